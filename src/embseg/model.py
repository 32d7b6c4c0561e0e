"""A model = its config (JSON) + its network weights (safetensors). Loading never unpickles.

A model folder holds ``config.json`` and ``model.safetensors``. Shipped models live in
``embseg/pretrained/<name>/`` and load by name: ``load_model("nuclei-2d")``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embseg.config import ModelConfig
from embseg.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
#: Tile halo (pixels per axis) by ndim; see :meth:`Model.halo`.
DEFAULT_HALO = {2: 96, 3: 48}
#: Images with more pixels than this are tiled automatically (bounded memory).
MAX_UNTILED_PIXELS = {2: 2048 * 2048, 3: 96 * 256 * 256}
#: First bytes of a ``torch.save`` file: a zip archive (PyTorch >= 1.6) or a bare pickle.
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")
#: Default tile (core) shape by ndim when tiling automatically.
DEFAULT_TILE = {2: (1024, 1024), 3: (64, 256, 256)}


def available_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def select_device(requested: str | None = "auto") -> torch.device:
    """Pick the device: ``cuda`` if available, else ``mps``, else ``cpu`` (for ``"auto"``)."""
    if requested in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {requested!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {requested!r} asked for, but CUDA is not available here")
    return device


def device_reason(requested: str | None = "auto") -> str:
    """Why :func:`select_device` picks what it picks (for ``embseg info``)."""
    device = select_device(requested)
    if requested not in (None, "auto"):
        return f"{device} (asked for)"
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    if device.type == "mps":
        return "mps (Apple GPU available)"
    return "cpu (no CUDA or MPS device found)"


def build_network(config: ModelConfig) -> torch.nn.Module:
    """The network described by ``config`` (freshly initialised)."""
    from embseg.net import BranchedERFNet

    return BranchedERFNet(ndim=config.ndim, in_channels=config.in_channels)


class Model:
    """A trained embseg model: configuration plus network.

    Parameters
    ----------
    config
        The model configuration (dimensions, grid step, normalisation, thresholds).
    net
        The network; built from ``config`` if omitted.
    """

    def __init__(self, config: ModelConfig, net: torch.nn.Module | None = None) -> None:
        self.config = config
        self.net = net if net is not None else build_network(config)
        self.source: str = ""

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.config.ndim

    def __repr__(self) -> str:
        return f"Model(name={self.config.name!r}, ndim={self.ndim}, in_channels={self.config.in_channels})"

    def halo(self) -> int:
        """Context (pixels) each tile gets on every side in tiled prediction.

        The exact receptive field of the network is 622 pixels (``net.receptive_field_halo``), far
        more than the context that matters: the influence of distant pixels decays fast, and
        :data:`DEFAULT_HALO` keeps tiled raw outputs within ~1e-4 of whole-image ones at a fraction
        of the cost. ``config.halo`` overrides it (set it to 624 for bit-exact tiles).
        """
        if self.config.halo is not None:
            return int(self.config.halo)
        return DEFAULT_HALO[self.ndim]

    def auto_tile_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...] | None:
        """Tile shape used when none is given: ``None`` (one pass) unless the image is large."""
        limit = MAX_UNTILED_PIXELS[self.ndim]
        if int(np.prod(spatial)) <= limit:
            return None
        return tuple(min(s, t) for s, t in zip(spatial, DEFAULT_TILE[self.ndim], strict=True))

    def prepare(self, image: np.ndarray, axes: str | None = None, source: str = "image") -> np.ndarray:
        """Channel-first float32 normalised image from a user array (validated against the model)."""
        from embseg.io import to_channel_first
        from embseg.normalize import percentile_normalize

        image = np.asarray(image)
        if axes is None:
            if image.ndim == self.ndim:
                axes = "ZYX"[-self.ndim:]
            elif image.ndim == self.ndim + 1 and self.config.in_channels > 1:
                axes = "C" + "ZYX"[-self.ndim:]
            else:
                raise UserError(
                    f"{source}: a {image.ndim}D array given to a {self.ndim}D model; pass axes= "
                    f"(e.g. {'YX' if self.ndim == 2 else 'ZYX'})"
                )
        array = to_channel_first(image, axes)
        spatial = array.shape[1:]
        if len(spatial) != self.ndim:
            raise UserError(f"{source}: image has {len(spatial)} spatial axes ({axes}) but the model is {self.ndim}D")
        if array.shape[0] != self.config.in_channels:
            hint = "; convert it to one channel" if self.config.in_channels == 1 else ""
            raise UserError(
                f"{source}: image has {array.shape[0]} channel(s) (read as {axes}) but the model "
                f"expects {self.config.in_channels}{hint}, or pass axes (--axes) if it is read wrongly"
            )
        if np.iscomplexobj(array) or array.dtype.kind not in "biuf":
            raise UserError(f"{source}: unsupported pixel type {array.dtype}")
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise UserError(f"{source}: image contains NaN or Inf pixels")
        return percentile_normalize(array, self.config.norm_low, self.config.norm_high)

    def predict_raw(
        self,
        image: np.ndarray,
        axes: str | None = None,
        tta: bool = False,
        tile_shape: tuple[int, ...] | int | None = None,
        device: str | None = "auto",
        normalized: bool = False,
        source: str = "image",
        amp: bool | None = None,
    ) -> torch.Tensor:
        """Raw network outputs ``(2*ndim + 1, *spatial)`` for one image (tiled, optional TTA).

        ``source`` names the image in error messages (e.g. its file).
        """
        from embseg.predict import predict_raw

        data = image if normalized else self.prepare(image, axes, source=source)
        dev = select_device(device)
        self.net.to(dev)
        tiles = _tile(tile_shape, self.ndim)
        if tiles is None:
            tiles = self.auto_tile_shape(tuple(data.shape[1:]))
        return predict_raw(
            self.net, data, self.ndim, tile_shape=tiles, halo=self.halo() if tiles is not None else None,
            tta=tta, device=dev, amp=_use_amp(amp, dev),
        )

    def predict(
        self,
        image: np.ndarray,
        axes: str | None = None,
        tta: bool = False,
        tile_shape: tuple[int, ...] | int | None = None,
        seed_thresh: float | None = None,
        fg_thresh: float | None = None,
        min_size: int | None = None,
        device: str | None = "auto",
        return_seeds: bool = False,
        source: str = "image",
        clustering: str = "blocks",
        amp: bool | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment one image.

        Parameters
        ----------
        image
            2D ``(Y, X)`` / ``(C, Y, X)`` or 3D ``(Z, Y, X)`` / ``(C, Z, Y, X)`` array.
        axes
            Axes of ``image`` (e.g. ``"YX"``, ``"CYX"``, ``"ZYX"``, ``"YXC"``); inferred only when
            unambiguous.
        tta
            Test-time augmentation (8 variants in 2D, 16 in 3D).
        tile_shape
            Predict tile by tile (with a halo) when the image is larger; ``None`` = whole image
            unless it has more than :data:`MAX_UNTILED_PIXELS` (then :data:`DEFAULT_TILE`).
            How a tiled image is clustered is ``clustering``'s choice.
        seed_thresh, fg_thresh, min_size
            Clustering thresholds; the model's tuned values by default.
        device
            ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        return_seeds
            Also return the seed map.
        source
            What to call the image in error messages (e.g. its file name).
        clustering
            For a tiled image: ``"blocks"`` (default) clusters every tile on its own, grown by
            an object halo (half the training crop), and keeps the objects seeded in it
            (:func:`embseg.blockwise.predict_labels_blockwise`): peak memory is bounded by
            the tile, beyond the input and the labels. ``"global"`` keeps the clustering
            candidates of all tiles and clusters them at once
            (:func:`embseg.predict.predict_labels_streamed`): exactly the labels of
            clustering the whole image's raw outputs, with memory growing with the
            foreground.
        amp
            Mixed precision. None (default): float16 on CUDA, float32 on the CPU. True on the
            CPU: bfloat16 where it computes it natively (AMX or AVX512-BF16,
            :func:`embseg.predict.cpu_bf16_supported`; ≈1.6× faster on such a Xeon, labels of
            IoU ≈0.99 with float32's), float32 elsewhere. False: float32.

        Returns
        -------
        labels : np.ndarray
            uint32 instance labels (0 = background).
        seeds : np.ndarray, optional
            float32 seediness map, when ``return_seeds``.
        """
        from embseg.blockwise import predict_labels_blockwise
        from embseg.cluster import seed_map
        from embseg.distributed import default_object_halo
        from embseg.predict import predict_labels_streamed

        if clustering not in ("blocks", "global"):
            raise UserError(f"clustering must be 'blocks' or 'global', got {clustering!r}")
        check_thresholds(seed_thresh, fg_thresh, min_size)  # before the expensive part
        data = self.prepare(image, axes, source=source)
        tiles = _tile(tile_shape, self.ndim)
        if tiles is None:
            tiles = self.auto_tile_shape(tuple(data.shape[1:]))
        if tiles is None:  # one pass: raw outputs of the whole image, then the clustering
            raw = self.predict_raw(data, tta=tta, device=device, normalized=True, amp=amp)
            labels = self.cluster(raw, seed_thresh=seed_thresh, fg_thresh=fg_thresh, min_size=min_size, tta=tta)
            return (labels, seed_map(raw)) if return_seeds else labels
        # Tiled (a large image): never the raw outputs of the whole image in memory.
        cfg = self.config
        default_seed, default_fg = cfg.thresholds(tta)
        dev = select_device(device)
        self.net.to(dev)
        common = dict(
            seed_thresh=default_seed if seed_thresh is None else seed_thresh,
            fg_thresh=default_fg if fg_thresh is None else fg_thresh,
            min_size=cfg.min_size if min_size is None else min_size,
            tta=tta, device=dev, amp=_use_amp(amp, dev), return_seeds=return_seeds,
            max_radius=cfg.seed_radius(),
        )
        if clustering == "blocks":
            result = predict_labels_blockwise(
                self.net, data, self.ndim, cfg.grid_step, block_shape=tiles,
                object_halo=default_object_halo(self), context=self.halo(), **common,
            )
        else:
            result = predict_labels_streamed(
                self.net, data, self.ndim, cfg.grid_step, tile_shape=tiles, halo=self.halo(), **common,
            )
        if return_seeds:
            return relabel_sequential(result[0]), result[1]
        return relabel_sequential(result)

    def cluster(
        self,
        raw: torch.Tensor,
        seed_thresh: float | None = None,
        fg_thresh: float | None = None,
        min_size: int | None = None,
        tta: bool = False,
    ) -> np.ndarray:
        """Cluster raw outputs with the model's (or the given) thresholds.

        ``tta`` says the outputs are test-time augmented: the model's TTA thresholds apply
        (:meth:`embseg.config.ModelConfig.thresholds`).
        """
        from embseg.cluster import cluster

        cfg = self.config
        check_thresholds(seed_thresh, fg_thresh, min_size)
        default_seed, default_fg = cfg.thresholds(tta)
        labels = cluster(
            raw,
            cfg.grid_step,
            seed_thresh=default_seed if seed_thresh is None else seed_thresh,
            fg_thresh=default_fg if fg_thresh is None else fg_thresh,
            min_size=cfg.min_size if min_size is None else min_size,
            max_radius=cfg.seed_radius(),
        )
        return relabel_sequential(labels)

    def save(self, folder: str | Path, half: bool = False, overwrite: bool = True) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (atomically)."""
        from safetensors.torch import save_file

        import embseg
        from embseg.io import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        if half:
            state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
        cfg = replace(self.config, embseg_version=embseg.__version__)
        with atomic_write(folder / WEIGHTS_FILE, overwrite=overwrite) as tmp:
            save_file(state, str(tmp), metadata={"format": "embseg", "ndim": str(cfg.ndim)})
        with atomic_write(folder / CONFIG_FILE, overwrite=overwrite) as tmp:
            Path(tmp).write_text(cfg.to_json())
        return folder


def _use_amp(amp: bool | None, device: torch.device) -> bool:
    """``amp=None``: mixed precision on CUDA only (float32 on the CPU, the results of record)."""
    return device.type == "cuda" if amp is None else bool(amp)


def check_thresholds(seed_thresh: float | None, fg_thresh: float | None, min_size: int | None) -> None:
    """Raise :class:`UserError` for clustering thresholds out of range (``None`` = the model's)."""
    for name, value in (("seed_thresh", seed_thresh), ("fg_thresh", fg_thresh)):
        if value is not None and not 0 < value < 1:
            raise UserError(f"{name} must be in (0, 1), got {value}")
    if min_size is not None and min_size < 0:
        raise UserError(f"min_size must be >= 0, got {min_size}")


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber ids to ``1..N`` in order of first appearance of their value (0 stays 0)."""
    if labels.size == 0 or labels.max() == 0:
        return labels
    present = np.bincount(labels.ravel()) > 0
    present[0] = False
    lut = np.zeros(present.size, dtype=labels.dtype)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=labels.dtype)
    return lut[labels]


def _tile(tile_shape: tuple[int, ...] | int | None, ndim: int) -> tuple[int, ...] | None:
    if tile_shape is None:
        return None
    if isinstance(tile_shape, int):
        tile_shape = (tile_shape,) * ndim
    tile_shape = tuple(int(t) for t in tile_shape)
    if len(tile_shape) != ndim:
        raise UserError(f"tile shape {tile_shape} must have {ndim} values for a {ndim}D model")
    if any(t < 8 for t in tile_shape):
        raise UserError(f"tile shape values must be >= 8, got {tile_shape}")
    return tile_shape


def read_config(folder: Path) -> ModelConfig:
    """Read and validate ``config.json`` of a model folder."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not a model folder (no {CONFIG_FILE})")
    try:
        values: Any = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt model config ({err})") from None
    return ModelConfig.from_dict(values, source=str(path))


