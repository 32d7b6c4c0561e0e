"""One benchmark workload of one implementation, in its own process.

Run by the project's python (``--impl ours``) or by the reference environment's python
(``--impl ref``); it must not import ``embseg`` in the latter. Reads the shared inputs from
``--inputs`` (written by ``inputs.py``), runs ``--warmup`` untimed and ``--reps`` timed
repetitions with 2 threads, and writes a JSON file (``--out``) with the times, the peak RSS of
the process (``ru_maxrss``), the RSS before the workload, and check values. Large outputs for the
cross-checks (labels, centres) go next to it as ``.npy``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process image: ``VmHWM`` (falls back to ``ru_maxrss``).

    ``ru_maxrss`` is not used first because Linux carries it over ``execve``: a worker started
    from a driver holding 1 GB would report at least 1 GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(folder: Path, name: str) -> np.ndarray:
    return np.load(folder / f"{name}.npy")


def vector_perm(ndim: int) -> list[int]:
    """Channel permutation between our raw layout and the reference's (an involution)."""
    block = list(range(ndim))[::-1]
    return block + [ndim + i for i in block] + [2 * ndim]


# ------------------------------------------------------------------------------ reference side
class Ref:
    """Adapters to the original EmbedSeg 0.2.5 (reference venv only)."""

    def __init__(self) -> None:
        sys.path.insert(0, str(HERE))
        import ref_compat

        ref_compat.prepare()

    @staticmethod
    def raw(raw_ours: np.ndarray, ndim: int) -> torch.Tensor:
        axis = 1 if raw_ours.ndim == ndim + 2 else 0
        return torch.from_numpy(np.ascontiguousarray(np.take(raw_ours, vector_perm(ndim), axis=axis)))

    @staticmethod
    def criterion(meta: dict):
        if meta["ndim"] == 2:
            from EmbedSeg.criterions.my_loss import SpatialEmbLoss

            gy, gx = meta["ref_grid"]
            py, px = meta["ref_pixel"]
            return SpatialEmbLoss(grid_y=gy, grid_x=gx, pixel_y=py, pixel_x=px, one_hot=False,
                                  n_sigma=2, foreground_weight=meta["fg_weight"])
        from EmbedSeg.criterions.my_loss_3d import SpatialEmbLoss_3d

        gz, gy, gx = meta["ref_grid"]
        pz, py, px = meta["ref_pixel"]
        return SpatialEmbLoss_3d(grid_z=gz, grid_y=gy, grid_x=gx, pixel_z=pz, pixel_y=py, pixel_x=px,
                                 one_hot=False, n_sigma=3, foreground_weight=meta["fg_weight"])

    @staticmethod
    def clusterer(meta: dict):
        from EmbedSeg.utils.utils import Cluster, Cluster_3d

        if meta["ndim"] == 2:
            gy, gx = meta["ref_grid"]
            py, px = meta["ref_pixel"]
            return Cluster(gy, gx, py, px, "cpu")
        gz, gy, gx = meta["ref_grid"]
        pz, py, px = meta["ref_pixel"]
        return Cluster_3d(gz, gy, gx, pz, py, px, "cpu")

    @staticmethod
    def network(folder: Path, ndim: int) -> tuple[torch.nn.Module, dict]:
        """The reference network with OUR saved weights (copied by order of equally shaped
        entries; decoder A's output channels permuted to the reference's x-first order), and a
        check that its outputs equal ours (modulo that channel order)."""
        if ndim == 2:
            from EmbedSeg.models.BranchedERFNet import BranchedERFNet

            net = BranchedERFNet(num_classes=[4, 1], input_channels=1)
        else:
            from EmbedSeg.models.BranchedERFNet_3d import BranchedERFNet_3d

            net = BranchedERFNet_3d(num_classes=[6, 1], input_channels=1)
        info = Ref._load_ours(net, folder / "net_check.pt", ndim)
        net.eval()
        x = torch.from_numpy(load(folder, "net_check_in"))
        with torch.no_grad():
            y = net(x).numpy()
        expected = np.take(load(folder, "net_check_out"), vector_perm(ndim), axis=1)
        err = float(np.abs(y - expected).max())
        if err > 1e-4:
            raise RuntimeError(f"reference network with our weights differs from ours: max |diff| = {err}")
        info["net_max_abs_diff"] = err
        info["net_params"] = int(sum(p.numel() for p in net.parameters()))
        Ref._load_ours(net, folder / "net.pt", ndim)
        return net, info

    @staticmethod
    def _load_ours(net: torch.nn.Module, path: Path, ndim: int) -> dict:
        ours = torch.load(path, map_location="cpu")
        ours_items = list(ours.items())
        ref_state = net.state_dict()
        copied, skipped, k = 0, [], 0
        new_state = {}
        for name, value in ref_state.items():
            if k < len(ours_items) and tuple(ours_items[k][1].shape) == tuple(value.shape):
                new_state[name] = ours_items[k][1].clone()
                k += 1
                copied += 1
            else:
                new_state[name] = value
                skipped.append(name)
        if k != len(ours_items):
            raise RuntimeError(f"could not map our state dict onto the reference: stuck at {ours_items[k][0]}")
        perm = vector_perm(ndim)[: 2 * ndim]
        w = new_state["decoders.0.output_conv.weight"]  # ConvTranspose: (in, out, *k)
        b = new_state["decoders.0.output_conv.bias"]
        new_state["decoders.0.output_conv.weight"] = w[:, perm].clone()
        new_state["decoders.0.output_conv.bias"] = b[perm].clone()
        net.load_state_dict(new_state)
        return {"weights_copied": copied, "ref_entries_skipped": skipped}


