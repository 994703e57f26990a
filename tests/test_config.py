"""Config: params.yaml mirrors the dataclasses; overrides; one-line errors; dump round trip."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from tfseg.config import SECTIONS, Config, config_from_dict, config_reference, dump_config, load_config
from tfseg.errors import ConfigError


def test_params_yaml_equals_dataclass_defaults(project_root):
    assert load_config(project_root / "params.yaml") == load_config(None)


def test_params_yaml_has_every_key_of_every_section(project_root):
    data = yaml.safe_load((project_root / "params.yaml").read_text())
    assert tuple(data) == SECTIONS
    defaults = Config()
    for section in SECTIONS:
        keys = {f for f in getattr(defaults, section).__dataclass_fields__}
        assert set(data[section]) == keys, section


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["train.lr=1e-4", "data.image_size=[256, 192]", "model.encoder_weights=null",
                             "train.loss={bce: 1.0, dice: 0.5}"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.image_size == (256, 192)
    assert cfg.model.input_shape == (256, 192, 3)  # derived from data
    assert cfg.model.encoder_weights is None
    assert cfg.train.loss == {"bce": 1.0, "dice": 0.5}


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "--set train.lrr=1: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian.lr=1", "--set trian.lr=1: unknown section 'trian' (did you mean 'train'?)"),
    ("train.epochs=ten", "--set train.epochs=ten: expected an integer, got 'ten'"),
    ("data.classes=0", "--set data.classes=0: 0 is out of range; expected at least 1"),
    ("infer.overlap=1.5", "--set infer.overlap=1.5: 1.5 is out of range; expected at most 0.95"),
    ("train.optimizer=adamm", "--set train.optimizer=adamm: 'adamm' is not allowed (did you mean 'adam'?)"),
    ("data.image_size=[1,2,3]", "--set data.image_size=[1,2,3]: expected a list of 2 values"),
    ("data.image_size=[a,2]", "--set data.image_size=[a,2]: data.image_size[0]: expected an integer, got 'a'"),
    ("train.lr", "--set train.lr: expected section.key=value"),
])
def test_bad_values_give_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    text = str(err.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_errors_blame_the_override_not_the_file(project_root):
    """A bad --set value is the override's fault, a bad file value the file's (the audit found
    `configs/isbi2012.yaml: train.lr: ...` for `--set train.lr=abc`)."""
    recipe = project_root / "configs" / "isbi2012.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["train.lr=abc"])
    assert str(err.value) == "--set train.lr=abc: expected a number, got 'abc'"
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"lr": "abc"}}, source="p.yaml")
    assert str(err.value) == "p.yaml: train.lr: expected a number, got 'abc'"
    with pytest.raises(ConfigError, match=r"^--set data.val_size=\[64,64\]: \[64, 64\] needs data.fit: random_crop"):
        load_config(None, ["data.val_size=[64,64]"])


def test_key_origin_records_where_each_value_came_from(project_root):
    from tfseg.config import key_origin

    recipe = project_root / "configs" / "isbi2012.yaml"
    cfg = load_config(recipe, ["train.lr=0.01", "model.arch=unet_small"])
    assert key_origin(cfg, "train.lr") == "--set train.lr=0.01"
    assert key_origin(cfg, "data.channels") == str(recipe)
    assert key_origin(cfg, "train.strategy") is None  # a default
    assert key_origin(cfg.replace(train={"lr": 0.1}), "train.lr") is None  # set in code
    assert key_origin(cfg.replace(train={"epochs": 3}), "model.arch") == "--set model.arch=unet_small"
    assert load_config(recipe, ["train.lr=0.01"]) == cfg  # where a value came from is not part of it


def test_model_channels_must_equal_the_data_channels(project_root):
    """The audit: `--set model.input_shape=[256,256,3]` on the 1-channel ISBI recipe trained into a
    29-line Keras ValueError; `--set data.channels=3` on a 1-channel run said only `image has 3
    channels. Expected 1`. Both keys and where each was set are named, before anything runs."""
    recipe = project_root / "configs" / "isbi2012.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["model.input_shape=[256,256,3]"])
    assert str(err.value) == (
        "--set model.input_shape=[256,256,3]: [256, 256, 3] takes 3 channel(s), but data.channels is 1 "
        f"({recipe}). Expected the same number (model.input_shape: null follows data.image_size and "
        "data.channels)")
    run_config = project_root / "runs" / "dummy.yaml"  # a run's config.yaml spells input_shape out
    run_params = {"data": {"channels": 1}, "model": {"input_shape": [None, None, 1]}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(run_params, ["data.channels=3"], source=str(run_config))
    assert str(err.value).startswith(
        f"--set data.channels=3: images would decode to 3 channel(s), but model.input_shape [null, null, 1] "
        f"({run_config}) takes 1.")
    assert load_config(recipe, ["data.channels=3"]).model.input_shape == (None, None, 3)  # null follows


def test_unknown_key_in_file_names_file_and_nearest(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model:\n  backbnoe: vgg16\n")
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key 'model.backbnoe' \(did you mean 'model.backbone'\?\)"):
        load_config(path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def test_model_and_data_classes_must_agree():
    assert config_from_dict({"data": {"classes": 1}}).model.classes == 1
    with pytest.raises(ConfigError, match="model.classes: 2 differs from data.classes: 1"):
        config_from_dict({"data": {"classes": 1}, "model": {"classes": 2}})


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 3.0  # type: ignore[misc]


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["train.name=x", "augment.ops=[{name: rot90, p: 1.0}]"])
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(out) == cfg
    assert not [p for p in out.parent.iterdir() if p.name != "config.yaml"]  # no temp file left


def test_replace_sections():
    cfg = load_config(None)
    new = cfg.replace(train={"epochs": 3})
    assert new.train.epochs == 3 and cfg.train.epochs == 20


def test_docs_config_reference_is_current(project_root):
    doc = project_root / "docs" / "config.md"
    assert doc.read_text() == config_reference() + "\n", "docs/config.md is stale: run `make docs`"
