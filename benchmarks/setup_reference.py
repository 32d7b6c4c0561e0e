"""Build the virtual environment of the original EmbedSeg 0.2.5, used only as a benchmark peer.

Idempotent: a finished environment is marked with ``.ready`` (holding the spec below) and is
reused as long as the spec is unchanged. Everything comes from the package registries or the
local wheel folder, through pip:

* ``torch==2.13.0`` first (pinned; the CPU build lies on this machine's disk),
* the embedseg 0.2.5 **sdist**, with the ``sources = ["EmbedSeg"]`` line removed from its
  ``pyproject.toml`` (the wheel strips the package folder and cannot be imported),
* ``numpy<2``, ``pandas<3``, ``tifffile==2024.12.12`` (the reference breaks on newer ones) and its
  other runtime dependencies,
* ``torchvision`` with ``--no-deps`` (an undeclared dependency; only its Python part is used).

The original code is CC BY-NC: it is installed and run for measurement only, under
``benchmarks/_work/`` (git-ignored), and nothing of it goes into the project.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
VENV = WORK / "venv-ref"
DOWNLOAD = WORK / "download"

TORCH = "torch==2.13.0"
EMBEDSEG = "embedseg==0.2.5"
PINS = [
    "numpy<2",
    "pandas<3",
    "tifffile==2024.12.12",
    "scipy",
    "scikit-image",
    "numba",
    "matplotlib",
    "seaborn",
    "pycocotools",
    "colorspacious",
    "tqdm",
]
TORCHVISION = "torchvision"
SPEC = "\n".join([TORCH, EMBEDSEG, *PINS, TORCHVISION + " --no-deps", "sdist-fix: drop sources line"])


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def ready(venv: Path = VENV) -> bool:
    marker = venv / ".ready"
    return marker.is_file() and marker.read_text() == SPEC and python_of(venv).exists()


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _fixed_sdist() -> Path:
    """Download the 0.2.5 sdist, unpack it and remove the line that breaks the wheel."""
    DOWNLOAD.mkdir(parents=True, exist_ok=True)
    archives = glob.glob(str(DOWNLOAD / "embedseg-0.2.5.tar.gz")) + glob.glob(
        str(DOWNLOAD / "EmbedSeg-0.2.5.tar.gz")
    )
    if not archives:
        _run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", DOWNLOAD, EMBEDSEG]
        )
        archives = [p for p in glob.glob(str(DOWNLOAD / "*.tar.gz")) if "0.2.5" in p]
    if not archives:
        raise SystemExit("could not download the embedseg 0.2.5 sdist")
    src = DOWNLOAD / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    with tarfile.open(archives[0]) as tar:
        tar.extractall(src, filter="data")
    (folder,) = [p for p in src.iterdir() if p.is_dir()]
    pyproject = folder / "pyproject.toml"
    lines = pyproject.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip().replace(" ", "") != 'sources=["EmbedSeg"]']
    if len(kept) == len(lines):
        print("note: no 'sources = [\"EmbedSeg\"]' line found in the sdist's pyproject.toml")
    pyproject.write_text("".join(kept))
    return folder


def build(venv: Path = VENV, force: bool = False) -> Path:
    """Create (or reuse) the reference environment; returns its python."""
    if ready(venv) and not force:
        return python_of(venv)
    if venv.exists():
        shutil.rmtree(venv)
    WORK.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", venv])
    py = python_of(venv)
    env = dict(os.environ)
    _run([py, "-m", "pip", "install", "-q", TORCH], env=env)
    _run([py, "-m", "pip", "install", "-q", TORCH, *PINS], env=env)
    folder = _fixed_sdist()
    _run([py, "-m", "pip", "install", "-q", "--no-deps", folder], env=env)
    _run([py, "-m", "pip", "install", "-q", "--no-deps", TORCHVISION], env=env)
    # check that the package imports (torchvision needs its op schemas defined first)
    check = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import ref_compat; ref_compat.prepare(); "
        "import EmbedSeg.criterions.my_loss, EmbedSeg.utils.utils, EmbedSeg.models.BranchedERFNet; "
        "import EmbedSeg.utils.test_time_augmentation, EmbedSeg.utils.generate_crops; print('ok')"
    )
    _run([py, "-c", check], env=env, cwd=WORK)
    (venv / ".ready").write_text(SPEC)
    return py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if ready")
    args = parser.parse_args()
    print(build(force=args.force))


if __name__ == "__main__":
    main()
