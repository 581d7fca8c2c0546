"""``sweep report --html FILE``: one self-contained HTML page to share a sweep.

The text table lives in a terminal and ``sweep plot``'s PNG cannot be hovered or zoomed; this
page holds both, interactive, plus what is needed to judge the numbers (the sweep's resolved
config and the software versions) in one file that opens offline: plotly.js is embedded
inline, so a copy mailed around or taken off an air-gapped cluster still renders.

Built from the Parquet results alone, like ``sweep report``: a running sweep (trials pending or
running, values missing) renders as far as it got. Every piece of text from the results or
the config is HTML-escaped; labels handed to plotly are escaped too (plotly reads a few tags
in them), and plotly writes its figures as JSON with ``<`` and ``/`` escaped.
"""

from __future__ import annotations

import html
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative

from sweep.api import find_sweeps, localize, read_epochs, read_trials
from sweep.layout import SweepLayout
from sweep.report import LEFT, LEGEND, build_report, hidden_columns, report_cells

RUNNING = ("pending", "running")
PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
PACKAGES = ("torch", "ray", "transformers", "pandas", "pyarrow", "plotly")
CHART_HEIGHT = "460px"


# -- helpers ----------------------------------------------------------------------------------
def _e(v: Any) -> str:
    """Escaped text for HTML (element content and quoted attributes)."""
    return html.escape("" if v is None else str(v), quote=True)


def _pe(v: Any) -> str:
    """Escaped text for a plotly label: plotly reads a few tags (<b>, <br>, <a>) in labels and
    decodes only &amp; &lt; &gt;, so those three are escaped and quotes left as they are."""
    return html.escape("" if v is None else str(v), quote=False)


def _val(v: Any) -> float | None:
    """A finite float for plotly; None (a gap) for a missing, NaN or infinite value."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _vals(values: Iterable[Any]) -> list[float | None]:
    return [_val(v) for v in values]


def spans_decade(values: Iterable[Any]) -> bool:
    """True when the finite positive values span more than a factor of ten: the charts then
    use a log y-axis, as ``sweep plot`` does, so a 300 -> 60 recovery and 60 -> 55 both show."""
    vals = [v for v in _vals(values) if v is not None and v > 0]
    return bool(vals) and max(vals) / min(vals) > 10


def pareto_front(sparsity: Sequence[float], perplexity: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats: none has at least their sparsity and at
    most their perplexity with one of the two strictly better. Ordered by sparsity; of equal
    points the first is kept. Missing or NaN perplexities are never on the front."""
    ok = [
        i for i, (s, p) in enumerate(zip(sparsity, perplexity, strict=True))
        if _val(s) is not None and _val(p) is not None
    ]  # fmt: skip
    ok.sort(key=lambda i: (-float(sparsity[i]), float(perplexity[i]), i))
    front, lowest = [], math.inf
    for i in ok:
        if float(perplexity[i]) < lowest:
            front.append(i)
            lowest = float(perplexity[i])
    return sorted(front, key=lambda i: (float(sparsity[i]), i))


def _group_label(key: tuple, varying: list[str]) -> str:
    """'batch 4', prefixed by sweep / method / pattern when the chart holds several."""
    named = dict(zip(["sweep", "method", "pattern", "batch_size"], key, strict=True))
    words = [
        str(named[p]) for p in varying if p != "batch_size" and named[p] is not None
        and not (isinstance(named[p], float) and math.isnan(named[p]))
    ]  # fmt: skip
    return " ".join([*words, f"batch {named['batch_size']}"])


def _trial_label(sweep: str, trial_id: str, several: bool) -> str:
    return _pe(f"{sweep}/{trial_id}" if several else trial_id)


