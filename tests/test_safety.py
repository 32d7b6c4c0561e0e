"""Safety and robustness: model files that cannot run code, validated weights, literal config
paths, reproducible seeds, uint32 labels, 16-bit normalisation, tiled prediction of huge images,
``embseg info``."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file, save_file

import embseg
from embseg.config import ModelConfig, TrainConfig, load_config
from embseg.errors import UserError
from embseg.model import WEIGHTS_FILE, Model, load_model

SRC = Path(embseg.__file__).resolve().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 2D model folder."""
    return Model(ModelConfig(ndim=2, name="safety")).save(tmp_path_factory.mktemp("model") / "m")


def copy_model(model_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def read_copy(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, copied out of the memory map (so the file can be rewritten)."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------------- no pickles


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_pickled_weights_are_refused_unopened(model_dir, tmp_path, kind):
    folder = copy_model(model_dir, tmp_path)
    marker = tmp_path / "code_ran"
    payload = {"state_dict": read_copy(folder / WEIGHTS_FILE), "evil": _Payload(marker)}
    target = folder / WEIGHTS_FILE
    if kind == "torch-zip":
        torch.save(payload, target)
    elif kind == "torch-legacy":
        torch.save(payload, target, _use_new_zipfile_serialization=False)
    else:
        target.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match="pickled PyTorch file") as info:
        load_model(folder)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists(), "the pickle was unpickled"


def test_no_unsafe_deserialisation_in_the_package():
    """Every ``torch.load`` in ``src/embseg`` passes ``weights_only=True``; no pickle loads."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : text.find(")", match.end()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        for pattern in (r"\bpickle\.loads?\(", r"\bdill\.", r"\bjoblib\.load\(", r"\bnp\.load\([^)]*allow_pickle=True"):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def _rewrite_weights(folder: Path, change) -> Path:
    path = folder / WEIGHTS_FILE
    state = read_copy(path)
    change(state)
    save_file(state, str(path))
    return folder


def _first_conv(state: dict) -> str:
    return next(k for k, v in state.items() if v.ndim == 4)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.__setitem__(_first_conv(s), torch.zeros(3, 3, 3, 3)), "has shape (3, 3, 3, 3), config implies"),
        (lambda s: s.pop(_first_conv(s)), "do not match the model config (missing"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "do not match the model config (unexpected ['extra.weight']"),
        (lambda s: s.__setitem__(_first_conv(s), s[_first_conv(s)].to(torch.int32)), "has dtype torch.int32, expected torch.float32"),
    ],
    ids=["shape", "missing", "extra", "dtype"],
)
def test_weights_are_checked_against_the_config(model_dir, tmp_path, change, expected):
    folder = _rewrite_weights(copy_model(model_dir, tmp_path), change)
    with pytest.raises(UserError) as info:
        load_model(folder)
    assert expected in str(info.value) and WEIGHTS_FILE in str(info.value)


def test_weights_of_another_architecture_are_refused(model_dir, tmp_path):
    """A 3D model's weights under a 2D config: the shapes give it away."""
    folder = copy_model(model_dir, tmp_path)
    Model(ModelConfig(ndim=3, grid_step=[1 / 1023] * 3)).save(tmp_path / "m3")
    (tmp_path / "m3" / WEIGHTS_FILE).replace(folder / WEIGHTS_FILE)
    with pytest.raises(UserError, match="weights do not match the model config"):
        load_model(folder)


# --------------------------------------------------------------------------------- config paths


def test_config_paths_are_not_executed_or_expanded(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f'images: "$(touch {marker})"\nmasks: "$HOME/masks"\noutput: "`touch {marker}`"\n')
    config = load_config(config_file)
    assert config.images == f"$(touch {marker})" and config.masks == "$HOME/masks"
    from embseg.training import load_training_data

    with pytest.raises(UserError, match=re.escape(f"$(touch {marker})")):
        load_training_data(config)
    assert not marker.exists()


def test_yaml_cannot_construct_objects(tmp_path):
    marker = tmp_path / "code_ran"
    config_file = tmp_path / "evil.yaml"
    config_file.write_text(f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(config_file)
    assert not marker.exists()


def test_tilde_is_expanded_in_data_paths(tmp_path, monkeypatch):
    from embseg.training import load_training_data

    monkeypatch.setenv("HOME", str(tmp_path))
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    labels = np.zeros((32, 32), np.uint16)
    labels[4:12, 4:12] = 1
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / "data" / "images" / f"{name}.tif", (labels * 100).astype(np.uint8))
        tifffile.imwrite(tmp_path / "data" / "masks" / f"{name}.tif", labels)
    data = load_training_data(TrainConfig(images="~/data/images", masks="~/data/masks"))
    assert sorted(data.train_names + data.val_names) == ["a.tif", "b.tif"]


# --------------------------------------------------------------------------------- seeds


def _tiny_config(tmp_path: Path, name: str, seed: int) -> TrainConfig:
    rng = np.random.default_rng(5)
    root = tmp_path / "data"
    if not root.exists():
        for sub in ("images", "masks"):
            (root / sub).mkdir(parents=True)
        yy, xx = np.indices((48, 48))
        for i in range(3):
            labels = np.zeros((48, 48), np.uint16)
            for k, (cy, cx) in enumerate([(12, 12), (30, 20), (20, 36)]):
                cy, cx = cy + int(rng.integers(-3, 4)), cx + int(rng.integers(-3, 4))
                labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = k + 1
            image = (labels > 0) * 150 + rng.integers(0, 50, labels.shape)
            tifffile.imwrite(root / "images" / f"i{i}.tif", image.astype(np.uint8))
            tifffile.imwrite(root / "masks" / f"i{i}.tif", labels)
    return TrainConfig(images=str(root / "images"), masks=str(root / "masks"), output=str(tmp_path / name),
                       crop_size=[32, 32], batch_size=4, samples_per_epoch=8, epochs=2, val_every=1,
                       tune=False, figure_every=0, seed=seed, device="cpu", threads=2)


def test_seed_makes_training_bit_identical(tmp_path):
    from embseg.training import train

    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        train(_tiny_config(tmp_path, name, seed), progress=False)
    a, b, c = (load_file(str(tmp_path / n / "checkpoints" / "last.safetensors")) for n in "abc")
    weights = [k for k in a if k.startswith("model.")]
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    assert not all(torch.equal(a[k], c[k]) for k in weights), "the seed changes nothing"
    final_a, final_b = (load_file(str(tmp_path / n / WEIGHTS_FILE)) for n in "ab")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)

    # seed, versions and the whole config are stored with the model
    model = load_model(tmp_path / "a")
    training = model.config.training
    assert training["seed"] == 11
    assert training["versions"]["embseg"] == embseg.__version__
    assert training["versions"]["torch"] == torch.__version__
    assert training["versions"]["numpy"] == np.__version__
    assert training["config"] == _tiny_config(tmp_path, "a", 11).to_dict()
    assert model.config.embseg_version == embseg.__version__


