"""Training: a few steps on real crops lower the loss (2D DSB nuclei, 3D QCANet embryo), and a
command-line round trip train -> predict -> evaluate on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import dataset
from embseg.cli import main
from embseg.data import TrainingCrops
from embseg.embedding import grid_step
from embseg.io import read_image, read_labels
from embseg.loss import spatial_embedding_loss
from embseg.model import build_network
from embseg.normalize import percentile_normalize


def loss_curve(images: list[np.ndarray], masks: list[np.ndarray], crop: tuple[int, ...], steps: int,
               batch: int, step: tuple[float, ...], fg_weight: float, lr: float = 1e-3) -> list[float]:
    """Losses of ``steps`` Adam steps of a fresh network on object-centred crops (seeded)."""
    from embseg.config import ModelConfig

    torch.manual_seed(0)
    ndim = len(crop)
    crops = TrainingCrops(images, masks, crop_size=crop, samples_per_epoch=steps * batch,
                          random_crop_fraction=0.0, seed=0, spacing=tuple(s / step[-1] for s in step))
    net = build_network(ModelConfig(ndim=ndim, grid_step=list(step)))
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    step_t = torch.tensor(step, dtype=torch.float32)
    for sample in torch.utils.data.DataLoader(crops, batch_size=batch):
        loss, _ = spatial_embedding_loss(net(sample["image"]), sample["instances"], sample["centers"], step_t,
                                         fg_weight=fg_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def first_and_last(losses: list[float], k: int) -> tuple[float, float]:
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def test_a_few_steps_lower_the_loss_2d():
    folder = dataset("dsb2018_fluo") / "train"
    paths = sorted((folder / "images").glob("*.tif"))[:40]
    images, masks = [], []
    for path in paths:
        mask = read_labels(folder / "masks" / path.name, ndim=2)
        if mask.shape != (256, 256) or mask.max() < 10:
            continue
        image, _ = read_image(path, ndim=2)
        images.append(percentile_normalize(image[None].astype(np.float32)))
        masks.append(mask)
        if len(images) == 4:
            break
    assert len(images) >= 2
    losses = loss_curve(images, masks, crop=(64, 64), steps=16, batch=4, step=grid_step(2), fg_weight=10.0)
    assert np.isfinite(losses).all()
    start, end = first_and_last(losses, 4)
    assert end < 0.85 * start, losses


def test_a_few_steps_lower_the_loss_3d():
    folder = dataset("qcanet_embryo_3d") / "train"
    path = sorted((folder / "images").glob("*.tif"))[0]
    image, _ = read_image(path, ndim=3)
    mask = read_labels(folder / "masks" / path.name, ndim=3)
    fg = float((mask == 0).sum() / max(1, (mask > 0).sum()))
    step = grid_step(3, anisotropy=2.18)
    losses = loss_curve([percentile_normalize(image[None].astype(np.float32))], [mask], crop=(16, 48, 48),
                        steps=12, batch=2, step=step, fg_weight=fg)
    assert np.isfinite(losses).all()
    start, end = first_and_last(losses, 3)
    assert end < 0.85 * start, losses


def write_pairs(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    yy, xx = np.indices((48, 48))
    for i in range(n):
        labels = np.zeros((48, 48), np.uint16)
        for k, (cy, cx) in enumerate([(12, 12), (32, 16), (16, 34), (36, 36)]):
            cy, cx = cy + int(rng.integers(-2, 3)), cx + int(rng.integers(-2, 3))
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 20] = k + 1
        image = (labels > 0) * 170 + rng.integers(0, 40, labels.shape)
        tifffile.imwrite(images / f"s{i}.tif", image.astype(np.uint8))
        tifffile.imwrite(masks / f"s{i}.tif", labels)
    return images, masks


def test_cli_train_predict_evaluate(tmp_path, capsys):
    images, masks = write_pairs(tmp_path / "train", n=4, seed=0)
    test_images, test_masks = write_pairs(tmp_path / "test", n=2, seed=1)
    model = tmp_path / "model"
    assert main(["train", "--images", str(images), "--masks", str(masks), "--output", str(model),
                 "--crop-size", "32", "--batch-size", "4", "--samples-per-epoch", "8", "--epochs", "3",
                 "--val-every", "1", "--figure-every", "0", "--seed", "1", "--device", "cpu", "--quiet"]) == 0
    assert "model saved to" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "log.csv", "curves.png"):
        assert (model / name).is_file(), name
    config = json.loads((model / "config.json").read_text())
    assert "tuning" in config["training"]  # thresholds tuned on the validation image
    assert 0 < config["seed_thresh"] < 1 and 0 < config["fg_thresh"] < 1

    predictions = tmp_path / "pred"
    assert main(["predict", str(test_images), "-m", str(model), "-o", str(predictions), "--quiet"]) == 0
    assert sorted(p.name for p in predictions.iterdir()) == ["s0.tif", "s1.tif"]
    labels = read_labels(predictions / "s0.tif")
    assert labels.shape == (48, 48) and labels.dtype == np.uint16

    report = tmp_path / "scores.json"
    assert main(["evaluate", str(test_masks), str(predictions), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "AP" in printed or "ap" in printed
    scores = json.loads(report.read_text())
    assert scores["n_images"] == 2 and scores["n_true"] == 8
    assert scores["n_pred"] == sum(int(read_labels(p).max()) for p in predictions.iterdir())
    assert len(scores["ap_pooled"]) == len(scores["thresholds"])
    assert all(0.0 <= v <= 1.0 for v in scores["ap_per_image"])


@pytest.mark.parametrize("bad", ["epochs: 0", "crop_size: [30, 30]"])
def test_train_refuses_bad_config_before_reading_data(tmp_path, capsys, bad):
    config = tmp_path / "c.yaml"
    config.write_text(f"images: {tmp_path / 'nowhere'}\nmasks: {tmp_path / 'nowhere'}\n"
                      f"output: {tmp_path / 'out'}\n{bad}\n")
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config:" in err and "nowhere" not in err


def _tiny_config(images: Path, masks: Path, output: Path, **extra):
    from embseg.config import TrainConfig

    values = dict(images=str(images), masks=str(masks), output=str(output), crop_size=[32, 32], batch_size=4,
                  samples_per_epoch=8, epochs=3, val_every=5, figure_every=0, seed=1, device="cpu", tune=False)
    values.update(extra)
    return TrainConfig(**values)


def test_stop_before_the_first_validation_still_leaves_a_validated_model(tmp_path):
    from embseg.training import train

    images, masks = write_pairs(tmp_path / "train", n=3, seed=0)
    rows = []

    def stop_now(row):
        rows.append(row)
        return True

    model = train(_tiny_config(images, masks, tmp_path / "run"), progress=False, callback=stop_now)
    assert len(rows) == 1 and rows[0]["epoch"] == 1  # stopped after the first epoch
    assert (tmp_path / "run" / "model.safetensors").is_file()
    log = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 2 and log[1].split(",")[7] != ""  # one row, with its validation score
    assert model.ndim == 2
    assert model.config.training["first_step_s"] > 0  # recorded from the call, data loading included


def test_init_from_starts_from_the_given_weights_and_refuses_other_shapes(tmp_path, capsys):
    from embseg.errors import UserError
    from embseg.model import load_model
    from embseg.training import train

    images, masks = write_pairs(tmp_path / "train", n=3, seed=0)
    source = load_model("nuclei-2d")
    fine = train(_tiny_config(images, masks, tmp_path / "fine", init_from="nuclei-2d", lr=1e-12, epochs=1),
                 progress=False)
    for key, value in source.net.state_dict().items():  # lr ~ 0: the weights stay the source's
        if value.is_floating_point() and "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(fine.net.state_dict()[key].float(), value.float(), atol=1e-3, rtol=1e-3)
    assert main(["train", "--images", str(images), "--masks", str(masks), "--output", str(tmp_path / "x"),
                 "--init-from", str(tmp_path / "nowhere"), "--quiet", "--epochs", "1"]) == 2
    assert "nowhere" in capsys.readouterr().err
    qcanet = tmp_path / "q3d"
    q = build_network_config_3d()
    q.save(qcanet)
    with pytest.raises(UserError, match="3D model"):
        train(_tiny_config(images, masks, tmp_path / "bad", init_from=str(qcanet), epochs=1), progress=False)


def build_network_config_3d():
    from embseg.config import ModelConfig
    from embseg.model import Model

    cfg = ModelConfig(ndim=3, in_channels=1, grid_step=[1 / 1023] * 3)
    return Model(cfg, build_network(cfg))


def test_weight_average_follows_the_warm_up_corrected_decay():
    from embseg.training import make_weight_average

    assert make_weight_average(torch.nn.Linear(2, 2), 0.0) is None
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    average = make_weight_average(net, 0.99)
    expected = None
    for n in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].num_batches_tracked += 3
        weight = net[0].weight.detach().clone()
        if expected is None:
            expected = weight  # the first update copies
        else:
            d = min(0.99, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * weight
        average.update_parameters(net)
        torch.testing.assert_close(average.module[0].weight, expected)
    assert int(average.module[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 15  # copied
    assert not torch.equal(average.module[0].weight, net[0].weight)


def test_training_with_a_weight_average_validates_and_saves_the_average(tmp_path):
    from safetensors.torch import load_file

    from embseg.training import train

    images, masks = write_pairs(tmp_path / "train", n=3, seed=0)
    train(_tiny_config(images, masks, tmp_path / "run", ema_decay=0.5, epochs=2, val_every=1000),
          progress=False)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    checkpoint = load_file(str(tmp_path / "run" / "checkpoints" / "last.safetensors"))
    assert int(checkpoint["average.n_averaged"]) == 4  # one update per optimizer step
    weights = [k for k in saved if k.endswith("weight")]
    assert weights
    for key in weights:
        torch.testing.assert_close(saved[key].float(), checkpoint[f"average.module.{key}"].float())
    assert any(not torch.equal(saved[k].float(), checkpoint[f"model.{k}"].float()) for k in weights)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_amp_trains_in_bfloat16_only_where_the_cpu_computes_it(tmp_path, monkeypatch, native):
    import embseg.predict
    import embseg.training
    from embseg.training import train

    dtypes = []

    def recording_network(config):
        net = build_network(config)
        net.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        return net

    monkeypatch.setattr(embseg.training, "build_network", recording_network)
    monkeypatch.setattr(embseg.predict, "cpu_bf16_supported", lambda: native)
    images, masks = write_pairs(tmp_path / "train", n=3, seed=0)
    model = train(_tiny_config(images, masks, tmp_path / "run", epochs=1, cpu_amp=True), progress=False)
    assert model.config.training["precision"] == ("bfloat16 autocast" if native else "float32")
    training_steps = dtypes[:2]  # 8 samples / batch 4: two steps before validation
    assert training_steps == [torch.bfloat16 if native else torch.float32] * 2
    log = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    assert np.isfinite(float(log[1].split(",")[3]))  # the loss column
    dtypes.clear()
    train(_tiny_config(images, masks, tmp_path / "off", epochs=1), progress=False)
    assert dtypes[:2] == [torch.float32] * 2  # off by default


def write_volumes(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """``n`` 16×32×32 volumes with four balls each (uint8 images, uint16 labels)."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    zz, yy, xx = np.indices((16, 32, 32))
    for i in range(n):
        labels = np.zeros((16, 32, 32), np.uint16)
        for k, (cz, cy, cx) in enumerate([(5, 8, 8), (10, 22, 10), (6, 10, 22), (10, 23, 23)]):
            cy, cx = cy + int(rng.integers(-2, 3)), cx + int(rng.integers(-2, 3))
            labels[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = k + 1
        image = (labels > 0) * 170 + rng.integers(0, 40, labels.shape)
        tifffile.imwrite(images / f"v{i}.tif", image.astype(np.uint8), metadata={"axes": "ZYX"})
        tifffile.imwrite(masks / f"v{i}.tif", labels, metadata={"axes": "ZYX"})
    return images, masks


def test_3d_training_end_to_end_in_the_cpu_training_layout(tmp_path, monkeypatch):
    """`train` on 3D volumes runs the network in channels-last-3d memory on the CPU (weights and
    batches, what `training_memory_format` says), saves a model that predicts one label volume
    per input, and the layout rule is channels-last on the CPU in 2D and 3D, default on CUDA."""
    import embseg.training
    from embseg.model import load_model
    from embseg.training import train, training_memory_format

    assert training_memory_format("cpu", 2) == torch.channels_last
    assert training_memory_format("cpu", 3) == torch.channels_last_3d
    assert training_memory_format("cuda", 3) == torch.contiguous_format
    layouts = []

    def recording_network(config):
        net = build_network(config)
        cl = torch.channels_last_3d
        block = net.encoder.layers[2]  # the first 64-channel residual block

        def record(module, inputs, output):
            if module.training:
                layouts.append((output.is_contiguous(memory_format=cl) and not output.is_contiguous(),
                                module.convs1[0].weight.is_contiguous(memory_format=cl)))
        block.register_forward_hook(record)
        return net

    monkeypatch.setattr(embseg.training, "build_network", recording_network)
    images, masks = write_volumes(tmp_path / "train", n=3, seed=0)
    model = train(_tiny_config(images, masks, tmp_path / "run", crop_size=[16, 32, 32], batch_size=2,
                               samples_per_epoch=4, epochs=2, ndim=3), progress=False)
    assert layouts and all(x and w for x, w in layouts), layouts
    log = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 3 and all(np.isfinite(float(row.split(",")[3])) for row in log[1:])
    loaded = load_model(tmp_path / "run")
    assert loaded.config.ndim == model.config.ndim == 3
    labels = loaded.predict(read_image(images / "v0.tif", ndim=3)[0])
    assert labels.shape == (16, 32, 32) and np.issubdtype(labels.dtype, np.integer)
