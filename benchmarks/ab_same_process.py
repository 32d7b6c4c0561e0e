"""Same-process A/B timings of a switchable code path (alternated repetitions, min CPU time).

    .venv/bin/python benchmarks/ab_same_process.py cluster-trees   # one KD-tree vs two (threads)
    .venv/bin/python benchmarks/ab_same_process.py medoid-groups   # FFT grids per size class vs one
    .venv/bin/python benchmarks/ab_same_process.py predict-2d      # before / ReLU in place / + BN folded (/ + 2D axis convs)
    .venv/bin/python benchmarks/ab_same_process.py predict-3d
    .venv/bin/python benchmarks/ab_same_process.py train-relu-2d   # training step, ReLU out of place / in place
    .venv/bin/python benchmarks/ab_same_process.py train-relu-3d
    .venv/bin/python benchmarks/ab_same_process.py onednn-3d       # 3D forward, torch's kernel choice vs oneDNN direct
    .venv/bin/python benchmarks/ab_same_process.py train-onednn-3d # the same for a training step's forward + backward
    .venv/bin/python benchmarks/ab_same_process.py cluster-scan    # every ball searched vs whole trees when mostly covered
    .venv/bin/python benchmarks/ab_same_process.py loss-backend-3d # loss: torch operators vs the compiled kernel (also -2d)
    .venv/bin/python benchmarks/ab_same_process.py predict-bf16-3d # trained-model prediction, float32 vs amp=True (also -2d)
    .venv/bin/python benchmarks/ab_same_process.py train-bf16-3d   # training step, float32 vs cpu_amp (bfloat16; also -2d)
    .venv/bin/python benchmarks/ab_same_process.py train-bf16-onednn-3d # 3D training step with cpu_amp, oneDNN direct vs torch's path
    .venv/bin/python benchmarks/ab_same_process.py train-layout-3d # training step, contiguous vs channels-last (also -2d)
    .venv/bin/python benchmarks/ab_same_process.py predict-fused-3d # trained-model prediction: the ninth pass's inference
                                                                    # copy / + post-ops / + direct output (also -2d)
    .venv/bin/python benchmarks/ab_same_process.py predict-pool-3d  # trained-model prediction: torch's max-pool vs
                                                                    # pairwise maxima (also -2d)

Uses the inputs built by ``run.py`` (``benchmarks/_work/inputs/full``). Each variant's output is
checked equal to the other's (``onednn-3d``: to float rounding, other kernels; ``train-onednn-3d``: to
1e-3 of the output's range, batch-norm batch statistics at random init amplify the rounding;
``loss-backend-*``: to 1e-4, float32 against float64 arithmetic; ``predict-bf16-*``: labels matched
at IoU 0.5 with F1 >= 0.99, bfloat16 is not float32; ``train-bf16-*``: the last losses within 5 %;
``train-layout-*``: the first step's losses to 1e-5, the layouts round differently). Small changes drown in the machine's load swings between runs;
alternating the variants within one process compares them under the same load.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import worker  # noqa: E402

import embseg.net  # noqa: E402

#: The network's ReLU and residual add as they are now (in place).
_RELU = (embseg.net._relu, embseg.net._add_relu)


def _set_relu(in_place: bool) -> None:
    """The network's ReLU and residual add in place (as now) or out of place (as before)."""
    embseg.net._relu = _RELU[0] if in_place else torch.relu
    embseg.net._add_relu = _RELU[1] if in_place else (lambda out, x: torch.relu(out + x))


