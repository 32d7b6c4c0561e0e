"""Reading and writing images and label images (TIFF), pairing folders, atomic writes.

Conventions
-----------
* Images come back channel-first with one of four axes strings: ``"YX"``, ``"CYX"``, ``"ZYX"``,
  ``"CZYX"``. A 2D single-channel image keeps no channel axis.
* Label images are integer arrays ``(Z,)Y,X`` with 0 as background.
* Every file is written through :func:`atomic_write`: the data goes to a temporary file in the
  target folder, which is renamed onto the target only once it is complete; an existing file is
  never replaced unless ``overwrite=True``.
* Bad input (missing file, not a TIFF, ambiguous axes, shapes that do not fit) raises
  :class:`embseg.errors.UserError` with a one-line message that names the file.

How axes are decided by :func:`read_image`, in order:

1. ``axes`` given: it names the axes of the array as stored (letters ``C``, ``Z``, ``Y``, ``X``
   in any order, e.g. ``"YXC"`` or ``"ZCYX"``).
2. The TIFF's own axes metadata (tifffile's ``series.axes``: ImageJ hyperstacks, tifffile's
   shaped files, RGB samples ``S``), when it only uses ``C``, ``Z``, ``Y``, ``X`` and ``S``
   (samples, read as channels). Generic letters (``Q``, ``I``: "some axis") carry no
   information; other letters (``T`` for time, ...) are refused: pass ``axes``.
3. Otherwise by the number of dimensions: 2D is ``"YX"``, 4D is ``"CZYX"``; 3D is ambiguous and
   is decided by ``ndim`` (the model's spatial dims: 2 gives ``"CYX"``, 3 gives ``"ZYX"``), or
   refused when ``ndim`` is not given. Nothing is guessed silently.

When ``ndim`` is given, the result must have that many spatial axes.
"""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from embseg.errors import UserError

#: File suffixes taken as TIFF (compared case-insensitively).
TIFF_SUFFIXES = (".tif", ".tiff")
#: Canonical order of axes letters.
CANONICAL_ORDER = "CZYX"
#: Axes letters in TIFF metadata that say nothing about what an axis is.
_GENERIC_AXES = set("QI")
#: How many names an error message lists before "and N more".
_MAX_LISTED = 10

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# axes


def _check_axes(axes: str, ndim_array: int, source: str) -> str:
    """Validate an axes string against an array's number of dimensions; return it upper-case."""
    letters = axes.upper()
    if not letters or any(a not in CANONICAL_ORDER for a in letters):
        raise UserError(f"{source}: axes {axes!r} may only use the letters C, Z, Y, X")
    if len(set(letters)) != len(letters):
        raise UserError(f"{source}: axes {axes!r} repeat a letter")
    if "Y" not in letters or "X" not in letters:
        raise UserError(f"{source}: axes {axes!r} must contain Y and X")
    if len(letters) != ndim_array:
        raise UserError(
            f"{source}: axes {axes!r} name {len(letters)} axes but the array has {ndim_array}"
        )
    return letters


def canonical_axes(axes: str) -> str:
    """The canonical (channel-first) order of the letters of ``axes``, e.g. ``"YXC"`` -> ``"CYX"``."""
    return "".join(a for a in CANONICAL_ORDER if a in axes.upper())


def to_channel_first(array: np.ndarray, axes: str) -> np.ndarray:
    """Transpose an array with named axes to ``(C, (Z,) Y, X)``, the network's layout.

    Parameters
    ----------
    array
        Array whose axes are named by ``axes``.
    axes
        One letter per array axis among ``C``, ``Z``, ``Y``, ``X``, in any order.

    Returns
    -------
    numpy.ndarray
        A view of ``array`` with the axes in canonical order and always a channel axis first:
        one of length 1 is added when ``axes`` has no ``C`` (so ``"YX"`` gives ``(1, Y, X)``).

    Raises
    ------
    UserError
        If ``axes`` is not a valid axes string for ``array``.

    Examples
    --------
    >>> to_channel_first(np.zeros((4, 5, 3)), "YXC").shape
    (3, 4, 5)
    >>> to_channel_first(np.zeros((4, 5)), "YX").shape
    (1, 4, 5)
    """
    array = np.asarray(array)
    letters = _check_axes(axes, array.ndim, "array")
    order = [letters.index(a) for a in canonical_axes(letters)]
    out = np.transpose(array, order)
    return out if "C" in letters else out[np.newaxis]


