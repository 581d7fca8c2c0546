"""Several evaluation sets and zero-shot tasks, without Ray: configs/tiny-metrics.yaml prepared
once, one trial run in one process (``LocalHooks``), its reports written through the sweep's
results callback, and read back by query, report and plot. The same code runs in Ray Train
workers (tests/test_metrics_ray.py runs the whole sweep)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from eval.sets import windows_for
from sweep.callbacks import ResultsCallback
from sweep.cli import main
from sweep.config import ConfigError, eval_sets, from_dict, load_config, primary_set, to_dict
from sweep.layout import SweepLayout
from sweep.plan import _non_default, build_specs, expand
from sweep.plot import plot_sweep
from sweep.prep import prepare
from sweep.query import run_query
from sweep.report import build_report, format_report
from sweep.results import EVALS_FILE, EVALS_SCHEMA, TASKS_FILE, TASKS_SCHEMA, results_dir
from trainers.core import TrialCore
from trainers.loop import LocalHooks, run_trial
from trainers.metrics import EVAL_COLUMNS, TASK_COLUMNS
from trainers.model import load_tokenizer
from trainers.spec import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "configs" / "tiny-metrics.yaml"
TRIAL = "s0.5-b2"
# The columns a user's queries may rely on: removing one is a schema change (README).
CONTRACT_EVALS = "sweep trial_id epoch set perplexity tokens windows seconds".split()
CONTRACT_TASKS = "sweep trial_id epoch task metric value stderr".split()


@pytest.fixture(scope="module")
def offline():
    """No hub: the local task and texts must not need it; paths relative to the repository."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.delenv("LOCAL_RANK", raising=False)
        mp.chdir(ROOT)
        yield


@pytest.fixture(scope="module")
def prepared(offline, tmp_path_factory):
    """tiny-metrics prepared once: tokens, both sets' windows, masks, the dense model on both
    sets and on the task."""
    root = tmp_path_factory.mktemp("metrics")
    cfg = load_config(METRICS)
    plans = expand(cfg)
    layout = SweepLayout(root / cfg.name)
    prep = prepare(cfg, str(layout.root), str(root / ".cache"), plans, threads=1)
    return cfg, layout, prep, build_specs(cfg, plans, layout, prep.prepared), root


@pytest.fixture(scope="module")
def trial(prepared):
    """One whole trial of tiny-metrics (2 epochs), its reports and its exported best model."""
    cfg, layout, prep, specs, root = prepared
    spec = dataclasses.replace(specs[TRIAL], log_path=str(root / "t.log"), progress_path=None,
                               export_dir=str(root / "export"))
    hooks = LocalHooks(None)
    run_trial(TrialCore(spec), hooks)
    return [r for r in hooks.reports if r.get("kind") == "eval"], spec


# -- config --------------------------------------------------------------------------------------
def test_configs_with_one_text_keep_one_set_and_their_fingerprint():
    tiny = load_config(ROOT / "configs" / "tiny.yaml", check_paths=False)
    assert [(s.name, s.protocol, s.token_length, s.stride, s.max_windows)
            for s in eval_sets(tiny.eval)] == [("text", "sequential", 64, 64, 16)]
    assert primary_set(tiny.eval) == "text"
    opt = load_config(ROOT / "configs" / "opt350m-wikitext2.yaml", check_paths=False)
    assert primary_set(opt.eval) == "wikitext2"
    # The new keys at their defaults leave what a sweep's fingerprint hashes unchanged.
    for cfg in (tiny, opt):
        hashed = _non_default(to_dict(cfg), to_dict(type(cfg)()))
        assert not {"sets", "primary", "tasks", "tasks_every"} & set(hashed.get("eval", {}))


