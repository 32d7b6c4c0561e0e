"""Share models: bioimage.io packages that output labels (2D and 3D), TorchScript and ONNX networks.

Three formats (:data:`FORMATS`):

``bioimageio``
    A bioimage.io model package (format 0.5, a ``.zip``) whose forward pass ends in the
    clustering, so any bioimage.io consumer gets an instance label image. It holds two
    equivalent weight entries: ``pytorch_state_dict`` (the original: a state dict plus a
    self-contained architecture source file, :func:`architecture_source`) and ``torchscript``
    (converted from it: the traced network and the scripted clustering of
    :mod:`embseg.script_cluster`). Inputs are normalised by the bioimage.io ``scale_range``
    preprocessing with the model's percentiles; outputs are ``labels`` (int32, ``1..N`` per
    image) and ``seeds`` (float32 seediness). Test tensors, a cover, documentation, licence,
    citations and the model's thresholds (in ``config.embseg``) are included.
``torchscript``, ``onnx``
    The network alone: normalised image ``(B, C, *S)`` (``S`` multiples of 8) to raw outputs
    ``(B, 2D+1, *S)`` (offsets, raw sigmas, seed logit; :mod:`embseg.embedding`). The caller
    normalises and clusters. Each export is checked against the PyTorch network.

The bioimage.io and ONNX parts need the ``export`` extra (``pip install embseg[export]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embseg.errors import UserError
from embseg.model import Model

#: Export formats of :func:`export_model`.
FORMATS = ("bioimageio", "torchscript", "onnx")
#: The network's input sizes must be multiples of this (its stride).
STRIDE = 8
#: Name of the architecture source file and its callable inside a bioimage.io package.
ARCHITECTURE_FILE = "embseg_label_model.py"
ARCHITECTURE_CALLABLE = "embseg_label_model"
#: Largest test tensor (spatial, per axis) cropped from the test image, by ndim.
DEFAULT_TEST_SHAPE = {2: (256, 256), 3: (32, 128, 128)}
#: Tolerance of the network export checks (absolute, on raw outputs).
NETWORK_ATOL = 1e-4
#: Citations written into bioimage.io packages.
CITATIONS = (
    {
        "text": "Lalit M., Tomancak P., Jug F. Embedding-based Instance Segmentation in "
        "Microscopy. Medical Imaging with Deep Learning (MIDL) 2021.",
        "doi": "10.48550/arXiv.2101.10033",
    },
    {
        "text": "Neven D., De Brabandere B., Proesmans M., Van Gool L. Instance Segmentation by "
        "Jointly Optimizing Spatial Embeddings and Clustering Bandwidth. CVPR 2019.",
        "doi": "10.1109/CVPR.2019.00904",
    },
)


# ----------------------------------------------------------------------------- torch modules


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence the deprecation and tracer warnings of ``torch.jit`` / ``torch.onnx``.

    Tracing warns that Python booleans of shape checks are constants in the trace: they are
    (the network's input check), and the traced graph is checked on other sizes instead.
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _example_input(model: Model, size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, model.config.in_channels, *(size,) * model.ndim)
    return torch.randn(shape, generator=generator)


def _radius_text(cfg: Any) -> str:
    radius = cfg.seed_radius()
    return "any number of" if radius is None else " x ".join(f"{r:g}" for r in radius)


def _eval_network(model: Model) -> torch.nn.Module:
    """The model's network on the CPU in eval mode, float32."""
    return model.net.to("cpu").float().eval()


def label_predictor(model: Model) -> torch.nn.Module:
    """Eager :class:`embseg.script_cluster.LabelPredictor` of ``model`` (network + clustering)."""
    from embseg.script_cluster import LabelPredictor

    cfg = model.config
    return LabelPredictor(
        _eval_network(model), list(cfg.grid_step), cfg.seed_thresh, cfg.fg_thresh, cfg.min_size, STRIDE,
        cfg.seed_radius(),
    ).eval()


def trace_network(model: Model) -> torch.jit.ScriptModule:
    """TorchScript of the network by tracing (any batch size and multiple-of-8 spatial size).

    The trace is checked against the eager network on another batch size and spatial size.
    """
    net = _eval_network(model)
    with torch.no_grad(), _quiet_torch():
        traced = torch.jit.trace(net, _example_input(model, 2 * STRIDE), check_trace=False)
    check_network(net, traced, model, what="TorchScript trace")
    return traced