def _spatial_ndim(axes: str) -> int:
    return sum(a in "ZYX" for a in axes)


def _metadata_axes(meta: str, shape: tuple[int, ...], path: Path) -> str | None:
    """Axes from TIFF metadata, or None when it says nothing definite."""
    meta = meta.upper()
    if len(meta) != len(shape) or any(a in _GENERIC_AXES for a in meta):
        return None
    unknown = sorted(set(meta) - set("CZYXS"))
    if unknown:
        raise UserError(
            f"{path}: the file's axes are {meta!r} ({', '.join(unknown)} is not C, Z, Y or X); "
            "pass --axes to say how to read it"
        )
    if "S" in meta and "C" in meta:
        raise UserError(
            f"{path}: the file has both channels and samples (axes {meta!r}); pass --axes"
        )
    letters = meta.replace("S", "C")
    if len(set(letters)) != len(letters) or "Y" not in letters or "X" not in letters:
        return None
    return letters


def _decide_axes(shape: tuple[int, ...], meta: str | None, ndim: int | None, path: Path) -> str:
    """The stored axes of an array read from ``path`` when the user gave none."""
    if meta is not None:
        found = _metadata_axes(meta, shape, path)
        if found is not None:
            return found
    if len(shape) == 2:
        return "YX"
    if len(shape) == 4:
        return "CZYX"
    if len(shape) == 3:
        if ndim == 2:
            return "CYX"
        if ndim == 3:
            return "ZYX"
        raise UserError(
            f"{path}: a 3D array {shape} may be CYX (2D with channels) or ZYX (a volume); "
            "pass --axes"
        )
    raise UserError(f"{path}: a {len(shape)}D array {shape}; expected 2D, 3D or 4D")


def _check_ndim(axes: str, ndim: int | None, path: Path, shape: tuple[int, ...]) -> None:
    if ndim is None:
        return
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    found = _spatial_ndim(axes)
    if found != ndim:
        raise UserError(
            f"{path}: read as {axes} {shape}, {found}D images, but {ndim}D is expected; "
            "pass --axes to say how to read it"
        )


# --------------------------------------------------------------------------------------------
# reading


def _read_tiff(path: PathLike) -> tuple[np.ndarray, str | None]:
    """Array and metadata axes of the first series of a TIFF, with errors naming the file."""
    import tifffile

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a TIFF file")
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise UserError(f"{path}: the TIFF holds no image")
            series = tif.series[0]
            array = series.asarray()
            meta = series.axes
    except UserError:
        raise
    except PermissionError as err:
        raise UserError(f"{path}: cannot read the file ({err.strerror or 'permission denied'})") from err
    except tifffile.TiffFileError as err:
        raise UserError(f"{path}: not a readable TIFF ({err})") from err
    except Exception as err:  # truncated or corrupt data surfaces as many exception types
        raise UserError(
            f"{path}: cannot read the TIFF, it may be truncated or corrupt ({err})"
        ) from err
    if array.shape != tuple(series.shape) or len(meta) != array.ndim:
        meta = None
    return array, meta


def read_image(
    path: PathLike, axes: str | None = None, ndim: int | None = None
) -> tuple[np.ndarray, str]:
    """Read a TIFF image, channel-first.

    Parameters
    ----------
    path
        TIFF file.
    axes
        Axes of the array as stored in the file (letters ``C``, ``Z``, ``Y``, ``X`` in any
        order, e.g. ``"YXC"``). None: decided from the file's metadata and ``ndim`` as the
        module docstring describes.
    ndim
        Spatial dimensions the caller expects (2 or 3), e.g. the model's. It settles 3D arrays
        without metadata and is checked against the result.

    Returns
    -------
    image : numpy.ndarray
        The pixels in their stored dtype (NaN and Inf are kept: see :func:`check_finite`),
        axes ordered ``(C,)(Z,)Y,X``.
    axes : str
        One of ``"YX"``, ``"CYX"``, ``"ZYX"``, ``"CZYX"``. A single-channel image has no
        channel axis; ``to_channel_first(image, axes)`` gives the network's ``(C, ...)`` layout.

    Raises
    ------
    UserError
        Missing file, not a TIFF, truncated or corrupt data, axes that do not fit the array or
        ``ndim``, a 3D array with neither axes metadata nor ``ndim``, 1D or 5D+ arrays.
    """
    path = Path(path)
    array, meta = _read_tiff(path)
    shape = tuple(array.shape)
    if array.ndim < 2 or array.ndim > 4:
        raise UserError(f"{path}: a {array.ndim}D array {shape}; expected 2D, 3D or 4D")
    stored = (
        _check_axes(axes, array.ndim, str(path)) if axes else _decide_axes(shape, meta, ndim, path)
    )
    _check_ndim(stored, ndim, path, shape)
    order = [stored.index(a) for a in canonical_axes(stored)]
    return np.ascontiguousarray(np.transpose(array, order)), canonical_axes(stored)


