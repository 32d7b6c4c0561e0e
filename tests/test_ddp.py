"""Multi-process training: disjoint rank shares, and 2 gloo processes that end with equal weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from embseg import ddp
from embseg.config import TrainConfig
from embseg.io import write_image, write_labels


class _Numbers:
    def __init__(self, n: int):
        self.n = n
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.epoch, i

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def test_rank_shares_are_disjoint_equal_and_follow_the_epoch():
    base = _Numbers(11)
    shares = [ddp.RankShare(base, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    shares[0].set_epoch(4)
    items = [s[i] for s in shares for i in range(len(s))]
    assert {e for e, _ in items} == {4}
    indices = sorted(i for _, i in items)
    assert indices == list(range(9))  # disjoint, and together the first 3 * 3 samples
    with pytest.raises(IndexError):
        shares[1][3]
    assert ddp.rank_share(base, None) is base
    assert ddp.context() is None and ddp.rank0_decides(True, None) is True


def _blob_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((48, 48), np.uint16)
    for k in range(1, 5):
        y, x = rng.integers(4, 36, 2)
        mask[y : y + 8, x : x + 8] = k
    image = (mask > 0) * 200.0 + rng.normal(20, 5, mask.shape)
    return image.astype(np.float32), mask


def _worker(config: TrainConfig, out: str) -> None:
    """One rank: train, then the non-zero ranks save the weights they hold at the end."""
    from safetensors.torch import save_file

    from embseg.training import train

    model = train(config, progress=False)
    ctx = ddp.context("cpu")
    assert ctx is not None and ctx.world_size == 2
    if not ctx.is_main:
        save_file({k: v.contiguous() for k, v in model.net.named_parameters()}, f"{out}/rank{ctx.rank}.safetensors")


def test_two_gloo_processes_hold_equal_weights(tmp_path):
    from safetensors.torch import load_file

    for i in range(3):
        image, mask = _blob_pair(i)
        write_image(tmp_path / "images" / f"{i}.tif", image)
        write_labels(tmp_path / "masks" / f"{i}.tif", mask)
    config = TrainConfig(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                         output=str(tmp_path / "model"), ndim=2, crop_size=[32, 32], batch_size=2,
                         samples_per_epoch=8, epochs=2, val_every=2, tune=False, figure_every=0,
                         device="cpu", amp=False, threads=1, val_fraction=0.34).validate()
    ddp.launch(_worker, 2, args=(config, str(tmp_path)), threads=1)

    final = {k[len("model."):]: v for k, v in load_file(tmp_path / "model" / "checkpoints" / "last.safetensors").items()
             if k.startswith("model.")}
    other = load_file(tmp_path / "rank1.safetensors")
    assert set(other) <= set(final) and len(other) > 50
    for name, value in other.items():
        assert torch.equal(value, final[name]), name  # rank 1 == rank 0 (its checkpoint)
    from embseg.model import build_network, load_model

    torch.manual_seed(config.seed)
    init = dict(build_network(load_model(tmp_path / "model").config).named_parameters())
    assert any(not torch.equal(init[n].detach(), v) for n, v in other.items())  # it did train
    log = (tmp_path / "model" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 1 + 2  # header + one row per epoch, written by rank 0 only
    # 2 epochs x (8 samples / 2 ranks / batch 2) steps
    import json

    assert json.loads((tmp_path / "model" / "checkpoints" / "last.json").read_text())["step"] == 4


def test_python_m_embseg_train_is_the_train_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "embseg.training", "--print-config", "--epochs", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "epochs: 3" in result.stdout