def _predict_variants(name: str):
    """Prediction with the network as before this pass (batch norms, ReLU out of place), then
    with ReLU in place, with the batch norms folded as well, and (3D) with the 1-D convolutions
    as 2D ones on a view as well."""
    import copy

    import embseg.fold as module
    from embseg.net import AxisConv3d

    folder = HERE / "_work" / "inputs" / "full" / name.replace("-", "_")
    meta = json.loads((folder / "meta.json").read_text())
    run, _ = worker.bench_predict("ours", folder, meta, tta=False)
    fold, axis_2d = module.fold_batchnorm, AxisConv3d.forward

    def variant(in_place: bool, folded: bool, views: bool):
        cache = type(module._FOLDED)()

        def switch():
            # Every variant keeps its own (folded or plain) copy between calls, as predicting a
            # folder with one model does (embseg.fold.folded_for_inference).
            module._FOLDED = cache
            module.fold_batchnorm = fold if folded else (lambda net: copy.deepcopy(net).eval())
            _set_relu(in_place)
            AxisConv3d.forward = axis_2d if views else torch.nn.Conv3d.forward
        return switch

    variants = {"as before": variant(False, False, False), "ReLU in place": variant(True, False, False),
                "+ batch norm folded": variant(True, True, False)}
    if name.endswith("3d"):
        variants["+ 2D axis convs"] = variant(True, True, True)
    return run, variants, time.perf_counter


def _train_relu_variants(name: str):
    """One training step (network, loss, Adam) with ReLU and residual add out of place / in place.
    Each variant steps its own copy of the same start (the outputs compared are the last losses)."""
    folder = HERE / "_work" / "inputs" / "full" / ("train_step_" + name.rsplit("-", 1)[1])
    meta = json.loads((folder / "meta.json").read_text())
    steps = {"out of place": worker.bench_train_step("ours", folder, meta)[0],
             "in place": worker.bench_train_step("ours", folder, meta)[0]}
    current: dict = {}
    count = dict.fromkeys(steps, 0)

    def variant(name: str, in_place: bool):
        def switch():
            _set_relu(in_place)
            current["name"] = name
        return switch

    def run():
        # The k-th step of either variant draws the same dropout masks: equal losses expected.
        name = current["name"]
        count[name] += 1
        torch.manual_seed(count[name])
        return np.asarray(steps[name]())

    variants = {"out of place": variant("out of place", False), "in place": variant("in place", True)}
    return run, variants, time.perf_counter


def _onednn_variants(shape: tuple[int, ...]):
    """Forward of the folded 3D inference copy on one ``shape`` volume (random-init network,
    channels-last), its (transposed) convolutions as torch chooses them or called in oneDNN."""
    import embseg.fold as fold
    import embseg.net as net_module

    torch.manual_seed(0)
    net = net_module.BranchedERFNet(3, 1).eval()
    cl = torch.channels_last_3d
    copies = {"torch's kernel choice": fold.fold_batchnorm(net).to(memory_format=cl),
              "oneDNN direct": fold.use_onednn_3d(fold.fold_batchnorm(net).to(memory_format=cl))}
    applies = net_module.onednn_applies
    x = torch.rand(1, 1, *shape).contiguous(memory_format=cl)
    current: dict = {}

    def switch(name: str):
        def go():
            current["name"] = name
            rule = applies if name == "oneDNN direct" else (lambda x, conv: False)
            net_module.onednn_applies = fold.onednn_applies = rule
        return go

    def run():
        with torch.inference_mode():
            return copies[current["name"]](x).numpy()

    return run, {name: switch(name) for name in copies}, time.perf_counter


def _train_onednn_variants(shape: tuple[int, ...]):
    """Forward + backward of the 3D network in training on a batch of one ``shape`` crop, its
    convolutions as torch chooses them or called in oneDNN (each variant its own copy of the
    same weights; dropout off, so that the outputs compare)."""
    import copy

    import embseg.net as net_module

    torch.manual_seed(0)
    net = net_module.BranchedERFNet(3, 1).train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout3d):
            m.p = 0.0
    nets = {"torch's kernel choice": net, "oneDNN direct": copy.deepcopy(net)}
    applies = net_module.onednn_applies
    x = torch.rand(1, 1, *shape)
    current: dict = {}

    def switch(name: str):
        def go():
            current["name"] = name
            net_module.onednn_applies = applies if name == "oneDNN direct" else (lambda x, conv: False)
        return go

    def run():
        model = nets[current["name"]]
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().mean().backward()
        return out.detach().numpy()

    return run, {name: switch(name) for name in nets}, time.perf_counter


