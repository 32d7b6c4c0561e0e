"""Nothing lost: a training run killed with SIGKILL resumes from its last checkpoint and ends
with the weights of an uninterrupted run; an interrupted folder prediction finishes on rerun."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from embseg.cli import main
from embseg.config import ModelConfig
from embseg.model import Model

EPOCHS = 8
STEPS_PER_EPOCH = 2  # samples_per_epoch 8 / batch 4


def write_pairs(root: Path, n: int = 3, shape: tuple[int, int] = (48, 48)) -> tuple[Path, Path]:
    """Synthetic image/mask pairs with three discs each."""
    rng = np.random.default_rng(2)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    yy, xx = np.indices(shape)
    for i in range(n):
        labels = np.zeros(shape, np.uint16)
        for k, (cy, cx) in enumerate([(12, 12), (32, 18), (18, 36)]):
            cy, cx = cy + int(rng.integers(-3, 4)), cx + int(rng.integers(-3, 4))
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = k + 1
        image = (labels > 0) * 160 + rng.integers(0, 40, shape)
        tifffile.imwrite(images / f"p{i}.tif", image.astype(np.uint8))
        tifffile.imwrite(masks / f"p{i}.tif", labels)
    return images, masks


def train_args(images: Path, masks: Path, output: Path) -> list[str]:
    return ["train", "--images", str(images), "--masks", str(masks), "--output", str(output),
            "--crop-size", "32", "--batch-size", "4", "--samples-per-epoch", "8", "--epochs", str(EPOCHS),
            "--val-every", "1", "--checkpoint-every", "1", "--no-tune", "--figure-every", "0",
            "--seed", "7", "--device", "cpu", "--threads", "2", "--ema-decay", "0.9"]


def embseg_command() -> list[str]:
    script = Path(sys.executable).parent / "embseg"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "embseg.cli"]


def checkpoint_epoch(folder: Path) -> int:
    try:
        return int(json.loads((folder / "checkpoints" / "last.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def log_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "log.csv").open() as fh:
        return list(csv.DictReader(fh))


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "average."))}


def test_sigkill_mid_training_then_resume(tmp_path, capsys):
    images, masks = write_pairs(tmp_path / "data")
    killed = tmp_path / "killed"
    args = train_args(images, masks, killed)
    process = subprocess.Popen([*embseg_command(), *args, "--quiet"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while checkpoint_epoch(killed) < 1:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    stopped_at = checkpoint_epoch(killed)
    assert 1 <= stopped_at < EPOCHS, "the run finished before the kill"
    rows_before = len(log_rows(killed))
    assert rows_before in (stopped_at, stopped_at + 1)  # at most one epoch past the checkpoint

    # resume in-process; its progress lines say which epochs it ran
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    ran = [int(m.group(1)) for m in re.finditer(r"\bepoch (\d+): loss", err)]
    assert ran == list(range(stopped_at + 1, EPOCHS + 1))
    rows = log_rows(killed)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [int(r["step"]) for r in rows] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    assert checkpoint_epoch(killed) == EPOCHS
    assert (killed / "model.safetensors").is_file() and (killed / "config.json").is_file()
    assert not [p for p in killed.rglob("*") if ".tmp" in p.name]  # nothing half-written kept

    # the same run without the kill: bit-identical weights
    whole = tmp_path / "whole"
    assert main([*train_args(images, masks, whole), "--quiet"]) == 0
    resumed = model_tensors(killed / "checkpoints" / "last.safetensors")
    straight = model_tensors(whole / "checkpoints" / "last.safetensors")
    assert resumed.keys() == straight.keys()
    assert any(k.startswith("average.") for k in straight)  # the weight average resumes too
    different = [k for k in straight if not torch.equal(resumed[k], straight[k])]
    assert different == []
    assert [r["loss"] for r in log_rows(killed)] == [r["loss"] for r in log_rows(whole)]


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    images, masks = write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main([*train_args(images, masks, out), "--resume", "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    images, masks = write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.json").write_text('{"epoch": 1')
    (out / "checkpoints" / "last.safetensors").write_bytes(b"\0" * 16)
    assert main([*train_args(images, masks, out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt checkpoint" in err and "\n" not in err


# --------------------------------------------------------------------------------- predict --resume


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return Model(ModelConfig(ndim=2, min_size=5)).save(tmp_path / "model")


def test_interrupted_folder_prediction_resumes(tmp_path, capsys, model_dir):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        tifffile.imwrite(inputs / f"im{i}.tif", rng.integers(0, 255, (40, 40)).astype(np.uint8))
    out = tmp_path / "out"
    argv = ["predict", str(inputs), "-m", str(model_dir), "-o", str(out), "--quiet"]
    assert main(argv) == 0
    # an interrupted run: two outputs never written, one temporary file left behind
    (out / "im1.tif").unlink()
    (out / "im3.tif").unlink()
    (out / ".im1.0badc0de.tmp.tif").write_bytes(b"half")
    past = time.time() - 1000
    for name in ("im0.tif", "im2.tif"):
        os.utime(out / name, (past, past))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("im*.tif")}

    assert main(argv) == 2  # without --resume the finished outputs are not silently replaced
    assert "--resume" in capsys.readouterr().err
    assert main([*argv[:-1], "--resume"]) == 0
    assert "skipped 2 finished output(s)" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("im*.tif")}
    assert sorted(after) == ["im0.tif", "im1.tif", "im2.tif", "im3.tif"]
    assert all(after[name] == before[name] for name in before)  # not rewritten
    assert all(after[name] > before["im0.tif"] for name in ("im1.tif", "im3.tif"))