# ----------------------------------------------------------------------------------- workloads
def _warm_up_loss() -> None:
    """Our loss kernel compiled (first run after an install, ≈13 s) or loaded from numba's cache
    before anything is timed, as `embseg train` does while it reads its data."""
    from embseg import loss_kernel

    if loss_kernel.AVAILABLE:
        loss_kernel.warm_up()


def bench_loss(impl: str, folder: Path, meta: dict):
    ndim = meta["ndim"]
    raw_np = load(folder, "raw")
    instances_np = load(folder, "instances")
    centers_np = load(folder, "centers")
    if impl == "ref":
        ref = Ref()
        crit = ref.criterion(meta)
        raw0 = ref.raw(raw_np, ndim)
        instances = torch.from_numpy(instances_np.astype(np.int16))
        labels = instances > 0
        center_images = torch.from_numpy(centers_np > 0)

        def run():
            raw = raw0.clone().requires_grad_(True)
            loss = crit(raw, instances, labels, center_images, w_inst=1, w_var=10, w_seed=1)
            loss.backward()
            return float(loss.detach())
    else:
        from embseg.allocator import reuse_freed_memory
        from embseg.loss import spatial_embedding_loss

        reuse_freed_memory()  # the malloc thresholds the loss runs under in embseg.training.train
        _warm_up_loss()
        raw0 = torch.from_numpy(raw_np)
        instances = torch.from_numpy(instances_np.astype(np.int64))
        centers = torch.from_numpy(centers_np.astype(np.int64))
        step = tuple(meta["step"])

        def run():
            raw = raw0.clone().requires_grad_(True)
            loss, _ = spatial_embedding_loss(raw, instances, centers, step, fg_weight=meta["fg_weight"])
            loss.backward()
            return float(loss.detach())

    return run, {}


def bench_cluster(impl: str, folder: Path, meta: dict):
    ndim = meta["ndim"]
    raw_np = load(folder, "raw")
    if impl == "ref":
        ref = Ref()
        cl = ref.clusterer(meta)
        raw = ref.raw(raw_np, ndim)

        def run():
            with torch.no_grad():
                return cl.cluster(raw, n_sigma=ndim, seed_thresh=meta["seed_thresh"],
                                  fg_thresh=meta["fg_thresh"], min_mask_sum=0, min_unclustered_sum=0,
                                  min_object_size=meta["ref_min_object_size"]).numpy()
    else:
        from embseg.cluster import cluster

        raw = torch.from_numpy(raw_np)

        def run():
            return cluster(raw, tuple(meta["step"]), seed_thresh=meta["seed_thresh"],
                           fg_thresh=meta["fg_thresh"], min_size=meta["min_size"])

    return run, {}


def _ours_network(folder: Path, ndim: int) -> torch.nn.Module:
    from embseg.net import BranchedERFNet

    net = BranchedERFNet(ndim, 1)
    net.load_state_dict(torch.load(folder / "net.pt", map_location="cpu"))
    return net