def _dense_traces(report: pd.DataFrame, x: list[float]) -> list[go.Scatter]:
    """A dashed horizontal line per distinct dense perplexity (one per sweep and model)."""
    dense = report.dropna(subset=["dense_perplexity"]).groupby("dense_perplexity", sort=True)
    several = dense.ngroups > 1
    traces = []
    for value, g in dense:
        who = f" ({', '.join(sorted(set(g['sweep'])))})" if several else ""
        traces.append(
            go.Scatter(
                x=x, y=[float(value)] * len(x), mode="lines", name=_pe(f"dense{who}: {value:.4g}"),
                line={"color": "black", "dash": "dash", "width": 1.5}, hoverinfo="name",
                meta="dense",
            )
        )  # fmt: skip
    return traces


def log_ticks(values: Iterable[Any]) -> list[float]:
    """1-2-5 ticks covering the finite positive values: a log axis labelled with plain
    numbers (20, 50, 100, 200) rather than plotly's bare mantissa digits."""
    vals = [v for v in _vals(values) if v is not None and v > 0]
    if not vals:
        return []
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    ticks = [m * 10.0**k for k in range(lo, hi + 1) for m in (1, 2, 5)]
    below = [t for t in ticks if t <= min(vals)]
    above = [t for t in ticks if t >= max(vals)]
    return [t for t in ticks if below[-1] <= t <= above[0]]


def _layout(fig: go.Figure, title: str, xtitle: str, ytitle: str, values: list[Any]) -> None:
    yaxis: dict[str, Any] = {"title": {"text": _pe(ytitle)}, "type": "linear"}
    if spans_decade(values):
        ticks = log_ticks(values)
        yaxis.update(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_layout(
        title={"text": _pe(title)}, template="plotly_white", hovermode="closest",
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        legend={"orientation": "h", "yanchor": "top", "y": -0.16, "x": 0, "font": {"size": 11}},
        xaxis={"title": {"text": _pe(xtitle)}}, yaxis=yaxis,
    )  # fmt: skip


def _empty_note(fig: go.Figure, text: str) -> None:
    fig.add_annotation(
        text=_pe(text), showarrow=False, xref="paper", yref="paper", x=0.5, y=0.65,
        font={"size": 14, "color": "grey"},
    )  # fmt: skip


def _x_span(report: pd.DataFrame) -> list[float]:
    xs = sorted(float(s) for s in report["sparsity"].dropna().unique())
    if not xs:
        return []
    return [xs[0] - 0.05, xs[-1] + 0.05] if len(xs) > 1 else [xs[0] - 0.1, xs[0] + 0.1]


# -- charts ------------------------------------------------------------------------------------
def sparsity_figure(report: pd.DataFrame) -> go.Figure:
    """Final (or, by the buttons, best) perplexity against sparsity, one line per batch size
    and, when several, per sweep / method / pattern; the pruned-before-training baseline
    dotted and the dense model dashed. Hollow markers: trials still running."""
    fig = go.Figure()
    keys = ["sweep", "method", "pattern", "batch_size"]
    varying = [k for k in keys if report[k].nunique(dropna=False) > 1 or k == "batch_size"]
    trained = report[report["epochs_completed"].fillna(0) >= 1]
    plotted: list[Any] = []
    kinds: list[str] = []  # "final", "best" or "ref" per trace, for the buttons
    for n, (key, g) in enumerate(trained.groupby(keys, dropna=False, sort=True)):
        g = g.sort_values("sparsity")
        label = _pe(_group_label(key, varying))
        color = PALETTE[n % len(PALETTE)]
        symbols = ["circle-open" if s in RUNNING else "circle" for s in g["status"]]
        custom = [[_pe(t), _pe(s)] for t, s in zip(g["trial_id"], g["status"], strict=True)]
        for kind in ("final", "best"):
            ys = _vals(g[f"{kind}_perplexity"])
            fig.add_trace(
                go.Scatter(
                    x=_vals(g["sparsity"]), y=ys, name=label, mode="lines+markers",
                    visible=kind == "final", meta=kind, customdata=custom,
                    line={"color": color, "width": 2},
                    marker={"symbol": symbols, "size": 9, "line": {"width": 2, "color": color}},
                    hovertemplate=f"%{{customdata[0]}} (%{{customdata[1]}})<br>sparsity %{{x}}"
                    f"<br>{kind} perplexity %{{y:.4g}}<extra>{label}</extra>",
                )
            )  # fmt: skip
            kinds.append(kind)
            plotted += ys
    base = report.groupby(["sweep", "method", "pattern", "sparsity"], dropna=False, sort=True)
    base = base["baseline_perplexity"].mean().dropna().reset_index()
    for i, (_, g) in enumerate(base.groupby(["sweep", "method", "pattern"], dropna=False)):
        fig.add_trace(
            go.Scatter(
                x=_vals(g["sparsity"]), y=_vals(g["baseline_perplexity"]),
                name="pruned, before training (epoch 0)", showlegend=i == 0,
                legendgroup="baseline", mode="lines+markers", meta="baseline",
                line={"color": "grey", "dash": "dot"}, marker={"symbol": "square", "size": 7},
                hovertemplate="sparsity %{x}<br>baseline perplexity %{y:.4g}<extra></extra>",
            )
        )  # fmt: skip
        kinds.append("ref")
        plotted += g["baseline_perplexity"].tolist()
    for t in _dense_traces(report, _x_span(report)):
        fig.add_trace(t)
        kinds.append("ref")
        plotted += list(t.y)
    if trained["status"].isin(RUNNING).any():
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", name="hollow: still running", meta="note",
                marker={"symbol": "circle-open", "color": "grey", "size": 9},
            )
        )  # fmt: skip
        kinds.append("ref")
    none_yet = not any(k in ("final", "best") for k in kinds)
    _layout(fig, "Perplexity vs sparsity" + (" (no trained epochs yet)" if none_yet else ""),
            "sparsity (fraction of weights zeroed per pruned layer)",
            "final perplexity (last evaluated epoch)", plotted)  # fmt: skip
    sparsities = sorted(float(s) for s in report["sparsity"].dropna().unique())
    fig.update_xaxes(tickvals=sparsities, ticktext=[f"{s:g}" for s in sparsities])
    if not none_yet:
        fig.update_layout(updatemenus=[{
            "type": "buttons", "direction": "right", "x": 1.0, "xanchor": "right", "y": 1.01,
            "yanchor": "bottom", "pad": {"b": 2}, "showactive": True, "active": 0, "font": {"size": 11},
            "buttons": [
                {"label": label, "method": "update", "args": [
                    {"visible": [k in (kind, "ref") for k in kinds]},
                    {"yaxis.title.text": title},
                ]}
                for kind, label, title in (
                    ("final", "final", "final perplexity (last evaluated epoch)"),
                    ("best", "best", "best perplexity (lowest over trained epochs)"),
                )
            ],
        }])  # fmt: skip
    return fig


