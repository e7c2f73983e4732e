"""Typed configs: every shipped config validates; unknown keys and wrong types are one-line errors."""

from pathlib import Path

import pytest

from stepdistill.config import RunConfig, apply_override, dump_config, load_config, validate
from stepdistill.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# stepdistill "), f"{path} must start with the command that runs it"
    assert str(path.relative_to(ROOT)) in first
    # the resolved config round-trips through YAML
    import yaml

    assert validate(yaml.safe_load(dump_config(cfg))) == cfg


def _toy(tmp_path, extra=""):
    p = tmp_path / "c.yaml"
    p.write_text("method: {name: denoising}\nmodel: {arch: {dim: 2}, kind: mlp}\ndata: {name: toy2d}\n" + extra)
    return p


def test_override_sets_nested_typed_values(tmp_path):
    cfg = load_config(_toy(tmp_path), ["train.steps=7", "train.optim.lr=3e-4", "train.optim.betas=[0.0, 0.99]",
                                       "data.num_modes=4"])
    assert cfg.train.steps == 7 and cfg.train.optim.lr == 3e-4 and cfg.train.optim.betas == (0.0, 0.99)
    assert cfg.data.num_modes == 4


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(UsageError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'"):
        load_config(_toy(tmp_path), ["train.stpes=5"])
    with pytest.raises(UsageError, match=r"'train.optim.learning_rat'"):
        load_config(_toy(tmp_path), ["train.optim.learning_rat=1"])
    with pytest.raises(UsageError, match=r"unknown config key 'data.num_mode'; did you mean 'data.num_modes'"):
        load_config(_toy(tmp_path, "train: {}\n"), ["data.num_mode=3"])


def test_wrong_type_names_field_and_type(tmp_path):
    with pytest.raises(UsageError, match=r"train.steps: .*integer.*'abc'"):
        load_config(_toy(tmp_path), ["train.steps=abc"])
    with pytest.raises(UsageError, match=r"train.optim.lr: .*greater than 0"):
        load_config(_toy(tmp_path), ["train.optim.lr=-1"])


def test_unknown_method_name(tmp_path):
    with pytest.raises(UsageError, match=r"method.name: unknown method 'dmdd'"):
        load_config(_toy(tmp_path), ["method.name=dmdd"])


def test_loss_weights_left_out_keep_their_defaults(tmp_path):
    cfg = load_config(_toy(tmp_path), ["method.name=dmd", "method.loss_weights={dm: 2.0}"])
    expected = {"dm": 2.0, "fake": 1.0, "reg": 0.25, "gan_g": 3e-3, "gan_d": 1e-2}
    assert cfg.method.loss_weights == expected
    import yaml

    assert yaml.safe_load(dump_config(cfg))["method"]["loss_weights"] == expected  # the run records every weight


def test_asset_methods_resolve_but_are_not_listed(tmp_path):
    from stepdistill import registry

    assert registry.names() == list(registry.METHODS) and "classifier" not in registry.names()
    assert load_config(_toy(tmp_path), ["method.name=classifier"]).method.name == "classifier"
    with pytest.raises(UsageError, match=rf"did you mean 'denoising'\? methods: {', '.join(registry.names())}$"):
        load_config(_toy(tmp_path), ["method.name=denoisin"])
    with pytest.raises(UsageError, match=r"unknown config key 'method.label_smoothin'; did you mean"):
        load_config(_toy(tmp_path), ["method.name=classifier", "method.label_smoothin=0.1"])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(bad)


def test_override_syntax():
    raw = {}
    with pytest.raises(UsageError, match="key=value"):
        apply_override(raw, "train.steps")
    apply_override(raw, "a.b.c=[1, 2]")
    assert raw == {"a": {"b": {"c": [1, 2]}}}