def check_finite(image: np.ndarray, path: PathLike) -> None:
    """Raise :class:`UserError` naming ``path`` if ``image`` holds NaN or infinite values."""
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.inexact):
        return
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise UserError(f"{path}: {bad} of {image.size} pixels are NaN or infinite")


def read_labels(path: PathLike, ndim: int | None = None) -> np.ndarray:
    """Read a label image (0 = background, one integer id per object).

    Parameters
    ----------
    path
        TIFF file.
    ndim
        Expected spatial dimensions (2 or 3). Leading axes of length 1 beyond ``ndim`` are
        dropped (e.g. a ``(1, Y, X)`` file read as 2D).

    Returns
    -------
    numpy.ndarray
        Integer labels. Integer files keep their dtype. A boolean mask is one object: it comes
        back as ``uint8`` 0/1. A float file is accepted only when every value is a non-negative
        whole number; it is cast to ``uint32`` (``uint64`` above 2**32 - 1).

    Raises
    ------
    UserError
        Missing or unreadable file, RGB data, wrong number of dimensions, negative values,
        non-integral or non-finite float values.
    """
    path = Path(path)
    labels, meta = _read_tiff(path)
    if meta is not None and "S" in meta.upper():
        raise UserError(f"{path}: an RGB image ({meta}); expected a label image of integer ids")
    if ndim is not None:
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        while labels.ndim > ndim and labels.shape[0] == 1:
            labels = labels[0]
        if labels.ndim != ndim:
            raise UserError(f"{path}: labels of shape {labels.shape}; expected {ndim}D")
    elif labels.ndim not in (2, 3):
        raise UserError(f"{path}: labels of shape {labels.shape}; expected 2D or 3D")
    return _as_label_array(labels, str(path))


def _as_label_array(labels: np.ndarray, source: str) -> np.ndarray:
    """Check and cast an array to integer labels (see :func:`read_labels`)."""
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
            raise UserError(f"{source}: labels hold negative values (min {labels.min()})")
        return labels
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)):
            raise UserError(f"{source}: labels hold NaN or infinite values")
        if labels.size and labels.min() < 0:
            raise UserError(f"{source}: labels hold negative values (min {labels.min()})")
        if np.any(labels != np.floor(labels)):
            raise UserError(f"{source}: labels hold non-integer values; expected integer ids")
        top = float(labels.max()) if labels.size else 0.0
        return labels.astype(np.uint32 if top <= np.iinfo(np.uint32).max else np.uint64)
    raise UserError(f"{source}: labels of dtype {labels.dtype}; expected integers")


def validate_pair(
    image: np.ndarray,
    image_axes: str,
    labels: np.ndarray,
    image_path: PathLike,
    mask_path: PathLike,
) -> None:
    """Check that an image and its label image cover the same pixels.

    Parameters
    ----------
    image
        Channel-first image as returned by :func:`read_image`.
    image_axes
        Its axes string.
    labels
        Label image ``(Z,)Y,X``.
    image_path, mask_path
        Files they came from, for the message.

    Raises
    ------
    UserError
        If the spatial shapes differ; the message names both files and both shapes.
    """
    if len(image_axes) != np.ndim(image):
        raise ValueError(f"axes {image_axes!r} do not fit an image of shape {np.shape(image)}")
    spatial = tuple(n for n, a in zip(np.shape(image), image_axes, strict=True) if a != "C")
    if spatial != tuple(labels.shape):
        raise UserError(
            f"{image_path} (spatial shape {spatial}) and {mask_path} (shape {tuple(labels.shape)}) "
            "differ in shape"
        )


# --------------------------------------------------------------------------------------------
# writing


