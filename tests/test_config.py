"""Config validation: one test per kind of bad input, each naming the offending key (and, for
file problems, the path); overrides; every shipped config loads and expands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep.config import (
    ConfigError,
    SweepConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)
from sweep.plan import expand

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))

# A valid config that touches no files: a config-built model and the default dataset text.
VALID_MODEL = {"config": {"model_type": "llama"}, "tokenizer": "byte"}


def with_model(**sections) -> dict:
    return {"model": dict(VALID_MODEL), **sections}


def config_error(data: dict, check_paths: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(data, check_paths=check_paths)
    return info.value


def test_valid_base_config_loads():
    cfg = from_dict(with_model())
    assert cfg.model.tokenizer == "byte"


# ---------------------------------------------------------------------------------------------
# One bad input per row: (data, key the message must name)

BAD_INPUTS = {
    "unknown top-level key": (with_model(bogus=1), "bogus"),
    "unknown nested key": (with_model(train={"bogus": 1}), "train.bogus"),
    "string for an int": (with_model(train={"num_epochs": "3"}), "train.num_epochs"),
    "list for a mapping": (with_model(train=[1, 2]), "train"),
    "bool for a number": (with_model(train={"base_lr": True}), "train.base_lr"),
    "string for a float list item": (with_model(grid={"sparsity": ["0.5"]}), "grid.sparsity[0]"),
    "sparsity 1.0": (with_model(grid={"sparsity": [1.0]}), "grid.sparsity[0]"),
    "sparsity -0.1": (with_model(grid={"sparsity": [0.5, -0.1]}), "grid.sparsity[1]"),
    "batch size 0": (with_model(grid={"batch_size": [0]}), "grid.batch_size[0]"),
    "batch size not divisible by workers": (
        with_model(grid={"batch_size": [4, 3]}, resources={"workers": 2}),
        "grid.batch_size[1]",
    ),
    "stride > token_length": (with_model(eval={"token_length": 64, "stride": 65}), "eval.stride"),
    "no model at all": ({}, "model.name_or_path"),
    "model.config without model_type": (
        {"model": {"config": {"hidden_size": 8}, "tokenizer": "byte"}},
        "model.config.model_type",
    ),
    "model.config without tokenizer": (
        {"model": {"config": {"model_type": "llama"}}},
        "model.tokenizer",
    ),
    "file source without path": (
        with_model(eval={"text": {"source": "file"}}),
        "eval.text.path",
    ),
    "empty sparsity grid": (with_model(grid={"sparsity": []}), "grid.sparsity"),
    "empty batch grid": (with_model(grid={"batch_size": []}), "grid.batch_size"),
    "repeated sparsity": (with_model(grid={"sparsity": [0.5, 0.5]}), "grid.sparsity"),
    "repeated batch size": (with_model(grid={"batch_size": [2, 2]}), "grid.batch_size"),
    "N:M with N >= M": (with_model(prune={"pattern": "4:2"}), "prune.pattern"),
    "N:M not of the form": (with_model(prune={"pattern": "2-4"}), "prune.pattern"),
    "N:M in the grid": (with_model(grid={"pattern": ["2:4", "2-4"]}), "grid.pattern[1]"),
    "bad Literal": (with_model(prune={"method": "random"}), "prune.method"),
    "bad grid method": (with_model(grid={"method": ["random"]}), "grid.method[0]"),
    "placement timeout 0": (
        with_model(resources={"placement_timeout_s": 0}), "resources.placement_timeout_s"),
    "over-subscription below 1": (
        with_model(resources={"oversubscription": 0.5}), "resources.oversubscription"),
    "bad checkpoint format": (with_model(checkpoint={"format": "zip"}), "checkpoint.format"),
    "checkpoint async not a bool": (with_model(checkpoint={"async": "yes"}), "checkpoint.async"),
    "background staging of a synchronous save": (
        with_model(checkpoint={"async": False, "background_staging": True}),
        "checkpoint.background_staging"),
    "background staging of a dense save": (
        with_model(checkpoint={"format": "dense", "background_staging": True}),
        "checkpoint.background_staging"),
}


@pytest.mark.parametrize("data, key", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_names_its_key(data, key):
    err = config_error(data)
    assert len(err.problems) == 1, err.problems
    assert err.problems[0].startswith(f"{key}:"), err.problems
    assert key in str(err)


def test_bad_literal_lists_the_allowed_values():
    err = config_error(with_model(prune={"method": "random"}))
    assert "'magnitude'" in str(err) and "'wanda'" in str(err)


def test_unknown_key_lists_the_allowed_keys():
    err = config_error(with_model(train={"bogus": 1}))
    assert "base_lr" in str(err)


# ---------------------------------------------------------------------------------------------
# Paths: the message names the key and the path


def test_local_model_path_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    err = config_error({"model": {"name_or_path": str(missing)}})
    assert err.problems[0].startswith("model.name_or_path:")
    assert str(missing) in str(err)


def test_local_model_dir_without_config_json(tmp_path):
    err = config_error({"model": {"name_or_path": str(tmp_path)}})
    assert err.problems[0].startswith("model.name_or_path:")
    assert str(tmp_path) in str(err) and "config.json" in str(err)


def test_gguf_file_not_found(tmp_path):
    err = config_error({"model": {"name_or_path": str(tmp_path), "gguf_file": "m.gguf"}})
    assert err.problems[0].startswith("model.gguf_file:")
    assert str(tmp_path / "m.gguf") in str(err)


def test_data_file_not_found(tmp_path):
    missing = tmp_path / "train.txt"
    err = config_error(with_model(data={"train": {"source": "file", "path": str(missing)}}))
    assert err.problems[0].startswith("data.train.path:")
    assert str(missing) in str(err)


def test_paths_not_checked_when_told_not_to(tmp_path):
    cfg = from_dict({"model": {"name_or_path": str(tmp_path / "absent")}}, check_paths=False)
    assert cfg.model.name_or_path.endswith("absent")


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


def test_error_names_the_source_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_model(bogus=1)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "bogus" in str(info.value)


# ---------------------------------------------------------------------------------------------
# All problems at once


def test_several_problems_reported_at_once():
    data = with_model(
        bogus=1,
        train={"warmup_frac": 1.5},
        grid={"sparsity": [1.0], "batch_size": [3]},
        eval={"token_length": 64, "stride": 128},
        resources={"workers": 2},
    )
    err = config_error(data)
    keys = sorted(p.split(":")[0] for p in err.problems)
    assert keys == [
        "bogus",
        "eval.stride",
        "grid.batch_size[0]",
        "grid.sparsity[0]",
        "train.warmup_frac",
    ]


def test_type_error_does_not_hide_range_problems():
    err = config_error(with_model(train={"num_epochs": "x"}, grid={"sparsity": [1.5]}))
    keys = sorted(p.split(":")[0] for p in err.problems)
    assert keys == ["grid.sparsity[0]", "train.num_epochs"]


@pytest.mark.parametrize(
    "grid, key",
    [
        ({"method": ["wanda", "wanda"]}, "grid.method"),
        ({"pattern": ["2:4", "2:4"]}, "grid.pattern"),
    ],
    ids=["method", "pattern"],
)
def test_repeated_method_or_pattern_rejected(grid, key):
    err = config_error(with_model(grid=grid))
    assert any(p.startswith(key) for p in err.problems), err.problems


# ---------------------------------------------------------------------------------------------
# --set overrides


@pytest.mark.parametrize(
    "item, parts, value",
    [
        ("train.base_lr=1.0e-4", ["train", "base_lr"], 1e-4),
        ("train.num_epochs=3", ["train", "num_epochs"], 3),
        ("grid.sparsity=[0.3, 0.6]", ["grid", "sparsity"], [0.3, 0.6]),
        ("eval.max_windows=null", ["eval", "max_windows"], None),
        ("model.tokenizer=", ["model", "tokenizer"], None),
        ("name=a=b", ["name"], "a=b"),
    ],
)
def test_parse_override_parses_yaml_values(item, parts, value):
    assert parse_override(item) == (parts, value)


@pytest.mark.parametrize("how", ["override", "file"])
def test_exponent_without_dot_is_a_number(tmp_path, how):
    path = tmp_path / "c.yaml"
    text = yaml.safe_dump(with_model())
    if how == "file":
        text += "train:\n  base_lr: 5e-6\n"
    path.write_text(text)
    cfg = load_config(path, ["train.base_lr=5e-6"] if how == "override" else [])
    assert cfg.train.base_lr == 5e-6


@pytest.mark.parametrize("item", ["train.base_lr", "train..base_lr=1", "=1"])
def test_bad_override_is_a_config_error(item):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(item)


def test_overrides_create_nested_keys_and_leave_input_alone():
    data = {"train": {"seed": 1}}
    out = apply_overrides(data, ["train.base_lr=2.0e-5", "checkpoint.every_steps=10"])
    assert out == {"train": {"seed": 1, "base_lr": 2e-5}, "checkpoint": {"every_steps": 10}}
    assert data == {"train": {"seed": 1}}


def test_load_config_applies_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_model()))
    cfg = load_config(path, ["grid.sparsity=[0.3, 0.6]", "eval.max_windows=4"])
    assert cfg.grid.sparsity == (0.3, 0.6)
    assert cfg.eval.max_windows == 4


def test_override_errors_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_model()))
    with pytest.raises(ConfigError, match="train.bogus"):
        load_config(path, ["train.bogus=1"])


# ---------------------------------------------------------------------------------------------
# Shipped configs, defaults, round trip


def test_there_are_shipped_configs():
    assert any(p.name == "tiny.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_expands(path):
    cfg = load_config(path, check_paths=False)
    assert len(expand(cfg)) >= 1


def test_defaults():
    cfg = SweepConfig()
    assert cfg.train.base_samples == 10000
    assert cfg.train.base_lr == 5e-6
    assert cfg.train.lr_rule == "sqrt"
    assert cfg.eval.token_length == 2048
    assert cfg.eval.stride == 2048
    assert cfg.eval.text.dataset == "wikitext"
    assert cfg.eval.text.dataset_config == "wikitext-2-raw-v1"
    assert cfg.eval.text.split == "test"


def test_checkpoint_async_is_spelled_as_in_yaml():
    """`async` is a Python keyword: the field is `async_`, the key (and to_dict) `async`."""
    cfg = from_dict(with_model(checkpoint={"async": False}), check_paths=False)
    assert cfg.checkpoint.async_ is False and cfg.checkpoint.format == "sparse"
    assert to_dict(cfg)["checkpoint"]["async"] is False
    assert "async_" not in to_dict(cfg)["checkpoint"]
    assert "checkpoint.async_: unknown key" in str(config_error(with_model(checkpoint={"async_": 1})))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_to_dict_round_trips(path):
    cfg = load_config(path, check_paths=False)
    plain = to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # YAML-able
    assert from_dict(plain, check_paths=False) == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.distill.kind=kd", "train.distill.kind"),
        ("train.distill.alpha=1.5", "train.distill.alpha"),
        ("train.distill.temperature=0", "train.distill.temperature"),
        ("train.distill.ce_weight=-1", "train.distill.ce_weight"),
        ("grid.distill=[none,kd]", "grid.distill[1]"),
        ("grid.method=[wanda,obs]", "grid.method[1]"),
        ("grid.layerwise=[owl,owl]", "grid.layerwise"),
        ("prune.method=obs", "prune.method"),
        ("prune.calibration.samples=0", "prune.calibration.samples"),
        ("prune.calibration.seq_len=1", "prune.calibration.seq_len"),
        ("prune.sparsegpt.percdamp=1.5", "prune.sparsegpt.percdamp"),
        ("prune.sparsegpt.blocksize=0", "prune.sparsegpt.blocksize"),
        ("prune.owl.lam=0.6", "prune.owl.lam"),
        ("prune.owl.m=0", "prune.owl.m"),
    ],
)
def test_pruning_and_distillation_keys_are_checked(tmp_path, override, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": VALID_MODEL}))
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert any(p.startswith(key) for p in err.value.problems), err.value.problems


def test_owl_refuses_a_pattern_and_sparsities_it_cannot_spread(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": VALID_MODEL}))
    with pytest.raises(ConfigError, match="prune.layerwise: owl"):
        load_config(path, ["prune.layerwise=owl", "grid.pattern=['2:4']"])
    with pytest.raises(ConfigError, match=r"grid.sparsity\[0\]"):
        load_config(path, ["prune.layerwise=owl", "grid.sparsity=[0.05]"])
