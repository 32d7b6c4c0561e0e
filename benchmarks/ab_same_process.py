"""Same-process A/B timings of a switchable code path (alternated repetitions, min CPU time).

    .venv/bin/python benchmarks/ab_same_process.py cluster-trees   # one KD-tree vs two (threads)
    .venv/bin/python benchmarks/ab_same_process.py medoid-groups   # FFT grids per size class vs one

Uses the inputs built by ``run.py`` (``benchmarks/_work/inputs/full``). Each variant's output is
checked equal to the other's. Small changes drown in the machine's load swings between runs;
alternating the variants within one process compares them under the same load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import worker  # noqa: E402


def _variants(name: str):
    folder = HERE / "_work" / "inputs" / "full" / ("cluster_3d" if name == "cluster-trees" else "medoid")
    meta = json.loads((folder / "meta.json").read_text())
    if name == "cluster-trees":
        import embseg.cluster as module

        run, _ = worker.bench_cluster("ours", folder, meta)
        return run, {"one tree": lambda: setattr(module, "_SPLIT_TREE_MIN", 10**12),
                     "two trees": lambda: setattr(module, "_SPLIT_TREE_MIN", 100_000)}, time.perf_counter
    import embseg.centers as module

    run, _ = worker.bench_medoid("ours", folder, meta)
    return run, {"grids per size class": lambda: setattr(module, "_ONE_GROUP_MAX", 0),
                 "one grid up to 16 objects": lambda: setattr(module, "_ONE_GROUP_MAX", 16)}, time.process_time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("cluster-trees", "medoid-groups"))
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    run, variants, clock = _variants(args.what)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs = {}
    for rep in range(args.reps):
        for name in names if rep % 2 else names[::-1]:
            variants[name]()
            start = clock()
            outputs[name] = run()
            times[name].append(clock() - start)
    same = np.array_equal(outputs[names[0]], outputs[names[1]])
    for name in names:
        print(f"{name:28s} min {min(times[name]) * 1e3:7.1f} ms  median {np.median(times[name]) * 1e3:7.1f} ms")
    print(f"outputs equal: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