def _cluster_scan_variants(wider: float):
    """Clustering of the cluster_3d input (bandwidths as built, or every raw sigma lowered by
    ``wider``: seeds whose balls cover much of the volume), every ball searched in the KD-trees
    or a tree taken whole when a ball's box covers most of it."""
    import embseg.cluster as module

    folder = HERE / "_work" / "inputs" / "full" / "cluster_3d"
    meta = json.loads((folder / "meta.json").read_text())
    raw = torch.from_numpy(worker.load(folder, "raw"))
    if wider:
        raw[3:6] -= wider

    def run():
        return module.cluster(raw, tuple(meta["step"]), seed_thresh=meta["seed_thresh"], fg_thresh=meta["fg_thresh"],
                              min_size=meta["min_size"])

    return run, {"every ball searched": lambda: setattr(module, "_SCAN_FRACTION", math.inf),
                 "whole trees when covered": lambda: setattr(module, "_SCAN_FRACTION", 0.25)}, time.perf_counter


def _loss_backend_variants(ndim: str):
    """The loss's torch formulation against the compiled kernel (embseg.loss_kernel), on the
    loss benchmark's inputs."""
    import embseg.loss_kernel as module

    folder = HERE / "_work" / "inputs" / "full" / f"loss_{ndim}"
    meta = json.loads((folder / "meta.json").read_text())
    run, _ = worker.bench_loss("ours", folder, meta)
    return run, {"torch operators": lambda: setattr(module, "AVAILABLE", False),
                 "compiled kernel": lambda: setattr(module, "AVAILABLE", True)}, time.perf_counter


def _train_bf16_variants(ndim: str):
    """One training step (network, loss, Adam) on the train_step_* inputs in float32 and with
    the network in bfloat16 autocast (``cpu_amp``); each variant steps its own copy of the same
    start (the outputs compared are the last losses: close, not equal)."""
    folder = HERE / "_work" / "inputs" / "full" / f"train_step_{ndim}"
    meta = json.loads((folder / "meta.json").read_text())
    steps = {"float32": worker.bench_train_step("ours", folder, meta)[0],
             "bfloat16 (cpu_amp)": worker.bench_train_step("ours", folder, meta, bf16=True)[0]}
    current: dict = {}
    count = dict.fromkeys(steps, 0)

    def run():
        name = current["name"]
        count[name] += 1
        torch.manual_seed(count[name])  # the k-th step of either variant draws the same dropout masks
        return np.asarray(steps[name]())

    return run, {name: (lambda name=name: current.__setitem__("name", name)) for name in steps}, time.perf_counter


def _train_bf16_onednn_variants():
    """One 3D training step with ``cpu_amp`` (bfloat16 autocast) on the train_step_3d inputs, its
    3D convolutions called in oneDNN directly (:func:`embseg.net.onednn_autocast_dtype`) or as
    torch's autocast path chooses them; each variant steps its own copy of the same start (the
    last losses compared: bfloat16 rounds differently on the two paths)."""
    import embseg.net as net_module

    folder = HERE / "_work" / "inputs" / "full" / "train_step_3d"
    meta = json.loads((folder / "meta.json").read_text())
    rule = net_module.onednn_autocast_dtype
    rules = {"oneDNN direct": rule, "torch's autocast path": lambda x, conv: None}
    steps = {name: worker.bench_train_step("ours", folder, meta, bf16=True)[0] for name in rules}
    current: dict = {}
    count = dict.fromkeys(steps, 0)

    def switch(name: str):
        def go():
            current["name"] = name
            net_module.onednn_autocast_dtype = rules[name]
        return go

    def run():
        name = current["name"]
        count[name] += 1
        torch.manual_seed(count[name])  # the k-th step of either variant draws the same dropout masks
        return np.asarray(steps[name]())

    return run, {name: switch(name) for name in steps}, time.perf_counter


def _predict_bf16_variants(ndim: str):
    """End-to-end prediction with the trained model (the predict_*_trained inputs) in float32
    and with `amp=True` (bfloat16 autocast, on a CPU with native bf16)."""
    from embseg import predict as module

    folder = HERE / "_work" / "inputs" / "full" / f"predict_{ndim}_trained"
    meta = json.loads((folder / "meta.json").read_text())
    run, _ = worker.bench_predict("ours", folder, meta, False)
    original = module._autocast
    print(f"native bfloat16 on this CPU: {module.cpu_bf16_supported()}")
    return run, {"float32": lambda: setattr(module, "_autocast", original),
                 "bfloat16 (amp=True)": lambda: setattr(module, "_autocast", lambda device, amp: original(device, True))
                 }, time.perf_counter


