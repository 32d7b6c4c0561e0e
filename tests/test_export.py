"""Export: TorchScript clustering equal to the Python one, network exports, bioimage.io packages.

The models are random-initialised networks whose seed output is pushed up (bias 2.5) and whose
offsets are slightly perturbed: seediness then exceeds the thresholds over much of the image,
so the clustering produces many objects (with overwriting and rejected proposals), which a
freshly initialised network would not.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from embseg import script_cluster
from embseg.cluster import cluster
from embseg.config import ModelConfig
from embseg.embedding import grid_step
from embseg.errors import UserError
from embseg.export import (
    ARCHITECTURE_FILE,
    architecture_source,
    check_package,
    export_bioimageio,
    export_onnx,
    export_torchscript,
    label_predictor,
    make_test_image,
    onnx_available,
    script_label_predictor,
)
from embseg.model import Model, relabel_sequential
from test_cluster import ideal_raw, random_raw

torch.set_num_threads(1)

H = 1.0 / 1023.0


def _bioimageio_installed() -> bool:
    try:
        import bioimageio.core
        import bioimageio.spec  # noqa: F401
    except ImportError:
        return False
    return True


needs_bioimageio = pytest.mark.skipif(
    not _bioimageio_installed(), reason="bioimageio.core/spec not installed (extra 'export')"
)


def engineered_model(ndim: int, anisotropy: float = 1.0, seed: int = 0) -> Model:
    """A random network that finds many objects (see the module docstring)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        ndim=ndim,
        grid_step=list(grid_step(ndim, anisotropy)),
        anisotropy=anisotropy,
        min_size=5,
        seed_thresh=0.85,
        fg_thresh=0.5,
        name=f"tiny-{ndim}d",
    )
    model = Model(cfg)
    with torch.no_grad():
        model.net.decoders[1].output_conv.bias.fill_(2.5)
        model.net.decoders[0].output_conv.weight.normal_(0.0, 2e-3)
    model.net.eval()
    return model


@pytest.fixture(scope="module")
def scripted_cluster():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(script_cluster.cluster)


# ----------------------------------------------------------------------------- clustering

CASES = [
    # shape, step, (seed_thresh, fg_thresh, min_size)
    ((48, 64), (H, H), (0.9, 0.5, 10)),
    ((48, 64), (H, H), (0.6, 0.3, 3)),
    ((48, 64), (H, H), (0.95, 0.5, 0)),
    ((10, 24, 32), (2.18 * H, H, H), (0.9, 0.5, 10)),
    ((10, 24, 32), (2.18 * H, H, H), (0.6, 0.3, 3)),
    ((12, 16, 16), (H, H, H), (0.8, 0.6, 1)),
]


@pytest.mark.parametrize(("shape", "step", "thresholds"), CASES)
def test_script_cluster_equals_python_on_random_outputs(scripted_cluster, shape, step, thresholds):
    rng = np.random.default_rng(len(shape) * 100 + int(thresholds[2]))
    raw = random_raw(shape, step, rng)
    expected = cluster(raw, step, *thresholds)
    assert expected.max() > 20  # many objects: the greedy rules are exercised
    got = scripted_cluster(raw, list(step), *thresholds)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(script_cluster.cluster(raw, list(step), *thresholds).numpy(), expected)


@pytest.mark.parametrize(("shape", "step"), [((48, 64), (H, H)), ((10, 24, 32), (2.18 * H, H, H))])
def test_script_cluster_max_radius_equals_python(scripted_cluster, shape, step):
    rng = np.random.default_rng(7)
    raw = random_raw(shape, step, rng)
    max_radius = [2.5 * step[-1] / h for h in step]  # pixels per axis: 2.5 X pixels everywhere
    expected = cluster(raw, step, 0.9, 0.5, 3, max_radius=max_radius)
    assert not np.array_equal(expected, cluster(raw, step, 0.9, 0.5, 3))  # the limit matters here
    got = scripted_cluster(raw, list(step), 0.9, 0.5, 3, max_radius)
    np.testing.assert_array_equal(got.numpy(), expected)
    predictor = script_cluster.LabelPredictor(torch.nn.Identity(), list(step), 0.9, 0.5, 3, 1, max_radius)
    labels, _ = predictor(raw[None])
    assert int(labels.max()) == len(np.unique(expected[expected > 0]))


@pytest.mark.parametrize("ndim", [2, 3])
def test_script_cluster_equals_python_on_ideal_objects(scripted_cluster, ndim):
    rng = np.random.default_rng(ndim)
    shape, step = ((64, 64), (H, H)) if ndim == 2 else ((16, 40, 40), (2.0 * H, H, H))
    raw, truth = ideal_raw(shape, 6, 6.0, step, rng)
    expected = cluster(raw, step, 0.9, 0.5, 10)
    got = scripted_cluster(raw, list(step), 0.9, 0.5, 10).numpy()
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got[got > 0])) == len(np.unique(truth[truth > 0]))


