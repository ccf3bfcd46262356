import pytest

from reid.config import DEFAULTS, load_config, parse_override, resolve_config_path
from reid.errors import ConfigError


def test_shipped_configs_load():
    for name in ("default", "cpu-small", "nyala-mobilenet"):
        cfg = load_config(name)
        assert set(cfg) == set(DEFAULTS)
    assert load_config("default")["model"]["embedding_dim"] == 512


def test_overrides_apply_in_order_and_parse_yaml_values():
    cfg = load_config("cpu-small", ["train.epochs=3", "train.lr=1e-3", "model.backbone_kwargs={img_size: 64}",
                                    "train.epochs=4"])
    assert cfg["train"]["epochs"] == 4
    assert cfg["train"]["lr"] == pytest.approx(1e-3)
    assert cfg["model"]["backbone_kwargs"] == {"img_size": 64}


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])


def test_bad_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="cpu-small"):
        resolve_config_path("no-such-config")


def test_section_needs_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*section"):
        load_config(bad)


def test_numbers_are_checked():
    assert load_config(None, ["train.lr=5e-4"])["train"]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="needs a number"):
        load_config(None, ["train.epochs=many"])
