import pytest

from embseg.config import ModelConfig, TrainConfig, config_from_dict, dump_config, load_config
from embseg.errors import UserError


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(epochs=3, crop_size=[64, 64], images="a", masks="b")
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_unknown_key_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epocs: 3\n")
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        load_config(path)


def test_flags_override_file_and_coerce():
    base = TrainConfig(epochs=5)
    cfg = config_from_dict({"epochs": "7", "crop-size": "96,96", "augment": "false"}, base=base)
    assert cfg.epochs == 7 and cfg.crop_size == [96, 96] and cfg.augment is False


@pytest.mark.parametrize("key,value", [("epochs", 0), ("lr", -1.0), ("seed_thresh", 1.5),
                                       ("batch_size", -2), ("crop_size", [60, 64]),
                                       ("image_balance", -0.5),
                                       ("intensity_augment", 3.0)])
def test_invalid_values_rejected(key, value):
    with pytest.raises(UserError, match=key):
        config_from_dict({key: value}).validate()


def test_bad_type_names_key():
    with pytest.raises(UserError, match="epochs"):
        config_from_dict({"epochs": "many"})


def test_model_config_newer_version_refused():
    with pytest.raises(UserError, match="newer"):
        ModelConfig.from_dict({"ndim": 2, "format_version": 99}, source="x/config.json")
    with pytest.raises(UserError, match="unknown model config key"):
        ModelConfig.from_dict({"ndim": 2, "ndimm": 2}, source="x/config.json")
    cfg = ModelConfig.from_dict({"ndim": 3, "grid_step": [0.002, 0.001, 0.001]}, source="x")
    assert cfg.ndim == 3


def test_seed_radius_defaults_to_half_the_training_crop(tmp_path):
    assert ModelConfig(ndim=2).seed_radius() is None  # crop unknown: no limit
    assert ModelConfig(ndim=2, crop_size=[96, 64]).seed_radius() == [48.0, 32.0]
    assert ModelConfig(ndim=2, crop_size=[96, 96], max_seed_radius=[10, 20]).seed_radius() == [10.0, 20.0]
    assert ModelConfig(ndim=2, crop_size=[96, 96], max_seed_radius=[]).seed_radius() is None  # off
    path = tmp_path / "config.json"
    for bad in ("[10]", "[0, 5]"):
        path.write_text(f'{{"ndim": 2, "max_seed_radius": {bad}}}')
        with pytest.raises(UserError, match="max_seed_radius"):
            ModelConfig.from_dict(__import__("json").loads(path.read_text()), source=str(path))