def test_script_cluster_without_candidates_or_accepted_objects(scripted_cluster):
    rng = np.random.default_rng(5)
    raw = random_raw((24, 24), (H, H), rng)
    empty = raw.clone()
    empty[4] = -20.0  # no pixel above fg_thresh
    assert int(scripted_cluster(empty, [H, H], 0.9, 0.5, 10).max()) == 0
    # seeds exist, but min_size rejects every proposal
    huge = scripted_cluster(raw, [H, H], 0.9, 0.5, 10**6)
    np.testing.assert_array_equal(huge.numpy(), cluster(raw, (H, H), 0.9, 0.5, 10**6))
    assert int(huge.max()) == 0


def test_script_cluster_window_axis_is_the_longest():
    assert script_cluster.window_axis([5, 9, 9]) == 1
    assert script_cluster.window_axis([30, 9, 12]) == 0
    assert script_cluster.window_axis([4, 4]) == 0


def test_relabel_sequential_matches_model():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 3, 7, 8, 20], size=(30, 20)).astype(np.int64)
    got = script_cluster.relabel_sequential(torch.from_numpy(labels)).numpy()
    np.testing.assert_array_equal(got, relabel_sequential(labels.astype(np.uint32)))
    no_background = np.array([[4, 9], [9, 4]])
    np.testing.assert_array_equal(
        script_cluster.relabel_sequential(torch.from_numpy(no_background)).numpy(), [[1, 2], [2, 1]]
    )


@pytest.mark.parametrize(("ndim", "spatial"), [(2, (40, 56)), (2, (37, 50)), (3, (16, 24, 21))])
def test_label_predictor_equals_model_prediction(ndim, spatial):
    """Network + TorchScript clustering == Model.predict_raw + Model.cluster, also when padding."""
    model = engineered_model(ndim, anisotropy=2.0 if ndim == 3 else 1.0)
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, *spatial)).astype(np.float32)
    raw = model.predict_raw(image, normalized=True, device="cpu")
    expected = model.cluster(raw)
    assert expected.max() > 5
    with torch.no_grad():
        labels, seeds = label_predictor(model)(torch.from_numpy(image)[None])
    assert labels.dtype == torch.int32 and labels.shape == (1, 1, *spatial)
    np.testing.assert_array_equal(labels[0, 0].numpy(), expected)
    np.testing.assert_allclose(seeds[0, 0].numpy(), torch.sigmoid(raw[-1]).numpy(), atol=1e-6)


def test_scripted_label_predictor_batches_like_eager():
    model = engineered_model(2)
    x = torch.randn(2, 1, 32, 48, generator=torch.Generator().manual_seed(3))
    scripted = script_label_predictor(model)
    with torch.no_grad():
        eager_labels, eager_seeds = label_predictor(model)(x)
        labels, seeds = scripted(x)
        single, _ = scripted(x[1:])
    assert torch.equal(labels, eager_labels)
    torch.testing.assert_close(seeds, eager_seeds)
    assert torch.equal(labels[1:], single)
    assert int(labels.max()) > 5


# ----------------------------------------------------------------------------- network exports