def _train_layout_variants(ndim: str):
    """One training step (network, loss, Adam) on the train_step_* inputs with the weights and
    batches contiguous and channels-last (``embseg.training.training_memory_format``); each
    variant steps its own copy of the same start (the last losses compared: close, not equal)."""
    import embseg.training as training

    folder = HERE / "_work" / "inputs" / "full" / f"train_step_{ndim}"
    meta = json.loads((folder / "meta.json").read_text())
    layouts = {"contiguous": torch.contiguous_format,
               "channels-last": torch.channels_last if ndim == "2d" else torch.channels_last_3d}
    original = training.training_memory_format
    steps = {}
    for name, layout in layouts.items():
        training.training_memory_format = lambda device, n, layout=layout: layout
        torch.manual_seed(0)
        steps[name] = worker.bench_train_step("ours", folder, meta)[0]
    training.training_memory_format = original
    current: dict = {}
    count = dict.fromkeys(steps, 0)
    losses: dict = {name: [] for name in steps}

    def run():
        # The first losses (the same weights and dropout masks) are compared; later ones drift
        # apart, as float32 training runs with other rounding do.
        name = current["name"]
        count[name] += 1
        torch.manual_seed(count[name])  # the k-th step of either variant draws the same dropout masks
        losses[name].append(steps[name]())
        return np.asarray(losses[name][0])

    return run, {name: (lambda name=name: current.__setitem__("name", name)) for name in steps}, time.perf_counter


def _predict_fused_variants(ndim: str):
    """Trained-model prediction (the predict_*_trained inputs) with the inference copy of the
    ninth pass (oneDNN direct, no post-ops, the two decoders' outputs concatenated channels-last,
    each core copied twice), with the ReLUs and residual adds as oneDNN post-ops (3D), and with
    the decoders' last layers written into one contiguous output as well (as now)."""
    import embseg.fold as fold
    import embseg.predict as predict

    folder = HERE / "_work" / "inputs" / "full" / f"predict_{ndim}_trained"
    meta = json.loads((folder / "meta.json").read_text())
    run, _ = worker.bench_predict("ours", folder, meta, False)
    fused, direct, tile_outputs = fold._FUSED, fold.direct_output, predict._tile_outputs

    def copied_twice(*args, **kwargs):
        kwargs["copy_cores"] = True
        return tile_outputs(*args, **kwargs)

    def variant(post_ops: bool, direct_output: bool):
        cache = type(fold._FOLDED)()

        def switch():
            fold._FOLDED = cache  # each variant keeps its own inference copy between calls
            fold._FUSED = fused if post_ops else {}
            fold.direct_output = direct if direct_output else (lambda net: net)
            predict._tile_outputs = tile_outputs if direct_output else copied_twice
        return switch

    variants = {"ninth pass": variant(False, False)}
    if ndim == "3d":
        variants["+ post-ops"] = variant(True, False)
    variants["+ direct output (now)"] = variant(True, True)
    return run, variants, time.perf_counter


def _predict_pool_variants(ndim: str):
    """Trained-model prediction (the predict_*_trained inputs) with torch's max-pool in the
    downsamplers, and with the pairwise maxima of :class:`embseg.net._PairwiseMaxPool` (as now)."""
    folder = HERE / "_work" / "inputs" / "full" / f"predict_{ndim}_trained"
    meta = json.loads((folder / "meta.json").read_text())
    run, _ = worker.bench_predict("ours", folder, meta, False)
    pool = embseg.net._PairwiseMaxPool
    pairwise = pool._pairwise
    return run, {"torch max-pool": lambda: setattr(pool, "_pairwise", lambda self, x: False),
                 "pairwise maxima (now)": lambda: setattr(pool, "_pairwise", pairwise)}, time.perf_counter