# --------------------------------------------------------------------------------- scale


def test_more_than_65535_objects_are_uint32(tmp_path):
    from embseg.io import read_labels, write_labels

    labels = np.arange(300 * 300, dtype=np.uint32).reshape(300, 300)  # 89,999 objects
    write_labels(tmp_path / "many.tif", labels)
    back = read_labels(tmp_path / "many.tif")
    assert back.dtype == np.uint32 and int(back.max()) == 300 * 300 - 1
    np.testing.assert_array_equal(back, labels)


def test_model_cluster_relabel_keeps_uint32(model_dir, monkeypatch):
    import embseg.cluster

    n = 70_000
    with_gaps = np.zeros(2 * n + 10, np.uint32)
    with_gaps[10:] = np.repeat(np.arange(1, n + 1, dtype=np.uint32) * 3, 2)  # ids 3, 6, ... 210000
    monkeypatch.setattr(embseg.cluster, "cluster", lambda raw, step, **kwargs: with_gaps.reshape(raw.shape[1:]))
    model = load_model(model_dir)
    labels = model.cluster(torch.zeros(5, 10, 2 * n // 10 + 1))
    assert labels.dtype == np.uint32
    assert int(labels.max()) == n and len(np.unique(labels)) == n + 1


def test_saturated_16bit_image_normalises_sensibly():
    from embseg.normalize import percentile_normalize

    rng = np.random.default_rng(0)
    image = rng.normal(4400, 40, (256, 256))
    foreground = np.zeros((256, 256), bool)
    foreground[40:120, 40:120] = foreground[150:220, 100:200] = True  # ~20 % of the pixels
    image[foreground] = rng.normal(20000, 300, foreground.sum())
    image[5:8, 5:8] = 65535  # saturated
    image = np.clip(image, 0, 65535).astype(np.uint16)
    out = percentile_normalize(image[None])[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert abs(float(np.median(out[~foreground]))) < 0.05
    assert abs(float(np.median(out[foreground])) - 1.0) < 0.05
    assert out.max() < 5  # saturation stays a bounded outlier


def test_saturated_real_usiigaci_image_normalises_sensibly():
    """Phase contrast with a few pixels at 65535: finite, the percentiles land on 0 and 1."""
    from conftest import dataset
    from embseg.io import read_image
    from embseg.normalize import percentile_normalize

    paths = sorted((dataset("usiigaci") / "train" / "images").glob("*.tif"))
    image = next((im for im in (read_image(p, ndim=2)[0] for p in paths[:10]) if im.max() == 65535), None)
    if image is None:
        pytest.skip("no saturated Usiigaci image among the first ten")
    out = percentile_normalize(image[None].astype(np.float32))[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert float(np.percentile(out, 1)) == pytest.approx(0.0, abs=1e-3)
    assert float(np.percentile(out, 99.8)) == pytest.approx(1.0, abs=1e-3)
    assert 0.0 < float(np.median(out)) < 1.0
    assert out[image == 65535].min() >= 0.999  # saturation: at or above the upper percentile


class _OneConv(torch.nn.Module):
    """Stand-in network: one 1x1 convolution (seed logit -10: no objects), records input shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 5, 1)
        torch.nn.init.zeros_(self.conv.weight)
        with torch.no_grad():
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0, -10.0]))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.conv(x)


def test_huge_2d_image_predicts_through_tiles():
    model = Model(ModelConfig(ndim=2))
    model.net = _OneConv()
    image = np.zeros((8192, 8192), np.uint8)
    image[::7, ::5] = 200
    labels = model.predict(image, device="cpu")
    assert labels.shape == (8192, 8192) and labels.dtype == np.uint32 and labels.max() == 0
    shapes = model.net.shapes
    assert sum(s[0] for s in shapes) == 64  # 8 x 8 tiles of 1024^2
    # block-wise clustering: core + object halo + network context, never the whole image
    from embseg.distributed import default_object_halo

    reach = max(default_object_halo(model)) + model.halo()
    assert max(max(s[2:]) for s in shapes) <= 1024 + 2 * reach < 8192


# --------------------------------------------------------------------------------- info


def test_info_reports_versions_and_device(capsys, monkeypatch):
    import numpy

    from embseg.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"embseg  {embseg.__version__}" in out
    assert f"torch   {torch.__version__}" in out
    assert f"numpy   {numpy.__version__}" in out
    assert "device  cpu (no CUDA or MPS device found)" in out
    assert main(["info", "--device", "cpu"]) == 0
    assert "device  cpu (asked for)" in capsys.readouterr().out
