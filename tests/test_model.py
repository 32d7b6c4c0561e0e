"""Model folders: save/load round trips (2D, 3D, half precision) and loading by shipped name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embseg.config import ModelConfig
from embseg.errors import UserError
from embseg.model import CONFIG_FILE, WEIGHTS_FILE, Model, available_models, load_model


def random_model(ndim: int, seed: int = 0) -> Model:
    """A model whose every weight and normalisation buffer is random (not the zero init)."""
    torch.manual_seed(seed)
    step = [2.0 / 1023] + [1.0 / 1023] * (ndim - 1) if ndim == 3 else [1.0 / 1023] * 2
    model = Model(ModelConfig(ndim=ndim, grid_step=step, seed_thresh=0.6, fg_thresh=0.4, min_size=3,
                              anisotropy=2.0 if ndim == 3 else 1.0, name=f"random-{ndim}d"))
    with torch.no_grad():
        for param in model.net.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for name, buffer in model.net.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    model.net.eval()
    return model


def sample_image(ndim: int) -> np.ndarray:
    shape = (24, 40, 40) if ndim == 3 else (56, 64)
    return np.random.default_rng(ndim).integers(0, 4000, shape).astype(np.uint16)


@pytest.mark.parametrize("ndim", [2, 3])
def test_round_trip_predicts_identically(tmp_path, ndim):
    model = random_model(ndim)
    image = sample_image(ndim)
    raw = model.predict_raw(image, device="cpu")
    assert raw.abs().max() > 0.01  # a network that says something
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for key in ("ndim", "grid_step", "anisotropy", "seed_thresh", "fg_thresh", "min_size", "name"):
        assert getattr(loaded.config, key) == getattr(model.config, key)
    state, reloaded = model.net.state_dict(), loaded.net.state_dict()
    assert state.keys() == reloaded.keys()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)
    assert torch.equal(loaded.predict_raw(image, device="cpu"), raw)
    np.testing.assert_array_equal(loaded.cluster(raw), model.cluster(raw))
    assert loaded.source == str(tmp_path / "m")


def test_load_from_the_weights_file_path(tmp_path):
    model = random_model(2)
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m" / WEIGHTS_FILE)
    assert loaded.source == str(tmp_path / "m")


def test_half_precision_save(tmp_path):
    model = random_model(2, seed=3)
    image = sample_image(2)
    model.save(tmp_path / "full")
    model.save(tmp_path / "half", half=True)
    stored = load_file(str(tmp_path / "half" / WEIGHTS_FILE))
    floats = [v for v in stored.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    full_size = (tmp_path / "full" / WEIGHTS_FILE).stat().st_size
    assert (tmp_path / "half" / WEIGHTS_FILE).stat().st_size < 0.6 * full_size
    half = load_model(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in half.net.parameters())  # computed in float32
    raw, raw_half = model.predict_raw(image, device="cpu"), half.predict_raw(image, device="cpu")
    scale = float(raw.abs().max())
    assert float((raw - raw_half).abs().max()) < 0.02 * scale
    assert not torch.equal(raw, raw_half)  # really rounded


def test_save_is_atomic_and_versioned(tmp_path):
    import embseg

    model = random_model(2)
    folder = model.save(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["embseg_version"] == embseg.__version__ and config["format_version"] == 1
    with pytest.raises(UserError, match="already exists"):
        model.save(folder, overwrite=False)


@pytest.fixture()
def shipped(tmp_path, monkeypatch) -> Path:
    import embseg.model

    root = tmp_path / "pretrained"
    random_model(2).save(root / "nuclei-2d")
    random_model(3).save(root / "nuclei-3d")
    (root / "not-a-model").mkdir()
    monkeypatch.setattr(embseg.model, "PRETRAINED_DIR", root)
    return root


def test_load_by_shipped_name(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    assert available_models() == ["nuclei-2d", "nuclei-3d"]
    model = load_model("nuclei-3d")
    assert model.ndim == 3 and model.source == str(shipped / "nuclei-3d")


def test_unknown_shipped_name_lists_the_available_ones(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_model("nuclei-2")
    message = str(info.value)
    assert "nuclei-2: no such model folder or shipped model name" in message
    assert "did you mean 'nuclei-2d'?" in message
    assert "shipped models: nuclei-2d, nuclei-3d" in message


def test_no_shipped_models_says_so(tmp_path, monkeypatch):
    import embseg.model

    monkeypatch.setattr(embseg.model, "PRETRAINED_DIR", tmp_path / "none")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no models are shipped"):
        load_model("nuclei-2d")


def test_a_folder_is_preferred_over_a_shipped_name(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(shipped / "nuclei-3d", tmp_path / "nuclei-2d")  # local folder, same name
    assert load_model("nuclei-2d").ndim == 3


def test_model_clustering_bars_seeds_wider_than_half_the_training_crop():
    import math

    from embseg.embedding import grid_step
    from test_cluster import ideal_raw, same_partition

    step = grid_step(2)
    raw, truth = ideal_raw((96, 96), 8, 5.0, step, np.random.default_rng(12))
    corner = (slice(0, 3), slice(0, 3))
    raw[4][corner] = 12.0  # confident seeds whose bandwidth spans the whole image
    raw[2:4][(slice(None), *corner)] = math.log(math.log(2.0) / (400 * step[-1]) ** 2) / 10
    model = Model(ModelConfig(ndim=2, grid_step=list(step), crop_size=[48, 48]))
    labels = model.cluster(raw)
    assert same_partition(np.where(truth > 0, labels, 0), truth)
    model.config.max_seed_radius = []  # the method's rule without the limit
    assert model.cluster(raw).max() == 1


def test_cpu_bfloat16_prediction_matches_float32(monkeypatch, tmp_path):
    """``amp=True`` on the CPU: bfloat16 where supported (forced here, so that every CPU runs the
    path; oneDNN emulates bf16 where it is not native), labels nearly those of float32; on a CPU
    without native bf16 the same call stays float32, identical to ``amp=False``."""
    from embseg import predict as predict_module
    from embseg.metrics import matching
    from embseg.samples import sample

    model = load_model("nuclei-2d")
    image = sample("dsb-dense").image[:256, :256]
    reference = model.predict(image, device="cpu")
    assert isinstance(predict_module.cpu_bf16_supported(), bool)
    monkeypatch.setattr(predict_module, "cpu_bf16_supported", lambda: False)
    assert np.array_equal(model.predict(image, device="cpu", amp=True), reference)
    monkeypatch.setattr(predict_module, "cpu_bf16_supported", lambda: True)
    raw = model.predict_raw(image, device="cpu", amp=True)
    assert raw.dtype == torch.float32
    labels = model.predict(image, device="cpu", amp=True)
    assert not torch.equal(raw, model.predict_raw(image, device="cpu"))  # it did run in bfloat16
    m = matching(reference, labels, thresh=0.5)
    assert m.n_true >= 10 and m.f1 >= 0.95, m
