"""What a trial prints, and keeps under SWEEP_DIR/logs/<trial_id>.log.

Formatting is pure (tested on its own); ``TrialLog`` writes on rank 0 only, to stdout and
appended to the trial's log file, which the sweep's driver tails to its console.
"""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path

import psutil
import torch


def trend(perplexity: float, baseline: float) -> str:
    """``"down 5.9%"`` / ``"up 2.0%"`` / ``"unchanged"`` against the baseline."""
    if not (math.isfinite(perplexity) and math.isfinite(baseline)) or baseline == 0:
        return "n/a"
    pct = 100.0 * (perplexity - baseline) / baseline
    if abs(pct) < 0.05:
        return "unchanged"
    return f"{'down' if pct < 0 else 'up'} {abs(pct):.1f}%"


def memory_mb(device: torch.device) -> tuple[float, float, str]:
    """(current, peak, label): the CUDA allocator on GPU, the process RSS on CPU."""
    if device.type == "cuda":
        return (
            torch.cuda.memory_allocated(device) / 2**20,
            torch.cuda.max_memory_allocated(device) / 2**20,
            "CUDA allocated",
        )
    rss = psutil.Process(os.getpid()).memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return rss, max(peak, rss), "process RSS"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def format_memory(before: float, after: float, peak: float, label: str) -> str:
    return (
        f"memory ({label}): before {before:.0f} MB, consumed {after - before:+.0f} MB, "
        f"peak-begin {peak - before:+.0f} MB, peak {peak:.0f} MB"
    )


def format_sparsity(summary: dict, target: float, n_layers: int) -> str:
    line = (
        f"sparsity (measured on weights): min {summary['min']:.4f} / mean {summary['mean']:.4f} / "
        f"max {summary['max']:.4f} over {n_layers} layers (target {target:.4f})"
    )
    if max(abs(summary["min"] - target), abs(summary["max"] - target)) > 0.01:
        line += "\nWARNING: measured sparsity is far from the target: wrongly loaded or pruned model?"
    return line


def format_summary(baseline: float, final: float, best: float, best_epoch: int) -> str:
    imp = 100.0 * (baseline - final) / baseline if baseline and math.isfinite(baseline) else float("nan")
    return (
        f"summary: baseline {baseline:.2f} -> final {final:.2f} "
        f"(best {best:.2f} at epoch {best_epoch}); improvement {imp:.1f}% "
        f"({trend(final, baseline)} vs baseline)"
    )


class TrialLog:
    def __init__(self, trial_id: str, path: str | None, enabled: bool):
        self.trial_id = trial_id
        self.path = Path(path) if path else None
        self.enabled = enabled
        if enabled and self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%H:%M:%S")
        lines = [f"[{self.trial_id}] {line}" for line in text.splitlines()]
        print("\n".join(lines), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write("".join(f"{stamp} {line}\n" for line in lines))
