"""GPU figures (issue #5, item 5): training memory of a DSB-sized model, step times, and
end-to-end prediction throughput in 2D and 3D, on whatever device is given.

Everything runs on the sample images shipped in the package (``embseg.samples``: three DSB2018
nuclei images and the QCANet 8-cell embryo), so it needs neither ``../shared/data`` nor a
download: a GPU machine needs only this checkout and a CUDA build of torch. Training batches
are cut by the product's own data pipeline (:class:`embseg.data.TrainingCrops`, medoid centres)
before the clock starts; each step is what ``embseg train`` does (its layout, fused Adam,
autocast and, in float16, the gradient scaler). Prediction is ``Model.predict_raw`` (tiling,
inference mode, autocast) then ``Model.cluster``, timed apart, on volumes tiled from the sample.

Memory on CUDA is ``torch.cuda.max_memory_allocated`` (tensors: weights, optimizer state,
activations, the loss) and ``max_memory_reserved`` (what torch's caching allocator holds from
the driver) over the timed steps; the CUDA context (≈ 0.5 GB) comes on top of both. On a CPU the
memory columns are empty (see ``benchmarks/RESULTS.md`` for the CPU's peak RSS).

Usage::

    python benchmarks/gpu.py --output benchmarks/RESULTS_gpu.md             # cuda when present
    python benchmarks/gpu.py --model-3d benchmarks/_work/models/qcanet-3d   # a trained 3D model
    python benchmarks/gpu.py --device cpu --quick --output /tmp/gpu.md      # the same code, small

Without ``--model-3d`` the 3D network has random weights: its outputs seed no objects, so the
3D rows then time the network (and an empty clustering) only, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # a checkout without an install (a GPU machine)

from embseg.config import ModelConfig  # noqa: E402
from embseg.data import TrainingCrops, dataset_properties  # noqa: E402
from embseg.embedding import grid_step  # noqa: E402
from embseg.io import atomic_write  # noqa: E402
from embseg.loss import spatial_embedding_loss  # noqa: E402
from embseg.model import Model, build_network, load_model, select_device  # noqa: E402
from embseg.predict import autocast_dtype  # noqa: E402
from embseg.samples import sample  # noqa: E402
from embseg.training import make_optimizer, training_memory_format  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_allocated_mb": None, "peak_reserved_mb": None}
    return {"peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}


def precision_name(device: torch.device, amp: bool) -> str:
    dtype = autocast_dtype(device, amp)
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


# ------------------------------------------------------------------------------------- training
def training_data(ndim: int) -> tuple[ModelConfig, list[np.ndarray], list[np.ndarray]]:
    """A model config and normalised sample images with their masks, as training sees them."""
    if ndim == 2:
        config = load_model("nuclei-2d", device="cpu").config
        names = ["dsb-dense", "dsb-clustered", "dsb-large"]
    else:
        s = sample("qcanet-3d")
        config = ModelConfig(ndim=3, grid_step=list(grid_step(3, s.anisotropy)), anisotropy=s.anisotropy)
        names = ["qcanet-3d"]
    model = Model(config, build_network(config))
    samples = [sample(n) for n in names]
    images = [model.prepare(s.image, s.axes, source=s.name) for s in samples]
    return config, images, [s.mask.astype(np.int64) for s in samples]


def bench_training(ndim: int, crop: tuple[int, ...], batch: int, amp: bool, device: torch.device,
                   steps: int, warmup: int) -> dict:
    """Median step time and peak memory of ``steps`` training steps after ``warmup`` ones."""
    config, images, masks = training_data(ndim)
    props = dataset_properties(masks, ndim)
    spacing = tuple(s / config.grid_step[-1] for s in config.grid_step)
    crops = TrainingCrops(images, masks, crop_size=crop, samples_per_epoch=batch * (steps + warmup),
                          center_method="medoid", spacing=spacing, seed=0)
    loader = torch.utils.data.DataLoader(crops, batch_size=batch, shuffle=False, drop_last=True)
    batches = list(loader)  # cut before the clock starts
    torch.manual_seed(0)
    memory_format = training_memory_format(device, ndim)
    net = build_network(config).to(device).to(memory_format=memory_format)
    net.train()
    optimizer = make_optimizer(net, 5e-4, 1e-4, device)
    amp_dtype = autocast_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    step_t = torch.tensor(config.grid_step, dtype=torch.float32, device=device)
    fg_weight = float(props["fg_weight"])
    times: list[float] = []
    reset_peak(device)
    for i, b in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        image = b["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        instances = b["instances"].to(device, non_blocking=True)
        centers = b["centers"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            raw = net(image)
        loss, _ = spatial_embedding_loss(raw.float(), instances, centers, step_t, fg_weight=fg_weight)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        float(loss.detach())  # the host sync the training loop's log makes
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"kind": "train", "ndim": ndim, "batch": batch, "crop": list(crop),
            "precision": precision_name(device, amp), "step_s": step_s, "times": times,
            "crops_per_s": batch / step_s, **peak_mb(device)}


# ------------------------------------------------------------------------------------ prediction
def prediction_model(ndim: int, model_3d: Path | None, device: torch.device) -> tuple[Model, str]:
    if ndim == 2:
        return load_model("nuclei-2d", device=str(device)), "shipped nuclei-2d"
    if model_3d is not None:
        return load_model(model_3d, device=str(device)), f"trained ({model_3d.name})"
    config, _, _ = training_data(3)
    net = build_network(config).eval().to(device)
    return Model(config, net), "random weights (no objects: network time only)"


def test_volume(ndim: int, reps: tuple[int, ...]) -> np.ndarray:
    """A sample image tiled ``reps`` times along each axis (its mirror every other time, so the
    seams stay continuous)."""
    s = sample("dsb-dense" if ndim == 2 else "qcanet-3d")
    image = s.image
    for axis, n in enumerate(reps):
        flips = [image if k % 2 == 0 else np.flip(image, axis) for k in range(n)]
        image = np.concatenate(flips, axis=axis)
    return np.ascontiguousarray(image)


def bench_prediction(ndim: int, reps: tuple[int, ...], amp: bool, device: torch.device, model: Model,
                     weights: str, repeats: int) -> dict:
    """Network and clustering time, objects and peak memory of predicting one tiled image."""
    raw_image = test_volume(ndim, reps)
    data = model.prepare(raw_image, "YX" if ndim == 2 else "ZYX")
    net_s, cluster_s = [], []
    labels = None
    model.predict_raw(data, normalized=True, device=str(device), amp=amp)  # warm-up (cudnn, numba)
    sync(device)
    reset_peak(device)
    for _ in range(repeats):
        t0 = time.perf_counter()
        raw = model.predict_raw(data, normalized=True, device=str(device), amp=amp)
        sync(device)
        t1 = time.perf_counter()
        labels = model.cluster(raw)
        cluster_s.append(time.perf_counter() - t1)
        net_s.append(t1 - t0)
        del raw
    n = int(np.prod(data.shape[1:]))
    total = min(net_s) + min(cluster_s)
    return {"kind": "predict", "ndim": ndim, "shape": list(data.shape[1:]), "voxels": n,
            "precision": precision_name(device, amp), "weights": weights,
            "tile": list(model.auto_tile_shape(tuple(data.shape[1:])) or data.shape[1:]),
            "network_s": min(net_s), "cluster_s": min(cluster_s), "total_s": total,
            "voxels_per_s": n / total, "objects": int(labels.max()) if labels is not None else 0,
            **peak_mb(device)}


# ---------------------------------------------------------------------------------------- report
def describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                f"CUDA {torch.version.cuda}, torch {torch.__version__}")
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def fmt(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def report(rows: list[dict], device: torch.device, command: str, elapsed: float) -> str:
    lines = ["# GPU figures: embseg training memory and prediction throughput", "",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} (UTC); wall time {elapsed / 60:.1f} min",
             f"- Command: `{command}`", f"- Device: {describe(device)}", "",
             "## Training (one step: network forward/backward, loss, fused Adam)", "",
             "| data | batch × crop | precision | step (median) | crops/s | peak allocated | peak reserved |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "train":
            data = "DSB2018 samples (2D)" if r["ndim"] == 2 else "QCANet sample (3D)"
            lines.append(f"| {data} | {r['batch']} × {'×'.join(map(str, r['crop']))} | {r['precision']} | "
                         f"{r['step_s'] * 1000:.1f} ms | {r['crops_per_s']:.0f} | {fmt(r['peak_allocated_mb'])} MB | "
                         f"{fmt(r['peak_reserved_mb'])} MB |")
    lines += ["", "## Prediction (one image, end to end after normalisation)", "",
              "| image | weights | precision | tile | network | clustering | voxels/s | objects | peak allocated |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "predict":
            lines.append(f"| {'×'.join(map(str, r['shape']))} ({r['voxels'] / 1e6:.1f} M) | {r['weights']} | "
                         f"{r['precision']} | {'×'.join(map(str, r['tile']))} | {r['network_s']:.3f} s | "
                         f"{r['cluster_s']:.3f} s | {r['voxels_per_s'] / 1e6:.2f} M | {r['objects']} | "
                         f"{fmt(r['peak_allocated_mb'])} MB |")
    lines += ["", "Memory excludes the CUDA context. Times are medians (training) or minima (prediction) "
              "after a warm-up.", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    with atomic_write(path, overwrite=True) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS_gpu.md")
    parser.add_argument("--model-3d", type=Path, default=None, help="a trained 3D model folder")
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps (tests, CPU)")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what embseg train sets on CUDA
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.monotonic()
    if args.quick:
        train_cases = [(2, (64, 64), 2), (3, (16, 48, 48), 1)]
        predict_cases = [(2, (1, 1)), (3, (1, 1, 1))]
        steps, warmup, repeats = 2, 1, 1
    else:
        # 16 × 256²: the original's DSB recipe (the paper's 1.3 GB); 16 × 96²: ours; 3D: the QCANet recipe
        train_cases = [(2, (256, 256), 16), (2, (96, 96), 16), (3, (32, 96, 96), 4)]
        # 1024² in 2D; 3D: 0.75 M, 24 M and 96 M voxels
        predict_cases = [(2, (4, 4)), (3, (1, 1, 1)), (3, (2, 4, 4)), (3, (4, 8, 4))]
        steps, warmup, repeats = 20, 5, 3
    amps = [False, True] if device.type == "cuda" or autocast_dtype(device, True) is not None else [False]
    rows: list[dict] = []
    for ndim, crop, batch in train_cases:
        for amp in amps:
            rows.append(bench_training(ndim, crop, batch, amp, device, steps, warmup))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "times"}), flush=True)
    models = {2: prediction_model(2, None, device), 3: prediction_model(3, args.model_3d, device)}
    for ndim, reps in predict_cases:
        model, weights = models[ndim]
        for amp in amps:
            rows.append(bench_prediction(ndim, reps, amp, device, model, weights, repeats))
            print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    elapsed = time.monotonic() - started
    write_atomic(args.output, report(rows, device, command.strip(), elapsed))
    write_atomic(args.output.with_suffix(".json"),
                 json.dumps({"device": describe(device), "command": command.strip(), "rows": rows}, indent=1))
    print(f"wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