def _per_trial_figure(
    epochs: pd.DataFrame, column: str, colors: dict[tuple[str, str], str]
) -> tuple[go.Figure, list[Any]]:
    """One line per trial of ``column`` over epochs (rows where it is missing left out)."""
    fig = go.Figure()
    several = epochs["sweep"].nunique() > 1
    rows = epochs[epochs[column].notna()] if column == "loss" else epochs
    plotted: list[Any] = []
    for (sweep, tid), g in rows.groupby(["sweep", "trial_id"], sort=True):
        g = g.sort_values("epoch")
        ys = _vals(g[column])
        name = _trial_label(sweep, tid, several)
        fig.add_trace(
            go.Scatter(
                x=[int(e) for e in g["epoch"]], y=ys, name=name, mode="lines+markers",
                line={"color": colors[(sweep, tid)], "width": 2}, marker={"size": 7},
                meta=column, hovertemplate=f"epoch %{{x}}<br>{column} %{{y:.4g}}<extra>{name}</extra>",
            )
        )  # fmt: skip
        plotted += ys
    return fig, plotted


def epochs_figure(epochs: pd.DataFrame, report: pd.DataFrame) -> go.Figure:
    """Perplexity over epochs, one line per trial (epoch 0 = pruned, before training)."""
    fig, plotted = _per_trial_figure(epochs, "perplexity", _trial_colors(report, epochs))
    last = int(epochs["epoch"].max()) if len(epochs) else 1
    for t in _dense_traces(report, [0, max(last, 1)]):
        fig.add_trace(t)
        plotted += list(t.y)
    empty = epochs.empty
    _layout(fig, "Perplexity over epochs, per trial" + (" (none evaluated yet)" if empty else ""),
            "epoch (0 = pruned, before training)", "perplexity", plotted)  # fmt: skip
    fig.update_xaxes(dtick=1, range=[-0.25, max(last, 1) + 0.25])
    if empty:
        _empty_note(fig, "no evaluations yet")
    return fig


