"""An evaluation of a tracked stage's model/ joins the stage's wandb run: accuracy per task with n, standard error
and 95% interval, under keys a `--limit` evaluation cannot overwrite; an untracked checkpoint is logged nowhere."""

import json

import pytest

from evaluation.results import parse_results
from evaluation.tracking import Z_95, log_to_stage_trackers, summary_values
from prism.config import SFTConfig, write_config_yaml
from prism.runtime import MetricsLogger
from tests.tracking_fixtures import isolate_wandb, offline_runs

# lmms-eval's results layout: a group of one task, a standard error lmms-eval could not compute ("N/A")
RESULTS = {
    "results": {
        "prism_embedded": {"alias": "prism_embedded", "accuracy,none": 0.5, "accuracy_stderr,none": 0.1,
                           "format_valid_rate,none": 1.0, "format_valid_rate_stderr,none": "N/A"},
        "prism_embedded_counting": {"alias": " - counting", "accuracy,none": 0.25, "accuracy_stderr,none": 0.125},
    },
    "group_subtasks": {"prism_embedded": ["prism_embedded_counting"]},
    "n-samples": {"prism_embedded_counting": {"original": 10, "effective": 4}},
}


def test_rows_become_accuracy_with_n_and_interval_per_task():
    values = summary_values(parse_results(RESULTS), "embedded")
    group, task = "eval/embedded/prism_embedded", "eval/embedded/prism_embedded_counting"
    assert values == pytest.approx({
        f"{group}/accuracy": 0.5, f"{group}/accuracy_stderr": 0.1,
        f"{group}/accuracy_ci95_low": 0.5 - Z_95 * 0.1, f"{group}/accuracy_ci95_high": 0.5 + Z_95 * 0.1,
        f"{group}/format_valid_rate": 1.0, f"{group}/n": 4,
        f"{task}/accuracy": 0.25, f"{task}/accuracy_stderr": 0.125,
        f"{task}/accuracy_ci95_low": 0.25 - Z_95 * 0.125, f"{task}/accuracy_ci95_high": 0.25 + Z_95 * 0.125,
        f"{task}/n": 4,
    })
    limited = summary_values(parse_results(RESULTS), "embedded", limit=4)
    assert sorted(limited) == sorted(key.replace("eval/", "eval-limit4/", 1) for key in values)


def test_an_evaluation_joins_the_stage_wandb_run(tmp_path, monkeypatch):
    isolate_wandb(monkeypatch, tmp_path)
    stage = tmp_path / "rlvr-0123456789ab"
    write_config_yaml(SFTConfig(output_dir=str(stage), tracking="wandb"), stage / "config.yaml")
    with MetricsLogger(stage, "wandb", project="prism") as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": 1.0 / step})

    assert log_to_stage_trackers(stage / "model", "embedded", parse_results(RESULTS)) == ["wandb"]
    run_id = json.loads((stage / "tracking.json").read_text())["wandb"]["run_id"]
    training, evaluation = offline_runs(stage)
    assert training["id"] == evaluation["id"] == run_id and evaluation["name"] == training["name"]
    assert evaluation["summary"]["eval/embedded/prism_embedded_counting/accuracy"] == 0.25
    assert evaluation["summary"]["eval/embedded/prism_embedded_counting/n"] == 4
    assert evaluation["summary"]["eval/embedded/prism_embedded/accuracy_ci95_high"] == pytest.approx(0.5 + Z_95 * 0.1)


def test_an_untracked_checkpoint_is_logged_nowhere(tmp_path, monkeypatch):
    isolate_wandb(monkeypatch, tmp_path)
    stage = tmp_path / "sft-0123456789ab"
    with MetricsLogger(stage) as logger:  # tracking: none
        logger.log(1, {"loss": 1.0})
    assert log_to_stage_trackers(stage / "model", "embedded", parse_results(RESULTS)) == []
    assert sorted(p.name for p in stage.iterdir()) == ["metrics.jsonl"]
