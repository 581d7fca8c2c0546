"""``sweep report --html``: the page's content read back, and the page rendered in Chromium.

The content tests parse the HTML with the standard library and read each chart's traces back
from the JSON plotly embeds, checking them against the numbers ``tests/fake_results.py``
wrote (not against the code that drew them). The browser test loads the file in headless
Chromium and checks what a reader would see: no script errors, every chart drawn, pixels on
the screenshot. No sweep runs here: the results are written through the real ResultsWriter.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import random
import shutil
import subprocess
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import torch
from fake_results import (
    BASELINE_PPL,
    DENSE_PPL,
    NUM_EPOCHS,
    TRAINED_PPL,
    write_fake_sweep,
)

from sweep.html_report import (
    environment,
    log_ticks,
    pareto_front,
    render_html,
    spans_decade,
    write_html_report,
)
from sweep.report import add_report_arguments, build_report, format_report, run_report_cli
from sweep.results import ResultsWriter

EVIL = '<script>alert("x")</script>'
CONFIG_TEXT = "name: fake\ngrid:\n  sparsity: [0.5, 0.7]\n  batch_size: [4, 8]\nnote: a < b & c\n"


# -- reading the page back ---------------------------------------------------------------------
class Page(HTMLParser):
    """What the tests look at: table rows, scripts, link attributes, section texts, and for
    a DOM dumped by Chromium which chart divs hold a rendered ``svg.main-svg``."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[str, list[str]]] = []  # (tr class, cell texts) of table.report
        self.headers: list[str] = []
        self.scripts: list[str] = []
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.sections: dict[str, str] = {}
        self.rendered: set[str] = set()  # chart div ids holding an svg.main-svg
        self.legend_texts: list[str] = []
        self.h1 = ""
        self._stack: list[tuple[str, dict]] = []
        self._cell: list[str] | None = None
        self._row: tuple[str, list[str]] | None = None
        self._script: list[str] | None = None
        self._section: str | None = None
        self._chart: str | None = None
        self._legend: list[str] | None = None
        self._in_h1 = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href", "action", "data"):
            if a.get(k):
                self.urls.append((tag, k, a[k]))
        if tag == "section":
            self._section = a.get("id")
            self.sections[self._section] = ""
        if tag == "div" and (a.get("id") or "").startswith("chart-"):
            self._chart = a["id"]
        if tag == "svg" and "main-svg" in (a.get("class") or "").split() and self._chart:
            self.rendered.add(self._chart)
        if tag == "text" and "legendtext" in (a.get("class") or "").split():
            self._legend = []
        if tag == "tr" and self._inside("table", "report"):
            self._row = (a.get("class") or "", [])
        if tag in ("td", "th") and self._row is not None:
            self._cell = []
        if tag == "script":
            self._script = []
        self._in_h1 = self._in_h1 or tag == "h1"
        if tag not in ("meta", "br", "path", "rect", "line", "circle", "input", "img", "link"):
            self._stack.append((tag, a))

    def _inside(self, tag: str, cls: str) -> bool:
        return any(t == tag and cls in (a.get("class") or "").split() for t, a in self._stack)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            (self._row[1] if tag == "td" else self.headers).append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            if self._row[1]:
                self.rows.append(self._row)
            self._row = None
        if tag == "script" and self._script is not None:
            self.scripts.append("".join(self._script))
            self._script = None
        if tag == "text" and self._legend is not None:
            self.legend_texts.append("".join(self._legend))
            self._legend = None
        if tag == "section":
            self._section = None
        if tag == "h1":
            self._in_h1 = False
        while self._stack:
            t, a = self._stack.pop()
            if t == "div" and a.get("id") == self._chart:
                self._chart = None
            if t == tag:
                break

    def handle_data(self, data):
        for buf in (self._cell, self._script, self._legend):
            if buf is not None:
                buf.append(data)
        if self._section:
            self.sections[self._section] += data
        if self._in_h1:
            self.h1 += data