@pytest.mark.parametrize("ndim", [2, 3])
def test_torchscript_network_export_reproduces_pytorch(tmp_path, ndim):
    model = engineered_model(ndim)
    path = export_torchscript(model, tmp_path / "net.pt")
    loaded = torch.jit.load(str(path))
    size = (24, 40) if ndim == 2 else (8, 16, 24)
    x = torch.randn(3, 1, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.net(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="exists"):
        export_torchscript(model, path)


@pytest.mark.skipif(not onnx_available()[0], reason="onnx/onnxscript not installed (extra 'export')")
def test_onnx_network_export_reproduces_pytorch(tmp_path):
    model = engineered_model(2)
    path, checked = export_onnx(model, tmp_path / "net.onnx")
    assert path.stat().st_size > 1_000_000  # the weights are inside the file
    if not checked:
        pytest.skip("onnxruntime not installed: exported without a runtime check")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 40, 32, generator=torch.Generator().manual_seed(1))
    (raw,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(raw, model.net(x).numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- bioimage.io


def test_architecture_source_is_self_contained(tmp_path):
    """The package's architecture file builds the model without importing embseg."""
    import ast
    import importlib.util

    source = architecture_source()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported == {"__future__", "functools", "math", "torch"}  # the standard library and torch only
    path = tmp_path / ARCHITECTURE_FILE
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("embseg_arch_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = engineered_model(2)
    built = module.embseg_label_model(2, 1, model.config.grid_step, 0.85, 0.5, 5)
    built.load_state_dict(label_predictor(model).state_dict())
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(built.eval()(x), label_predictor(model)(x), strict=True):
            assert torch.equal(a, b)


def test_make_test_image_crops_to_multiples_of_8():
    model = engineered_model(3)
    image = make_test_image(model, max_shape=(20, 30, 100))  # bundled 3D sample 51x120x122
    assert image.shape == (1, 16, 24, 96) and image.dtype == np.float32
    with pytest.raises(UserError, match="channel"):
        make_test_image(model, np.zeros((2, 16, 16, 16)), axes="CZYX")


def _package_yaml(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(("rdf.yaml", "bioimageio.yaml")))
        return yaml.safe_load(zf.read(name))


def _package_array(path: Path, name: str) -> np.ndarray:
    import io

    with zipfile.ZipFile(path) as zf:
        return np.load(io.BytesIO(zf.read(name)))


@needs_bioimageio
@pytest.mark.parametrize("ndim", [2, 3])
def test_bioimageio_package_outputs_labels_and_passes_the_model_test(tmp_path, ndim):
    model = engineered_model(ndim, anisotropy=2.18 if ndim == 3 else 1.0)
    shape = (64, 64) if ndim == 2 else (16, 32, 32)
    path = export_bioimageio(model, tmp_path / "model.zip", test_shape=shape, authors=["Test Author"])

    rdf = _package_yaml(path)
    weights = rdf["weights"]
    assert set(weights) == {"pytorch_state_dict", "torchscript"}
    assert weights["torchscript"]["parent"] == "pytorch_state_dict"
    arch = weights["pytorch_state_dict"]["architecture"]
    assert arch["source"] == ARCHITECTURE_FILE and len(arch["sha256"]) == 64
    assert arch["kwargs"]["ndim"] == ndim and arch["kwargs"]["min_size"] == 5
    (inp,) = rdf["inputs"]
    space = [a for a in inp["axes"] if a["type"] == "space"]
    assert [a["id"] for a in space] == list("zyx"[-ndim:])
    assert all(a["size"] == {"min": 8, "step": 1} for a in space)  # the forward pads to 8
    scale = next(p for p in inp["preprocessing"] if p["id"] == "scale_range")["kwargs"]
    assert (scale["min_percentile"], scale["max_percentile"]) == (1.0, 99.8)
    assert scale["axes"] == list("zyx"[-ndim:])
    outputs = {o["id"]: o for o in rdf["outputs"]}
    assert outputs["labels"]["data"]["type"] == "int32"
    assert outputs["seeds"]["data"]["type"] == "float32"
    assert {c["doi"] for c in rdf["cite"]} == {"10.48550/arXiv.2101.10033", "10.1109/CVPR.2019.00904"}
    assert rdf["config"]["embseg"]["seed_thresh"] == 0.85
    assert rdf["authors"] == [{"name": "Test Author"}]

    # The expected labels are embseg's own clustering of the network outputs.
    labels = _package_array(path, outputs["labels"]["test_tensor"]["source"])
    test_input = _package_array(path, inp["test_tensor"]["source"])
    assert labels.shape == (1, 1, *shape) and labels.dtype == np.int32
    assert test_input.shape == (1, 1, *shape)
    assert labels.max() > 3
    normalized = model.prepare(test_input[0], axes="C" + "ZYX"[-ndim:])
    own = model.cluster(model.predict_raw(normalized, normalized=True, device="cpu"))
    # embseg's and bioimage.io's normalisation differ in the last bits (eps): nearly all equal.
    assert np.mean(own == labels[0, 0]) > 0.95

    result = check_package(path)
    assert result.passed, result.report
    assert "torchscript" in result.report and "pytorch_state_dict" in result.report


@needs_bioimageio
def test_bioimageio_export_refuses_bad_targets(tmp_path):
    model = engineered_model(2)
    with pytest.raises(UserError, match="zip"):
        export_bioimageio(model, tmp_path / "model.yaml")
    target = tmp_path / "model.zip"
    target.write_bytes(b"old")
    with pytest.raises(UserError, match="exists"):
        export_bioimageio(model, target)
    with pytest.raises(UserError, match="author"):
        export_bioimageio(model, tmp_path / "other.zip", authors=[])


def test_cli_export_torchscript(tmp_path, capsys):
    from embseg.cli import main

    model = engineered_model(2)
    folder = model.save(tmp_path / "model")
    out = tmp_path / "net.pt"
    assert main(["export", str(folder), "--format", "torchscript", "-o", str(out)]) == 0
    assert out.is_file() and "TorchScript" in capsys.readouterr().out
    assert main(["export", str(folder), "--format", "torchscript", "-o", str(out)]) == 2
    info = json.loads((folder / "config.json").read_text())
    assert info["ndim"] == 2