def loss_figure(epochs: pd.DataFrame, report: pd.DataFrame) -> go.Figure:
    """Mean training loss of each epoch, one line per trial (epoch 0 has none)."""
    fig, plotted = _per_trial_figure(epochs, "loss", _trial_colors(report, epochs))
    empty = not plotted
    last = int(epochs["epoch"].max()) if len(epochs) else 1
    _layout(fig, "Training loss over epochs, per trial" + (" (none yet)" if empty else ""),
            "epoch", "mean training loss over the epoch", plotted)  # fmt: skip
    fig.update_xaxes(dtick=1, range=[0.75, max(last, 1) + 0.25])
    if empty:
        _empty_note(fig, "no trained epochs yet")
    return fig


def pareto_figure(report: pd.DataFrame) -> go.Figure:
    """Best perplexity against sparsity for every trial, and per sweep the Pareto front: the
    trials that no other trial beats on both (at least as sparse and at most as perplex)."""
    fig = go.Figure()
    several = report["sweep"].nunique() > 1
    scored = report.dropna(subset=["sparsity", "best_perplexity"])
    plotted: list[Any] = []
    for n, (sweep, g) in enumerate(scored.groupby("sweep", sort=True)):
        g = g.reset_index(drop=True)
        color = PALETTE[n % len(PALETTE)]
        who = f" ({sweep})" if several else ""
        custom = [[_pe(t), _pe(s)] for t, s in zip(g["trial_id"], g["status"], strict=True)]
        fig.add_trace(
            go.Scatter(
                x=_vals(g["sparsity"]), y=_vals(g["best_perplexity"]), mode="markers",
                name=_pe(f"trials{who}"), meta="trials", customdata=custom,
                marker={"color": color, "size": 9, "opacity": 0.45},
                hovertemplate="%{customdata[0]} (%{customdata[1]})<br>sparsity %{x}"
                "<br>best perplexity %{y:.4g}<extra></extra>",
            )
        )  # fmt: skip
        front = pareto_front(g["sparsity"].tolist(), g["best_perplexity"].tolist())
        f = g.iloc[front]
        fig.add_trace(
            go.Scatter(
                x=_vals(f["sparsity"]), y=_vals(f["best_perplexity"]), mode="lines+markers",
                name=_pe(f"Pareto front{who}"), meta="front",
                customdata=[custom[i] for i in front],
                line={"color": color, "width": 2.5}, marker={"color": color, "size": 11},
                hovertemplate="%{customdata[0]}<br>sparsity %{x}"
                "<br>best perplexity %{y:.4g}<extra>front</extra>",
            )
        )  # fmt: skip
        plotted += g["best_perplexity"].tolist()
    for t in _dense_traces(report, _x_span(report)):
        fig.add_trace(t)
        plotted += list(t.y)
    empty = scored.empty
    _layout(fig, "Pareto front: sparsity vs best perplexity" + (" (none yet)" if empty else ""),
            "sparsity (higher: smaller model)", "best perplexity (lower is better)",
            plotted)  # fmt: skip
    sparsities = sorted(float(s) for s in report["sparsity"].dropna().unique())
    fig.update_xaxes(tickvals=sparsities, ticktext=[f"{s:g}" for s in sparsities])
    if empty:
        _empty_note(fig, "no trained epochs yet")
    return fig


def _trial_colors(report: pd.DataFrame, epochs: pd.DataFrame) -> dict[tuple[str, str], str]:
    """The same colour for a trial in every per-trial chart."""
    keys = sorted(
        set(zip(report["sweep"], report["trial_id"], strict=True))
        | set(zip(epochs["sweep"], epochs["trial_id"], strict=True))
    )
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}