@contextmanager
def atomic_write(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a file all at once: yield a temporary path in the same folder, then rename it.

    The temporary name keeps the target's suffix (``.plot.1a2b3c4d.tmp.png``), so writers that
    infer the format from the name work. Missing parent folders are created. On success the
    temporary file is renamed onto ``path``; on any exception it is deleted and the exception
    propagates, so ``path`` is either absent, the old file, or the complete new file.

    Parameters
    ----------
    path
        Target file.
    overwrite
        Replace an existing ``path``. Otherwise an existing file is refused, also when it
        appears while writing (the final step is an atomic no-clobber link where the file
        system supports it).

    Yields
    ------
    pathlib.Path
        The temporary path to write to (not created yet).

    Raises
    ------
    UserError
        If ``path`` exists and ``overwrite`` is False, or is a folder.
    OSError
        A failed write (disk full, permission denied), re-raised with ``path`` as its file name
        and the same errno; the temporary file is gone and an old ``path`` is untouched.

    Examples
    --------
    >>> with atomic_write("out.json") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("{}")
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, cannot write a file there")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; refusing to overwrite it")
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{path}: nothing was written to the temporary file {tmp}")
        _commit(tmp, path, overwrite)
    except OSError as err:
        raise _naming_target(err, path, tmp) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def _naming_target(err: OSError, path: Path, tmp: Path) -> OSError:
    """``err`` as an error about ``path`` (not its temporary file), for a one-line message.

    Errors about other files (the writer may read some) pass unchanged. The errno, and with it
    the subclass (``PermissionError``, ...), is kept.
    """
    if err.filename not in (None, str(tmp), tmp):
        return err
    if err.errno is None:
        return OSError(f"{path}: cannot write ({err})")
    reason = err.strerror or os.strerror(err.errno)
    return OSError(err.errno, f"cannot write ({reason})", str(path))


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temporary file onto ``path``."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: no window for clobbering
    except FileExistsError as err:
        raise UserError(f"{path}: already exists; refusing to overwrite it") from err
    except OSError:  # file systems without hard links
        if path.exists():
            raise UserError(f"{path}: already exists; refusing to overwrite it") from None
        os.replace(tmp, path)


def _tiff_axes_metadata(ndim: int, channels: bool) -> str:
    spatial = "ZYX"[3 - (ndim - int(channels)) :]
    return ("C" if channels else "") + spatial