def check_network(
    reference: torch.nn.Module, run: Any, model: Model, what: str, sizes: Sequence[int] = (3 * STRIDE,)
) -> float:
    """Largest absolute difference between ``run(x)`` and ``reference(x)`` on random inputs.

    ``run`` takes and returns torch tensors. Raises ``RuntimeError`` above :data:`NETWORK_ATOL`.
    """
    worst = 0.0
    with torch.no_grad():
        for size in sizes:
            x = _example_input(model, size, batch=2, seed=size)
            expected = reference(x)
            got = run(x)
            if tuple(got.shape) != tuple(expected.shape):
                raise RuntimeError(f"{what}: output shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
            worst = max(worst, float((got.float() - expected).abs().max()))
    if not worst <= NETWORK_ATOL:
        raise RuntimeError(f"{what} differs from the PyTorch network by {worst:.3g} (> {NETWORK_ATOL})")
    return worst


def script_label_predictor(model: Model) -> torch.jit.ScriptModule:
    """TorchScript of network + clustering: normalised image in, ``(labels, seeds)`` out."""
    from embseg.script_cluster import LabelPredictor

    cfg = model.config
    predictor = LabelPredictor(
        trace_network(model), list(cfg.grid_step), cfg.seed_thresh, cfg.fg_thresh, cfg.min_size, STRIDE,
        cfg.seed_radius(),
    )
    with _quiet_torch():
        return torch.jit.script(predictor.eval())


def architecture_source() -> str:
    """Self-contained Python source defining the network, the clustering and the model factory.

    It is the text of :mod:`embseg.net` and :mod:`embseg.script_cluster` (which import only
    ``torch`` and ``math``) followed by :data:`ARCHITECTURE_CALLABLE`, so that a
    bioimage.io consumer can build the ``pytorch_state_dict`` model without embseg installed.
    """
    import embseg
    from embseg import net, script_cluster

    parts = [
        f'"""embseg {embseg.__version__}: branched ERFNet + greedy seed clustering (generated by '
        'embseg.export).\n\nThe network and the clustering are copied from embseg.net and '
        'embseg.script_cluster; BSD-3-Clause."""\n',
        "from __future__ import annotations\n",
    ]
    for module in (net, script_cluster):
        text = inspect.getsource(module).replace("from __future__ import annotations\n", "")
        parts.append(f"\n# {'-' * 30} from {module.__name__}\n\n{text}")
    parts.append(_FACTORY_SOURCE)
    return "".join(parts)


_FACTORY_SOURCE = '''

# ------------------------------ bioimage.io entry point


def embseg_label_model(ndim, in_channels, grid_step, seed_thresh, fg_thresh, min_size, max_radius=None):
    """Network + clustering for a bioimage.io ``pytorch_state_dict`` entry (state dict keys ``net.*``)."""
    return LabelPredictor(
        BranchedERFNet(int(ndim), int(in_channels)),
        [float(v) for v in grid_step],
        float(seed_thresh),
        float(fg_thresh),
        int(min_size),
        STRIDE,
        [float(r) for r in max_radius] if max_radius else None,
    )
'''


# ----------------------------------------------------------------------------- network exports


def export_torchscript(model: Model, path: str | Path, overwrite: bool = False) -> Path:
    """Write the traced network (raw outputs, no clustering) as TorchScript; checked on export."""
    from embseg.io import atomic_write

    traced = trace_network(model)
    path = Path(path)
    with atomic_write(path, overwrite=overwrite) as tmp:
        with _quiet_torch():
            traced.save(str(tmp))
            loaded = torch.jit.load(str(tmp))
        check_network(_eval_network(model), loaded, model, what="saved TorchScript")
    return path


def onnx_available() -> tuple[bool, bool]:
    """Whether ``onnx`` (with ``onnxscript``, for the exporter) and ``onnxruntime`` import."""
    import importlib.util

    export = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
    runtime = importlib.util.find_spec("onnxruntime") is not None
    return export, runtime


def export_onnx(model: Model, path: str | Path, overwrite: bool = False, opset: int = 18) -> tuple[Path, bool]:
    """Write the network (raw outputs, no clustering) as ONNX with dynamic batch and sizes.

    Spatial sizes stay multiples of 8. When ``onnxruntime`` is installed the file is run on
    random inputs of another size and compared with the PyTorch network.

    Returns
    -------
    path : pathlib.Path
    checked : bool
        Whether the onnxruntime check ran (it raises if it fails).
    """
    from embseg.io import atomic_write

    can_export, can_run = onnx_available()
    if not can_export:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install 'embseg[export]'")
    from torch.export import Dim

    net = _eval_network(model)
    names = "zyx"[-model.ndim:]
    shapes = {"x": {0: Dim("batch"), **{2 + i: STRIDE * Dim(f"{a}_blocks", min=1, max=1 << 14)
                                       for i, a in enumerate(names)}}}
    path = Path(path)
    with atomic_write(path, overwrite=overwrite) as tmp:
        with _quiet_torch(), contextlib.redirect_stdout(_Sink()):
            torch.onnx.export(
                net, (_example_input(model, 2 * STRIDE),), str(tmp), dynamo=True, opset_version=opset,
                input_names=["input"], output_names=["raw"], dynamic_shapes=shapes, verbose=False,
                external_data=False,
            )
        if can_run:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            check_network(
                net, lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0]),
                model, what="ONNX (onnxruntime)",
            )
    return path, can_run


