"""embseg vs the original EmbedSeg 0.2.5, side by side: speed and peak memory.

Usage (from the repository root, with the project's environment)::

    make bench                                   # full suite -> benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --quick   # smoke run, small inputs
    .venv/bin/python benchmarks/run.py --only loss,cluster_2d

The reference environment is built on first use (``setup_reference.py``, idempotent). Inputs are
built once by ``inputs.py`` into ``benchmarks/_work/inputs`` and read by both implementations.
For every benchmark, one worker process per implementation (``worker.py``, run by that
implementation's python, 2 threads) sets the workload up and then runs single repetitions on
command; the driver alternates the two (ours, ref, ref, ours, ...), so that load from other
processes on a shared machine hits both alike. Reported: median time, ratio = reference / ours,
peak RSS of each worker process, and a check that both computed the same thing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
sys.path.insert(0, str(HERE))

import inputs  # noqa: E402
import predict_memory  # noqa: E402
import setup_reference  # noqa: E402

#: Hand-written analysis (what each change bought, what limits the targets still missed),
#: appended to the generated report so that a new run keeps it.
ANALYSIS = HERE / "RESULTS_analysis.md"
#: Records of the last memory benchmark (``predict_memory.py``), shown when a run skips it.
MEMORY_JSON = WORK / "memory-full.json"


@dataclass(frozen=True)
class Bench:
    name: str
    inputs: str
    what: str
    target: float | None
    reps: int
    warmup: int
    quick_reps: int = 2
    quick_warmup: int = 1


#: Fields: name, inputs, what, target ratio, repetitions, warm-up runs. The training steps get two
#: warm-up steps: our second step still grows the heap (≈ 29,000 page faults, 0.58 s against
#: 0.39 s from the third step on in 3D, ``benchmarks/RESULTS_analysis.md``, eleventh pass), a
#: transient that a training run of thousands of steps does not see; the reference gets the same.
BENCHES = [
    Bench("loss_2d", "loss_2d", "loss forward + backward, 2D", 10, 3, 0),
    Bench("loss_3d", "loss_3d", "loss forward + backward, 3D", 10, 5, 1),
    Bench("cluster_2d", "cluster_2d", "clustering, 2D", 20, 3, 1),
    Bench("cluster_3d", "cluster_3d", "clustering, 3D", 20, 5, 1),
    Bench("train_step_2d", "train_step_2d", "training step (net + loss + Adam), 2D", 2, 3, 2),
    Bench("train_step_2d_256", "train_step_2d_256", "training step, 2D, the reference's 256² crops", 2, 2, 2),
    Bench("train_step_3d", "train_step_3d", "training step (net + loss + Adam), 3D", 2, 4, 2),
    Bench("predict_2d", "predict_2d", "prediction, 2D, no TTA, random weights (nothing to cluster)", 3, 3, 1),
    Bench("predict_2d_tta", "predict_2d", "prediction, 2D, TTA (8 variants)", None, 1, 0, 1, 0),
    Bench("predict_3d", "predict_3d", "prediction, 3D, no TTA, random weights (nothing to cluster)", 3, 3, 1),
    Bench("predict_3d_tta", "predict_3d", "prediction, 3D, TTA (16 variants)", None, 2, 0, 1, 0),
    Bench("predict_2d_trained", "predict_2d_trained", "prediction (net + clustering), 2D, no TTA, trained model", 3, 3, 1),
    Bench("predict_3d_trained", "predict_3d_trained", "prediction (net + clustering), 3D, no TTA, trained model", 3, 3, 1),
    Bench("medoid", "medoid", "medoid centre images of training crops", 10, 3, 1),
    # Ours in bfloat16 autocast against the reference in float32 (it has no CPU mixed precision):
    # not at equal results, so no target and not in the ratios line's first part; run only on a
    # CPU that computes bfloat16 natively (embseg.predict.cpu_bf16_supported).
    Bench("train_step_2d_bf16", "train_step_2d", "training step, 2D, ours in bfloat16 (--cpu-amp)", None, 3, 2),
    Bench("train_step_3d_bf16", "train_step_3d", "training step, 3D, ours in bfloat16 (--cpu-amp)", None, 4, 2),
    Bench("predict_2d_trained_bf16", "predict_2d_trained", "prediction, 2D, trained model, ours in bfloat16 (--amp)",
          None, 3, 1),
    Bench("predict_3d_trained_bf16", "predict_3d_trained", "prediction, 3D, trained model, ours in bfloat16 (--amp)",
          None, 3, 1),
]

#: Keys of the final ``ratios:`` line, in order, and the benchmark each reports. End-to-end
#: prediction is that of a trained model (with a random network no seed reaches the threshold,
#: so nothing is clustered: those rows time the network alone and are listed after the ``|``).
RATIO_KEYS = [
    ("loss", "loss_2d"), ("cluster", "cluster_2d"), ("train_step_2d", "train_step_2d"),
    ("train_step_3d", "train_step_3d"), ("predict_2d", "predict_2d_trained"), ("predict_3d", "predict_3d_trained"),
    ("medoid", "medoid"),
]
EXTRA_KEYS = [
    ("loss_3d", "loss_3d"), ("cluster_3d", "cluster_3d"), ("train_step_2d_256", "train_step_2d_256"),
    ("predict_2d_random_weights", "predict_2d"), ("predict_3d_random_weights", "predict_3d"),
    ("predict_2d_tta", "predict_2d_tta"), ("predict_3d_tta", "predict_3d_tta"),
    ("train_step_2d_bf16", "train_step_2d_bf16"), ("train_step_3d_bf16", "train_step_3d_bf16"),
    ("predict_2d_bf16", "predict_2d_trained_bf16"), ("predict_3d_bf16", "predict_3d_trained_bf16"),
]


# -------------------------------------------------------------------------------------- workers
class Worker:
    """One implementation's worker process, driven over its stdin/stdout."""

    def __init__(self, impl: str, python: Path, bench: str, folder: Path, out_stem: Path, log: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONUNBUFFERED="1")
        cmd = [str(python), str(HERE / "worker.py"), "--serve", "--bench", bench, "--impl", impl,
               "--inputs", str(folder), "--out", str(out_stem), "--save-output"]
        self.impl = impl
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=WORK)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.flush()
            raise RuntimeError(f"{self.impl} worker died (exit {self.proc.returncode}); see {self.log.name}")
        return json.loads(line)

    def ready(self) -> dict:
        return self._read()

    def command(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_bench(bench: Bench, folder: Path, pythons: dict[str, Path], quick: bool,
              reps: int | None = None, warmup: int | None = None) -> dict:
    if reps is None:
        reps = bench.quick_reps if quick else bench.reps
    if warmup is None:
        warmup = bench.quick_warmup if quick else bench.warmup
    outdir = WORK / "out" / ("quick" if quick else "full")
    outdir.mkdir(parents=True, exist_ok=True)
    workers: dict[str, Worker] = {}
    try:
        for impl in ("ours", "ref"):  # set up one after the other (not timed)
            w = Worker(impl, pythons[impl], bench.name, folder, outdir / f"{bench.name}.{impl}",
                       outdir / f"{bench.name}.{impl}.log")
            workers[impl] = w
            w.ready()
        for impl in ("ours", "ref"):
            for _ in range(warmup):
                workers[impl].command("warmup")
        for i in range(reps):
            order = ("ours", "ref") if i % 2 == 0 else ("ref", "ours")
            for impl in order:
                workers[impl].command("run")
        records = {impl: w.command("finish") for impl, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    for impl, rec in records.items():
        rec["median"] = statistics.median(rec["times"])
        rec["output"] = str(outdir / f"{bench.name}.{impl}.npy")
    return records


# --------------------------------------------------------------------------------------- checks
def _contingency(a, b):
    import numpy as np

    a = a.astype(np.int64).ravel()
    b = b.astype(np.int64).ravel()
    pairs, counts = np.unique(a * (int(b.max()) + 1) + b, return_counts=True)
    ia, ib = pairs // (int(b.max()) + 1), pairs % (int(b.max()) + 1)
    size_a = np.bincount(a)
    size_b = np.bincount(b)
    keep = (ia > 0) & (ib > 0)
    ia, ib, counts = ia[keep], ib[keep], counts[keep]
    iou = counts / (size_a[ia] + size_b[ib] - counts)
    return ia, ib, iou, len(np.unique(a[a > 0])), len(np.unique(b[b > 0]))


def label_agreement(a, b, thresh: float) -> dict:
    """AP = TP / (TP + FP + FN) at IoU >= thresh (>= 0.5, so matches are unique), and whether the
    two label images are equal up to a permutation of the ids."""
    import numpy as np

    _, _, iou, na, nb = _contingency(a, b)
    tp = int((iou >= thresh).sum())
    denom = na + nb - tp
    same = bool(np.array_equal(a > 0, b > 0) and tp == na == nb and np.all(iou[iou >= thresh] == 1.0))
    return {"ap": (tp / denom) if denom else 1.0, "n_a": na, "n_b": nb, "identical_up_to_ids": same}


def medoid_differences(crops, ours, ref) -> tuple[int, int, int]:
    """Objects whose centre pixel differs between the two centre images, and how many of those
    are ties (both pixels have the same sum of distances within 1e-9 relative)."""
    import numpy as np
    from scipy.spatial.distance import cdist

    n_diff = n_ties = n_objects = 0
    for crop, a, b in zip(crops, ours, ref, strict=True):
        ids = np.unique(crop)
        n_objects += int((ids > 0).sum())
        if np.array_equal(a, b):
            continue
        for obj in np.unique(crop[a != b]):
            if obj == 0:
                continue
            inside = crop == obj
            pa, pb = np.argwhere(a & inside), np.argwhere(b & inside)
            n_diff += 1
            if len(pa) == 1 and len(pb) == 1:
                points = np.argwhere(inside).astype(float)
                sa = cdist(pa.astype(float), points).sum()
                sb = cdist(pb.astype(float), points).sum()
                n_ties += bool(abs(sa - sb) <= 1e-9 * max(sa, sb))
    return n_diff, n_ties, n_objects


def check(bench: Bench, folder: Path, records: dict) -> str:
    import numpy as np

    ours, ref = records["ours"], records["ref"]
    if bench.name.startswith("loss"):
        rel = abs(ours["value"] - ref["value"]) / max(abs(ref["value"]), 1e-12)
        return f"loss ours {ours['value']:.6g} / ref {ref['value']:.6g} (rel. diff {rel:.1e})"
    if bench.name.startswith("train_step"):
        return (f"same network (max |out diff| {ref.get('net_max_abs_diff', float('nan')):.1e}, "
                f"{ref.get('net_params')} params); last loss ours {ours['value']:.4f} / ref {ref['value']:.4f} "
                "(dropout masks differ)")
    a = np.load(ours["output"])
    b = np.load(ref["output"])
    if bench.name.startswith("cluster"):
        gt = np.load(folder / "labels.npy")
        agree = label_agreement(a, b, 0.9)
        vs_gt = label_agreement(gt, a, 0.5)
        same = "identical up to ids" if agree["identical_up_to_ids"] else "not identical"
        return (f"ours {agree['n_a']} / ref {agree['n_b']} objects, AP@0.9(ours vs ref) {agree['ap']:.4f}, {same}; "
                f"ours vs truth AP@0.5 {vs_gt['ap']:.3f} ({vs_gt['n_a']} true objects)")
    if bench.name.startswith("predict"):
        agree = label_agreement(a, b, 0.5)
        net = f"same network (max |out diff| {ref.get('net_max_abs_diff', float('nan')):.1e})"
        weights = "trained" if bench.name.removesuffix("_bf16").endswith("_trained") else "random weights"
        split = ours.get("extra_result")
        split = (f"; ours: network {split['network_s']:.3f} s + clustering {split['cluster_s']:.3f} s"
                 if split else "")
        return (f"{net}; {weights}: ours {agree['n_a']} / ref {agree['n_b']} objects, "
                f"AP@0.5(ours vs ref) {agree['ap']:.3f}{split}")
    if bench.name == "medoid":
        n_diff, n_ties, n_objects = medoid_differences(np.load(folder / "crops.npy"), a, b)
        extra, own = ref.get("extra_time"), ours.get("extra_time")
        note = f"; reference as called by its crop pipeline (ids of the whole image): {extra:.2f} s" if extra else ""
        note += f"; ours crop by crop (every medoid recomputed per crop): {own:.2f} s" if own else ""
        return (f"same medoid for {n_objects - n_diff}/{n_objects} objects; the {n_diff} others are exact ties "
                f"(equal sums of distances) in {n_ties} cases{note}")
    return ""


# -------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}"


def fmt_s(t: float) -> str:
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def write_report(path: Path, results: list[dict], command: str, started: str, elapsed: float,
                 load: tuple[tuple[float, ...], tuple[float, ...]], quick: bool, pending: list[str],
                 merged_from: Path | None = None, memory: dict | None = None) -> None:
    lines = [
        "# Benchmarks: embseg vs the original EmbedSeg 0.2.5",
        "",
        *([f"**Incomplete run: still to run {', '.join(pending)}.**", ""] if pending else []),
        f"- Date: {started} (UTC)" + (f"; wall time of the run {elapsed / 60:.1f} min" if elapsed == elapsed else "")
        + (" (--quick)" if quick else ""),
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Load average (1, 5, 15 min) at start {load[0]}, at end {load[1]} — the machine is shared, so "
        "absolute times are noisy; ratios come from repetitions of the two implementations alternated in "
        "the same run.",
        "- Both: torch 2.13.0 CPU, 2 threads (`torch.set_num_threads(2)`, `OMP_NUM_THREADS=2`), one worker "
        "process per implementation and benchmark (peak RSS = `VmHWM` of that process, which includes "
        "~250 MB for Python + torch + inputs; `ru_maxrss` is not used since Linux carries it over `exec` "
        "from the driver).",
        *([f"- Merged: rows not run by this command come from an earlier run (`{merged_from.name}`); each "
           "row's own run is listed under the table."] if merged_from else []),
        "- Reference: embedseg 0.2.5 (sdist, numpy<2, its own venv, `benchmarks/setup_reference.py`), run "
        "for measurement only.",
        "",
        "| benchmark | workload | ours median (s) | ref median (s) | ratio ref/ours | ratio of minima | target | ours peak RSS (MB) | ref peak RSS (MB) | reps | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['desc']} | – | – | – | – | – | – | – | – | ERROR: {r['error']} |")
            continue
        o, f = r["ours"], r["ref"]
        target = f"≥{r['target']:g}×" if r["target"] else "–"
        if r["target"]:
            target += " ✓" if r["ratio"] >= r["target"] else " ✗"
        lines.append(
            f"| {r['name']} | {r['desc']} | {fmt_s(o['median'])} | {fmt_s(f['median'])} | **{r['ratio']:.2f}×** | "
            f"{min(f['times']) / min(o['times']):.2f}× | {target} | {o['peak_rss_mb']:.0f} | {f['peak_rss_mb']:.0f} | {len(o['times'])} | {r['check']} |"
        )
    lines += [
        "",
        "All times per repetition (s):",
        "",
    ]
    for r in results:
        if "error" not in r:
            lines.append(f"- {r['name']}: ours {[round(t, 3) for t in r['ours']['times']]}, "
                         f"ref {[round(t, 3) for t in r['ref']['times']]}")
    runs = sorted({(r["run"]["started"], r["run"]["command"]) for r in results if "run" in r})
    if len(runs) > 1:
        lines += ["", "Runs:", ""]
        for started_at, cmd in runs:
            names = [r["name"] for r in results if r.get("run", {}).get("started") == started_at]
            wall = {r["run"].get("wall_min") for r in results if r.get("run", {}).get("started") == started_at} - {None}
            wall_text = f" ({max(wall):.1f} min)" if wall else ""
            lines.append(f"- {started_at} UTC, `{cmd}`{wall_text}: {', '.join(names)}")
    lines += ["", "Load average before / after each benchmark: " + "; ".join(
        f"{r['name']} {r['run']['load_before'][0]}/{r['run']['load_after'][0]}" for r in results if "run" in r)]
    if memory and memory.get("records"):
        lines += ["", *predict_memory.markdown(memory["records"]),
                  f"(memory run of {memory.get('started', '?')} UTC)", ""]
    if ANALYSIS.is_file():
        lines += ["", ANALYSIS.read_text().rstrip(), ""]
    lines += ["", "## What is measured", ""] + [f"- {t}" for t in NOTES] + [""]
    path.write_text("\n".join(lines))


NOTES = [
    "**Inputs** are built once (`benchmarks/inputs.py`) and read by both implementations from `.npy` files. "
    "Raw network outputs are stored in our channel order ((z,)y,x); the reference worker reverses the offset "
    "and sigma blocks (it is x-first). Grid: 2D step 1/1023 (the reference's grid 1024, pixel 1); 3D QCANet "
    "(anisotropy 2.18) with the reference's notebook grid (Z rounded up to 8, Y = X = largest extent rounded "
    "up to 8, `pixel_z = (n_z-1)/(n_x-1)·anisotropy`) and our step set to the same spacing.",
    "**loss_2d / loss_3d**: forward + backward of the loss alone on the same synthetic raw outputs "
    "(offsets towards each object's medoid with 2 px noise, sigma for 0.8× the equivalent radius, "
    "seed high at the centre), the same label crops (densest 256² windows of the DSB train images; "
    "object-centred QCANet crops) and the same medoid centres (ours as an id image, the reference "
    "as a bool image). Foreground weight 10 (2D) and #bg/#fg of the QCANet mask (3D).",
    "**cluster_2d / cluster_3d**: clustering of ideal-with-noise raw outputs (0.7 px offset noise, radius "
    "0.6× the equivalent radius, at least 3 px) built from tiled real masks (2×2 densest 512² DSB "
    "windows; QCANet 8-cell embryo tiled in Y and X, padded to 64×256×256). seed_thresh 0.9, fg_thresh 0.5 "
    "(the reference ignores fg_thresh in 2D: 0.5 is its fixed value), min size: reference "
    "`min_object_size=10` ('>'), ours `min_size=11` ('>='). The check compares our labels with the "
    "reference's (AP at IoU 0.9, and exact equality up to a permutation of ids) and with the truth.",
    "The clustering check is exact up to one object on cluster_2d: ours counts the seed pixel as "
    "unclustered in the 'more than half unclustered' test, the reference marks it clustered first "
    "(documented in `embseg.cluster.cluster`); at exactly half, ours accepts a proposal the reference "
    "rejects (1 of 1056 objects here).",
    "**train_step_***: one optimiser step: network forward on a batch of object-centred crops, loss, "
    "backward, Adam (lr 5e-4, weight decay 1e-4), train mode (dropout on). Same weights: ours, copied into "
    "the reference network by order of equally shaped state-dict entries, decoder A's output channels "
    "permuted to x-first; a forward check asserts both networks give the same outputs.",
    "**predict_***: end-to-end prediction of a normalised image with the same random-init weights (eval mode): "
    "ours `embseg.predict.predict_labels` (whole image, reflect padding to multiples of 8), the reference "
    "`EmbedSeg.test.predict` / `predict_3d` with `cluster_fast=True` (its `.cuda()` calls patched to "
    "identity on CPU). 2D: Usiigaci set1 (1022×1024, padded to 1024²); 3D: the QCANet volume 51×120×122. "
    "With random weights no seed reaches 0.9, so these time the network, TTA and the clustering set-up.",
    "**predict_*_trained**: the same end-to-end prediction with a trained network, so that there are "
    "objects to cluster (the figure a user waits for; the `predict_2d` / `predict_3d` keys of the ratios "
    "line). 2D: the shipped `nuclei-2d` model on a 1024² mosaic of the four densest 520×696 DSB *test* "
    "images (each normalised on its own), its own thresholds (seed 0.9, foreground 0.5, min size 21; the "
    "reference `min_object_size` 20); 3D: the benchmark's QCANet model (`bench_model.py`: "
    "`configs/qcanet-3d.yaml`, 12 min of training, trained once by `make bench` when missing) on the "
    "embryo tiled 1×2×2 (51×240×244), its tuned thresholds (`config.json`; seed 0.5, foreground 0.4, min size 1024), the "
    "reference grid the volume rounded up to 8 with the pixel size giving the model's step. The check "
    "gives our split of the time into network (`predict_raw`) and clustering (`cluster`), best of 2, "
    "measured after the repetitions.",
    "**medoid**: centre images (exact medoid) of object-centred 96² crops of the first DSB train images "
    "(one crop per object, as the reference's crop generation): reference `generate_center_image` per crop "
    "(given the ids present in the crop); ours as its training data pipeline computes them "
    "(`embseg.data.ObjectTable`: each object's whole-object medoid once, batched per image, reused by "
    "every crop that holds the object whole; objects cut by a crop border get the medoid of their "
    "visible part, as the reference computes it). Both give the centre image of every crop. The "
    "reference's own pipeline passes all ids of the whole image to every crop, and ours crop by crop "
    "(`object_centers` + `center_image` per crop): those variants' times are given in the check column.",
    "**Targets** (ratio ref/ours): loss ≥10×, clustering ≥20×, training step ≥2×, prediction without "
    "TTA ≥3×, medoid ≥10×.",
]


def merged(kept: list[dict], new: list[dict]) -> list[dict]:
    """``kept`` with the entries of ``new`` replacing those of the same name, in suite order."""
    by_name = {r["name"]: r for r in kept}
    by_name.update({r["name"]: r for r in new})
    order = [b.name for b in BENCHES]
    return sorted(by_name.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))


def select(names: str | None) -> list[Bench]:
    from embseg.predict import cpu_bf16_supported

    suite = [b for b in BENCHES if cpu_bf16_supported() or not b.name.endswith("_bf16")]
    if not names:
        return suite
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        exact = [b for b in BENCHES if b.name == name]
        group = exact or [b for b in BENCHES if b.name.startswith(name + "_") or b.name.startswith(name)]
        if not group:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(b.name for b in BENCHES)}")
        chosen += [b for b in group if b not in chosen]
    return [b for b in suite if b in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description="embseg vs EmbedSeg 0.2.5 benchmarks")
    parser.add_argument("--quick", action="store_true", help="small inputs, fewer repetitions (smoke run)")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names or prefixes (e.g. loss,cluster_2d)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report path (default: benchmarks/RESULTS.md for a full run of all benchmarks, "
                             "else benchmarks/_work/RESULTS-<quick|partial>.md)")
    parser.add_argument("--merge", type=Path, default=None,
                        help="results JSON of an earlier run (benchmarks/_work/results-*.json): the benchmarks run "
                             "now replace theirs, the others are kept, and the report covers all")
    parser.add_argument("--render", type=Path, default=None,
                        help="only write the report (--output, default benchmarks/RESULTS.md) from a results JSON")
    parser.add_argument("--reps", type=int, default=None, help="override the repetitions of every benchmark")
    parser.add_argument("--warmup", type=int, default=None, help="override the warm-up runs of every benchmark")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory benchmark (predict_memory.py; part of a full run, or --only memory)")
    args = parser.parse_args()
    names = [n.strip() for n in (args.only or "").split(",") if n.strip()]
    run_memory = not args.no_memory and not args.quick and (not names or "memory" in names)
    names = [n for n in names if n != "memory"]
    only_memory = bool(args.only) and not names
    last_memory = json.loads(MEMORY_JSON.read_text()) if MEMORY_JSON.is_file() else None

    if args.render is not None:
        results = json.loads(args.render.read_text())
        runs = [r["run"] for r in results if "run" in r]
        first = min(runs, key=lambda r: r["started"]) if runs else {"started": "?", "command": "?"}
        out = args.output or HERE / "RESULTS.md"
        write_report(out, results, first["command"], first["started"], float("nan"),
                     (tuple(first.get("load_before", ())), tuple(runs[-1].get("load_after", ()) if runs else ())),
                     False, pending=[], merged_from=None, memory=last_memory)
        print(f"report: {out}")
        return
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t_start = time.monotonic()
    load0 = tuple(round(x, 2) for x in os.getloadavg())
    command = "make bench" if not (args.quick or args.only) and os.environ.get("MAKELEVEL") else \
        " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])
    benches = [] if only_memory else select(",".join(names) or None)
    pythons = {"ours": Path(sys.executable), "ref": setup_reference.build()}
    root = WORK / "inputs"
    if args.output is not None:
        out = args.output
    elif not args.quick and not args.only:
        out = HERE / "RESULTS.md"
    else:
        out = WORK / f"RESULTS-{'quick' if args.quick else 'partial'}.md"
    results: list[dict] = []
    kept: list[dict] = json.loads(args.merge.read_text()) if args.merge else []
    elapsed = 0.0
    for bench in benches:
        t0 = time.monotonic()
        load_bench = tuple(round(x, 2) for x in os.getloadavg())
        entry = {"name": bench.name, "desc": bench.what, "target": bench.target}
        try:
            folder = inputs.build(root, bench.inputs, args.quick)
            meta = json.loads((folder / "meta.json").read_text())
            entry["desc"] = f"{bench.what}: {meta.get('desc', '')}"
            records = run_bench(bench, folder, pythons, args.quick, args.reps, args.warmup)
            entry.update(records)
            entry["ratio"] = records["ref"]["median"] / records["ours"]["median"]
            entry["check"] = check(bench, folder, records)
            print(f"{bench.name:18s} ours {records['ours']['median']:8.3f} s  ref {records['ref']['median']:8.3f} s  "
                  f"ratio {entry['ratio']:7.2f}x  rss {records['ours']['peak_rss_mb']:.0f}/"
                  f"{records['ref']['peak_rss_mb']:.0f} MB  [{time.monotonic() - t0:.0f} s]  {entry['check']}",
                  flush=True)
        except Exception as exc:  # report and go on with the other benchmarks
            entry["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{bench.name:18s} ERROR {entry['error']}", flush=True)
        entry["run"] = {"started": started, "command": command, "load_before": load_bench,
                        "load_after": tuple(round(x, 2) for x in os.getloadavg())}
        results.append(entry)
        # the report is rewritten after every benchmark, so that an interrupted run leaves one
        elapsed = time.monotonic() - t_start
        load1 = tuple(round(x, 2) for x in os.getloadavg())
        combined = merged(kept, results)
        write_report(out, combined, command, started, elapsed, (load0, load1), args.quick,
                     pending=[b.name for b in benches[len(results):]], merged_from=args.merge,
                     memory=last_memory)
        # a partial run (--only) never replaces the full run's results
        kind = "quick" if args.quick else ("partial" if args.only and not args.merge else "full")
        (WORK / f"results-{kind}.json").write_text(json.dumps(combined, indent=1))
    if run_memory:
        memory_started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        last_memory = {"started": memory_started, "records": predict_memory.run_all(
            predict_memory.ROUTES, list(predict_memory.FACTORS))}
        MEMORY_JSON.write_text(json.dumps(last_memory, indent=1))
        elapsed = time.monotonic() - t_start
        load1 = tuple(round(x, 2) for x in os.getloadavg())
        if only_memory and out == WORK / "RESULTS-partial.md" and (WORK / "results-full.json").is_file():
            kept = kept or json.loads((WORK / "results-full.json").read_text())
        write_report(out, merged(kept, results), command, started, elapsed, (load0, load1), args.quick,
                     pending=[], merged_from=args.merge, memory=last_memory)
    results = merged(kept, results)
    by_name = {r["name"]: r for r in results if "ratio" in r}

    def ratio(name: str) -> str:
        return f"{by_name[name]['ratio']:.2f}x" if name in by_name else "n/a"

    parts = [f"{key}={ratio(name)}" for key, name in RATIO_KEYS]
    extra = [f"{key}={ratio(name)}" for key, name in EXTRA_KEYS if name in by_name]
    print(f"report: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}  ({elapsed / 60:.1f} min)")
    print("ratios: " + " ".join(parts) + (" | " + " ".join(extra) if extra else ""))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