def figures(page: Page) -> dict[str, dict]:
    """``{div id: {"data": traces, "layout": layout}}`` from every ``Plotly.newPlot(id,
    data, layout, config)`` call in the page's scripts (plotly writes the arguments as JSON)."""
    dec = json.JSONDecoder()
    out = {}
    for script in page.scripts:
        start = script.find("Plotly.newPlot(")
        if start < 0 or len(script) > 1_000_000:  # plotly.js itself mentions newPlot too
            continue
        pos, args = start + len("Plotly.newPlot("), []
        for _ in range(3):
            while script[pos] in " \n\t,":
                pos += 1
            value, pos = dec.raw_decode(script, pos)
            args.append(value)
        out[args[0]] = {"data": args[1], "layout": args[2]}
    return out


def traces(fig: dict, meta: str) -> list[dict]:
    return [t for t in fig["data"] if t.get("meta") == meta]


def close(actual, expected) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    )


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def fake(tmp_path):
    """The default fake sweep (one trial running) with a config file."""
    sweep = write_fake_sweep(tmp_path)
    (sweep.dir / "sweep.yaml").write_text(CONFIG_TEXT)
    return sweep


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Page, str, Path]:
    """The fake sweep's page, parsed once for the tests that only read it."""
    sweep = write_fake_sweep(tmp_path_factory.mktemp("page"))
    (sweep.dir / "sweep.yaml").write_text(CONFIG_TEXT)
    text = render_html(sweep.dir)
    return Page(text), text, sweep.dir


def _add_evil_trial(sweep_dir: Path, like: dict, epoch_rows: list[dict]) -> None:
    """A trial whose id is markup: the page must show it as text, never run it."""
    writer = ResultsWriter(sweep_dir)
    writer.upsert_trial({**like, "trial_id": EVIL, "stop_reason": "</td></tr><b>bold</b>"})
    for r in epoch_rows:
        writer.upsert_epoch({**r, "trial_id": EVIL})


# -- content -----------------------------------------------------------------------------------
def test_table_rows_match_the_report(page):
    p, _, sweep_dir = page
    report = build_report(sweep_dir)
    printed = format_report(report).splitlines()[0].split()
    assert [h for h in p.headers if h] == printed  # the same columns `sweep report` prints
    assert p.headers[0] == ""  # the best-marker column
    col = {h: i for i, h in enumerate(p.headers)}
    assert [cells[col["trial_id"]] for _, cells in p.rows] == report["trial_id"].tolist()
    assert len(p.rows) == 4
    by_id = {cells[col["trial_id"]]: (cls.split(), cells) for cls, cells in p.rows}
    # Best per sparsity: s0.5-b4 (25.48 < 28.55) and the running s0.7-b8 (71.95 < 74.86).
    for tid, best in {"s0.5-b4": True, "s0.5-b8": False, "s0.7-b4": False, "s0.7-b8": True}.items():
        cls, cells = by_id[tid]
        assert ("best" in cls) is best and (cells[col[""]] == "*") is best, tid
    cls, cells = by_id["s0.7-b8"]
    assert "status-running" in cls and cells[col["status"]] == "running"
    assert float(cells[col["final"]]) == pytest.approx(TRAINED_PPL[(0.7, 8)][-1], abs=5e-3)
    assert cells[col["epochs"]] == f"1/{NUM_EPOCHS}"
    _, cells = by_id["s0.5-b8"]
    assert cells[col["stop_reason"]].startswith("no improvement")
    assert float(cells[col["baseline"]]) == pytest.approx(BASELINE_PPL[0.5], abs=5e-3)
    assert float(cells[col["dense"]]) == pytest.approx(DENSE_PPL, abs=5e-3)
    assert "Sweep fake" in p.h1