def write_labels(path: PathLike, labels: np.ndarray, overwrite: bool = False) -> Path:
    """Write a label image as a zlib-compressed TIFF, atomically.

    Parameters
    ----------
    path
        Target file (``.tif``).
    labels
        Integer or boolean array ``(Z,)Y,X``, non-negative.
    overwrite
        Replace an existing file (otherwise :class:`UserError`).

    Returns
    -------
    pathlib.Path
        The written file.

    Notes
    -----
    The dtype is ``uint16`` when the largest id is at most 65535 (what Fiji reads best), else
    ``uint32``; ids beyond 2**32 - 1 are written as ``uint64``. The axes are recorded as
    ``YX`` / ``ZYX`` in tifffile's metadata, so that :func:`read_image` needs no ``ndim``.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be 2D or 3D, got shape {labels.shape}")
    labels = _as_label_array(labels, "labels")
    top = int(labels.max()) if labels.size else 0
    if top <= np.iinfo(np.uint16).max:
        dtype = np.uint16
    elif top <= np.iinfo(np.uint32).max:
        dtype = np.uint32
    else:
        dtype = np.uint64
    axes = _tiff_axes_metadata(labels.ndim, channels=False)
    return _write_tiff(path, labels.astype(dtype, copy=False), axes, overwrite)


def write_image(
    path: PathLike, array: np.ndarray, axes: str | None = None, overwrite: bool = False
) -> Path:
    """Write an image (e.g. a float seed map) as a zlib-compressed TIFF, atomically.

    Parameters
    ----------
    path
        Target file (``.tif``).
    array
        Array, channel-first. Booleans are written as ``uint8``, ``float64`` as ``float32``;
        other dtypes as they are.
    axes
        Its axes (one of ``"YX"``, ``"CYX"``, ``"ZYX"``, ``"CZYX"``), stored in the metadata.
        None: ``"YX"`` for 2D, ``"ZYX"`` for 3D, ``"CZYX"`` for 4D.
    overwrite
        Replace an existing file (otherwise :class:`UserError`).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    array = np.asarray(array)
    if axes is None:
        if array.ndim not in (2, 3, 4):
            raise ValueError(f"array must be 2D, 3D or 4D, got shape {array.shape}")
        axes = _tiff_axes_metadata(array.ndim, channels=array.ndim == 4)
    axes = _check_axes(axes, array.ndim, str(path))
    if axes != canonical_axes(axes):
        raise ValueError(f"axes must be channel-first, got {axes!r}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    return _write_tiff(path, array, axes, overwrite)


def _write_tiff(path: PathLike, array: np.ndarray, axes: str, overwrite: bool) -> Path:
    """The one TIFF write path: zlib, grey values, ``axes`` in tifffile's metadata, atomic."""
    import tifffile

    with atomic_write(path, overwrite=overwrite) as tmp:
        tifffile.imwrite(
            tmp, array, compression="zlib", photometric="minisblack", metadata={"axes": axes}
        )
    return Path(path)


# --------------------------------------------------------------------------------------------
# folders


def _is_tiff(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in TIFF_SUFFIXES and not path.name.startswith(".")


def _tiff_files(folder: PathLike, what: str) -> dict[str, Path]:
    """TIFF files of a folder keyed by stem; errors for a missing/empty folder or duplicates."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder ({what})")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder ({what})")
    files: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if not _is_tiff(file):
            continue
        if file.stem in files:
            raise UserError(f"{folder}: both {files[file.stem].name} and {file.name} exist")
        files[file.stem] = file
    if not files:
        raise UserError(f"{folder}: no .tif/.tiff files ({what})")
    return files


def _list_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def pair_folders(
    images_dir: PathLike,
    masks_dir: PathLike,
    *,
    kinds: tuple[str, str] = ("image", "mask"),
) -> list[tuple[Path, Path]]:
    """Pair the TIFFs of two folders by file name.

    Files pair when their names match up to the suffix (``a.tif`` pairs with ``a.tiff``).
    Hidden files and non-TIFF files are ignored.

    Parameters
    ----------
    images_dir, masks_dir
        The two folders.
    kinds
        What the two folders hold, for messages (e.g. ``("ground truth", "prediction")``).

    Returns
    -------
    list of (Path, Path)
        Pairs sorted by name.

    Raises
    ------
    UserError
        A folder is missing or holds no TIFF, a name appears twice in one folder, or some
        files have no partner: one message lists them all (the first ten of each side, then
        "and N more").
    """
    first = _tiff_files(images_dir, f"{kinds[0]}s")
    second = _tiff_files(masks_dir, f"{kinds[1]}s")
    only_first = sorted(first[k].name for k in first.keys() - second.keys())
    only_second = sorted(second[k].name for k in second.keys() - first.keys())
    if only_first or only_second:
        parts = []
        if only_first:
            parts.append(
                f"{len(only_first)} {kinds[0]} file(s) in {images_dir} without a {kinds[1]} "
                f"in {masks_dir}: {_list_names(only_first)}"
            )
        if only_second:
            parts.append(
                f"{len(only_second)} {kinds[1]} file(s) in {masks_dir} without a {kinds[0]} "
                f"in {images_dir}: {_list_names(only_second)}"
            )
        raise UserError("; ".join(parts))
    return [(first[k], second[k]) for k in sorted(first)]


def list_inputs(inputs: Sequence[PathLike]) -> list[Path]:
    """Expand command-line inputs to a list of files.

    Parameters
    ----------
    inputs
        Files (taken as given), folders (their ``.tif``/``.tiff`` files, not recursive, sorted),
        or glob patterns (``data/*.tif``, sorted matches that are files).

    Returns
    -------
    list of Path
        Files in the order of ``inputs``, each once.

    Raises
    ------
    UserError
        No inputs, a path that does not exist, a folder without TIFFs, or a pattern that
        matches no file.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    if not inputs:
        raise UserError("no input files given")
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found[path] = None
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if _is_tiff(p))
            if not files:
                raise UserError(f"{path}: the folder holds no .tif/.tiff files")
            found.update(dict.fromkeys(files))
        elif any(c in str(item) for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(item)) if Path(p).is_file())
            if not files:
                raise UserError(f"{item}: the pattern matches no file")
            found.update(dict.fromkeys(files))
        else:
            raise UserError(f"{path}: no such file or folder")
    return list(found)
