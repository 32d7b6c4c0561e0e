"""Typed configuration: the training config (YAML / flags) and the model config (JSON).

Every field of :class:`TrainConfig` is also an ``embseg train`` flag (``--crop-size``, ...); flags
override the YAML file, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from embseg.errors import UserError

#: Version of the model folder format; a model written by a newer format is refused.
MODEL_FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    Fields left at ``None`` are derived from the data (crop size, foreground weight, minimum
    object size, number of dimensions) or from the machine (device).
    """

    images: str | None = None
    masks: str | None = None
    output: str | None = None
    val_images: str | None = None
    val_masks: str | None = None
    val_fraction: float = 0.15
    max_val_images: int = 24
    axes: str | None = None
    ndim: int | None = None
    anisotropy: float = 1.0
    grid_step: float = 1.0 / 1023.0
    norm_low: float = 1.0
    norm_high: float = 99.8
    crop_size: list[int] | None = None
    batch_size: int = 16
    virtual_batch: int = 1
    epochs: int = 200
    samples_per_epoch: int = 1600
    time_limit_minutes: float | None = None
    lr: float = 5e-4
    weight_decay: float = 1e-4
    ema_decay: float = 0.0
    w_inst: float = 1.0
    w_var: float = 10.0
    w_seed: float = 1.0
    fg_weight: float | None = None
    center: str = "medoid"
    random_crop_fraction: float = 0.1
    image_balance: float = 0.0
    intensity_augment: float = 0.0
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    cpu_amp: bool = False
    threads: int | None = None
    num_workers: int = 0
    val_every: int = 5
    val_metric: str = "ap"
    checkpoint_every: int = 1
    figure_every: int = 10
    seed_thresh: float = 0.9
    fg_thresh: float = 0.5
    min_size: int | None = None
    tune: bool = True
    tune_tta: bool = False
    init_from: str | None = None

    def validate(self) -> TrainConfig:
        """Check values; raise :class:`UserError` naming the bad key."""
        positive_int = ["batch_size", "virtual_batch", "epochs", "samples_per_epoch", "val_every",
                        "checkpoint_every", "max_val_images"]
        for key in positive_int:
            if getattr(self, key) < 1:
                raise UserError(f"config: {key} must be >= 1, got {getattr(self, key)}")
        for key in ["lr", "anisotropy", "grid_step"]:
            if not getattr(self, key) > 0:
                raise UserError(f"config: {key} must be > 0, got {getattr(self, key)}")
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise UserError(f"config: time_limit_minutes must be > 0, got {self.time_limit_minutes}")
        for key in ["seed_thresh", "fg_thresh", "val_fraction", "random_crop_fraction",
                    "image_balance"]:
            v = getattr(self, key)
            if not 0 <= v <= 1:
                raise UserError(f"config: {key} must be in [0, 1], got {v}")
        if not 0 <= self.intensity_augment <= 2:
            raise UserError(f"config: intensity_augment must be in [0, 2] (0 = off), got {self.intensity_augment}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"config: ema_decay must be in [0, 1) (0 = no weight average), got {self.ema_decay}")
        if self.fg_weight is not None and self.fg_weight <= 0:
            raise UserError(f"config: fg_weight must be > 0, got {self.fg_weight}")
        if self.min_size is not None and self.min_size < 0:
            raise UserError(f"config: min_size must be >= 0, got {self.min_size}")
        if self.ndim not in (None, 2, 3):
            raise UserError(f"config: ndim must be 2 or 3, got {self.ndim}")
        if self.center not in ("medoid", "approximate-medoid", "centroid"):
            raise UserError(f"config: center must be medoid, approximate-medoid or centroid, got {self.center!r}")
        if self.val_metric not in ("ap", "iou"):
            raise UserError(f"config: val_metric must be 'ap' or 'iou', got {self.val_metric!r}")
        if not 0 <= self.norm_low < self.norm_high <= 100:
            raise UserError("config: need 0 <= norm_low < norm_high <= 100")
        if self.crop_size is not None:
            if any(int(c) < 8 or int(c) % 8 for c in self.crop_size):
                raise UserError(f"config: crop_size values must be positive multiples of 8, got {self.crop_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Convert ``value`` to the type of ``annotation`` (``X | None`` allowed)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if value is None:
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            return None
        raise UserError(f"{source}: {key} must not be empty")
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return _coerce(key, value, inner, source)
    try:
        if origin is list:
            (item,) = args
            if isinstance(value, str):
                value = [v for v in value.replace("x", ",").split(",") if v.strip()]
            if not isinstance(value, list | tuple):
                value = [value]
            return [_coerce(key, v, item, source) for v in value]
        if annotation is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key} = {value!r} is not a valid {getattr(annotation, '__name__', annotation)}") from None
    return value


def suggest(name: str, choices: list[str]) -> str:
    """A ``" (did you mean ...?)"`` suffix for a mistyped name, or ``""``."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_from_dict(values: dict[str, Any], source: str = "config", base: TrainConfig | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from ``values`` on top of ``base`` (defaults if ``None``).

    Unknown keys raise :class:`UserError` with a "did you mean" suggestion.
    """
    types_ = _field_types(TrainConfig)
    known = list(types_)
    out = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in types_:
            raise UserError(f"{source}: unknown key {key!r}{suggest(k, known)}")
        setattr(out, k, _coerce(k, value, types_[k], source))
    return out


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML training config; paths in it are taken as written (only ``~`` is expanded)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return config_from_dict(values, source=str(path), base=base)


def dump_config(config: TrainConfig) -> str:
    """The config as YAML text."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


@dataclass
class ModelConfig:
    """What a saved model needs to predict: stored as ``config.json`` next to the weights."""

    ndim: int
    in_channels: int = 1
    grid_step: list[float] = field(default_factory=lambda: [1.0 / 1023.0] * 2)
    anisotropy: float = 1.0
    norm_low: float = 1.0
    norm_high: float = 99.8
    seed_thresh: float = 0.9
    fg_thresh: float = 0.5
    min_size: int = 10
    #: Thresholds tuned on test-time-augmented outputs (averaging lowers the seed peaks), used
    #: when predicting with TTA; ``None`` = the same as without TTA.
    tta_seed_thresh: float | None = None
    tta_fg_thresh: float | None = None
    halo: int | None = None
    crop_size: list[int] | None = None
    #: Per axis, in pixels: a pixel whose clustering bandwidth reaches farther than this cannot
    #: start an object (:func:`embseg.cluster.cluster`, ``max_radius``). ``None``: half the
    #: training crop (no limit when the crop is unknown); ``[]``: no limit.
    max_seed_radius: list[float] | None = None
    name: str = "embseg-model"
    format_version: int = MODEL_FORMAT_VERSION
    embseg_version: str = ""
    training: dict[str, Any] = field(default_factory=dict)

    def thresholds(self, tta: bool = False) -> tuple[float, float]:
        """``(seed_thresh, fg_thresh)`` for predictions without (or with) test-time augmentation."""
        if tta:
            return (self.seed_thresh if self.tta_seed_thresh is None else self.tta_seed_thresh,
                    self.fg_thresh if self.tta_fg_thresh is None else self.tta_fg_thresh)
        return self.seed_thresh, self.fg_thresh

    def seed_radius(self) -> list[float] | None:
        """The ``max_radius`` of the clustering (:attr:`max_seed_radius`), ``None`` for no limit.

        By default half the training crop per axis: the crop is the data rule's mean + 5 std
        of the object extents, so no trained object reaches farther from its seed.
        """
        if self.max_seed_radius is not None:
            return [float(r) for r in self.max_seed_radius] or None
        if self.crop_size:
            return [int(c) / 2 for c in self.crop_size]
        return None

    def to_json(self) -> str:
        """JSON text of the config."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> ModelConfig:
        """Validate and build from a dict read from ``config.json``."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: model config must be a JSON object")
        version = values.get("format_version", MODEL_FORMAT_VERSION)
        if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
            raise UserError(
                f"{source}: model format version {version} is newer than this embseg supports "
                f"({MODEL_FORMAT_VERSION}); upgrade embseg"
            )
        known = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in known]
        if unknown:
            raise UserError(f"{source}: unknown model config key {unknown[0]!r}{suggest(unknown[0], known)}")
        if values.get("ndim") not in (2, 3):
            raise UserError(f"{source}: ndim must be 2 or 3, got {values.get('ndim')!r}")
        types_ = _field_types(cls)
        coerced = {k: (_coerce(k, v, types_[k], source) if k != "training" else v) for k, v in values.items()}
        cfg = cls(**coerced)
        if len(cfg.grid_step) != cfg.ndim or any(s <= 0 for s in cfg.grid_step):
            raise UserError(f"{source}: grid_step must hold {cfg.ndim} positive values")
        if cfg.max_seed_radius and (len(cfg.max_seed_radius) != cfg.ndim or any(not r > 0 for r in cfg.max_seed_radius)):
            raise UserError(f"{source}: max_seed_radius must be empty or hold {cfg.ndim} positive values")
        if cfg.in_channels < 1:
            raise UserError(f"{source}: in_channels must be >= 1")
        return cfg
