"""Training: data loading, the optimisation loop, validation, checkpoints and resume.

The output folder is a model folder (``config.json`` + ``model.safetensors``, the best model by
validation) plus ``checkpoints/last.safetensors`` + ``checkpoints/last.json`` (written atomically
every ``checkpoint_every`` epochs; never pickled), ``log.csv`` and ``curves.png``.
"""

from __future__ import annotations

import csv
import io as _io
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embseg.config import ModelConfig, TrainConfig
from embseg.errors import UserError
from embseg.model import Model, build_network, select_device
from embseg.predict import _memory_format, autocast_dtype

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.csv"
#: Seed thresholds tried at each validation (the score is the best of them).
VAL_SEED_THRESHOLDS = (0.6, 0.75, 0.9)
LOG_FIELDS = ["epoch", "step", "lr", "loss", "instance", "variance", "seed", "val_ap", "val_iou",
              "elapsed_s"]


@dataclass
class TrainingData:
    """Normalised images and masks, split into training and validation sets."""

    train_images: list[np.ndarray]
    train_masks: list[np.ndarray]
    val_images: list[np.ndarray]
    val_masks: list[np.ndarray]
    train_names: list[str]
    val_names: list[str]
    ndim: int
    in_channels: int
    properties: dict[str, Any] = field(default_factory=dict)
    #: The whole validation split (``val_*`` may be a subset of it, ``max_val_images``): the final
    #: threshold tuning uses all of it; ``None`` = the same as ``val_*``.
    tune_images: list[np.ndarray] | None = None
    tune_masks: list[np.ndarray] | None = None


