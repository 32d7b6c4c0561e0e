"""Peak memory of in-memory 3D prediction (`Model.predict`) for volumes of 1x, 4x and 16x a tile.

Every case runs in its own process (peak RSS = that process's ``VmHWM``). The volume is the
QCANet 8-cell embryo (``/work/shared/data/qcanet_embryo_3d``, 51x120x122, padded by reflection
to one tile) tiled 1x1x1, 1x2x2 and 2x4x2 times; the model is the benchmark's trained 3D model
(``bench_model.py``: the README's 3D example, trained here once). Three routes,
with the same tiles (one tile = the 1x volume, context ``model.halo()``):

* ``blocks``: ``Model.predict`` as it is now (``clustering="blocks"``): every tile clustered on
  its own, grown by the object halo, keeping the objects seeded in it
  (``embseg.blockwise.predict_labels_blockwise``);
* ``streamed``: ``Model.predict(clustering="global")``: tile by tile, only the clustering
  candidates kept, then one global clustering (``embseg.predict.predict_labels_streamed``);
* ``whole-raw`` (only with ``--routes``): the raw outputs of the whole volume (7 float32 maps),
  then ``cluster`` on them (``Model.predict_raw`` + ``Model.cluster``).

Reported per case: peak RSS, RSS before predicting (Python, torch, model and the input), the
input (the user's uint16 array and the float32 normalised copy that ``prepare`` makes), the
labels (uint32), and ``peak - baseline - labels``: the working memory of the prediction
itself. For the blocks route it stays at the network's working set for one block; for the
streamed route it adds the candidates (about 100 bytes per foreground voxel); for the whole-raw
route it grows by 28 bytes per voxel.

Usage::

    python benchmarks/predict_memory.py                 # prints a markdown section
    python benchmarks/predict_memory.py --json out.json # also the records
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path("/work/shared/data/qcanet_embryo_3d/train/images/8_cell_stage.tif")
TILE = (56, 128, 128)
FACTORS = {"1x": (1, 1, 1), "4x": (1, 2, 2), "16x": (2, 4, 2)}
ROUTES = ["blocks", "streamed"]


def vm(key: str) -> float:
    """``VmHWM`` or ``VmRSS`` of this process, MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def volume(factor: tuple[int, int, int]) -> np.ndarray:
    """The QCANet volume padded (reflect) to one tile, tiled ``factor`` times, uint16."""
    import tifffile

    if DATA.is_file():
        base = tifffile.imread(DATA).astype(np.uint16)
    else:  # synthetic fallback: bright balls on noise
        rng = np.random.default_rng(0)
        grid = np.indices((51, 120, 122))
        base = rng.normal(100, 20, grid.shape[1:])
        for c in rng.uniform((8, 20, 20), (43, 100, 102), (8, 3)):
            base[((grid - c.reshape(3, 1, 1, 1)) ** 2).sum(0) < 144] += 600
        base = base.astype(np.uint16)
    pad = [(0, max(t - n, 0)) for t, n in zip(TILE, base.shape, strict=True)]
    base = np.pad(base, pad, mode="reflect")[tuple(slice(0, t) for t in TILE)]
    return np.ascontiguousarray(np.tile(base, factor))


def load_model():
    from bench_model import qcanet_model_dir

    from embseg.model import load_model as load

    folder = qcanet_model_dir()
    return load(folder, device="cpu"), f"{folder.relative_to(ROOT)} (trained, bench_model.py)"


def run_case(route: str, name: str) -> dict:
    """One case in this process (called in a child process)."""
    import torch

    torch.set_num_threads(2)
    model, model_name = load_model()
    image = volume(FACTORS[name])
    rss_before = vm("VmRSS")
    t0 = time.perf_counter()
    if route in ("blocks", "streamed"):
        labels = model.predict(image, axes="ZYX", tile_shape=TILE, device="cpu",
                               clustering="blocks" if route == "blocks" else "global")
    else:
        raw = model.predict_raw(image, axes="ZYX", tile_shape=TILE, device="cpu")
        network = time.perf_counter() - t0
        labels = model.cluster(raw)
        del raw
    seconds = time.perf_counter() - t0
    split = {"network_s": network, "cluster_s": seconds - network} if route == "whole-raw" else {}
    peak = vm("VmHWM")
    return {
        "route": route, "case": name, "shape": list(image.shape), "voxels": int(image.size),
        "model": model_name, "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": rss_before,
        "input_mb": image.nbytes / 2**20, "normalised_mb": image.size * 4 / 2**20,
        "labels_mb": labels.nbytes / 2**20, "objects": int(labels.max()),
        "foreground": float((labels > 0).mean()), **split,
    }