def test_sparsity_chart_final_best_baseline_dense(page):
    figs = figures(page[0])
    assert set(figs) == {"chart-sparsity", "chart-epochs", "chart-pareto", "chart-loss"}
    fig = figs["chart-sparsity"]
    for kind in ("final", "best"):
        got = {t["name"]: t for t in traces(fig, kind)}
        assert set(got) == {"batch 4", "batch 8"}
        for b in (4, 8):
            t = got[f"batch {b}"]
            assert t["x"] == [0.5, 0.7]
            runs = [TRAINED_PPL[(s, b)] for s in (0.5, 0.7)]
            close(t["y"], [r[-1] if kind == "final" else min(r) for r in runs])
            assert t.get("visible", True) is (kind == "final")  # "best" behind its button
    # The running trial (0.7, batch 8) is drawn hollow.
    assert {t["name"]: t["marker"]["symbol"] for t in traces(fig, "final")}["batch 8"] == [
        "circle",
        "circle-open",
    ]
    (base,) = traces(fig, "baseline")
    assert base["x"] == [0.5, 0.7]
    close(base["y"], [BASELINE_PPL[0.5], BASELINE_PPL[0.7]])
    (dense,) = traces(fig, "dense")
    close(dense["y"], [DENSE_PPL] * len(dense["y"]))
    assert fig["layout"]["yaxis"]["type"] == "log"  # 20.9 .. 312: more than a decade
    assert fig["layout"]["yaxis"]["ticktext"] == ["20", "50", "100", "200", "500"]
    buttons = fig["layout"]["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == ["final", "best"]
    metas = [t.get("meta") for t in fig["data"]]
    for b, kind in zip(buttons, ("final", "best"), strict=True):
        visible = b["args"][0]["visible"]
        assert [v for v, m in zip(visible, metas, strict=True) if m in ("final", "best")] == [
            m == kind for m in metas if m in ("final", "best")
        ]
        assert all(v for v, m in zip(visible, metas, strict=True) if m in ("baseline", "dense"))


def test_epoch_and_loss_charts_per_trial(page):
    figs = figures(page[0])
    ppl = {t["name"]: t for t in traces(figs["chart-epochs"], "perplexity")}
    loss = {t["name"]: t for t in traces(figs["chart-loss"], "loss")}
    assert set(ppl) == set(loss) == {f"s{s:g}-b{b}" for s, b in TRAINED_PPL}
    for (s, b), trained in TRAINED_PPL.items():
        tid = f"s{s:g}-b{b}"
        assert ppl[tid]["x"] == list(range(len(trained) + 1))
        close(ppl[tid]["y"], [BASELINE_PPL[s], *trained])
        assert loss[tid]["x"] == list(range(1, len(trained) + 1))  # epoch 0 has no loss
        close(loss[tid]["y"], [math.log(p) + 0.05 for p in trained])  # fake_results' loss
        assert ppl[tid]["line"]["color"] == loss[tid]["line"]["color"]  # one colour per trial
    assert figs["chart-epochs"]["layout"]["yaxis"]["type"] == "log"
    assert figs["chart-loss"]["layout"]["yaxis"]["type"] == "linear"  # 3.3 .. 5.8
    (dense,) = traces(figs["chart-epochs"], "dense")
    close(dense["y"], [DENSE_PPL, DENSE_PPL])


def test_pareto_chart(page):
    fig = figures(page[0])["chart-pareto"]
    (pts,) = traces(fig, "trials")
    best = {(s, b): min(r) for (s, b), r in TRAINED_PPL.items()}
    assert sorted(zip(pts["x"], pts["y"], strict=True)) == sorted(
        (s, p) for (s, _), p in best.items()
    )
    (front,) = traces(fig, "front")
    # At 0.5 batch 4 (25.48) beats batch 8; at 0.7 batch 8 (71.95) beats batch 4: neither of
    # the two winners is at least as sparse and at most as perplex as the other.
    assert front["x"] == [0.5, 0.7]
    close(front["y"], [25.48, 71.95])
    assert [c[0] for c in front["customdata"]] == ["s0.5-b4", "s0.7-b8"]


def _brute_front(s: list[float], p: list[float]) -> set[int]:
    ok = [i for i in range(len(s)) if not math.isnan(p[i])]
    front = set()
    for i in ok:
        beaten = any(
            s[j] >= s[i] and p[j] <= p[i] and (s[j] > s[i] or p[j] < p[i]) for j in ok if j != i
        )
        if not beaten:
            front.add(i)
    # Of exactly equal points keep the first, as pareto_front documents.
    return {i for i in front if not any(j < i and (s[j], p[j]) == (s[i], p[i]) for j in front)}


def test_pareto_front_against_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 12)
        s = [rng.choice([0.3, 0.5, 0.7, 0.9]) for _ in range(n)]
        p = [rng.choice([math.nan, *range(10, 20)]) for _ in range(n)]
        got = pareto_front(s, p)
        assert set(got) == _brute_front(s, p), (s, p)
        assert got == sorted(got, key=lambda i: (s[i], i))
    assert pareto_front([0.5, 0.7], [None, 3.0]) == [1]


