"""The README stays true: every config key is documented, and the two commands are shown."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from sweep.config import SweepConfig, TextSource, config_key

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _keys(cls, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and tp is not TextSource:
            yield from _keys(tp, f"{prefix}{config_key(f)}.")
        else:
            yield prefix + config_key(f)


def test_every_config_key_is_in_the_readme():
    missing = [k for k in _keys(SweepConfig) if f"`{k}`" not in README]
    missing += [k for k in _keys(TextSource) if f"`{k}`" not in README]
    assert not missing, missing


def test_the_two_commands_are_shown():
    assert "make demo" in README and "make test" in README


def test_every_epochs_column_is_in_the_schema_table():
    from trainers.metrics import EPOCH_COLUMNS

    section = README[README.index("## Results: Parquet schema"):README.index("## Configuration reference")]
    missing = [c.name for c in EPOCH_COLUMNS if c.name not in section]
    assert not missing, missing