def _is_pickle(path: Path) -> bool:
    """Whether ``path`` looks like a ``torch.save`` file rather than safetensors.

    A safetensors file starts with the 8-byte length of its JSON header, then ``{``; a file that
    does not, and starts like a zip archive or a pickle, is a PyTorch pickle. Only bytes are read.
    """
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head.startswith(PICKLE_MAGIC)


def read_weights(path: Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Read safetensors weights and check names, shapes and dtypes against ``net``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path.parent}: no weights file {WEIGHTS_FILE}")
    if _is_pickle(path):
        raise UserError(
            f"{path}: is a pickled PyTorch file (torch.save), not safetensors; embseg never unpickles "
            "model files (pickles can run code): re-save the weights with safetensors"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: corrupt or truncated weights file ({str(err).splitlines()[0]})") from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UserError(f"{path}: weights do not match the model config ({what})")
    for key, ref in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise UserError(f"{path}: tensor {key} has shape {tuple(got.shape)}, config implies {tuple(ref.shape)}")
        if ref.is_floating_point() != got.is_floating_point():
            raise UserError(f"{path}: tensor {key} has dtype {got.dtype}, expected {ref.dtype}")
        state[key] = got.to(ref.dtype)
    return state


def load_model(name_or_path: str | Path, device: str | None = None) -> Model:
    """Load a model by shipped name (``"nuclei-2d"``) or from a model folder.

    Loading reads JSON and safetensors only; no pickle is ever unpickled.
    """
    text = str(name_or_path)
    folder = Path(text).expanduser()
    if not folder.exists():
        if text in available_models():
            folder = PRETRAINED_DIR / text
        else:
            names = available_models()
            from embseg.config import suggest

            known = f"; shipped models: {', '.join(names)}" if names else " (no models are shipped with this installation)"
            raise UserError(f"{text}: no such model folder or shipped model name{suggest(text, names)}{known}")
    if folder.is_file():
        folder = folder.parent
    config = read_config(folder)
    net = build_network(config)
    net.load_state_dict(read_weights(folder / WEIGHTS_FILE, net))
    net.eval()
    model = Model(config, net)
    model.source = str(folder)
    if device is not None:
        net.to(select_device(device))
    return model
