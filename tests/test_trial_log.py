"""What a trial prints: trend, memory, measured sparsity, the final summary, and the log that
writes prefixed lines to stdout and the trial's file on rank 0 only."""

from __future__ import annotations

import math

import pytest

from trainers.trial_log import TrialLog, format_memory, format_sparsity, format_summary, trend


@pytest.mark.parametrize(
    "perplexity, baseline, text",
    [
        (94.1, 100.0, "down 5.9%"),
        (102.0, 100.0, "up 2.0%"),
        (100.0, 100.0, "unchanged"),
        (100.04, 100.0, "unchanged"),  # below 0.05%
        (50.0, 100.0, "down 50.0%"),
        (300.0, 100.0, "up 200.0%"),
        (math.nan, 100.0, "n/a"),
        (math.inf, 100.0, "n/a"),
        (100.0, math.nan, "n/a"),
        (100.0, 0.0, "n/a"),
    ],
)
def test_trend(perplexity, baseline, text):
    assert trend(perplexity, baseline) == text


def test_format_memory():
    line = format_memory(before=1000.0, after=1250.0, peak=1800.0, label="process RSS")
    assert "process RSS" in line
    assert "before 1000 MB" in line
    assert "consumed +250 MB" in line
    assert "peak-begin +800 MB" in line
    assert "peak 1800 MB" in line


def test_format_memory_negative_consumption():
    assert "consumed -100 MB" in format_memory(500.0, 400.0, 500.0, "CUDA allocated")


@pytest.mark.parametrize(
    "summary, target, warns",
    [
        ({"min": 0.5, "mean": 0.5, "max": 0.5}, 0.5, False),
        ({"min": 0.495, "mean": 0.5, "max": 0.505}, 0.5, False),  # within 1 point
        ({"min": 0.0, "mean": 0.0, "max": 0.0}, 0.5, True),  # nothing pruned
        ({"min": 0.5, "mean": 0.6, "max": 0.9}, 0.5, True),  # one layer far off
        ({"min": 0.3, "mean": 0.5, "max": 0.5}, 0.5, True),
    ],
)
def test_format_sparsity_warns_only_when_far(summary, target, warns):
    text = format_sparsity(summary, target, n_layers=14)
    assert "14 layers" in text
    assert f"min {summary['min']:.4f}" in text and f"max {summary['max']:.4f}" in text
    assert f"target {target:.4f}" in text
    assert ("WARNING" in text) == warns


def test_format_summary_numbers():
    text = format_summary(baseline=200.0, final=150.0, best=140.0, best_epoch=2)
    assert "baseline 200.00" in text
    assert "final 150.00" in text
    assert "best 140.00 at epoch 2" in text
    assert "improvement 25.0%" in text
    assert "down 25.0%" in text


def test_format_summary_worse_and_nonfinite():
    assert "improvement -10.0%" in format_summary(100.0, 110.0, 100.0, 0)
    assert "improvement nan%" in format_summary(math.nan, 110.0, 100.0, 0)


def test_trial_log_writes_prefixed_lines(tmp_path, capsys):
    path = tmp_path / "logs" / "s0.5-b2.log"
    log = TrialLog("s0.5-b2", str(path), enabled=True)
    log("epoch 1\nperplexity 12.3")
    log("done")
    assert capsys.readouterr().out.splitlines() == [
        "[s0.5-b2] epoch 1",
        "[s0.5-b2] perplexity 12.3",
        "[s0.5-b2] done",
    ]
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert [line.split(" ", 1)[1] for line in lines] == [
        "[s0.5-b2] epoch 1",
        "[s0.5-b2] perplexity 12.3",
        "[s0.5-b2] done",
    ]


def test_trial_log_disabled_writes_nothing(tmp_path, capsys):
    path = tmp_path / "logs" / "t.log"
    log = TrialLog("t", str(path), enabled=False)
    log("hello")
    assert capsys.readouterr().out == ""
    assert not path.exists() and not path.parent.exists()


def test_trial_log_without_path_only_prints(capsys):
    TrialLog("t", None, enabled=True)("hello")
    assert capsys.readouterr().out == "[t] hello\n"
