"""The trained 3D model the benchmarks predict with (end-to-end prediction, memory).

There is no shipped 3D model, and a random network gives no objects, so nothing to cluster.
The benchmark trains one, once, with the README's 3D example (``configs/qcanet-3d.yaml``:
the QCANet embryo, 12 minutes on this CPU) into ``benchmarks/_work/models/qcanet-3d``, and
reuses it afterwards (an interrupted training is resumed). One training volume of 8 nuclei and
12 minutes make a model for benchmarking the prediction (objects to cluster), not one to
segment with.

Usage::

    python benchmarks/bench_model.py   # trains it when missing; prints its folder
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "qcanet-3d.yaml"
OUTPUT = HERE / "_work" / "models" / "qcanet-3d"
# The data as the benchmark inputs find it: the config's own paths are relative to a checkout
# next to ../shared, which a clone elsewhere (CI, /tmp) is not.
sys.path.insert(0, str(HERE))
from inputs import QCANET  # noqa: E402


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def qcanet_model_dir(train: bool = True) -> Path:
    """Folder of the benchmark's 3D model; trains it first when there is none (and ``train``)."""
    if _complete(OUTPUT):
        return OUTPUT
    if not train:
        raise FileNotFoundError(f"no benchmark 3D model in {OUTPUT}")
    embseg = Path(sys.executable).parent / "embseg"
    cmd = [str(embseg), "train", "--config", str(CONFIG), "--images", str(QCANET / "images"),
           "--masks", str(QCANET / "masks"), "--output", str(OUTPUT), "--quiet"]
    if (OUTPUT / "checkpoints").is_dir():
        cmd.append("--resume")  # an interrupted earlier training
    print("training the benchmark's 3D model (12 min): " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    if not _complete(OUTPUT):
        raise RuntimeError(f"training finished without a model in {OUTPUT}")
    return OUTPUT


if __name__ == "__main__":
    print(qcanet_model_dir())