def bench_train_step(impl: str, folder: Path, meta: dict, bf16: bool = False):
    ndim = meta["ndim"]
    images = torch.from_numpy(load(folder, "images"))
    instances_np = load(folder, "instances")
    centers_np = load(folder, "centers")
    info = {}
    torch.manual_seed(0)
    if impl == "ref":
        ref = Ref()
        net, info = ref.network(folder, ndim)
        crit = ref.criterion(meta)
        instances = torch.from_numpy(instances_np.astype(np.int16))
        labels = instances > 0
        center_images = torch.from_numpy(centers_np > 0)

        def loss_fn(out):
            return crit(out, instances, labels, center_images, w_inst=1, w_var=10, w_seed=1)
    else:
        from embseg.loss import spatial_embedding_loss

        _warm_up_loss()
        net = _ours_network(folder, ndim)
        instances = torch.from_numpy(instances_np.astype(np.int64))
        centers = torch.from_numpy(centers_np.astype(np.int64))
        step = tuple(meta["step"])

        def loss_fn(out):
            return spatial_embedding_loss(out, instances, centers, step, fg_weight=meta["fg_weight"])[0]

    net.train()
    if impl == "ref":
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=meta["lr"], weight_decay=meta["weight_decay"])
    else:  # what embseg.training.train does: its layout, optimizer and malloc thresholds
        from embseg.allocator import reuse_freed_memory
        from embseg.training import make_optimizer, training_memory_format

        reuse_freed_memory()

        memory_format = training_memory_format("cpu", ndim)
        net = net.to(memory_format=memory_format)
        images = images.contiguous(memory_format=memory_format)
        optimizer = make_optimizer(net, meta["lr"], meta["weight_decay"], "cpu")

    def run():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # what --cpu-amp does
            out = net(images)
        loss = loss_fn(out.float())
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run, info


def bench_predict(impl: str, folder: Path, meta: dict, tta: bool, amp: bool = False):
    ndim = meta["ndim"]
    image = load(folder, "image")  # (1, *spatial) normalised float32
    info = {}
    if impl == "ref":
        ref = Ref()
        net, info = ref.network(folder, ndim)
        cl = ref.clusterer(meta)
        from EmbedSeg.test import predict, predict_3d

        fn = predict if ndim == 2 else predict_3d
        im = torch.from_numpy(image[None])  # B C (Z) Y X

        def run():
            with torch.no_grad():
                labels, _ = fn(im, net, tta, True, ndim, meta["fg_thresh"], meta["seed_thresh"], 0, 0,
                               meta["ref_min_object_size"], cl, "cpu")
            return labels.numpy()
    else:
        from embseg.predict import predict_labels

        net = _ours_network(folder, ndim)

        def run():
            labels, _ = predict_labels(net, image, ndim, tuple(meta["step"]), seed_thresh=meta["seed_thresh"],
                                       fg_thresh=meta["fg_thresh"], min_size=meta["min_size"], tta=tta,
                                       device="cpu", amp=amp)
            return labels

        def split() -> dict:
            """What ``predict_labels`` spends in the network and in the clustering (best of 2)."""
            from embseg.cluster import cluster
            from embseg.predict import predict_raw

            net_s, cluster_s = [], []
            for _ in range(2):
                t0 = time.perf_counter()
                raw = predict_raw(net, image, ndim, tta=tta, device="cpu", amp=amp)
                t1 = time.perf_counter()
                cluster(raw, tuple(meta["step"]), seed_thresh=meta["seed_thresh"], fg_thresh=meta["fg_thresh"],
                        min_size=meta["min_size"])
                net_s.append(t1 - t0)
                cluster_s.append(time.perf_counter() - t1)
            return {"network_s": min(net_s), "cluster_s": min(cluster_s)}

        if not tta:
            info["extra"] = split

    net.eval()
    return run, info