# -- page sections -----------------------------------------------------------------------------
def environment() -> dict[str, str]:
    """Versions and hardware of the machine running this (not necessarily where the sweep
    ran): what a reader needs to reproduce the page's numbers or spot a version skew."""
    env = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    env["platform"] = platform.platform()
    env["cpu count"] = str(os.cpu_count())
    env["gpu"] = _gpu_name()
    return env


def _gpu_name() -> str:
    """The GPU(s) torch sees; failing that, what ``nvidia-smi`` lists (a CPU build of torch
    on a GPU machine), so the page does not claim "none" on a machine that has one."""
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            name = torch.cuda.get_device_name(0)
            return f"{n} x {name}" if n > 1 else name
    except Exception as e:  # a broken CUDA setup must not stop the report
        return f"unknown ({type(e).__name__}: {e})"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return "none visible to torch (nvidia-smi failed)"
        names = [line.strip() for line in out.splitlines() if line.strip()]
        if names:
            listed = ", ".join(f"{names.count(n)} x {n}" if names.count(n) > 1 else n
                               for n in dict.fromkeys(names))  # fmt: skip
            return f"{listed} (nvidia-smi; not available to torch)"
    return "none"


def configs(sweep_dirs: Sequence[Path]) -> list[tuple[str, Path, str | None]]:
    """(sweep name, config path, its text or None when absent) per sweep directory."""
    out = []
    for d in sweep_dirs:
        f = SweepLayout(d).config_file
        out.append((d.name, f, f.read_text(errors="replace") if f.is_file() else None))
    return out


