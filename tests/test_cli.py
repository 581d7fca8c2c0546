"""The ``sweep`` command line on invalid input (exit 2, a message naming the key or path,
nothing written) and ``run --dry-run`` (the plan, nothing written). No Ray is started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep.cli import main
from sweep.config import ConfigError

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
TINY_IDS = ["s0.5-b2", "s0.5-b4", "s0.8-b2", "s0.8-b4"]


@pytest.fixture
def storage(tmp_path) -> Path:
    """A --storage directory that no test here may create."""
    return tmp_path / "sweeps"


def run(storage: Path, *args: str) -> int:
    return main(["run", *args, "--storage", str(storage)])


def test_missing_config_file(storage, tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert run(storage, str(missing)) == 2
    assert str(missing) in capsys.readouterr().err
    assert not storage.exists()


def test_unknown_key_in_config(storage, tmp_path, capsys):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["train"]["bogus_steps"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run(storage, str(path)) == 2
    err = capsys.readouterr().err
    assert "train.bogus_steps" in err and str(path) in err
    assert not storage.exists()


def test_unknown_key_from_set(storage, capsys):
    assert run(storage, str(TINY), "--set", "grid.bogus=1") == 2
    assert "grid.bogus" in capsys.readouterr().err
    assert not storage.exists()


def test_gguf_file_without_model(storage, capsys):
    assert run(storage, str(TINY), "--gguf-file", "m.gguf") == 2
    assert "--gguf-file" in capsys.readouterr().err
    assert not storage.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(storage, capsys):
    assert run(storage, str(TINY), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "4 trials" in out
    for tid in TINY_IDS:
        assert tid in out
    assert not storage.exists()


def test_shortcuts_make_a_one_trial_plan(storage, capsys):
    assert run(storage, str(TINY), "--sparsity", "0.3", "--batch-size", "2", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "1 trials" in out and "s0.3-b2" in out
    assert not any(tid in out for tid in TINY_IDS)
    assert not storage.exists()


def test_name_shortcut_sets_the_sweep_dir(storage, capsys):
    assert run(storage, str(TINY), "--name", "other", "--dry-run") == 0
    assert str(storage.resolve() / "other") in capsys.readouterr().out
    assert not storage.exists()


def test_resume_missing_dir(tmp_path, capsys):
    missing = tmp_path / "no-sweep"
    assert main(["resume", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()


def test_query_missing_dir(tmp_path, capsys):
    missing = tmp_path / "no-sweep"
    assert main(["query", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()


def test_changed_grid_is_refused_on_resume(tmp_path, capsys):
    """A sweep directory whose trials started continues only with a config that gives the same
    grid; resources may change. (One whose trials never started may be replaced:
    tests/test_failfast.py.)"""
    from sweep.config import load_config
    from sweep.results import ResultsWriter
    from sweep.runner import check_resume_compatible, write_sweep_state

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(tiny, check_paths=False)
    sweep_dir = tmp_path / "tiny"
    write_sweep_state(cfg, sweep_dir)
    changed = load_config(tiny, ["grid.sparsity=[0.5, 0.9]", "train.base_lr=1e-4"])
    assert check_resume_compatible(changed, sweep_dir) == ["grid.sparsity", "train.base_lr"]
    ResultsWriter(sweep_dir).upsert_trial({"trial_id": "s0.5-b2", "status": "running"})
    resized = load_config(tiny, ["resources.max_concurrent_trials=1"])
    assert check_resume_compatible(resized, sweep_dir) is None
    with pytest.raises(ConfigError) as err:
        check_resume_compatible(changed, sweep_dir)
    assert "grid.sparsity" in str(err.value) and "train.base_lr" in str(err.value)
    # Through the CLI: exit 2, nothing started.
    rc = main(["run", str(tiny), "--storage", str(tmp_path), "--set", "grid.sparsity=[0.9]"])
    assert rc == 2
    assert "different grid" in capsys.readouterr().err