def bench_medoid(impl: str, folder: Path, meta: dict):
    crops = load(folder, "crops")
    if impl == "ref":
        Ref()
        from EmbedSeg.utils.generate_crops import generate_center_image

        crop_ids = []
        for c in crops:
            ids = np.unique(c)
            crop_ids.append(ids[ids > 0])

        def run():
            return np.stack([generate_center_image(c, "medoid", ids, False) for c, ids in zip(crops, crop_ids, strict=True)])

        ids_full = load(folder, "ids_full")
        offsets = load(folder, "ids_offsets")

        def run_pipeline():
            return [generate_center_image(c, "medoid", ids_full[offsets[i]:offsets[i + 1]], False)
                    for i, c in enumerate(crops)]

        return run, {"extra": run_pipeline}
    from embseg.centers import center_image, object_centers
    from embseg.data import ObjectTable

    masks = [load(folder, f"mask_{k}") for k in range(meta["n_images"])]
    image_index, origins = load(folder, "image_index"), load(folder, "origins")

    def run():
        """What the training data pipeline does (embseg.data): whole-object medoids once per
        object (batched per image), reused by every crop that holds the object whole; objects
        cut by a crop border get the medoid of their visible part."""
        table = ObjectTable(masks, center_method="medoid")
        table.precompute_centers()
        out = np.zeros(crops.shape, dtype=bool)
        for i, (k, origin) in enumerate(zip(image_index, origins, strict=True)):
            box = tuple(slice(int(o), int(o) + n) for o, n in zip(origin, crops.shape[1:], strict=True))
            mask_crop = table.masks[k][box]
            present = np.flatnonzero(np.bincount(mask_crop.ravel()))
            present = present[present > 0]
            centers = table.crop_centers(int(k), origin, mask_crop, present)
            out[i][tuple(centers.T)] = True
        return out

    def run_per_crop():
        """Each crop on its own (every object's medoid recomputed in every crop)."""
        return np.stack([center_image(c, object_centers(c, "medoid")) > 0 for c in crops])

    return run, {"extra": run_per_crop}


def make(bench: str, impl: str, folder: Path, meta: dict):
    bf16 = bench.endswith("_bf16")  # ours in bfloat16 autocast; the reference as always
    bench = bench.removesuffix("_bf16")
    if bench.startswith("loss"):
        return bench_loss(impl, folder, meta)
    if bench.startswith("cluster"):
        return bench_cluster(impl, folder, meta)
    if bench.startswith("train_step"):
        return bench_train_step(impl, folder, meta, bf16=bf16)
    if bench.startswith("predict"):
        return bench_predict(impl, folder, meta, tta=bench.endswith("_tta"), amp=bf16)
    if bench == "medoid":
        return bench_medoid(impl, folder, meta)
    raise SystemExit(f"unknown benchmark {bench}")


def _final_record(args, info: dict, times: list[float], result, rss_before: float, extra) -> dict:
    record = {"bench": args.bench, "impl": args.impl, "times": times, "rss_before_mb": rss_before,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__, **info}
    record["peak_rss_mb"] = peak_rss_mb()
    record["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if isinstance(result, float):
        record["value"] = result
    elif args.save_output and result is not None and args.out is not None:
        np.save(str(args.out) + ".npy", np.asarray(result))
    if extra is not None:
        t0 = time.perf_counter()
        out = extra()
        record["extra_time"] = time.perf_counter() - t0
        if isinstance(out, dict):
            record["extra_result"] = out
    return record


def serve(args, run, info: dict, extra, rss_before: float, channel) -> None:
    """Line protocol on ``channel`` (the original stdout): the driver writes ``warmup``,
    ``run`` or ``finish`` on stdin; each is answered by one JSON line. Lets the driver
    alternate single repetitions of the two implementations without restarting them."""
    times: list[float] = []
    result = None

    def reply(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    reply({"ready": True, "rss_before_mb": rss_before})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "warmup":
            t0 = time.perf_counter()
            result = run()
            reply({"warmup": time.perf_counter() - t0})
        elif cmd == "run":
            t0 = time.perf_counter()
            result = run()
            t = time.perf_counter() - t0
            times.append(t)
            reply({"time": t})
        elif cmd == "finish":
            reply(_final_record(args, info, times, result, rss_before, extra))
            return
    raise SystemExit("driver went away")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", required=True)
    parser.add_argument("--impl", choices=("ours", "ref"), required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (one-shot mode) / .npy stem")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help="line protocol on stdin/stdout (driver mode)")
    parser.add_argument("--save-output", action="store_true", help="save the last result as .npy")
    args = parser.parse_args()

    channel = None
    if args.serve:
        # keep the real stdout for the protocol; everything else printed (the reference prints
        # on every 3D loss call) goes to stderr
        channel = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    torch.set_num_threads(args.threads)
    meta = json.loads((args.inputs / "meta.json").read_text())
    run, info = make(args.bench, args.impl, args.inputs, meta)
    extra = info.pop("extra", None)
    rss_before = rss_now_mb()
    if args.serve:
        serve(args, run, info, extra, rss_before, channel)
        return
    result = None
    for _ in range(args.warmup):
        result = run()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    record = _final_record(args, info, times, result, rss_before, extra)
    text = json.dumps(record)
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