def test_log_ticks_cover_the_values_with_plain_numbers():
    assert log_ticks([20.93, 312.4, None]) == [20, 50, 100, 200, 500]
    assert log_ticks([0.03, 1.0]) == pytest.approx([0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    assert log_ticks([]) == []


def test_spans_decade():
    assert spans_decade([20.9, 312.0])
    assert not spans_decade([20.9, 200.0, None, math.nan, float("inf"), -5.0, 0.0])
    assert not spans_decade([])


def test_config_and_environment_sections(page):
    p, _, _ = page
    assert CONFIG_TEXT.strip() in p.sections["config"]  # escaped in the HTML, text again here
    env = p.sections["environment"]
    assert "Environment of the machine that wrote this page" in env
    for key, value in {
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "ray": metadata.version("ray"),
        "transformers": metadata.version("transformers"),
        "platform": platform.platform(),
    }.items():
        assert f"{key}{value}" in env.replace("\n", "")  # adjacent <td>s
    assert "cpu count" in env and "gpu" in env


def test_gpu_listed_by_nvidia_smi_when_torch_has_no_cuda(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200'\necho 'NVIDIA H200'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # no real nvidia-smi in the way
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert environment()["gpu"] == "2 x NVIDIA H200 (nvidia-smi; not available to torch)"
    smi.unlink()
    assert environment()["gpu"] == "none"


def test_self_contained(page):
    p, text, _ = page
    external = [u for u in p.urls if u[2].lower().startswith(("http:", "https:", "//"))]
    assert external == []
    assert not any(tag == "script" and attr == "src" for tag, attr, _ in p.urls)
    assert any(len(s) > 1_000_000 and "Plotly" in s for s in p.scripts)  # plotly.js inline
    assert "<link" not in text


def test_markup_in_results_and_config_is_escaped(fake):
    _add_evil_trial(fake.dir, fake.trial_rows[0], fake.epoch_rows[:3])
    (fake.dir / "sweep.yaml").write_text("name: x\n</pre><script>alert(2)</script>\n")
    text = render_html(fake.dir)
    p = Page(text)
    assert "<script>alert" not in text and "<b>bold" not in text
    assert not any("alert(" in s for s in p.scripts if "Plotly.newPlot(" not in s)
    col = {h: i for i, h in enumerate(p.headers)}
    cells = {c[col["trial_id"]]: c for _, c in p.rows}
    assert cells[EVIL][col["stop_reason"]] == "</td></tr><b>bold</b>"  # shown as text
    assert len(p.rows) == 5
    assert "</pre><script>alert(2)</script>" in p.sections["config"]
    names = [t["name"] for t in traces(figures(p)["chart-epochs"], "perplexity")]
    # Plotly renders a few tags in names; escaped, it shows the characters instead.
    assert '&lt;script&gt;alert("x")&lt;/script&gt;' in names


def test_running_sweep_without_trained_epochs(tmp_path):
    sweep = write_fake_sweep(tmp_path, max_epoch=0)  # baselines only; no config file
    p = Page(render_html(sweep.dir))
    col = {h: i for i, h in enumerate(p.headers)}
    assert [c[col["status"]] for _, c in p.rows] == ["running"] * 4
    assert all(c[col["final"]] == "" for _, c in p.rows)
    figs = figures(p)
    spars = figs["chart-sparsity"]
    assert traces(spars, "final") == [] and "updatemenus" not in spars["layout"]
    assert "no trained epochs yet" in spars["layout"]["title"]["text"]
    close(traces(spars, "baseline")[0]["y"], [BASELINE_PPL[0.5], BASELINE_PPL[0.7]])
    assert traces(figs["chart-loss"], "loss") == []
    assert traces(figs["chart-pareto"], "front") == []
    assert all(len(t["y"]) == 1 for t in traces(figs["chart-epochs"], "perplexity"))
    assert "no sweep.yaml at" in p.sections["config"]


def test_parent_of_several_sweeps(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        s = write_fake_sweep(tmp_path, name=name, scale=scale)
        (s.dir / "sweep.yaml").write_text(f"name: {name}\n")
    p = Page(render_html(tmp_path))
    assert "Sweep a, b" in p.h1
    assert "name: a" in p.sections["config"] and "name: b" in p.sections["config"]
    assert "sweep" in p.headers and len(p.rows) == 8
    figs = figures(p)
    names = {t["name"] for t in traces(figs["chart-epochs"], "perplexity")}
    assert names == {f"{n}/s{s:g}-b{b}" for n in "ab" for s, b in TRAINED_PPL}
    fronts = {t["name"]: t["y"] for t in traces(figs["chart-pareto"], "front")}
    assert set(fronts) == {"Pareto front (a)", "Pareto front (b)"}
    close(fronts["Pareto front (b)"], [2 * 25.48, 2 * 71.95])
    (dense,) = traces(figs["chart-sparsity"], "dense")  # fake_results: one dense model
    assert dense["name"] == f"dense: {DENSE_PPL:.4g}"
    assert {t["name"] for t in traces(figs["chart-sparsity"], "final")} == {
        f"{n} batch {b}" for n in "ab" for b in (4, 8)
    }


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    return run_report_cli(parser.parse_args(argv))


def test_cli_prints_table_and_writes_page(fake, tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    assert _cli([str(fake.dir), "--html", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[-1] == f"wrote {out}"
    assert stdout.startswith(format_report(build_report(fake.dir)))
    assert [c for _, c in Page(out.read_text()).rows]
    assert not list(out.parent.glob(".*.tmp"))

    out2 = tmp_path / "b.html"
    assert _cli([str(fake.dir), "--format", "json", "--html", str(out2)]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 4  # stdout stays parseable
    assert captured.err.strip() == f"wrote {out2}" and out2.is_file()

    assert _cli([str(tmp_path / "missing"), "--html", str(tmp_path / "c.html")]) == 2
    assert not (tmp_path / "c.html").exists()


# -- a real browser ----------------------------------------------------------------------------
def _chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((p for n in names if (p := shutil.which(n))), None)


def render_in_chromium(
    html: Path, png: Path, profile: Path, binary: str | None = None
) -> tuple[list[str], str]:
    """Load ``html`` in headless Chromium once: the screenshot to ``png``, and returns the
    page's console lines (Chromium logs every console message and uncaught error as
    ``CONSOLE``) and the DOM after the scripts ran."""
    proc = subprocess.run(
        [binary or _chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
         f"--user-data-dir={profile}", "--window-size=1200,2000", "--enable-logging=stderr",
         "--v=0", f"--screenshot={png}", "--dump-dom", html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert png.is_file(), proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line], proc.stdout


def test_page_renders_in_headless_chromium(fake, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    from PIL import Image

    _add_evil_trial(fake.dir, fake.trial_rows[0], fake.epoch_rows[:3])
    html = write_html_report(fake.dir, tmp_path / "page.html")
    png = tmp_path / "page.png"
    console, dom = render_in_chromium(html, png, tmp_path / "profile", binary)
    assert console == []  # no uncaught error, no console message at all
    p = Page(dom)
    assert p.rendered == {"chart-sparsity", "chart-epochs", "chart-pareto", "chart-loss"}
    assert EVIL in p.legend_texts  # the markup shows as its characters in the legend
    assert any(t == "batch 4" for t in p.legend_texts)
    assert len(p.rows) == 5

    img = Image.open(io.BytesIO(png.read_bytes())).convert("RGB")
    assert img.size == (1200, 2000)
    colors = img.getcolors(maxcolors=1 << 20)
    assert len(colors) > 200  # text, lines, markers: not a blank page
    # The first trace colour of plotly's palette (#636efa): drawn lines and markers.
    blue = sum(n for n, c in colors if all(abs(a - b) <= 12 for a, b in zip(c, (99, 110, 250), strict=True)))
    assert blue > 500
    white = max(n for n, c in colors if c == (255, 255, 255))
    assert white < 0.95 * img.size[0] * img.size[1]


def test_pareto_front_handles_missing_values():
    assert pareto_front([], []) == []
    assert pareto_front([0.5, 0.7], [math.nan, math.nan]) == []
    assert pareto_front([0.5, 0.7, 0.9], [pd.NA, 3.0, None]) == [1]
    assert pareto_front([0.5, 0.5], [3.0, 3.0]) == [0]
