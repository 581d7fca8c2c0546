"""The results readers: notebook API, query, report and plot over a fake sweep's Parquet."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import struct
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweep.api import find_sweeps, load, read_epochs, read_trials
from sweep.plot import add_plot_arguments, plot_sweep, run_plot_cli
from sweep.query import QueryError, add_query_arguments, run_query, run_query_cli
from sweep.report import LEGEND, add_report_arguments, build_report, format_report, run_report_cli
from sweep.results import EPOCHS_SCHEMA, TRIALS_SCHEMA, ResultsWriter

try:  # `python -m pytest` from the repository root, or tests/ made a package
    from tests.fake_results import DENSE_PPL, FakeSweep, write_fake_sweep
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from fake_results import DENSE_PPL, FakeSweep, write_fake_sweep

CONTRACT_EPOCHS = (
    "sweep, trial_id, sparsity, batch_size, epoch, perplexity, improvement_pct, loss, lr, steps, "
    "samples, tokens, sparsity_actual, wall_s, tokens_per_s, mem_peak_mb, timestamp"
).split(", ")
CONTRACT_TRIALS = (
    "sweep, trial_id, model, sparsity, batch_size, lr, steps_per_epoch, num_epochs, workers, "
    "epochs_completed, dense_perplexity, baseline_perplexity, final_perplexity, best_perplexity, "
    "best_epoch, improvement_pct, status, stop_reason, best_checkpoint, wall_s, mem_peak_mb"
).split(", ")


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeSweep:
    return write_fake_sweep(tmp_path_factory.mktemp("sweeps"), "fake")


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many")
    write_fake_sweep(root, "a")
    write_fake_sweep(root, "b", scale=1.1)
    (root / "not-a-sweep").mkdir()
    return root


def _parse(argv: list[str], add) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def _trained(fake: FakeSweep, trial_id: str) -> list[dict]:
    return [r for r in fake.epoch_rows if r["trial_id"] == trial_id and r["epoch"] > 0]


# -- the files themselves ---------------------------------------------------------------------
def test_schema_has_every_contract_column(fake: FakeSweep) -> None:
    for schema, contract, name in (
        (EPOCHS_SCHEMA, CONTRACT_EPOCHS, "epochs"),
        (TRIALS_SCHEMA, CONTRACT_TRIALS, "trials"),
    ):
        assert set(contract) <= set(schema.names), set(contract) - set(schema.names)
        written = pq.read_schema(fake.dir / "results" / f"{name}.parquet").names
        assert set(contract) <= set(written), set(contract) - set(written)


def test_files_read_with_pyarrow_pandas_and_duckdb(fake: FakeSweep) -> None:
    epochs = fake.dir / "results" / "epochs.parquet"
    trials = fake.dir / "results" / "trials.parquet"
    assert pq.read_table(epochs).num_rows == len(fake.epoch_rows) == 10
    assert len(pd.read_parquet(trials)) == len(fake.trial_rows) == 4
    n, ppl_sum = (
        duckdb.connect()
        .execute(f"SELECT count(*), sum(perplexity) FROM read_parquet('{epochs}')")
        .fetchone()
    )
    assert n == 10
    assert ppl_sum == pytest.approx(sum(r["perplexity"] for r in fake.epoch_rows))


# -- notebook API -----------------------------------------------------------------------------
def test_load_pandas_matches_rows_written(fake: FakeSweep) -> None:
    res = load(fake.dir)
    assert res.sweeps == [fake.dir]
    assert list(res.epochs.columns[: len(EPOCHS_SCHEMA)]) == EPOCHS_SCHEMA.names
    assert len(res.epochs) == 10 and len(res.trials) == 4
    assert set(res.epochs["sweep"]) == {"fake"}
    assert str(res.epochs["epoch"].dtype) == "Int64"
    by_key = {(r["trial_id"], r["epoch"]): r["perplexity"] for r in fake.epoch_rows}
    for _, r in res.epochs.iterrows():
        assert r["perplexity"] == by_key[(r["trial_id"], r["epoch"])]
    assert res.trials.set_index("trial_id").loc["s0.5-b8", "status"] == "early_stopped"
    pd.testing.assert_frame_equal(read_epochs(fake.dir), res.epochs)
    pd.testing.assert_frame_equal(read_trials(fake.dir), res.trials)


def test_load_arrow_has_schema(fake: FakeSweep) -> None:
    res = load(fake.dir, as_="arrow")
    assert res.epochs.schema.names[: len(EPOCHS_SCHEMA)] == EPOCHS_SCHEMA.names
    assert res.epochs.schema.field("timestamp").type == EPOCHS_SCHEMA.field("timestamp").type
    assert res.trials.num_rows == 4


def test_find_and_load_several_sweeps(parent: Path) -> None:
    assert [p.name for p in find_sweeps(parent)] == ["a", "b"]
    assert find_sweeps(parent / "a" / "results") == [parent / "a"]
    res = load(parent)
    assert res.epochs.groupby("sweep").size().to_dict() == {"a": 10, "b": 10}
    assert res.trials.groupby("sweep").size().to_dict() == {"a": 4, "b": 4}


def test_empty_tables_keep_schema_and_missing_dir_is_named(tmp_path: Path) -> None:
    ResultsWriter(tmp_path / "s").upsert_trial(
        {"sweep": "s", "trial_id": "s0.5-b4", "sparsity": 0.5, "batch_size": 4, "status": "pending"}
    )
    res = load(tmp_path / "s")
    assert len(res.epochs) == 0 and list(res.epochs.columns) == EPOCHS_SCHEMA.names
    assert load(tmp_path / "s", as_="arrow").epochs.schema.names == EPOCHS_SCHEMA.names
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load(tmp_path / "empty")


# -- query ------------------------------------------------------------------------------------
def test_default_query_lists_all_epochs_in_order(fake: FakeSweep) -> None:
    rows = list(csv.DictReader(io.StringIO(run_query(fake.dir, fmt="csv"))))
    expected = sorted(fake.epoch_rows, key=lambda r: (r["trial_id"], r["epoch"]))
    assert [(r["trial_id"], int(r["epoch"])) for r in rows] == [
        (r["trial_id"], r["epoch"]) for r in expected
    ]
    assert [float(r["perplexity"]) for r in rows] == [r["perplexity"] for r in expected]
    assert rows[0]["loss"] == ""  # NULL at the baseline


def test_sql_aggregate_equals_pandas(fake: FakeSweep) -> None:
    sql = (
        "SELECT batch_size, avg(perplexity) AS mean_ppl, count(*) AS n FROM epochs "
        "WHERE epoch > 0 GROUP BY batch_size ORDER BY batch_size"
    )
    got = json.loads(run_query(fake.dir, sql, fmt="json"))
    df = pd.DataFrame(fake.epoch_rows)
    want = df[df["epoch"] > 0].groupby("batch_size")["perplexity"].agg(["mean", "count"])
    assert [r["batch_size"] for r in got] == list(want.index)
    for r in got:
        assert r["mean_ppl"] == pytest.approx(want.loc[r["batch_size"], "mean"])
        assert r["n"] == want.loc[r["batch_size"], "count"]


def test_join_of_both_views(fake: FakeSweep) -> None:
    sql = (
        "SELECT t.trial_id, t.status, max(e.epoch) AS last FROM trials t "
        "JOIN epochs e USING (trial_id) GROUP BY ALL ORDER BY 1"
    )
    got = {r["trial_id"]: r for r in json.loads(run_query(fake.dir, sql, fmt="json"))}
    assert got["s0.7-b8"] == {"trial_id": "s0.7-b8", "status": "running", "last": 1}
    assert got["s0.5-b4"]["last"] == 2
    described = run_query(fake.dir, "DESCRIBE trials")  # SQL without flags runs as given
    assert all(c in described for c in CONTRACT_TRIALS)


def test_filter_flags(fake: FakeSweep) -> None:
    out = run_query(
        fake.dir,
        fmt="json",
        table="trials",
        where="status <> 'running'",
        sort="-sparsity,batch_size",
        limit=2,
    )
    assert [r["trial_id"] for r in json.loads(out)] == ["s0.7-b4", "s0.5-b4"]
    cols = run_query(fake.dir, fmt="csv", columns="trial_id, epoch", where="epoch = 2")
    assert cols.splitlines() == ["trial_id,epoch", "s0.5-b4,2", "s0.7-b4,2"]


def test_table_format_aligns_and_shows_nan_and_null(fake: FakeSweep) -> None:
    out = run_query(fake.dir, "SELECT 'x' AS name, 'nan'::DOUBLE AS a, NULL AS b, 1234.5678 AS c")
    header, rule, row, footer = out.splitlines()
    assert header.split() == ["name", "a", "b", "c"]
    assert row.split() == ["x", "nan", "1234.6"]
    assert len(header) == len(rule) and footer == "(1 row)"
    table = run_query(fake.dir, table="trials", columns="trial_id, final_perplexity")
    lines = table.splitlines()
    assert lines[2].split() == ["s0.5-b4", "25.48"]
    assert len(lines[2]) == len(lines[0])  # the number right-aligned under its header
    assert lines[5] == "s0.7-b8"  # NULL final of the running trial: empty


def test_query_over_several_sweeps(parent: Path) -> None:
    out = run_query(parent, "SELECT sweep, count(*) AS n FROM epochs GROUP BY 1 ORDER BY 1", "csv")
    assert out.splitlines() == ["sweep,n", "a,10", "b,10"]


def test_bad_sql_raises_and_cli_exits_2(fake: FakeSweep, tmp_path: Path, capsys) -> None:
    with pytest.raises(QueryError, match="no_such_column"):
        run_query(fake.dir, "SELECT no_such_column FROM epochs")
    with pytest.raises(QueryError):
        run_query(fake.dir, "SELEC 1")
    assert (
        run_query_cli(_parse([str(fake.dir), "SELECT nope FROM epochs"], add_query_arguments)) == 2
    )
    assert "nope" in capsys.readouterr().err
    assert run_query_cli(_parse([str(tmp_path / "missing")], add_query_arguments)) == 2
    assert "missing" in capsys.readouterr().err
    assert run_query_cli(_parse([str(fake.dir), "--table", "trials"], add_query_arguments)) == 0
    assert "s0.7-b8" in capsys.readouterr().out


# -- report -----------------------------------------------------------------------------------
def test_report_values_match_rows(fake: FakeSweep) -> None:
    df = build_report(fake.dir).set_index("trial_id")
    assert list(df.index) == ["s0.5-b4", "s0.5-b8", "s0.7-b4", "s0.7-b8"]  # sparsity, batch
    for tid, r in df.iterrows():
        rows = [x for x in fake.epoch_rows if x["trial_id"] == tid]
        base = next(x["perplexity"] for x in rows if x["epoch"] == 0)
        best = min(_trained(fake, tid), key=lambda x: x["perplexity"])
        final = _trained(fake, tid)[-1]["perplexity"]
        assert r["baseline_perplexity"] == base and r["final_perplexity"] == final
        assert (r["best_perplexity"], r["best_epoch"]) == (best["perplexity"], best["epoch"])
        assert r["improvement_pct"] == pytest.approx(100 * (base - final) / base)
        assert r["dense_perplexity"] == DENSE_PPL
    assert df.loc["s0.5-b8", "status"] == "early_stopped"
    assert df.loc["s0.5-b8", "stop_reason"].startswith("no improvement")
    # best per sparsity: s0.5-b4 (25.48 < 28.55) and s0.7-b8 (71.95 < 74.86)
    assert sorted(df.index[df["best"]]) == ["s0.5-b4", "s0.7-b8"]


def test_report_derives_running_trial_from_epochs(fake: FakeSweep) -> None:
    stale = next(t for t in fake.trial_rows if t["trial_id"] == "s0.7-b8")
    assert stale["epochs_completed"] == 0 and stale["best_perplexity"] is None
    r = build_report(fake.dir).set_index("trial_id").loc["s0.7-b8"]
    assert r["status"] == "running"
    assert r["epochs_completed"] == 1 and r["num_epochs"] == 2
    assert (r["best_perplexity"], r["best_epoch"]) == (71.95, 1)
    assert r["wall_s"] == _trained(fake, "s0.7-b8")[-1]["wall_s"]


def test_report_while_sweep_runs(tmp_path: Path) -> None:
    fake = write_fake_sweep(tmp_path, "early", max_epoch=0)
    df = build_report(fake.dir)
    assert set(df["status"]) == {"running"} and not df["best"].any()
    assert df["final_perplexity"].isna().all() and df["baseline_perplexity"].notna().all()
    text = format_report(df)
    assert "0/2" in text and "*" not in text.split("\n* ")[0]


def test_format_report_marks_best_and_has_legend(fake: FakeSweep) -> None:
    text = format_report(build_report(fake.dir))
    lines = text.splitlines()
    assert LEGEND.splitlines()[0] in text
    marked = [ln.split()[1] for ln in lines[2:6] if ln.startswith("*")]
    assert marked == ["s0.5-b4", "s0.7-b8"]
    row = next(ln for ln in lines if "s0.5-b8" in ln)
    for cell in ("28.55", "+20.1%", "1/2", "early_stopped"):
        assert cell in row
    assert "sweep" not in lines[0]  # one sweep: no sweep column


def test_report_several_sweeps_and_cli_formats(parent: Path, capsys) -> None:
    df = build_report(parent)
    assert len(df) == 8 and df.groupby("sweep")["best"].sum().to_dict() == {"a": 2, "b": 2}
    assert run_report_cli(_parse([str(parent), "--format", "json"], add_report_arguments)) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 8 and {r["sweep"] for r in records} == {"a", "b"}
    assert run_report_cli(_parse([str(parent / "a"), "--format", "csv"], add_report_arguments)) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert float(rows[0]["best_perplexity"]) == 25.48
    assert run_report_cli(_parse([str(parent)], add_report_arguments)) == 0
    assert "sweep" in capsys.readouterr().out.splitlines()[0]
    assert run_report_cli(_parse([str(parent / "nope")], add_report_arguments)) == 2


# -- plot -------------------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png(fake: FakeSweep, tmp_path: Path) -> None:
    out = plot_sweep(fake.dir, tmp_path / "sub" / "p.png")
    width, height = _png_size(out)
    assert 1200 <= width <= 4000 and 500 <= height <= 2000
    assert 30_000 < out.stat().st_size < 2_000_000


@pytest.mark.parametrize("kwargs", [{"grid": [(0.5, 4)]}, {"max_epoch": 0}])
def test_plot_one_trial_and_baselines_only(tmp_path: Path, kwargs: dict) -> None:
    fake = write_fake_sweep(tmp_path, "small", **kwargs)
    out = plot_sweep(fake.dir, tmp_path / "p.png")
    assert min(_png_size(out)) > 400 and out.stat().st_size > 20_000


def test_plot_cli_default_output(parent: Path, capsys) -> None:
    assert run_plot_cli(_parse([str(parent / "a")], add_plot_arguments)) == 0
    assert (parent / "a" / "plot.png").stat().st_size > 30_000
    assert str(parent / "a" / "plot.png") in capsys.readouterr().out
    assert run_plot_cli(_parse([str(parent / "zzz"), "-o", "x.png"], add_plot_arguments)) == 2


# -- layouts and edge cases -------------------------------------------------------------------
def test_directory_of_parts_and_older_files(fake: FakeSweep, tmp_path: Path) -> None:
    """epochs.parquet as a directory of part files, one of them lacking a newer column."""
    results = tmp_path / "parts" / "results"
    (results / "epochs.parquet").mkdir(parents=True)
    shutil.copy(fake.dir / "results" / "trials.parquet", results / "trials.parquet")
    table = pq.read_table(fake.dir / "results" / "epochs.parquet")
    pq.write_table(table.slice(0, 4), results / "epochs.parquet" / "part-0.parquet")
    older = table.slice(4).drop_columns(["eval_tokens"])
    pq.write_table(older, results / "epochs.parquet" / "part-1.parquet")
    (results / "epochs.parquet" / ".part-2.parquet.tmp").write_bytes(b"half-written")

    epochs = load(tmp_path / "parts").epochs
    assert len(epochs) == 10 and epochs["eval_tokens"].isna().sum() == 6
    assert isinstance(load(tmp_path / "parts", as_="arrow").epochs, pa.Table)
    out = run_query(tmp_path / "parts", "SELECT count(*) AS n, count(eval_tokens) AS e FROM epochs")
    assert out.splitlines()[2].split() == ["10", "4"]
    report = build_report(tmp_path / "parts").set_index("trial_id")
    assert report.loc["s0.7-b8", "best_perplexity"] == 71.95


def test_report_diverged_trial_keeps_nan_final(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path / "d")
    base = {"sweep": "d", "trial_id": "s0.9-b4", "sparsity": 0.9, "batch_size": 4}
    for epoch, ppl in enumerate([900.0, 410.0, float("nan")]):
        w.upsert_epoch({**base, "epoch": epoch, "perplexity": ppl})
    w.upsert_trial({**base, "status": "diverged", "num_epochs": 3, "stop_reason": "loss is nan"})
    r = build_report(tmp_path / "d").iloc[0]
    assert math.isnan(r["final_perplexity"]) and r["best_perplexity"] == 410.0
    assert r["best_epoch"] == 1 and r["epochs_completed"] == 2
    row = format_report(build_report(tmp_path / "d")).splitlines()[2]
    assert "nan" in row.split() and "diverged" in row
    assert json.loads(
        run_query(tmp_path / "d", "SELECT perplexity FROM epochs ORDER BY epoch", "json")
    )[2] == {"perplexity": None}