@pytest.mark.parametrize("evalcfg, message", [
    ({"sets": {"a": {}, "b": {}}, "primary": "x"}, "eval.primary: 'x' is not one of the sets a, b"),
    ({"sets": {}}, "eval.sets: empty"),
    ({"sets": {"a": {}}, "text": {"source": "pydoc_topics"}},
     "eval.text: give either eval.text (one set) or eval.sets, not both"),
    ({"sets": {"a": {"stride": 0}}}, "eval.sets.a.stride: must be >= 1, got 0"),
    ({"sets": {"a": {"protocol": "c4_wanda", "text": {"source": "pydoc_topics"}}}},
     "eval.sets.a: the pydoc_topics source has no documents"),
    ({"sets": {"a": {"protocol": "c4"}}}, "eval.sets.a.protocol: 'c4' is not one of"),
    ({"sets": {"1st": {}}}, "eval.sets.1st: a set name is a letter"),
    ({"sets": {"a": {"text": {"source": "file", "path": "nope.jsonl"}}}},
     "eval.sets.a.text.path: file not found: nope.jsonl"),
    ({"tasks": {"names": ["t", "t"]}}, "eval.tasks.names: values repeat"),
    ({"tasks": {"names": ["t"], "batch_size": 0}}, "eval.tasks.batch_size: must be >= 1"),
    ({"tasks": {"names": ["t"], "include_path": "nope"}}, "eval.tasks.include_path: not a directory"),
    ({"tasks_every": "step"}, "eval.tasks_every: 'step' is not one of"),
])
def test_bad_sets_and_tasks_name_their_key(evalcfg, message):
    data = {"model": {"config": {"model_type": "llama"}, "tokenizer": "byte"}, "eval": evalcfg}
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems


# -- preparation ---------------------------------------------------------------------------------
def test_every_set_is_tokenized_once_and_measured_on_the_dense_model(prepared):
    cfg, layout, prep, specs, _ = prepared
    assert [name for name, _ in prep.eval_sets] == ["pydoc", "notes"]  # the primary first
    assert dict(prep.eval_sets)["pydoc"] == str(layout.eval_windows)
    spec = specs[TRIAL]
    assert spec.prepared.eval_sets == prep.eval_sets and spec.prepared.primary_set == "pydoc"
    tokenizer = load_tokenizer(ModelConfig(name_or_path=prep.model_dir))
    for es in eval_sets(cfg.eval):
        saved = load_file(dict(prep.eval_sets)[es.name])
        ids, labels = windows_for(es, tokenizer)
        assert torch.equal(saved["input_ids"], ids) and torch.equal(saved["labels"], labels)
        assert ids.shape == (16, 64)
    dense = json.loads(layout.dense.read_text())
    assert set(dense["sets"]) == {"pydoc", "notes"}
    assert dense["perplexity"] == dense["sets"]["pydoc"]["perplexity"]
    assert dense["sets"]["notes"]["perplexity"] != dense["sets"]["pydoc"]["perplexity"]
    assert {(r["task"], r["metric"]) for r in dense["tasks"]} == {
        ("next_word_local", "acc"), ("next_word_local", "acc_norm")}
    assert all(r["samples"] == 20 for r in dense["tasks"])


# -- the trial -----------------------------------------------------------------------------------
def test_the_trial_reports_every_set_and_the_primary_drives_perplexity(trial):
    reports, _ = trial
    assert [r["epoch"] for r in reports] == [0, 1, 2]
    for r in reports:
        assert list(r["evals"]) == ["pydoc", "notes"]
        assert r["perplexity"] == r["evals"]["pydoc"]["perplexity"]
        assert r["eval_tokens"] == r["evals"]["pydoc"]["tokens"]
        assert all(ev["windows"] == 16 and ev["seconds"] >= 0 for ev in r["evals"].values())
    # Training recovers on both texts, not only the one it is judged on.
    for name in ("pydoc", "notes"):
        assert reports[-1]["evals"][name]["perplexity"] < reports[0]["evals"][name]["perplexity"]
    # tasks_every final: the pruned model and the final one (here also the best).
    assert reports[1]["tasks"] is None
    assert {t["epoch"] for t in reports[0]["tasks"]} == {0}
    assert {t["epoch"] for t in reports[2]["tasks"]} == {2}
    assert reports[2]["best_epoch"] == 2


