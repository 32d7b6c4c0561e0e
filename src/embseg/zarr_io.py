"""Zarr and OME-Zarr in and out: lazy image reading, chunked label images that napari and Fiji open.

Reading
-------
:func:`open_zarr_image` opens a plain zarr array, or an OME-Zarr image group (NGFF v0.4, zarr
format 2, or v0.5, zarr format 3), without reading pixels. Of an OME-Zarr multiscale image it
takes level 0 (``multiscales[0].datasets[0]``), its axes from ``multiscales[0].axes`` and its voxel
size from the ``scale`` coordinate transformations (the dataset's times the multiscale's own). A
time axis of length 1 is dropped; longer time series are refused. The pixels come out
channel-first ``(C, (Z,) Y, X)`` region by region (:meth:`ZarrImage.read`), in their stored dtype.

Axes of a plain array: the ``axes`` argument, else the xarray convention
``_ARRAY_DIMENSIONS`` / zarr 3 ``dimension_names`` when they name only ``t c z y x``, else by
the number of dimensions like a TIFF (``embseg.io.read_image``; 3D needs ``ndim`` or ``axes``).

Writing
-------
:func:`create_label_image` makes an empty, chunked ``uint32`` label image as an OME-Zarr
(NGFF **v0.4**, zarr format 2: what napari-ome-zarr and Fiji read most reliably; written with
zarr-python 3) group with one
multiscale level ``0``, zlib-compressed chunks and ``/``-separated chunk keys, and the
``image-label`` metadata of the spec. It is either

* a stand-alone label image (``OUT_DIR/<name>.zarr``): napari-ome-zarr opens it as a labels
  layer, Fiji (File > Import > OME-Zarr / BigDataViewer N5-Zarr) as an integer image; or
* ``labels/<name>`` inside an existing OME-Zarr image (:func:`label_group_in_image`), listed in
  ``labels/.zattrs`` and pointing back to the image with ``source.image = "../../"``, as the spec
  lays labels out; viewers then show image and labels together.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embseg.errors import UserError
from embseg.io import _check_axes, _decide_axes, canonical_axes

#: The OME-NGFF version written.
NGFF_VERSION = "0.4"
#: Letters (upper case) of the OME-NGFF axis names embseg understands.
_AXIS_LETTERS = set("TCZYX")
_AXIS_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}


def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - the zarr extra is missing
        raise UserError("zarr support needs the zarr extra (zarr 3, Python >= 3.11): pip install 'embseg[zarr]'") from None
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise UserError(f"embseg needs zarr >= 3 (zarr {zarr.__version__} is installed)")
    return zarr


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` is a zarr array or group (format 2 or 3) on disk."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any((path / name).is_file() for name in (".zarray", ".zgroup", "zarr.json"))


def _attrs(node: Any) -> dict[str, Any]:
    """Attributes of a zarr node, with v0.5's ``ome`` namespace flattened into them."""
    attrs = dict(node.attrs)
    ome = attrs.get("ome")
    if isinstance(ome, dict):
        attrs = {**attrs, **ome}
    return attrs


def _open(path: Path) -> Any:
    zarr = _zarr()
    if not is_zarr(path):
        raise UserError(f"{path}: not a zarr array or group (no .zarray, .zgroup or zarr.json)")
    try:
        return zarr.open(str(path), mode="r")
    except Exception as err:  # corrupt metadata surfaces as many exception types
        raise UserError(f"{path}: cannot open the zarr store ({err})") from None


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class ZarrImage:
    """A lazily read zarr image with named axes.

    Attributes
    ----------
    path
        Folder of the zarr array (for OME-Zarr: the level-0 array inside the image group).
    axes
        Axes of the stored array, upper case, e.g. ``"ZYX"``, ``"CZYX"``, ``"TCZYX"``.
    voxel_size
        Physical size per spatial axis in ``(Z,) Y, X`` order, or None when not recorded.
    unit
        Unit of ``voxel_size`` when the metadata names one.
    group
        The OME-Zarr image group the array belongs to, or None for a plain array.
    """

    path: Path
    axes: str
    voxel_size: tuple[float, ...] | None = None
    unit: str | None = None
    group: Path | None = None
    _array: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # Ship the path, not an open store, to dask workers.
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> Any:
        """The zarr array (opened on first use)."""
        if self._array is None:
            self._array = _open(self.path)
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the stored array."""
        return tuple(int(n) for n in self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        """Pixel type."""
        return np.dtype(self.array.dtype)

    @property
    def spatial_axes(self) -> str:
        """Spatial axes in canonical order, ``"YX"`` or ``"ZYX"``."""
        return "".join(a for a in "ZYX" if a in self.axes)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.spatial_axes)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes in canonical order."""
        shape = self.shape
        return tuple(shape[self.axes.index(a)] for a in self.spatial_axes)

    @property
    def n_channels(self) -> int:
        """Number of channels (1 without a channel axis)."""
        return self.shape[self.axes.index("C")] if "C" in self.axes else 1

    def read(self, region: Sequence[slice] | None = None) -> np.ndarray:
        """Pixels of a spatial region, channel-first ``(C, *region)``, stored dtype.

        Parameters
        ----------
        region
            One slice per spatial axis in ``(Z,) Y, X`` order (steps allowed); None = all.
        """
        spatial = self.spatial_axes
        region = tuple(region) if region is not None else (slice(None),) * len(spatial)
        if len(region) != len(spatial):
            raise ValueError(f"region has {len(region)} slices for spatial axes {spatial}")
        index: list[Any] = []
        kept = ""
        for a in self.axes:
            if a == "T":
                index.append(0)
            elif a == "C":
                index.append(slice(None))
                kept += a
            else:
                index.append(region[spatial.index(a)])
                kept += a
        data = np.asarray(self.array[tuple(index)])
        order = [kept.index(a) for a in canonical_axes(kept)]
        data = np.transpose(data, order)
        return data if "C" in kept else data[np.newaxis]


