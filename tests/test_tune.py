"""Threshold tuning: picks the thresholds that work, stores TTA thresholds separately, and
prediction with TTA uses them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import tifffile
import torch
from scipy import ndimage

from embseg.cli import main
from embseg.config import ModelConfig
from embseg.embedding import grid_step
from embseg.model import Model, build_network, load_model
from embseg.samples import sample
from embseg.tune import tune_thresholds
from test_cluster import masks_to_ideal_raw


def disks(shape=(64, 64), centres=((16, 16), (16, 46), (46, 20), (44, 48)), r2=40):
    yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.int64)
    for k, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r2] = k
    return labels


def with_seed_peak(raw, truth, peak):
    """Seediness ``peak`` at object centres, lower towards the border, background 0.02."""
    raw = raw.clone()
    depth = ndimage.distance_transform_edt(truth > 0)
    rel = np.zeros_like(depth)
    for k, box in enumerate(ndimage.find_objects(truth), start=1):
        inside = truth[box] == k
        rel[box][inside] = depth[box][inside] / depth[box][inside].max()
    seed = np.where(truth > 0, 0.31 + (peak - 0.31) * rel, 0.02)
    raw[-1] = torch.from_numpy(np.log(seed / (1 - seed)).astype(np.float32))
    return raw


def test_tuning_lowers_the_seed_threshold_below_the_seed_peaks():
    truth = disks()
    step = grid_step(2)
    raw = with_seed_peak(masks_to_ideal_raw(truth, step), truth, peak=0.82)
    config = ModelConfig(ndim=2, grid_step=list(step), min_size=5)
    best = tune_thresholds([raw], [truth], config, seed_grid=(0.7, 0.8, 0.9), fg_grid=(0.3, 0.5))
    assert best["ap"] == 1.0 and best["seed_thresh"] <= 0.8
    by_pair = {(r["seed_thresh"], r["fg_thresh"]): r["ap"] for r in best["table"]}
    assert by_pair[(0.9, 0.3)] == 0.0  # no seed reaches 0.9: nothing found
    assert by_pair[(0.8, 0.5)] < 1.0  # fg 0.5 cuts the objects' borders (seed < 0.5 there)


def test_tta_thresholds_are_used_only_with_tta():
    truth = disks()
    step = grid_step(2)
    raw = with_seed_peak(masks_to_ideal_raw(truth, step), truth, peak=0.82)
    config = ModelConfig(ndim=2, grid_step=list(step), min_size=5, seed_thresh=0.9, fg_thresh=0.3)
    model = Model(config, build_network(config))
    assert config.thresholds(tta=True) == (0.9, 0.3)  # no TTA thresholds: the plain ones
    assert model.cluster(raw).max() == 0
    config.tta_seed_thresh, config.tta_fg_thresh = 0.8, 0.3
    assert config.thresholds(tta=True) == (0.8, 0.3) and config.thresholds() == (0.9, 0.3)
    assert model.cluster(raw, tta=True).max() == 4
    assert model.cluster(raw).max() == 0
    assert model.cluster(raw, tta=True, seed_thresh=0.9).max() == 0  # given values win
    again = ModelConfig.from_dict(json.loads(config.to_json()), source="config.json")
    assert again.thresholds(tta=True) == (0.8, 0.3)


def test_cli_tune_tta_writes_tta_thresholds_only(tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(load_model("nuclei-2d").source, model_dir)
    before = json.loads((model_dir / "config.json").read_text())
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("dsb-dense", "dsb-large"):
        s = sample(name)
        tifffile.imwrite(images / f"{name}.tif", s.image)
        tifffile.imwrite(masks / f"{name}.tif", s.mask.astype(np.uint16))
    args = ["tune", "-m", str(model_dir), "--images", str(images), "--masks", str(masks), "--device", "cpu"]
    assert main([*args, "--tta"]) == 0
    out = capsys.readouterr().out
    assert "with TTA on 2 images" in out
    after = json.loads((model_dir / "config.json").read_text())
    assert (after["seed_thresh"], after["fg_thresh"]) == (before["seed_thresh"], before["fg_thresh"])
    tuned = after["training"]["tuning_tta"]
    assert (after["tta_seed_thresh"], after["tta_fg_thresh"]) == (tuned["seed_thresh"], tuned["fg_thresh"])
    assert tuned["tta"] is True and tuned["n_images"] == 2 and 0 < tuned["ap"] <= 1
    model = load_model(model_dir)
    assert model.config.thresholds(tta=True) == (tuned["seed_thresh"], tuned["fg_thresh"])


def test_cli_tune_on_the_validation_split_of_a_training_config(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("dsb-dense", "dsb-large", "dsb-clustered"):
        s = sample(name)
        tifffile.imwrite(images / f"{name}.tif", s.image)
        tifffile.imwrite(masks / f"{name}.tif", s.mask.astype(np.uint16))
    config = tmp_path / "c.yaml"
    config.write_text(f"images: {images}\nmasks: {masks}\noutput: {tmp_path / 'run'}\nval_fraction: 0.34\n")
    model_dir = tmp_path / "model"
    shutil.copytree(load_model("nuclei-2d").source, model_dir)
    assert main(["tune", "-m", str(model_dir), "--config", str(config), "--device", "cpu", "--dry-run"]) == 0
    assert "on 1 images" in capsys.readouterr().out  # one of three images is the validation split
    assert main(["tune", "-m", str(model_dir), "--device", "cpu"]) == 2
    assert "--images and --masks, or --config" in capsys.readouterr().err


def test_min_size_is_tuned_only_from_the_data_rule_size():
    from embseg.tune import min_size_grid, tune_model

    assert min_size_grid(21) == (21, 32, 42) and min_size_grid(0) == (0,)
    truth = disks(shape=(64, 64), r2=40)  # four disks of ~121 px
    step = grid_step(2)
    raw = with_seed_peak(masks_to_ideal_raw(truth, step), truth, peak=0.95)
    # Two background fragments of 6x6 px, confident seeds whose 8-px ellipse holds all 36 pixels.
    for y, x in ((2, 2), (56, 30)):
        raw[-1, y : y + 6, x : x + 6] = 5.0
        raw[2:4, y : y + 6, x : x + 6] = float(np.log(np.log(2.0) / (8 * step[-1]) ** 2) / 10)
    best = tune_thresholds([raw], [truth], ModelConfig(ndim=2, grid_step=list(step), min_size=20),
                           size_grid=(20, 40))
    assert best["min_size"] == 40 and best["ap"] == 1.0  # 36-px fragments are objects at 20
    assert {r["min_size"] for r in best["table"]} == {20, 40}

    def tiny_model(base):
        config = ModelConfig(ndim=2, grid_step=list(step), min_size=20, seed_thresh=0.9, fg_thresh=0.5)
        config.training = {} if base is None else {"base_min_size": base}
        model = Model(config, build_network(config))
        model.predict_raw = lambda image, **kwargs: raw  # the network is beside the point here
        return model

    image = np.zeros((1, 64, 64), np.float32)
    tuned = tiny_model(20)
    assert tune_model(tuned, [image], [truth], device="cpu", normalized=True)["min_size"] == 40
    assert tuned.config.min_size == 40
    fixed = tiny_model(None)  # min_size chosen by the user (or an older model): kept
    assert tune_model(fixed, [image], [truth], device="cpu", normalized=True)["min_size"] == 20
    assert fixed.config.min_size == 20