class _Sink:
    """A text stream that drops everything (the ONNX exporter prints its progress)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


# ----------------------------------------------------------------------------- bioimage.io


def _import_bioimageio() -> Any:
    try:
        import bioimageio.core
        import bioimageio.spec
    except ImportError:
        raise UserError(
            "bioimage.io export needs bioimageio.spec and bioimageio.core: pip install 'embseg[export]'"
        ) from None
    return bioimageio.spec


def make_test_image(
    model: Model,
    image: np.ndarray | None = None,
    axes: str | None = None,
    max_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Raw (not normalised) ``(C, *S)`` float32 test image with sizes multiples of 8.

    ``image`` (with ``axes``) by default the first bundled sample of the model's ndim; it is
    centre-cropped to at most ``max_shape`` (default :data:`DEFAULT_TEST_SHAPE`), rounded down
    to multiples of 8.
    """
    from embseg.io import to_channel_first

    ndim = model.ndim
    if image is None:
        from embseg.samples import list_samples, sample

        names = list_samples(ndim)
        if not names or model.config.in_channels != 1:
            raise UserError(
                f"no bundled {ndim}D sample with {model.config.in_channels} channel(s): pass a test image"
            )
        found = sample(names[0])
        image, axes = found.image, found.axes
    image = np.asarray(image)
    if axes is None:
        axes = ("C" if image.ndim == ndim + 1 else "") + "ZYX"[-ndim:]
    array = to_channel_first(image, axes)
    if array.ndim != ndim + 1 or array.shape[0] != model.config.in_channels:
        raise UserError(
            f"test image of shape {image.shape} ({axes}) does not fit a {ndim}D model with "
            f"{model.config.in_channels} channel(s)"
        )
    limit = tuple(max_shape) if max_shape is not None else DEFAULT_TEST_SHAPE[ndim]
    if len(limit) != ndim:
        raise UserError(f"test shape {limit} must have {ndim} values")
    spatial = array.shape[1:]
    target = [min(n, m) // STRIDE * STRIDE for n, m in zip(spatial, limit, strict=True)]
    if min(target) < STRIDE:
        raise UserError(f"test image of spatial shape {spatial} is smaller than {STRIDE} pixels on an axis")
    crop = tuple(slice((n - t) // 2, (n - t) // 2 + t) for n, t in zip(spatial, target, strict=True))
    out = np.ascontiguousarray(array[(slice(None), *crop)], dtype=np.float32)
    if not np.isfinite(out).all():
        raise UserError("test image contains NaN or Inf pixels")
    return out


def _write_tensor(files: dict[str, Path], name: str, array: np.ndarray) -> None:
    """The test tensor (``.npy``) and the sample tensor (``.tif``, for people) of one tensor."""
    import tifffile

    np.save(files[f"test_{name}"], array)
    tifffile.imwrite(files[f"sample_{name}"], array)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cover(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """2:1 PNG: the image (first channel; 3D: middle slice) and its labels' outlines."""
    from matplotlib.image import imsave

    from embseg.plots import overlay

    plane = image[0]
    lab = labels
    if plane.ndim == 3:
        plane, lab = plane[plane.shape[0] // 2], lab[lab.shape[0] // 2]
    rgb = np.concatenate([overlay(plane, np.zeros_like(lab)), overlay(plane, lab)], axis=1)
    zoom = max(1, -(-256 // rgb.shape[0]))
    rgb = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
    imsave(path, np.clip(rgb, 0, 1), format="png")


def _documentation(model: Model, name: str) -> str:
    cfg = model.config
    axes = "ZYX"[-model.ndim:]
    return f"""# {name}

An embseg instance segmentation model (the EmbedSeg method:
spatial embeddings, seediness and learnt clustering bandwidths) for {model.ndim}D images with
{cfg.in_channels} channel(s). The network is a branched ERFNet; its forward pass here ends in the
greedy seed clustering, so the model outputs an **instance label image**.

## Inputs and outputs

- `input`: `(batch, channel, {', '.join(axes.lower())})`, any size of at least 8 per spatial axis
  (the model reflect-pads to multiples of 8 inside and crops back). Normalised by the
  `scale_range` preprocessing: percentiles {cfg.norm_low:g} and {cfg.norm_high:g} per channel
  over the spatial axes, no clipping.
- `labels`: int32 instance labels, 0 = background, objects numbered 1..N per image.
- `seeds`: float32 seediness in [0, 1] (the network's guess of how central a pixel is).

Clustering thresholds (tuned on validation data, stored in `config.embseg`): seed threshold
{cfg.seed_thresh:g}, foreground threshold {cfg.fg_thresh:g}, minimum object size {cfg.min_size}
pixels; a seed's clustering ellipse may reach {_radius_text(cfg)} pixels per axis. Grid step per axis: {', '.join(f'{s:.6g}' for s in cfg.grid_step)}
(anisotropy z/xy {cfg.anisotropy:g}).

## Limitations

- Run the **whole image as one block**. Labels of tiles cannot be stitched by a generic consumer
  (each tile numbers its own objects and cuts objects at its border). For images too large for
  memory use `embseg predict`, which tiles the network outputs and clusters once.
- Images should look like the training data (modality, pixel size, object size).
- The label output is int32 (not uint32): PyTorch's uint32 supports few operations and Java
  consumers have no unsigned 32-bit type.

## Validation

Evaluate on held-out images with ground truth: `embseg predict` then `embseg evaluate`
(average precision at IoU 0.5-0.9, as StarDist's `matching`). The test tensors in this package
check that both weight formats reproduce the exported outputs.
"""


def _axes(ndim: int, anisotropy: float) -> list[dict[str, Any]]:
    axes = []
    for a in "zyx"[-ndim:]:
        entry: dict[str, Any] = {"type": "space", "id": a}
        if a == "z":
            entry["description"] = f"z spacing / xy spacing the model was trained for: {anisotropy:g}"
        axes.append(entry)
    return axes


def _rdf(
    spec: Any,
    model: Model,
    name: str,
    files: dict[str, Path],
    authors: Sequence[str],
    license: str,
    description: str | None,
) -> dict[str, Any]:
    """The bioimage.io model description (format 0.5) as a plain dict of YAML values."""
    import embseg

    cfg = model.config
    ndim = model.ndim
    space = "zyx"[-ndim:]
    torch_version = torch.__version__.split("+")[0]
    channel_names = [f"channel{i}" for i in range(cfg.in_channels)]
    in_axes = [{"type": "batch"}, {"type": "channel", "channel_names": channel_names}]
    for axis in _axes(ndim, cfg.anisotropy):
        # Any size from 8 on: the forward pass reflect-pads to multiples of 8 and crops back
        # (as embseg predict does), so consumers need not pad and sizes like 250 x 243 work.
        in_axes.append({**axis, "size": {"min": STRIDE, "step": 1}})

    def out_axes(channel: str) -> list[dict[str, Any]]:
        axes: list[dict[str, Any]] = [{"type": "batch"}, {"type": "channel", "channel_names": [channel]}]
        for axis in _axes(ndim, cfg.anisotropy):
            axes.append({**axis, "size": {"tensor_id": "input", "axis_id": axis["id"]}})
        return axes

    def file(key: str) -> dict[str, str]:
        return {"source": files[key].name, "sha256": _sha256(files[key])}

    embseg_config = dataclasses.asdict(cfg)
    embseg_config["embseg_version"] = embseg.__version__
    kwargs = {
        "ndim": ndim,
        "in_channels": cfg.in_channels,
        "grid_step": [float(s) for s in cfg.grid_step],
        "seed_thresh": float(cfg.seed_thresh),
        "fg_thresh": float(cfg.fg_thresh),
        "min_size": int(cfg.min_size),
        "max_radius": cfg.seed_radius() or [],
    }
    return {
        "format_version": spec.model.v0_5.ModelDescr.implemented_format_version,
        "type": "model",
        "name": name,
        "description": description
        or f"embseg (EmbedSeg method) {ndim}D instance segmentation with label output",
        "authors": [{"name": a} for a in authors],
        "cite": [dict(c) for c in CITATIONS],
        "license": license,
        "tags": ["embseg", "embedseg", "instance-segmentation", f"{ndim}d", "pytorch", "torchscript"],
        "documentation": {"source": files["documentation"].name},
        "covers": [{"source": files["cover"].name}],
        "inputs": [
            {
                "id": "input",
                "description": "image, normalised by scale_range (percentiles per channel)",
                "axes": in_axes,
                "test_tensor": file("test_input"),
                "sample_tensor": file("sample_input"),
                "data": {"type": "float32"},
                "preprocessing": [
                    {
                        "id": "scale_range",
                        "kwargs": {
                            "axes": list(space),
                            "min_percentile": float(cfg.norm_low),
                            "max_percentile": float(cfg.norm_high),
                        },
                    },
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                ],
            }
        ],
        "outputs": [
            {
                "id": "labels",
                "description": "instance labels, 0 = background, 1..N per image",
                "axes": out_axes("labels"),
                "test_tensor": file("test_labels"),
                "sample_tensor": file("sample_labels"),
                "data": {"type": "int32", "range": [0, None]},
            },
            {
                "id": "seeds",
                "description": "seediness in [0, 1]",
                "axes": out_axes("seeds"),
                "test_tensor": file("test_seeds"),
                "sample_tensor": file("sample_seeds"),
                "data": {"type": "float32", "range": [0.0, 1.0]},
            },
        ],
        "weights": {
            "pytorch_state_dict": {
                **file("state_dict"),
                "architecture": {
                    **file("architecture"),
                    "callable": ARCHITECTURE_CALLABLE,
                    "kwargs": kwargs,
                },
                "pytorch_version": torch_version,
            },
            "torchscript": {
                **file("torchscript"),
                "pytorch_version": torch_version,
                "parent": "pytorch_state_dict",
                "comment": "traced network + scripted clustering (embseg.script_cluster)",
            },
        },
        "config": {
            "bioimageio": {
                "architecture_type": "BranchedERFNet",
                "model_parameter_count": int(sum(p.numel() for p in model.net.parameters())),
            },
            "embseg": embseg_config,
        },
    }


def _build(spec: Any, rdf: dict[str, Any], root: Path) -> Any:
    """Validate ``rdf`` (files relative to ``root``); raise ``RuntimeError`` if it is invalid."""
    from bioimageio.spec import ValidationContext, build_description

    descr = build_description(rdf, context=ValidationContext(root=root, perform_io_checks=True))
    if descr.validation_summary.status == "failed" or not isinstance(descr, spec.ModelDescr):
        raise RuntimeError(
            "invalid bioimage.io description:\n" + descr.validation_summary.format()
        )
    return descr


def _preprocessed_test_input(descr: Any) -> np.ndarray:
    """The test input after the description's preprocessing, computed by bioimageio.core.

    The expected outputs are computed from exactly what a consumer feeds the network: the
    percentiles and the ``eps`` of bioimage.io's ``scale_range`` differ from embseg's own
    normalisation in the last bits, enough to reorder seeds of equal seediness.
    """
    from bioimageio.core.digest_spec import get_test_input_sample
    from bioimageio.core.proc_setup import setup_pre_and_postprocessing

    sample = get_test_input_sample(descr)
    procs = setup_pre_and_postprocessing(descr, dataset_for_initial_statistics=[])
    for op in procs.pre:
        op(sample)
    tensor = next(iter(sample.members.values()))
    dims = [str(a.id) for a in descr.inputs[0].axes]
    return np.ascontiguousarray(tensor.data.transpose(*dims).values, dtype=np.float32)


@dataclass(frozen=True)
class PackageTest:
    """Result of :func:`check_package`: ``passed`` and the bioimage.io test summary text."""

    passed: bool
    report: str


def check_package(path: str | Path, weight_format: str | None = None) -> PackageTest:
    """Run ``bioimageio.core``'s model test (all weight formats unless one is given) on a package."""
    _import_bioimageio()
    from bioimageio.core import test_model

    with _quiet_torch():
        summary = test_model(str(path), weight_format=weight_format)
    return PackageTest(summary.status == "passed", summary.format())


def export_bioimageio(
    model: Model,
    path: str | Path,
    image: np.ndarray | None = None,
    axes: str | None = None,
    authors: Sequence[str] = ("embseg",),
    license: str = "BSD-3-Clause",
    name: str | None = None,
    description: str | None = None,
    test_shape: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bioimage.io model package (``.zip``) whose outputs are labels and seeds.

    Parameters
    ----------
    model
        The model; its tuned thresholds go into the clustering and ``config.embseg``.
    path
        Output ``.zip``.
    image, axes
        Test image (raw intensities) and its axes; by default a bundled sample. It is
        centre-cropped to ``test_shape`` (multiples of 8; default :data:`DEFAULT_TEST_SHAPE`).
    authors, license, name, description
        Metadata (SPDX licence id; the name defaults to the model's name).

    Returns
    -------
    pathlib.Path
        ``path``. The package is not tested here: see :func:`check_package`.
    """
    from embseg.io import atomic_write

    spec = _import_bioimageio()
    path = Path(path)
    if path.suffix != ".zip":
        raise UserError(f"{path}: a bioimage.io package is a .zip file")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; use --overwrite")
    if not authors:
        raise UserError("a bioimage.io package needs at least one author")
    name = _package_name(name or model.config.name)
    raw_image = make_test_image(model, image, axes, test_shape)
    predictor = label_predictor(model)
    scripted = script_label_predictor(model)
    with tempfile.TemporaryDirectory(prefix="embseg-export-") as tmp_dir:
        root = Path(tmp_dir)
        files = {
            "state_dict": root / "weights.pt",
            "architecture": root / ARCHITECTURE_FILE,
            "torchscript": root / "weights_torchscript.pt",
            "test_input": root / "test_input.npy",
            "test_labels": root / "test_labels.npy",
            "test_seeds": root / "test_seeds.npy",
            "sample_input": root / "sample_input.tif",
            "sample_labels": root / "sample_labels.tif",
            "sample_seeds": root / "sample_seeds.tif",
            "cover": root / "cover.png",
            "documentation": root / "README.md",
        }
        state = {k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
        torch.save(state, files["state_dict"])
        files["architecture"].write_text(architecture_source())
        with _quiet_torch():
            scripted.save(str(files["torchscript"]))
        batch = raw_image[None]
        spatial = batch.shape[2:]
        # First pass with placeholder outputs: only to let bioimageio.core preprocess the input.
        _write_tensor(files, "input", batch)
        # (placeholders must not be all ~0: bioimage.io rejects such test tensors)
        _write_tensor(files, "labels", np.ones((1, 1, *spatial), np.int32))
        _write_tensor(files, "seeds", np.ones((1, 1, *spatial), np.float32))
        _cover(raw_image, np.zeros(spatial, np.int32), files["cover"])
        files["documentation"].write_text(_documentation(model, name))
        draft = _build(spec, _rdf(spec, model, name, files, authors, license, description), root)
        normalized = torch.from_numpy(_preprocessed_test_input(draft))
        with torch.no_grad():
            labels, seeds = predictor(normalized)
            labels_ts, seeds_ts = scripted(normalized)
        if not torch.equal(labels, labels_ts) or not torch.allclose(seeds, seeds_ts, atol=1e-5):
            raise RuntimeError("TorchScript labels differ from the eager model's on the test image")
        if int(labels.max()) == 0:
            raise UserError(
                "the model finds no object in the test image, so the package could not be tested; "
                "pass a test image with objects (--image)"
            )
        _write_tensor(files, "labels", labels.numpy())
        _write_tensor(files, "seeds", seeds.numpy())
        _cover(raw_image, labels.numpy()[0, 0], files["cover"])
        descr = _build(spec, _rdf(spec, model, name, files, authors, license, description), root)
        with atomic_write(path, overwrite=overwrite) as tmp:
            spec.save_bioimageio_package(descr, output_path=tmp)
    return path


def _package_name(text: str) -> str:
    """A bioimage.io model name: letters, digits, ``_+- ()``, 5 to 128 characters."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+- ()")
    name = "".join(c if c in allowed else "-" for c in text).strip()
    if len(name) < 5:
        name = f"embseg {name}".strip()
    return name[:128]


# ----------------------------------------------------------------------------- dispatch


def export_model(model: Model, path: str | Path, format: str = "bioimageio", **kwargs: Any) -> Path:
    """Export ``model`` to ``path`` in one of :data:`FORMATS` (keyword arguments per format)."""
    if format == "bioimageio":
        return export_bioimageio(model, path, **kwargs)
    if format == "torchscript":
        return export_torchscript(model, path, **kwargs)
    if format == "onnx":
        return export_onnx(model, path, **kwargs)[0]
    raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