def _ngff_axes(multiscale: dict[str, Any], n: int, source: str) -> str:
    axes = multiscale.get("axes")
    if axes is None:  # v0.1 / v0.2: always 5D tczyx
        names = list("tczyx")[5 - n :]
    else:
        names = [a if isinstance(a, str) else a.get("name", "") for a in axes]
    letters = "".join(str(name).upper() for name in names)
    if len(letters) != n or len(set(letters)) != n or not set(letters) <= _AXIS_LETTERS:
        raise UserError(f"{source}: OME-Zarr axes {names} are not among t, c, z, y, x (one letter each)")
    return letters


def _axis_units(multiscale: dict[str, Any]) -> dict[str, str]:
    units = {}
    for a in multiscale.get("axes") or []:
        if isinstance(a, dict) and a.get("unit"):
            units[str(a.get("name", "")).upper()] = str(a["unit"])
    return units


def _scale(transforms: Any, n: int) -> np.ndarray:
    scale = np.ones(n)
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale" and isinstance(t.get("scale"), list):
            if len(t["scale"]) == n:
                scale = scale * np.asarray(t["scale"], dtype=np.float64)
    return scale


def _from_multiscales(group_path: Path, attrs: dict[str, Any]) -> ZarrImage:
    multiscales = attrs["multiscales"]
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise UserError(f"{group_path}: OME-Zarr 'multiscales' metadata is empty or malformed")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets or "path" not in datasets[0]:
        raise UserError(f"{group_path}: OME-Zarr multiscales lists no datasets")
    level0 = group_path / str(datasets[0]["path"])
    array = _open(level0)
    n = len(array.shape)
    axes = _ngff_axes(ms, n, str(group_path))
    scale = _scale(datasets[0].get("coordinateTransformations"), n) * _scale(
        ms.get("coordinateTransformations"), n
    )
    spatial = [i for i, a in enumerate(axes) if a in "ZYX"]
    spatial.sort(key=lambda i: "ZYX".index(axes[i]))
    units = _axis_units(ms)
    unit = units.get("X") or units.get("Y")
    image = ZarrImage(level0, axes, tuple(float(scale[i]) for i in spatial), unit, group_path)
    image._array = array
    return image


def open_zarr_image(path: str | Path, axes: str | None = None, ndim: int | None = None) -> ZarrImage:
    """Open a zarr or OME-Zarr image lazily (see the module docstring for how axes are decided).

    Parameters
    ----------
    path
        A zarr array, an OME-Zarr image group, or a level array inside one.
    axes
        Axes of the stored array (letters ``T C Z Y X``); overrides the metadata.
    ndim
        Spatial dimensions expected (the model's); checked, and settles 3D plain arrays.

    Returns
    -------
    ZarrImage

    Raises
    ------
    UserError
        Not a zarr store, a group without OME multiscales, unknown or inconsistent axes, a
        time axis longer than 1, or a spatial dimension other than ``ndim``.
    """
    path = Path(path).expanduser()
    node = _open(path)
    zarr = _zarr()
    if isinstance(node, zarr.Group):
        attrs = _attrs(node)
        if "multiscales" not in attrs:
            raise UserError(
                f"{path}: a zarr group without OME-Zarr 'multiscales' metadata; "
                "give the path of the array inside it"
            )
        image = _from_multiscales(path, attrs)
    else:
        image = ZarrImage(path, "")
        image._array = node
        parent = path.parent
        if is_zarr(parent):  # a level array of an OME-Zarr image: keep the image's metadata
            try:
                parent_attrs = _attrs(zarr.open(str(parent), mode="r"))
            except Exception:
                parent_attrs = {}
            if "multiscales" in parent_attrs:
                image = _from_multiscales(parent, parent_attrs)
                if image.path.resolve() != path.resolve():
                    image = ZarrImage(path, image.axes, None, None, parent)
                    image._array = node
        if not image.axes and not axes:
            image.axes = _plain_axes(node, ndim, path)
    if axes:
        letters = axes.upper()
        if len(letters) != len(image.shape) or len(set(letters)) != len(letters) or not set(letters) <= _AXIS_LETTERS:
            raise UserError(f"{path}: axes {axes!r} do not fit the array's {len(image.shape)} dimensions {image.shape}")
        image.axes = letters
    _check_image_axes(image, ndim, path)
    return image


