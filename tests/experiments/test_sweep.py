"""Optuna sweeps: the space maps onto stage overrides, two workers share one SQLite study without losing or
duplicating trials, trials reuse upstream stages, and the report exports the best setting as a matrix file."""

import json
import os
import subprocess
from pathlib import Path

import optuna
import pytest

from experiments.matrix import build_plan, load_matrix
from experiments.sweep import load_sweep, run_sweep, teacher_likeness, trial_overrides
from prism.config import ConfigError
from reports.sweep_report import build_sweep_report

SMOKE_SWEEP = """name: smoke
matrix: table1
preset: smoke
size: s
trials: 3
eval_limit: 1
report_top: 2
n_startup_trials: 1
n_warmup_steps: 1
stage_overrides:
  align: [steps=3]
space:
  align.alpha: {type: float, low: 0.0, high: 1.0}
  disc_warmup.num_experts: {type: categorical, choices: [2, 4]}
"""


def test_the_published_sweep_loads_and_maps_onto_stage_overrides():
    cfg = load_sweep("discriminator")
    assert cfg.trials >= 12 and cfg.objective in ("align", "align_rlvr")
    overrides = trial_overrides(cfg, {"align.alpha": 0.25, "disc_warmup.num_experts": 2})
    assert "alpha=0.25" in overrides["align"] and "steps=6" in overrides["align"]
    assert "num_experts=2" in overrides["disc_warmup"]
    assert teacher_likeness({"caption_bullets_w1": 0.5, "reasoning_steps_w1": 0.25}) == -0.75


def test_a_space_key_must_name_a_prism_stage(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\nspace:\n  rlvr.optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3}\n")
    with pytest.raises(ConfigError, match="space.rlvr.optim.lr"):
        load_sweep(bad)
    bad.write_text("name: x\nspace:\n  align.alpha: {type: float, low: 1.0, high: 0.5}\n")
    with pytest.raises(ConfigError, match="low < high"):
        load_sweep(bad)


def test_two_workers_share_one_study_and_the_report_exports_the_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "smoke.yaml"
    path.write_text(SMOKE_SWEEP)
    cfg = load_sweep(path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    storage = run_sweep(cfg, workers=2, storage=None, log=lambda message: None, source=path)
    study = optuna.load_study(study_name="smoke", storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) >= 3 and len({t.number for t in trials}) == len(trials)
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(0.0 <= t.value <= 100.0 for t in complete)
    # (the smoke SFT never writes the format, so no step has a W1 to report: pruning is shown by the real sweep)
    # every trial reused the one world, base and SFT stage
    stages = [p.name.rsplit("-", 1)[0] for p in Path("outputs/stages").iterdir() if p.is_dir()]
    assert stages.count("base") == 1 and stages.count("sft") == 1
    out = build_sweep_report(cfg)
    summary = json.loads((out / "summary.json").read_text())
    # the best 2 trials by their 1-item-per-family value, re-evaluated on the preset's 3 items per family: the
    # exported best is the better of those two, each with its interval and its paired difference to it
    top = summary["top_trials"]
    assert [row["trial"] for row in top] == [t.number for t in sorted(complete, key=lambda t: -t.value)[:2]]
    assert all(row["items"] == 18 and "[" in row["accuracy (full evaluation)"] for row in top)
    assert summary["best_trial"] in [row["trial"] for row in top]
    assert sum(row["minus the best"] == "-" for row in top) == 1
    assert "Best trials, re-evaluated" in (out / "index.html").read_text()
    best = load_matrix(out / "table1-best.yaml")
    plan = build_plan(best, "smoke")
    aligns = {n.cfg.alpha for n in plan.nodes.values() if n.kind == "align"}
    assert aligns == {summary["best_params"]["align.alpha"]}
    assert (out / "index.html").is_file() and (out / "history.png").is_file()


def test_sweep_workers_share_the_cores_this_process_may_run_on(tmp_path, monkeypatch):
    """A worker's threads are a share of the affinity mask (a SLURM or container CPU limit), as the matrix's nodes
    are, not of the machine's CPU count: 2 workers in a 4-CPU mask on a 64-CPU machine get 2 threads each."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "smoke.yaml"
    path.write_text(SMOKE_SWEEP)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    started = []

    class Worker:  # records the environment a worker process would start with
        def __init__(self, args, env, **kwargs):
            started.append(env)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Worker)
    run_sweep(load_sweep(path), workers=2, storage=None, log=lambda message: None, source=path)
    assert [env["OMP_NUM_THREADS"] for env in started] == ["2", "2"]


def test_a_bad_space_is_refused_before_any_trial_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(SMOKE_SWEEP.replace("align.alpha:", "align.alpah:"))
    with pytest.raises(ConfigError, match=r"space.align.alpah=0.0: .*field 'alpah': unknown key"):
        run_sweep(load_sweep(path), workers=1, storage=None, log=lambda message: None, source=path)
    path.write_text(SMOKE_SWEEP.replace("preset: smoke", "preset: smokey"))
    with pytest.raises(ConfigError, match="has no preset 'smokey'"):
        run_sweep(load_sweep(path), workers=1, storage=None, log=lambda message: None, source=path)
    assert not (tmp_path / "outputs").exists()  # no study, no log, no stage
    path.write_text(SMOKE_SWEEP.replace("{type: float, low: 0.0, high: 1.0}", "{type: float, low: 0.0, high: 1.0, log: true}"))
    with pytest.raises(ConfigError, match="log-scale"):
        load_sweep(path)


def test_a_sweep_stops_after_consecutive_failed_trials_naming_the_first_error():
    from experiments.sweep import _stop_after_failures, consecutive_failures, recording_errors

    study = optuna.create_study(direction="maximize")
    calls = []

    @recording_errors
    def objective(trial):
        calls.append(trial.number)
        if trial.number == 0:
            return 1.0
        raise ConfigError(f"align: unknown field 'alpah' (trial {trial.number})")

    study.optimize(objective, n_trials=50, catch=(ConfigError,), callbacks=[_stop_after_failures(3)])
    assert calls == [0, 1, 2, 3]  # one success, then three failures in a row stop it
    failed = consecutive_failures(study, 3)
    assert failed[0] == "ConfigError: align: unknown field 'alpah' (trial 1)" and len(failed) == 3
    assert consecutive_failures(study, 4) == []  # the success breaks a run of four