def run_all(routes: list[str], cases: list[str], timeout: float = 900) -> list[dict]:
    """Every case in a fresh process (2 threads)."""
    from bench_model import qcanet_model_dir

    qcanet_model_dir()  # trained here first (once), not inside a measured case
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    records = []
    for route in routes:
        for name in cases:
            out = subprocess.run([sys.executable, __file__, "--case", route, name], capture_output=True,
                                 text=True, env=env, timeout=timeout, check=False)
            if out.returncode != 0:
                records.append({"route": route, "case": name, "error": out.stderr.strip().splitlines()[-1:]})
                continue
            records.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = records[-1]
            print(f"memory {route:9s} {name:3s} {tuple(r['shape'])}: peak {r['peak_rss_mb']:.0f} MB "
                  f"(before {r['rss_before_mb']:.0f}, labels {r['labels_mb']:.0f}) {r['seconds']:.1f} s",
                  flush=True)
    return records


def markdown(records: list[dict]) -> list[str]:
    ok = [r for r in records if "error" not in r]
    model = ok[0]["model"] if ok else "?"
    lines_split: list[dict] = []
    lines = [
        "## Memory: 3D prediction of 1x, 4x and 16x volumes",
        "",
        f"`python benchmarks/predict_memory.py` (run by `make bench`): `Model.predict` of the QCANet embryo "
        f"tiled 1x / 4x / 16x (uint16 input), model {model}, tiles {TILE} (one tile = the 1x volume, "
        "context 48), 2 threads, one process per case; peak RSS = `VmHWM`. *before* = RSS before predicting "
        "(Python, torch, model, the input array); *working* = peak − before − labels: what the prediction "
        "itself holds at its peak (the float32 normalised copy of the input, the network's tile or block, "
        "the raw outputs or the clustering candidates). Routes: *blocks* = `Model.predict` (default "
        "`clustering=\"blocks\"`: each tile clustered on its own with the object halo, seed ownership); "
        "*streamed* = `clustering=\"global\"` (all candidates clustered at once); *whole-raw* = raw "
        "outputs of the whole volume, then `cluster`.",
        "",
        "| route | volume | voxels | peak RSS (MB) | before (MB) | input uint16 + float32 copy (MB) | labels (MB) | working (MB) | working − float32 copy (MB) | objects | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['route']} | {r['case']} | – | ERROR {r['error']} |||||||| |")
            continue
        working = r["peak_rss_mb"] - r["rss_before_mb"] - r["labels_mb"]
        if "network_s" in r:
            lines_split.append(r)
        lines.append(
            f"| {r['route']} | {r['case']} {tuple(r['shape'])} | {r['voxels'] / 1e6:.1f} M | {r['peak_rss_mb']:.0f} | "
            f"{r['rss_before_mb']:.0f} | {r['input_mb']:.0f} + {r['normalised_mb']:.0f} | {r['labels_mb']:.0f} | "
            f"{working:.0f} | {working - r['normalised_mb']:.0f} | {r['objects']} | {r['seconds']:.1f} |"
        )
    lines.append("")
    if lines_split:
        lines.append("Post-processing vs network (the whole-raw cases, trained model, real foreground): " + "; ".join(
            f"{r['case']}: network {r['network_s']:.1f} s, clustering {r['cluster_s']:.2f} s "
            f"({r['cluster_s'] / r['network_s']:.0%} of the network)" for r in lines_split) + ".")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", nargs=2, metavar=("ROUTE", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--routes", default=",".join(ROUTES), help="blocks, streamed, whole-raw")
    parser.add_argument("--cases", default="1x,4x,16x")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return
    records = run_all(args.routes.split(","), args.cases.split(","))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print("\n".join(markdown(records)))


if __name__ == "__main__":
    main()