def _plain_axes(node: Any, ndim: int | None, path: Path) -> str:
    names = node.attrs.get("_ARRAY_DIMENSIONS") or getattr(node.metadata, "dimension_names", None)  # v2 / v3
    shape = tuple(int(n) for n in node.shape)
    if names and len(names) == len(shape) and all(isinstance(n, str) for n in names):
        letters = "".join(n.upper() for n in names)
        if set(letters) <= _AXIS_LETTERS and len(set(letters)) == len(letters):
            return letters
    return _decide_axes(shape, None, ndim, path)


def _check_image_axes(image: ZarrImage, ndim: int | None, path: Path) -> None:
    letters = image.axes.replace("T", "")
    _check_axes(letters, len(letters), str(path))
    if "T" in image.axes and image.shape[image.axes.index("T")] != 1:
        raise UserError(
            f"{path}: a time series ({image.shape[image.axes.index('T')]} time points); "
            "predict one time point at a time (a zarr array per time point)"
        )
    if ndim is not None and image.ndim != ndim:
        raise UserError(
            f"{path}: read as {image.axes} {image.shape}, {image.ndim}D images, but {ndim}D is "
            "expected; pass --axes to say how to read it"
        )


def read_zarr_labels(path: str | Path) -> np.ndarray:
    """All of a label image written by :func:`create_label_image` (or any zarr array), in memory."""
    image = open_zarr_image(path)
    return image.read()[0]


# --------------------------------------------------------------------------------------------
# writing


def _create_array(group: Any, name: str, shape: Sequence[int], chunks: Sequence[int], dtype: Any) -> Any:
    """A zlib-compressed (readable by Fiji's pure-Java codecs), zero-filled array with ``/`` chunk
    keys (NGFF 0.4) in a zarr-format-2 group."""
    import numcodecs

    return group.create_array(
        name, shape=tuple(int(n) for n in shape), chunks=tuple(int(c) for c in chunks), dtype=dtype,
        fill_value=0, compressors=numcodecs.Zlib(level=1), chunk_key_encoding={"name": "v2", "separator": "/"},
    )


def _open_group_v2(path: Path, mode: str) -> Any:
    return _zarr().open_group(str(path), mode=mode, zarr_format=2)


def multiscales_metadata(
    axes: str, voxel_size: Sequence[float] | None = None, unit: str | None = None, name: str = "labels"
) -> list[dict[str, Any]]:
    """OME-NGFF v0.4 ``multiscales`` metadata of a single-level image with spatial ``axes``."""
    scale = [float(v) for v in voxel_size] if voxel_size is not None else [1.0] * len(axes)
    if len(scale) != len(axes):
        raise ValueError(f"voxel_size has {len(scale)} values for axes {axes}")
    entries = []
    for a in axes:
        entry = {"name": a.lower(), "type": _AXIS_TYPES[a]}
        if unit and _AXIS_TYPES[a] == "space":
            entry["unit"] = unit
        entries.append(entry)
    return [{
        "version": NGFF_VERSION,
        "name": name,
        "axes": entries,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        "type": "none",
    }]