def _read_pairs(images_dir: str, masks_dir: str, config: TrainConfig) -> tuple[list, list, list, int, int]:
    from embseg.io import pair_folders, read_image, read_labels, to_channel_first, validate_pair
    from embseg.normalize import percentile_normalize

    images, masks, names = [], [], []
    ndim = config.ndim
    channels = None
    pairs = pair_folders(Path(images_dir).expanduser(), Path(masks_dir).expanduser())
    for image_path, mask_path in pairs:
        mask = read_labels(mask_path, ndim=ndim)
        ndim = ndim or mask.ndim
        image, axes = read_image(image_path, axes=config.axes, ndim=ndim)
        validate_pair(image, axes, mask, image_path, mask_path)
        image = to_channel_first(image, axes)
        if channels is None:
            channels = image.shape[0]
        elif image.shape[0] != channels:
            raise UserError(f"{image_path}: has {image.shape[0]} channels, earlier images have {channels}")
        image = image.astype(np.float32, copy=False)
        if not np.isfinite(image).all():
            raise UserError(f"{image_path}: image contains NaN or Inf pixels")
        if not mask.any():
            continue  # an empty mask teaches only background; keep out of the object table
        images.append(percentile_normalize(image, config.norm_low, config.norm_high))
        masks.append(mask)
        names.append(image_path.name)
    if not images:
        raise UserError(f"{masks_dir}: none of the {len(pairs)} masks has any object (all pixels are 0); "
                        "nothing to train on")
    assert ndim is not None and channels is not None
    return images, masks, names, ndim, channels


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read, validate and normalise the training (and validation) images and masks."""
    from embseg.data import dataset_properties

    if not config.images or not config.masks:
        raise UserError("train: --images and --masks are required")
    images, masks, names, ndim, channels = _read_pairs(config.images, config.masks, config)
    if config.val_images or config.val_masks:
        if not (config.val_images and config.val_masks):
            raise UserError("train: give both --val-images and --val-masks, or neither")
        v_images, v_masks, v_names, v_ndim, v_channels = _read_pairs(config.val_images, config.val_masks,
                                                                     replace(config, ndim=ndim))
        if (v_ndim, v_channels) != (ndim, channels):
            raise UserError("train: validation images differ from training images in dimensions or channels")
        t_images, t_masks, t_names = images, masks, names
    elif len(images) < 2:
        # One image (e.g. a single 3D volume): validate on the training image itself.
        t_images, t_masks, t_names = images, masks, names
        v_images, v_masks, v_names = images, masks, names
    else:
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(images))
        n_val = min(max(1, round(config.val_fraction * len(images))), len(images) - 1)
        val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
        t_images = [images[i] for i in train_idx]
        t_masks = [masks[i] for i in train_idx]
        t_names = [names[i] for i in train_idx]
        v_images = [images[i] for i in val_idx]
        v_masks = [masks[i] for i in val_idx]
        v_names = [names[i] for i in val_idx]
    tune_images, tune_masks = v_images, v_masks
    if len(v_images) > config.max_val_images:
        keep = np.random.default_rng(config.seed + 1).choice(len(v_images), config.max_val_images, replace=False)
        keep = sorted(keep)
        v_images = [v_images[i] for i in keep]
        v_masks = [v_masks[i] for i in keep]
        v_names = [v_names[i] for i in keep]
    props = dataset_properties(t_masks, ndim)
    return TrainingData(t_images, t_masks, v_images, v_masks, t_names, v_names, ndim, channels, props,
                        tune_images=tune_images, tune_masks=tune_masks)


def poly_lr(base_lr: float, progress: float, power: float = 0.9) -> float:
    """Polynomial decay ``base_lr * (1 - progress) ** power``, ``progress`` clipped to [0, 1]."""
    return base_lr * max(0.0, 1.0 - min(max(progress, 0.0), 1.0)) ** power


def _versions() -> dict[str, str]:
    import embseg

    return {"embseg": embseg.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def model_config_for(config: TrainConfig, data: TrainingData) -> ModelConfig:
    """The model config a training run produces (thresholds tuned later)."""
    from embseg.embedding import grid_step

    props = data.properties
    min_size = config.min_size if config.min_size is not None else int(props.get("min_object_size", 10))
    name = Path(config.output).name if config.output else "embseg-model"
    return ModelConfig(
        ndim=data.ndim,
        in_channels=data.in_channels,
        grid_step=list(grid_step(data.ndim, config.anisotropy, config.grid_step)),
        anisotropy=config.anisotropy,
        norm_low=config.norm_low,
        norm_high=config.norm_high,
        seed_thresh=config.seed_thresh,
        fg_thresh=config.fg_thresh,
        min_size=min_size,
        crop_size=list(props["crop_size"]),
        name=name,
        training={"config": config.to_dict(), "seed": config.seed, "versions": _versions(),
                  "data": {k: _jsonable(v) for k, v in props.items()},
                  # min_size from the data rule: tuning may raise it (embseg.tune.min_size_grid)
                  "base_min_size": min_size if config.min_size is None else None},
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list | np.ndarray):
        return [_jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------- step set-up


def training_memory_format(device: torch.device | str, ndim: int) -> torch.memory_format:
    """Layout of the network's weights and input batches during training.

    Channels-last on the CPU (oneDNN's preferred layout: ~8 % off a 16x96² 2D training step, and
    ~12 % off a 2x32x96² 3D step since the 3D convolutions call oneDNN directly,
    ``benchmarks/RESULTS.md``); the default layout elsewhere.
    """
    if torch.device(device).type == "cpu":
        return _memory_format(ndim)  # the channels-last layout for ndim, as prediction's
    return torch.contiguous_format


def make_optimizer(net: torch.nn.Module, lr: float, weight_decay: float,
                   device: torch.device | str) -> torch.optim.Adam:
    """Adam over the trainable parameters of ``net``, fused on CPU and CUDA (one kernel for
    all parameters instead of a loop of element-wise ops per tensor; same update rule)."""
    params = [p for p in net.parameters() if p.requires_grad]
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def make_weight_average(net: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights and buffers of ``net`` (``None`` when
    ``decay`` is 0).

    The decay at the ``n``-th update is ``min(decay, (1 + n) / (10 + n))``: the first updates
    follow the weights closely, so an early validation does not score the random start.
    Integer buffers (batch-norm counters) are copied.
    """
    if not decay:
        return None

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged.item())
        d = min(decay, (1.0 + n) / (10.0 + n))
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():
                a.copy_(c)

    return torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=update, use_buffers=True)


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give the optimizer's per-parameter state tensors their parameter's memory layout
    (checkpoints store them contiguous)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], scaler: Any = None,
                    average: torch.nn.Module | None = None) -> None:
    """Write the resumable state: tensors to safetensors, everything else to JSON (atomic).
    ``average`` is the weight average of :func:`make_weight_average`, if any."""
    from safetensors.torch import save_file

    from embseg.io import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
    if average is not None:
        for k, v in average.state_dict().items():
            tensors[f"average.{k}"] = v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = dict(state)
    meta["optim_param_groups"] = opt["param_groups"]
    meta["optim_scalars"] = {str(pid): {k: v for k, v in ps.items() if not isinstance(v, torch.Tensor)}
                             for pid, ps in opt["state"].items()}
    if scaler is not None:
        meta["scaler"] = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in scaler.state_dict().items()}
    # Weights first, then the JSON that points at them: a kill between the two leaves the
    # previous JSON, whose epoch is older, so resume repeats at most one interval.
    with atomic_write(folder / "last.safetensors", overwrite=True) as tmp:
        save_file(tensors, str(tmp))
    with atomic_write(folder / "last.json", overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))


