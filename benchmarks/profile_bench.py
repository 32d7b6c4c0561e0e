"""Profile one benchmark workload of one implementation (cProfile and/or torch.profiler).

    .venv/bin/python benchmarks/profile_bench.py train_step_2d_256 [--quick] [--impl ours] [--torch]

Uses the inputs built by ``run.py`` (``benchmarks/_work/inputs``; built here if missing). For the
reference, run it with the reference environment's python (``--impl ref``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import worker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--impl", default="ours", choices=("ours", "ref"))
    parser.add_argument("--torch", action="store_true", help="torch.profiler operator table instead of cProfile")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    name = args.bench.removesuffix("_tta")
    folder = HERE / "_work" / "inputs" / ("quick" if args.quick else "full") / name
    if not (folder / "meta.json").exists():
        import inputs

        inputs.build(HERE / "_work" / "inputs", name, args.quick)
    meta = json.loads((folder / "meta.json").read_text())
    run, _ = worker.make(args.bench, args.impl, folder, meta)
    for _ in range(args.warmup):
        run()
    if args.torch:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            t0 = time.perf_counter()
            run()
            t = time.perf_counter() - t0
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    else:
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        run()
        pr.disable()
        t = time.perf_counter() - t0
        stats = pstats.Stats(pr)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)
    print(f"{args.bench} ({args.impl}): {t:.3f} s")


if __name__ == "__main__":
    main()