def create_label_image(
    path: str | Path,
    shape: Sequence[int],
    chunks: Sequence[int],
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    name: str | None = None,
    source_image: str | None = None,
    dtype: Any = np.uint32,
    attributes: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Any:
    """Create an empty chunked OME-Zarr (v0.4) label image; returns its level-0 zarr array.

    Parameters
    ----------
    path
        Folder of the label image group (e.g. ``out/cells.zarr`` or ``img.zarr/labels/cells``).
    shape, chunks
        Spatial shape and chunk shape, ``(Z,) Y, X``.
    voxel_size, unit
        Physical voxel size per axis (``scale`` transformation) and its unit (e.g.
        ``"micrometer"``).
    name
        Name in the metadata (default: the folder name without ``.zarr``).
    source_image
        ``image-label.source.image``: relative path from the label group to its image
        (``"../../"`` for ``labels/<name>`` inside an image); None for a stand-alone label image.
    dtype
        Label dtype (``uint32``; Fiji reads ``uint16``/``uint32`` label images).
    attributes
        Extra group attributes (embseg records its settings under ``"embseg"``).
    overwrite
        Replace an existing folder.
    """
    path = Path(path)
    ndim = len(shape)
    if ndim not in (2, 3) or len(chunks) != ndim:
        raise ValueError(f"shape {tuple(shape)} and chunks {tuple(chunks)} must both be 2D or 3D")
    if path.exists():
        if not overwrite:
            raise UserError(f"{path}: already exists; refusing to overwrite it")
        shutil.rmtree(path)
    group = _open_group_v2(path, "w")
    axes = "ZYX"[3 - ndim :]
    label_name = name or path.name.split(".")[0]
    image_label: dict[str, Any] = {"version": NGFF_VERSION}
    if source_image is not None:
        image_label["source"] = {"image": source_image}
    group.attrs.update({
        "multiscales": multiscales_metadata(axes, voxel_size, unit, label_name),
        "image-label": image_label,
        **(attributes or {}),
    })
    return _create_array(group, "0", shape, chunks, dtype)


def label_group_in_image(image_group: str | Path, name: str) -> Path:
    """Register ``labels/<name>`` in an OME-Zarr image's ``labels`` group; returns its path.

    The label image itself is then made with ``create_label_image(path, ...,
    source_image="../../")``. The ``labels`` group is created if missing (zarr format 2).
    """
    image_group = Path(image_group)
    attrs = _attrs(_open(image_group))
    if "multiscales" not in attrs:
        raise UserError(f"{image_group}: not an OME-Zarr image group (no multiscales metadata)")
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"label name {name!r} must be a plain folder name")
    labels_path = image_group / "labels"
    if is_zarr(labels_path):
        zarr_format = _open(labels_path).metadata.zarr_format
        if zarr_format != 2:
            raise UserError(f"{labels_path}: a zarr format {zarr_format} labels group; embseg writes format 2 (NGFF 0.4)")
        group = _open_group_v2(labels_path, "r+")
    else:
        group = _open_group_v2(labels_path, "w")
    names = list(group.attrs.get("labels", []))
    if name not in names:
        names.append(name)
    group.attrs["labels"] = names
    return labels_path / name


def write_image_zarr(
    path: str | Path,
    image: np.ndarray,
    axes: str,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an in-memory image as a single-level OME-Zarr (v0.4) image group.

    For converting TIFFs to zarr, tests and benchmarks; ``axes`` are those of ``image`` among
    ``C Z Y X`` (written in canonical order). Chunks default to 64 per spatial axis (channels
    whole).
    """
    path = Path(path)
    letters = _check_axes(axes, np.ndim(image), str(path))
    order = [letters.index(a) for a in canonical_axes(letters)]
    data = np.transpose(np.asarray(image), order)
    canon = canonical_axes(letters)
    spatial = canon.replace("C", "")
    if chunks is None:
        chunks = [min(64, n) for n in data.shape[-len(spatial):]]
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) == len(spatial) and "C" in canon:
        chunks = (data.shape[0], *chunks)
    if path.exists():
        if not overwrite:
            raise UserError(f"{path}: already exists; refusing to overwrite it")
        shutil.rmtree(path)
    group = _open_group_v2(path, "w")
    scale = [1.0] * len(canon)
    if voxel_size is not None:
        if len(voxel_size) != len(spatial):
            raise ValueError(f"voxel_size has {len(voxel_size)} values for spatial axes {spatial}")
        scale[-len(spatial):] = [float(v) for v in voxel_size]
    meta = multiscales_metadata(canon, scale, unit, path.name.split(".")[0])
    meta[0].pop("type")
    group.attrs["multiscales"] = meta
    array = _create_array(group, "0", data.shape, chunks, data.dtype)
    array[...] = data
    return path


def block_aligned_chunks(block_shape: Sequence[int], max_chunk: int = 256) -> tuple[int, ...]:
    """Chunk shape for a block-wise output: the block shape, halved while above ``max_chunk``
    (chunks must tile blocks exactly so that parallel block writes never share a chunk)."""
    out = []
    for b in block_shape:
        c = int(b)
        while c > max_chunk and c % 2 == 0:
            c //= 2
        out.append(c)
    return tuple(out)


def json_attr(value: Any) -> Any:
    """``value`` made JSON-safe for zarr attributes (NumPy scalars and arrays to Python)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