def load_checkpoint(folder: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: Any = None, average: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restore net, optimizer, RNG and the weight average (when the checkpoint has one; else
    it restarts from the restored weights) from :func:`save_checkpoint`; returns the JSON state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, tensor_path = folder / "last.json", folder / "last.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise UserError(f"{folder}: no checkpoint to resume from")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise UserError(f"{folder}: corrupt checkpoint ({str(err).splitlines()[0]})") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        net.load_state_dict(model_state)
    except RuntimeError as err:
        raise UserError(f"{tensor_path}: checkpoint does not match the network ({str(err).splitlines()[0]})") from None
    if average is not None:
        average_state = {k[len("average."):]: v for k, v in tensors.items() if k.startswith("average.")}
        if average_state:
            try:
                average.load_state_dict(average_state)
            except RuntimeError as err:
                raise UserError(f"{tensor_path}: the checkpoint's weight average does not match the network "
                                f"({str(err).splitlines()[0]})") from None
        else:
            average.n_averaged.zero_()  # type: ignore[operator]
    opt_state: dict[str, Any] = {"param_groups": meta.pop("optim_param_groups"), "state": {}}
    for pid, scalars in meta.pop("optim_scalars").items():
        entry = dict(scalars)
        for k, v in tensors.items():
            prefix = f"optim.{pid}."
            if k.startswith(prefix):
                entry[k[len(prefix):]] = v
        opt_state["state"][int(pid)] = entry
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.torch"])
    if scaler is not None and "scaler" in meta:
        scaler.load_state_dict(meta.pop("scaler"))
    return meta


# ----------------------------------------------------------------------------- validation


def predict_raw_images(model: Model, images: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Raw outputs of ``model`` for normalised images (tiled automatically when large)."""
    return [model.predict_raw(image, normalized=True, device=str(device)) for image in images]


def mean_ap(raws: list[torch.Tensor], masks: list[np.ndarray], model_config: ModelConfig,
            seed_thresh: float, fg_thresh: float, thresh: float = 0.5) -> float:
    """Mean over images of AP (TP/(TP+FP+FN)) at IoU ``thresh`` for given clustering thresholds."""
    from embseg.cluster import cluster
    from embseg.metrics import matching

    scores = []
    for raw, mask in zip(raws, masks, strict=True):
        labels = cluster(raw, model_config.grid_step, seed_thresh=seed_thresh, fg_thresh=fg_thresh,
                         min_size=model_config.min_size, max_radius=model_config.seed_radius())
        scores.append(matching(mask, labels, thresh=thresh).accuracy)
    return float(np.mean(scores)) if scores else 0.0


def validation_iou(net: torch.nn.Module, crops: Any, step: torch.Tensor, device: torch.device) -> float:
    """The cheap proxy: mean IoU of ``phi > 0.5`` around the ground-truth centres on fixed crops."""
    from embseg.loss import gt_center_iou

    was_training = net.training
    net.eval()
    ious = []
    with torch.inference_mode():
        for batch in torch.utils.data.DataLoader(crops, batch_size=8):
            raw = net(batch["image"].to(device)).float()
            ious.append(gt_center_iou(raw, batch["instances"].to(device), batch["centers"].to(device), step).cpu())
    net.train(was_training)
    values = torch.cat(ious) if ious else torch.zeros(0)
    return float(values.mean()) if values.numel() else 0.0


def write_training_figure(model: Model, data: TrainingData, path: Path, device: torch.device,
                          max_side: int = 256) -> None:
    """The embedding figure (:func:`embseg.plots.explain_figure`) for a crop of the first validation image."""
    from embseg.plots import explain_figure

    image, mask = data.val_images[0], data.val_masks[0]
    region = tuple(slice(0, min(s, max_side)) for s in mask.shape)
    image, mask = image[(slice(None), *region)], mask[region]
    raw = model.predict_raw(image, normalized=True, device=str(device))
    labels = model.cluster(raw)
    explain_figure(image, raw, labels, model.config.grid_step, path, mask=mask)


# ----------------------------------------------------------------------------- the loop


def _prepare_output(config: TrainConfig, resume: bool, overwrite: bool) -> Path:
    if not config.output:
        raise UserError("train: --output is required")
    out = Path(config.output).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    has_content = out.is_dir() and any(out.iterdir())
    if has_content and not (resume or overwrite):
        raise UserError(f"{out}: output folder is not empty; use --resume to continue or --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{out}: output folder is not writable ({err.strerror})") from None
    return out


def _truncate_log(path: Path, epoch: int) -> None:
    """Drop the rows of ``log.csv`` after ``epoch`` (written after the checkpoint a run resumes)."""
    from embseg.io import atomic_write

    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [line for line in lines[1:] if line.split(",", 1)[0].isdigit()
                        and int(line.split(",", 1)[0]) <= epoch]
    if len(keep) < len(lines):
        with atomic_write(path, overwrite=True) as tmp:
            Path(tmp).write_text("".join(keep))


def _append_log(path: Path, row: dict[str, Any], replace_last: bool = False) -> None:
    from embseg.io import atomic_write

    buf = _io.StringIO()
    old = path.read_text() if path.is_file() else ""
    if replace_last and old.count("\n") > 1:
        old = old[: old.rstrip("\n").rfind("\n") + 1]
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    if not old:
        writer.writeheader()
    writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_FIELDS})
    with atomic_write(path, overwrite=True) as tmp:
        Path(tmp).write_text(old + buf.getvalue())


def train(
    config: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    data: TrainingData | None = None,
) -> Model:
    """Train a model as described by ``config``; returns the best model (also saved to ``output``).

    Parameters
    ----------
    config
        The training configuration.
    resume
        Continue from ``output/checkpoints/last.*``.
    overwrite
        Allow a non-empty output folder without resuming.
    progress
        Show a tqdm progress bar.
    callback
        Called after every epoch with the log row; returning ``True`` stops training (a
        checkpoint and the best model are kept).
    data
        Pre-loaded data (skips reading ``config.images``/``config.masks``).

    Notes
    -----
    Freed large buffers stay in the process's heap from here on (:mod:`embseg.allocator`).
    """
    from tqdm.auto import tqdm

    from embseg import ddp, loss_kernel
    from embseg.allocator import reuse_freed_memory
    from embseg.data import TrainingCrops
    from embseg.loss import spatial_embedding_loss

    called = time.monotonic()
    config.validate()
    dist = ddp.context(config.device)  # None unless in a process group (see embseg.ddp)
    main = dist is None or dist.is_main
    progress = progress and main
    out = _prepare_output(config, resume, overwrite) if main else Path(config.output).expanduser()
    ddp.barrier(dist)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = dist.device if dist is not None else select_device(config.device)
    if device.type == "cuda":  # fixed crop shapes: let cuDNN time its algorithms once per shape
        torch.backends.cudnn.benchmark = True
    # float16 on CUDA (config.amp), bfloat16 on a CPU that computes it natively (config.cpu_amp)
    amp_dtype = autocast_dtype(device, config.amp if device.type == "cuda" else config.cpu_amp)
    if device.type == "cpu" and config.cpu_amp and amp_dtype is None and main:
        print("cpu_amp: this CPU does not compute bfloat16 natively (no AMX / AVX512-BF16); "
              "training in float32", file=sys.stderr)
    if device.type == "cpu":  # the compiled loss: compiled (first run) or loaded while data loads
        loss_kernel.warm_up_in_background()

    if data is None:
        data = load_training_data(config)
    model_config = model_config_for(config, data)
    crop = tuple(config.crop_size) if config.crop_size else tuple(data.properties["crop_size"])
    if len(crop) == 1:  # one value for every axis (``--crop-size 96``)
        crop = crop * data.ndim
    if len(crop) != data.ndim:
        raise UserError(f"config: crop_size {list(crop)} must have {data.ndim} values for {data.ndim}D data")
    model_config.crop_size = list(crop)
    model_config.training["precision"] = (f"{str(amp_dtype).removeprefix('torch.')} autocast"
                                          if amp_dtype is not None else "float32")
    fg_weight = config.fg_weight if config.fg_weight is not None else float(data.properties["fg_weight"])
    spacing = tuple(s / model_config.grid_step[-1] for s in model_config.grid_step)
    crops = TrainingCrops(data.train_images, data.train_masks, crop_size=crop,
                          samples_per_epoch=config.samples_per_epoch,
                          random_crop_fraction=config.random_crop_fraction, augment=config.augment,
                          center_method=config.center, spacing=spacing, seed=config.seed,
                          image_balance=config.image_balance, intensity_augment=config.intensity_augment)
    val_crops = None
    if config.val_metric == "iou":
        val_crops = TrainingCrops(data.val_images, data.val_masks, crop_size=crop,
                                  samples_per_epoch=min(64, config.samples_per_epoch), augment=False,
                                  center_method=config.center, spacing=spacing, seed=config.seed + 7)
    net = build_network(model_config)
    if config.init_from and not resume:
        init_weights(net, model_config, config.init_from)
    net = net.to(device)
    memory_format = training_memory_format(device, data.ndim)
    net = net.to(memory_format=memory_format)
    optimizer = make_optimizer(net, config.lr, config.weight_decay, device)
    average = make_weight_average(net, config.ema_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None  # bfloat16: no scaling
    step_t = torch.tensor(model_config.grid_step, dtype=torch.float32)

    state: dict[str, Any] = {"epoch": 0, "step": 0, "best": -1.0, "elapsed_s": 0.0,
                             "model_config": json.loads(model_config.to_json())}
    if resume:
        ckpt_dir = out / CHECKPOINT_DIR
        if (ckpt_dir / "last.json").is_file():
            state = load_checkpoint(ckpt_dir, net, optimizer, scaler, average)
            match_state_layout(optimizer)
            if main:  # a kill between the log and the checkpoint leaves rows to be redone
                _truncate_log(out / LOG_FILE, int(state["epoch"]))
        elif not overwrite and any(p.name != LOG_FILE for p in out.iterdir()):
            raise UserError(f"{out}: --resume given but there is no checkpoint in {ckpt_dir}")
    eval_net = average.module if average is not None else net  # what is validated and saved
    model = Model(model_config, eval_net)
    train_net = ddp.wrap(net, dist)  # DDP broadcasts rank 0's weights here
    if dist is not None and dist.rank:
        torch.manual_seed(config.seed + 7919 * dist.rank)  # own dropout masks per rank
    shard = ddp.rank_share(crops, dist)

    steps_per_epoch = max(1, len(shard) // config.batch_size)
    generator = torch.Generator()
    start = time.monotonic() - float(state["elapsed_s"])
    epoch = int(state["epoch"])
    stop_requested = False

    def progress_fraction(ep: float) -> float:
        frac = ep / config.epochs
        if config.time_limit_minutes:
            frac = max(frac, (time.monotonic() - start) / (60.0 * config.time_limit_minutes))
        return frac

    def out_of_time() -> bool:  # rank 0's clock decides for all ranks
        over = bool(config.time_limit_minutes) and time.monotonic() - start >= 60.0 * config.time_limit_minutes
        return ddp.rank0_decides(over, dist) if config.time_limit_minutes else False

    while epoch < config.epochs and not stop_requested:
        if out_of_time():
            break
        reuse_freed_memory()  # again after a validation that predicted tile by tile (embseg.allocator)
        shard.set_epoch(epoch)
        generator.manual_seed(config.seed * 100_003 + epoch)
        loader = torch.utils.data.DataLoader(shard, batch_size=config.batch_size, shuffle=False,
                                             drop_last=True, num_workers=config.num_workers,
                                             pin_memory=device.type == "cuda", generator=generator,
                                             persistent_workers=False)
        net.train()
        sums = torch.zeros(4, dtype=torch.float64)
        n_batches = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False, file=sys.stderr, dynamic_ncols=True)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            lr = poly_lr(config.lr, progress_fraction(epoch + i / steps_per_epoch))
            for group in optimizer.param_groups:
                group["lr"] = lr
            image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            instances = batch["instances"].to(device, non_blocking=True)
            centers = batch["centers"].to(device, non_blocking=True)
            accumulating = (i + 1) % config.virtual_batch != 0
            with ddp.no_sync(train_net, accumulating):
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    raw = train_net(image)
                loss, parts = spatial_embedding_loss(raw.float(), instances, centers, step_t.to(device),
                                                     fg_weight=fg_weight, w_inst=config.w_inst,
                                                     w_var=config.w_var, w_seed=config.w_seed)
                scaled = loss / config.virtual_batch
                if scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            if (i + 1) % config.virtual_batch == 0:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if average is not None:
                    average.update_parameters(net)
                state["step"] = int(state["step"]) + 1
                if "first_step_s" not in model_config.training:  # from the call, data loading included
                    model_config.training["first_step_s"] = round(time.monotonic() - called, 1)
                    if progress:
                        print(f"first training step done {model_config.training['first_step_s']:.1f} s "
                              "after the start", file=sys.stderr)
            sums += torch.stack([loss.detach().double().cpu(), parts["instance"].double().cpu(),
                                 parts["variance"].double().cpu(), parts["seed"].double().cpu()])
            n_batches += 1
            if progress and (i % 5 == 0 or i + 1 == steps_per_epoch):
                bar.set_postfix(loss=f"{sums[0].item() / n_batches:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if out_of_time():
                break
        bar.close()
        epoch += 1
        means = (ddp.mean_over_ranks(sums, dist) / max(n_batches, 1)).tolist()
        row: dict[str, Any] = {"epoch": epoch, "step": state["step"], "lr": lr, "loss": means[0],
                               "instance": means[1], "variance": means[2], "seed": means[3]}
        timed_out = out_of_time()
        last = epoch >= config.epochs or timed_out
        if not main:  # rank 0 validates and writes; the others go on when it is done
            stop_requested = ddp.rank0_decides(False, dist)
            continue
        def validate(row: dict[str, Any] = row, epoch: int = epoch) -> None:
            if config.val_metric == "iou":
                score = validation_iou(eval_net, val_crops, step_t.to(device), device)
                row["val_iou"] = score
            else:
                raws = predict_raw_images(model, data.val_images, device)
                # Seeds calibrate late in training: score the best of a few seed thresholds, so
                # model selection does not hinge on one threshold (the final tuning picks it).
                score = max(mean_ap(raws, data.val_masks, model_config, t, model_config.fg_thresh)
                            for t in VAL_SEED_THRESHOLDS)
                row["val_ap"] = score
            if score > float(state["best"]):
                state["best"] = score
                state["best_epoch"] = epoch
                model.save(out)

        validated = epoch % config.val_every == 0 or last
        if validated:
            validate()
        if config.figure_every and (epoch % config.figure_every == 0 or last):
            write_training_figure(model, data, out / "figures" / f"epoch_{epoch:04d}.png", device)
        row["elapsed_s"] = round(time.monotonic() - start, 1)
        state["epoch"] = epoch
        state["elapsed_s"] = time.monotonic() - start
        _append_log(out / LOG_FILE, row)
        if epoch % config.checkpoint_every == 0 or last:
            save_checkpoint(out / CHECKPOINT_DIR, net, optimizer, state, scaler, average)
        if progress:
            val = f" val AP@0.5 {row['val_ap']:.3f}" if "val_ap" in row else ""
            print(f"epoch {epoch}: loss {means[0]:.4f}{val} ({row['elapsed_s']:.0f} s)", file=sys.stderr)
        if callback is not None and callback(row):
            stop_requested = True
            if not validated and not (out / "model.safetensors").is_file():
                validate()  # a stop before the first validation still leaves a model
                _append_log(out / LOG_FILE, row, replace_last=True)
                save_checkpoint(out / CHECKPOINT_DIR, net, optimizer, state, scaler, average)
        stop_requested = ddp.rank0_decides(stop_requested, dist)
    if not main:
        return model
    _plot_curves(out)
    return finish_training(out, data, config, progress=progress)


def init_weights(net: torch.nn.Module, model_config: ModelConfig, source: str) -> None:
    """Start from the weights of another model (a folder or a shipped name) of the same shape.

    Raises
    ------
    UserError
        When the source model differs in dimensions or input channels.
    """
    from embseg.model import load_model

    src = load_model(source)
    mine = (model_config.ndim, model_config.in_channels)
    theirs = (src.config.ndim, src.config.in_channels)
    if mine != theirs:
        raise UserError(f"init_from {source}: a {theirs[0]}D model with {theirs[1]} input channel(s) cannot "
                        f"start a {mine[0]}D model with {mine[1]} input channel(s)")
    net.load_state_dict({k: v.float() for k, v in src.net.state_dict().items()})


def finish_training(out: Path, data: TrainingData, config: TrainConfig, progress: bool = True) -> Model:
    """Load the best model of ``out``, tune its thresholds on the validation set, save and return it."""
    from embseg.model import load_model
    from embseg.tune import tune_model

    if not (out / "model.safetensors").is_file():
        raise UserError(f"{out}: training stopped before any model was saved")
    model = load_model(out)
    if config.tune:
        device = str(select_device(config.device))
        images = data.tune_images if data.tune_images is not None else data.val_images
        masks = data.tune_masks if data.tune_masks is not None else data.val_masks
        for tta in (False, True) if config.tune_tta else (False,):
            best = tune_model(model, images, masks, device=device, tta=tta, normalized=True)
            model.config.training["tuning_tta" if tta else "tuning"] = best
            if progress:
                print(f"tuned thresholds{' for TTA' if tta else ''}: seed_thresh {best['seed_thresh']:.2f}, "
                      f"fg_thresh {best['fg_thresh']:.2f}, min_size {best['min_size']} "
                      f"(val AP@0.5 {best['ap']:.3f} on {len(images)} images)",
                      file=sys.stderr)
        model.net.cpu()
        model.save(out)
    return model


def _plot_curves(out: Path) -> None:
    path = out / LOG_FILE
    if not path.is_file():
        return
    try:
        from embseg.plots import plot_curves
    except ImportError:  # plotting is optional
        return
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    if rows:
        plot_curves(rows, out / "curves.png")


if __name__ == "__main__":  # torchrun --nproc-per-node N -m embseg.training <embseg train flags>
    from embseg.cli import main as _cli_main

    sys.exit(_cli_main(["train", *sys.argv[1:]]))