def _variants(name: str, shape: tuple[int, ...], wider: float):
    if name == "onednn-3d":
        return _onednn_variants(shape)
    if name == "train-onednn-3d":
        return _train_onednn_variants(shape)
    if name == "cluster-scan":
        return _cluster_scan_variants(wider)
    if name == "train-bf16-onednn-3d":
        return _train_bf16_onednn_variants()
    if name.startswith("train-bf16"):
        return _train_bf16_variants(name.removeprefix("train-bf16-"))
    if name.startswith("train-layout"):
        return _train_layout_variants(name.removeprefix("train-layout-"))
    if name.startswith("predict-pool"):
        return _predict_pool_variants(name.removeprefix("predict-pool-"))
    if name.startswith("predict-fused"):
        return _predict_fused_variants(name.removeprefix("predict-fused-"))
    if name.startswith("predict-bf16"):
        return _predict_bf16_variants(name.removeprefix("predict-bf16-"))
    if name.startswith("loss-backend"):
        return _loss_backend_variants(name.removeprefix("loss-backend-"))
    if name.startswith("predict"):
        return _predict_variants(name)
    if name.startswith("train-relu"):
        return _train_relu_variants(name)
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
    parser.add_argument("what", choices=("cluster-trees", "medoid-groups", "predict-2d", "predict-3d", "train-relu-2d",
                                         "train-relu-3d", "onednn-3d", "train-onednn-3d", "cluster-scan", "loss-backend-2d",
                                         "loss-backend-3d", "predict-bf16-2d", "predict-bf16-3d", "train-bf16-2d",
                                         "train-bf16-3d", "train-bf16-onednn-3d", "train-layout-2d", "train-layout-3d", "predict-fused-2d",
                                         "predict-fused-3d", "predict-pool-2d", "predict-pool-3d"))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shape", default="32,96,96", help="onednn-3d: the volume (Z,Y,X)")
    parser.add_argument("--wider", type=float, default=0.0,
                        help="cluster-scan: lower every raw sigma by this (balls e^(5 wider) times wider: 0.6 is 20x)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shape = tuple(int(v) for v in args.shape.split(","))
    run, variants, clock = _variants(args.what, shape, args.wider)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs = {}
    for rep in range(args.reps):
        for name in names if rep % 2 else names[::-1]:
            variants[name]()
            start = clock()
            outputs[name] = run()
            times[name].append(clock() - start)
    if args.what == "onednn-3d":
        same = all(np.allclose(outputs[names[0]], outputs[n], rtol=1e-4, atol=1e-5) for n in names[1:])
    elif args.what.startswith("predict-bf16"):  # not equal: the labels of bfloat16 against float32's
        from embseg.metrics import matching

        m = matching(outputs[names[0]], outputs[names[1]], thresh=0.5)
        print(f"bfloat16 vs float32 labels: F1 {m.f1:.4f} at IoU 0.5, mean matched IoU {m.mean_matched_score:.4f}, "
              f"{m.n_true} / {m.n_pred} objects")
        same = m.f1 >= 0.99
    elif args.what.startswith("train-bf16"):  # bfloat16: the losses close, not equal
        same = all(np.isclose(outputs[names[0]], outputs[n], rtol=0.05) for n in names[1:])
        print("last losses: " + ", ".join(f"{n} {float(outputs[n]):.4f}" for n in names))
    elif args.what.startswith("train-layout"):  # the first step's losses: the layouts round differently
        same = all(np.isclose(outputs[names[0]], outputs[n], rtol=1e-5) for n in names[1:])
        print("first losses: " + ", ".join(f"{n} {float(outputs[n]):.6f}" for n in names))
    elif args.what.startswith("loss-backend"):  # float32 (torch) against float64 arithmetic (kernel)
        same = all(np.isclose(outputs[names[0]], outputs[n], rtol=1e-4) for n in names[1:])
    elif args.what == "train-onednn-3d":  # batch statistics at random init amplify rounding
        scale = float(np.abs(outputs[names[0]]).max())
        same = all(np.allclose(outputs[names[0]], outputs[n], rtol=1e-3, atol=1e-3 * scale) for n in names[1:])
    else:
        same = all(np.array_equal(outputs[names[0]], outputs[n]) for n in names[1:])
    for name in names:
        print(f"{name:28s} min {min(times[name]) * 1e3:7.1f} ms  median {np.median(times[name]) * 1e3:7.1f} ms")
    print(f"outputs equal: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
