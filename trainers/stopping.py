"""Early-stopping rules on perplexity: pure functions, shared by the worker and the tests.

Divergence and plateau are decided by the trial itself (it knows its own history), so a
stopped trial ends like a finished one: its last rows and checkpoint are written and its
workers are released at once. ASHA needs the other trials and runs as a Tune scheduler
(``sweep.tuner.build_scheduler``).
"""

from __future__ import annotations

import math


def divergence(loss: float | None, perplexity: float, baseline: float | None,
               factor: float | None) -> str | None:
    """The reason a trial diverged, or None. NaN/inf always counts; ``factor`` x baseline
    counts when set."""
    if loss is not None and not math.isfinite(loss):
        return f"training loss is {loss}"
    if not math.isfinite(perplexity):
        return f"perplexity is {perplexity}"
    if factor is not None and baseline and perplexity > factor * baseline:
        return f"perplexity {perplexity:.4g} > {factor:g} x baseline {baseline:.4g}"
    return None


def plateau(perplexities: list[float], patience: int | None, min_rel_improvement: float) -> str | None:
    """Stop after ``patience`` evaluations in a row that each improved the best perplexity so
    far by less than ``min_rel_improvement`` (relative). ``perplexities[0]`` is the baseline."""
    if patience is None or len(perplexities) <= patience:
        return None
    best = perplexities[0]
    stale = 0
    for p in perplexities[1:]:
        if p < best * (1 - min_rel_improvement):
            stale = 0
        else:
            stale += 1
        best = min(best, p)
    if stale >= patience:
        return (
            f"plateau: {stale} evaluation(s) without a {100 * min_rel_improvement:g}% improvement "
            f"(best {best:.4g})"
        )
    return None