def table_html(report: pd.DataFrame) -> str:
    """The report as an HTML table: the cells ``sweep report`` prints, the same columns shown
    or hidden, the best row per sparsity marked (``*`` and class ``best``)."""
    if report.empty:
        return '<p class="note">no trials yet</p>'
    hide = hidden_columns(report)
    records = report.to_dict("records")
    rows = [report_cells(r) for r in records]
    cols = [c for c in rows[0] if not hide.get(c, False)]
    head = "".join(f'<th class="{"l" if c in LEFT else "r"}">{_e(c)}</th>' for c in cols)
    body = []
    for rec, cells in zip(records, rows, strict=True):
        cls = ["best"] if rec["best"] else []
        cls.append("status-" + (rec["status"] or "unknown").replace(" ", "_"))
        tds = "".join(
            f'<td class="{"l" if c in LEFT else "r"}{" wrap" if c == "stop_reason" else ""}">'
            f"{_e(cells[c])}</td>"
            for c in cols
        )
        body.append(f'<tr class="{_e(" ".join(cls))}">{tds}</tr>')
    return (
        f'<div class="scroll"><table class="report"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _latest(epochs: pd.DataFrame, trials: pd.DataFrame) -> str:
    times = [t for t in (epochs["timestamp"].max(), trials["updated_at"].max()) if pd.notna(t)]
    return max(times).strftime("%Y-%m-%d %H:%M:%S UTC") if times else "no rows yet"


def _status_summary(report: pd.DataFrame) -> str:
    counts = report["status"].fillna("unknown").value_counts()
    parts = [f"{n} {s}" for s, n in sorted(counts.items())]
    return f"{len(report)} trial{'s' * (len(report) != 1)}" + (
        ": " + ", ".join(parts) if parts else ""
    )


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 16px 24px; color: #1f2937; }
h1 { font-size: 1.5em; margin: 0.2em 0; } h2 { font-size: 1.15em; margin-top: 1.4em; }
.meta { color: #4b5563; margin: 0.2em 0; }
table.report { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
table.report th, table.report td { padding: 3px 9px; border-bottom: 1px solid #e5e7eb;
                                   white-space: nowrap; }
table.report td.wrap { white-space: normal; min-width: 16em; max-width: 32em; }
.scroll { overflow-x: auto; }
table.report th { background: #f3f4f6; position: sticky; top: 0; }
td.r, th.r { text-align: right; } td.l, th.l { text-align: left; }
tr.best td { background: #ecfdf5; font-weight: 600; }
tr.status-running td, tr.status-pending td { font-style: italic; color: #6b7280; }
tr.status-errored td, tr.status-diverged td { color: #b91c1c; }
.legend { font-size: 12px; color: #4b5563; white-space: pre-wrap; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 12px; }
.chart { border: 1px solid #e5e7eb; border-radius: 6px; padding: 4px; }
pre { background: #f9fafb; border: 1px solid #e5e7eb; padding: 8px; font-size: 12px;
      overflow-x: auto; }
table.env td { padding: 2px 12px 2px 0; font-size: 13px; }
.note { color: #6b7280; }
"""


def render_html(path: str | os.PathLike, report: pd.DataFrame | None = None) -> str:
    """The whole page for the sweep(s) under ``path`` (a SWEEP_DIR, a parent of several, or
    an object-store URI). ``report``: ``build_report(path)`` when the caller already has it."""
    path = localize(path)
    dirs = find_sweeps(path)
    report = build_report(path) if report is None else report
    epochs, trials = read_epochs(path), read_trials(path)
    names = [d.name for d in dirs]
    title = "Sweep " + ", ".join(names) if len(names) <= 3 else f"{len(names)} sweeps"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    models = sorted(m for m in report["model"].dropna().unique()) if len(report) else []
    figures = [
        ("sparsity", sparsity_figure(report)),
        ("epochs", epochs_figure(epochs, report)),
        ("pareto", pareto_figure(report)),
        ("loss", loss_figure(epochs, report)),
    ]
    charts = []
    for i, (name, fig) in enumerate(figures):
        div = pio.to_html(
            fig, full_html=False, include_plotlyjs=i == 0, div_id=f"chart-{name}",
            default_height=CHART_HEIGHT, config={"displaylogo": False, "responsive": True},
        )  # fmt: skip
        charts.append(f'<div class="chart" data-chart="{name}">{div}</div>')
    cfg_parts = []
    for sweep, f, text in configs(dirs):
        if text is None:
            cfg_parts.append(f'<p class="note">{_e(sweep)}: no {_e(f.name)} at {_e(f)}</p>')
        else:
            cfg_parts.append(
                f'<details class="config"{" open" if len(dirs) == 1 else ""}>'
                f"<summary>{_e(sweep)}: {_e(f)}</summary><pre>{_e(text)}</pre></details>"
            )
    env_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in environment().items())
    sweeps_line = f"<p class=\"meta\">sweeps: {_e(', '.join(names))}</p>" if len(names) > 3 else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}: pruning-recovery report</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{_e(title)}: perplexity after pruning and recovery training</h1>
{sweeps_line}
<p class="meta">model: {_e(", ".join(models) or "unknown")} &middot; {_e(_status_summary(report))}</p>
<p class="meta">results last updated {_e(_latest(epochs, trials))} &middot; page written {_e(now)}
from {_e(os.fspath(path))}</p>
</header>
<section id="report">
<h2>Trials</h2>
{table_html(report)}
<p class="legend">{_e(LEGEND)}</p>
</section>
<section id="charts">
<h2>Charts</h2>
<p class="note">Hover for values, drag to zoom, double-click to reset; click a legend entry to
hide it. Log y-axis when the values span more than a factor of ten.</p>
<div class="charts">
{"".join(charts)}
</div>
</section>
<section id="config">
<h2>Config</h2>
{"".join(cfg_parts)}
</section>
<section id="environment">
<h2>Environment of the machine that wrote this page</h2>
<p class="note">Not necessarily the machine(s) the sweep ran on.</p>
<table class="env">{env_rows}</table>
</section>
</body>
</html>
"""


def write_html_report(
    path: str | os.PathLike, out: str | os.PathLike, report: pd.DataFrame | None = None
) -> Path:
    """Write ``render_html(path)`` to ``out``, replaced atomically (a browser reloading it
    never sees half a page). Returns ``out``."""
    out = Path(out)
    page = render_html(path, report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