def test_sweep_eval_on_the_exported_model_equals_the_trial(trial, capsys):
    """Each set alone through `sweep eval --config --eval-set`, and all with the task in one
    call: the same numbers as the trial measured on the same (exported, best = final) model."""
    reports, spec = trial
    final = reports[-1]
    for name in ("notes", "pydoc"):
        assert main(["eval", "--model", spec.export_dir, "--config", str(METRICS),
                     "--eval-set", name, "--no-tasks", "--no-progress", "--threads", "1"]) == 0
        alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert list(alone["sets"]) == [name] and "tasks" not in alone
        assert alone["perplexity"] == pytest.approx(final["evals"][name]["perplexity"], rel=1e-9)
    assert main(["eval", "--model", spec.export_dir, "--config", str(METRICS), "--no-progress",
                 "--threads", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["primary"] == "pydoc" and list(record["sets"]) == ["pydoc", "notes"]
    got = {(r["task"], r["metric"]): (r["value"], r["stderr"]) for r in record["tasks"]}
    want = {(r["task"], r["metric"]): (r["value"], r["stderr"]) for r in final["tasks"]}
    assert got == want


def test_only_the_primary_set_stops_a_trial(prepared, trial):
    """A plateau threshold between the two sets' improvements after epoch 1: the trial stops
    when the set that improved less is the primary, and runs on when the other one is."""
    cfg, layout, prep, specs, root = prepared
    reports, _ = trial

    def rel(name):
        return 1 - reports[1]["evals"][name]["perplexity"] / reports[0]["evals"][name]["perplexity"]

    gain = {name: rel(name) for name in ("pydoc", "notes")}
    assert gain["pydoc"] != gain["notes"]
    threshold = sum(gain.values()) / 2
    es = dataclasses.replace(cfg.early_stop, plateau_patience=1,
                             plateau_min_rel_improvement=threshold)
    outcome = {}
    for primary in ("pydoc", "notes"):
        sets = dict(prep.eval_sets)
        ordered = ((primary, sets[primary]),) + tuple(i for i in prep.eval_sets if i[0] != primary)
        prepared_ = dataclasses.replace(specs[TRIAL].prepared, eval_windows=sets[primary],
                                        eval_sets=ordered, primary_set=primary)
        spec = dataclasses.replace(specs[TRIAL], prepared=prepared_, early_stop=es, tasks=None,
                                   log_path=None, progress_path=None, export_dir=None)
        hooks = LocalHooks(None)
        run_trial(TrialCore(spec), hooks)
        evals = [r for r in hooks.reports if r.get("kind") == "eval"]
        assert all(r["perplexity"] == r["evals"][primary]["perplexity"] for r in evals)
        outcome[primary] = [(r["epoch"], r["status"]) for r in evals]
    weaker = min(gain, key=gain.get)
    stronger = max(gain, key=gain.get)
    assert outcome[weaker] == [(0, None), (1, "early_stopped")]
    # Past epoch 1 (the last epoch may plateau too: a smaller relative gain than the first).
    assert outcome[stronger][:2] == [(0, None), (1, None)] and outcome[stronger][2][0] == 2


# -- results -------------------------------------------------------------------------------------
def _write_results(prepared, reports, sweep_dir: Path) -> ResultsCallback:
    cfg, _, prep, specs, _ = prepared
    cb = ResultsCallback(str(sweep_dir), cfg.name, "config:llama", prep.dense_perplexity,
                         [specs[TRIAL].plan])
    cb.set_dense(prep.dense, primary_set(cfg.eval))
    trial_ = SimpleNamespace(config={"trial_id": TRIAL}, trial_id=TRIAL)
    for r in reports:
        cb.on_trial_result(0, [], trial_, {**r, "node_id": "n"})
    cb.on_trial_complete(0, [], trial_)
    return cb


def test_evals_and_tasks_tables_query_report_and_plot(prepared, trial, tmp_path, capsys):
    reports, _ = trial
    sweep_dir = tmp_path / "tiny-metrics"
    cb = _write_results(prepared, reports, sweep_dir)
    res = results_dir(sweep_dir)
    evals = pq.read_table(res / EVALS_FILE)
    tasks = pq.read_table(res / TASKS_FILE)
    assert evals.schema.names == EVALS_SCHEMA.names and tasks.schema.names == TASKS_SCHEMA.names
    assert set(CONTRACT_EVALS) <= set(evals.schema.names)
    assert set(CONTRACT_TASKS) <= set(tasks.schema.names)
    rows = evals.to_pylist()
    assert {(r["epoch"], r["set"]) for r in rows} == {(e, s) for e in (0, 1, 2) for s in ("pydoc", "notes")}
    dense = json.loads(SweepLayout.of(prepared[1].root).dense.read_text())
    for r in rows:
        rep = reports[r["epoch"]]
        assert r["perplexity"] == rep["evals"][r["set"]]["perplexity"]
        assert r["primary"] == int(r["set"] == "pydoc")
        assert r["dense_perplexity"] == dense["sets"][r["set"]]["perplexity"]
        base = reports[0]["evals"][r["set"]]["perplexity"]
        assert r["improvement_pct"] == pytest.approx(100 * (base - r["perplexity"]) / base)
    task_rows = tasks.to_pylist()
    assert sorted((r["epoch"], r["metric"]) for r in task_rows) == [
        (0, "acc"), (0, "acc_norm"), (2, "acc"), (2, "acc_norm")]
    dense_tasks = {r["metric"]: r["value"] for r in dense["tasks"]}
    assert all(r["dense_value"] == dense_tasks[r["metric"]] for r in task_rows)

    out = run_query(sweep_dir, "SELECT epoch, perplexity FROM evals WHERE set = 'notes' "
                               "ORDER BY epoch", "json")
    assert [r["perplexity"] for r in json.loads(out)] == [
        pytest.approx(reports[e]["evals"]["notes"]["perplexity"]) for e in (0, 1, 2)]
    out = run_query(sweep_dir, None, "csv", table="tasks", where="metric = 'acc'")
    assert out.splitlines()[0].startswith("sweep,trial_id,epoch,task,metric,value")
    assert len(out.splitlines()) == 3

    df = build_report(sweep_dir)
    assert df.loc[0, "set:notes"] == pytest.approx(reports[2]["evals"]["notes"]["perplexity"])
    acc = next(t["value"] for t in reports[2]["tasks"] if t["metric"] == "acc")
    assert df.loc[0, "task:next_word_local/acc"] == pytest.approx(acc)
    text = format_report(df)
    header = text.splitlines()[0].split()
    assert "notes" in header and "next_word_local/acc" in header and "pydoc" not in header

    png = plot_sweep(sweep_dir, tmp_path / "notes.png", eval_set="notes", task="next_word_local/acc_norm")
    assert png.stat().st_size > 10_000
    assert main(["plot", str(sweep_dir), "-o", str(tmp_path / "x.png"), "--eval-set", "nope"]) == 2
    assert "no evaluation set 'nope'" in capsys.readouterr().err

    # A restart from the epoch-1 checkpoint forgets later rows of every table, as for epochs.
    cb.on_trial_result(0, [], SimpleNamespace(config={"trial_id": TRIAL}, trial_id=TRIAL),
                       {**reports[1], "node_id": "n"})
    assert max(r["epoch"] for r in pq.read_table(res / EVALS_FILE).to_pylist()) == 1
    assert {r["epoch"] for r in pq.read_table(res / TASKS_FILE).to_pylist()} == {0}


def test_every_evals_and_tasks_column_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Results: Parquet schema"):readme.index("## Configuration reference")]
    missing = [c.name for c in EVAL_COLUMNS + TASK_COLUMNS if f"`{c.name}`" not in section
               and c.name not in section]
    assert not missing, missing


def test_a_short_set_text_is_refused_before_ray_naming_its_key(tmp_path):
    from sweep.preflight import check_lengths

    short = tmp_path / "short.txt"
    short.write_text("too short")
    cfg = from_dict({"model": {"config": {"model_type": "llama"}, "tokenizer": "byte"},
                     "data": {"train": {"source": "pydoc_topics"}, "seq_len": 8},
                     "eval": {"sets": {"long": {"text": {"source": "pydoc_topics"}},
                                       "tiny": {"text": {"source": "file", "path": str(short)},
                                                "token_length": 32}},
                              "token_length": 64, "stride": 64}})
    assert check_lengths(cfg) == [
        "eval.sets.tiny.token_length=32: the text (eval.sets.tiny.text) has 9 tokens, fewer "
        "than one window of 32; use a longer text or a larger eval.sets.tiny.text.max_chars, "
        "or a smaller eval.sets.tiny.token_length"]


def test_the_best_model_is_measured_from_its_export_when_it_is_not_the_final(prepared, trial):
    """At the last epoch with the best model elsewhere (here: the trained export as the best
    of epoch 1, the untrained pruned model in memory as the final one), the rows of each
    model carry that model's epoch and values."""
    from trainers.loop import measure_tasks
    from trainers.trial_log import TrialLog

    reports, spec = trial
    core = TrialCore(spec)
    core.build()  # the pruned model, before training
    core.st.epoch, core.st.best_epoch = 2, 1
    rows = measure_tasks(core, LocalHooks(None), TrialLog(TRIAL, None, enabled=False), final=True)
    got = {(r["epoch"], r["metric"]): r["value"] for r in rows}
    pruned = {t["metric"]: t["value"] for t in reports[0]["tasks"]}
    trained = {t["metric"]: t["value"] for t in reports[2]["tasks"]}  # what the export holds
    assert got == {**{(2, m): v for m, v in pruned.items()}, **{(1, m): v for m, v in trained.items()}}
    assert pruned != trained
