"""The sweep report page: a summary in words, one table column per parameter, the optuna-dashboard command for the
study's real storage, and no raw JSON."""

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from experiments.sweep import SweepConfig, default_storage, open_storage
from reports import sweep_report
from reports.sweep_report import build_sweep_report, dashboard_command, trials_table

SPACE = {"align.alpha": FloatDistribution(0.0, 1.0), "disc_warmup.num_experts": CategoricalDistribution([2, 4])}


def small_study(storage: str) -> optuna.Study:
    """Three completed trials, one pruned at step 3, one failed."""
    study = optuna.create_study(study_name="small", storage=open_storage(storage), direction="maximize")
    for alpha, experts, value in ((0.25, 2, 41.5), (0.75, 4, 47.25), (0.5, 2, 44.0)):
        study.add_trial(create_trial(params={"align.alpha": alpha, "disc_warmup.num_experts": experts},
                                     distributions=SPACE, value=value, user_attrs={"checkpoint": "ckpt"}))
    study.add_trial(create_trial(params={"align.alpha": 0.1, "disc_warmup.num_experts": 4}, distributions=SPACE,
                                 state=TrialState.PRUNED, intermediate_values={1: -1.5, 3: -1.25}))
    study.add_trial(create_trial(params={"align.alpha": 0.9, "disc_warmup.num_experts": 2}, distributions=SPACE,
                                 state=TrialState.FAIL))
    return study


def test_the_trial_table_has_a_column_per_parameter_best_first_and_says_where_pruned_trials_stopped(tmp_path):
    frame = trials_table(small_study(f"sqlite:///{tmp_path / 'study.db'}"))
    assert list(frame.columns) == ["trial", "align.alpha", "disc_warmup.num_experts", "value", "state",
                                   "duration (s)", "stopped at"]
    assert frame["trial"].tolist() == [1, 2, 0, 3, 4]  # completed by value (maximize), then the others
    assert frame["value"].tolist()[:3] == [47.25, 44.0, 41.5] and frame["value"][3:].isna().all()
    assert frame["state"].tolist() == ["complete"] * 3 + ["pruned", "fail"]
    assert frame["align.alpha"].tolist() == [0.75, 0.5, 0.25, 0.1, 0.9]
    assert frame["stopped at"].tolist() == ["", "", "", "step 3 (teacher-likeness -1.25)", ""]
    assert all(math.isfinite(d) and d >= 0 for d in frame["duration (s)"])


def test_the_dashboard_command_names_the_real_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dashboard_command("sqlite:///outputs/sweeps/x/study.db") == (
        f"optuna-dashboard sqlite:///{tmp_path.resolve()}/outputs/sweeps/x/study.db")
    assert dashboard_command("postgresql://me:secret@db.example:5432/optuna") == (
        "optuna-dashboard 'postgresql://me:***@db.example:5432/optuna'")


@pytest.fixture
def no_reevaluation(tmp_path, monkeypatch):
    """The report re-evaluates the best trials' checkpoints; these have none, so the sweep's own value decides."""
    monkeypatch.setattr(sweep_report, "reevaluate", lambda cfg, checkpoint: str(tmp_path / "no-record.json"))


def test_the_page_opens_with_a_readable_summary_and_no_raw_json(tmp_path, monkeypatch, no_reevaluation):
    monkeypatch.chdir(tmp_path)
    cfg = SweepConfig(name="small", matrix="table1", preset="embedded",
                      space={"align.alpha": {"type": "float", "low": 0.0, "high": 1.0}})
    small_study(default_storage(cfg))
    page = (build_sweep_report(cfg) / "index.html").read_text(encoding="utf-8")
    summary = page[page.index("<h2>Summary</h2>"):page.index("<h2>Trials</h2>")]
    assert "direction maximize" in summary and "5 trials: 3 complete, 1 pruned, 1 fail." in summary
    assert "Best trial by the sweep's value: #1, value 47.25, with align.alpha = 0.75, " \
           "disc_warmup.num_experts = 4." in summary
    assert "and exported: the same trial." in summary
    assert "Parameter importances" in summary and "align.alpha (" in summary
    db = (tmp_path / "outputs/sweeps/small/study.db").resolve()
    assert f"<code>optuna-dashboard sqlite:///{db}</code>" in summary
    assert "<th>align.alpha</th>" in page and "<th>disc_warmup.num_experts</th>" in page
    assert "<pre>" not in page and "{&quot;" not in page and '{"' not in page  # no JSON dump, no params as JSON
    assert "<h2>history</h2>" in page and (tmp_path / "outputs/sweeps/small/report/table1-best.yaml").is_file()
