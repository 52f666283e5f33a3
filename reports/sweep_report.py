"""A sweep's report: one HTML page with a summary in words (direction, trials by state, best trial, importances, the
optuna-dashboard command), the best trials re-evaluated, a table of every trial (one column per parameter) and
Optuna's matplotlib plots (history, intermediate values, parallel coordinates, importances); and the best
configuration exported as a matrix file whose preset carries the best overrides
(`prism matrix plan outputs/sweeps/<name>/report/<matrix>-best.yaml`)."""

from __future__ import annotations

import html
import json
import shlex
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml

from experiments.matrix import CONFIG_DIR
from experiments.sweep import (
    SWEEP_ROOT,
    SweepConfig,
    default_storage,
    open_storage,
    reevaluate,
    trial_overrides,
)
from prism.atomic_io import atomic_write_text
from prism.config import ConfigError
from reports.stats import format_estimate, interval, paired_difference
from reports.tables import sample_scores


def _plot(name: str, draw, out: Path) -> Path | None:
    try:
        axis = draw()
    except (ValueError, RuntimeError):  # too few finished trials for this plot
        plt.close("all")
        return None
    figure = axis.figure if hasattr(axis, "figure") else axis.flat[0].figure
    figure.set_size_inches(8, 4.5)
    figure.tight_layout()
    path = out / f"{name}.png"
    figure.savefig(path, dpi=110)
    plt.close("all")
    return path


def best_matrix_file(cfg: SweepConfig, params: dict, out: Path) -> Path:
    """The sweep's matrix with the best overrides appended to every size of the tuned preset."""
    raw = yaml.safe_load((CONFIG_DIR / f"{cfg.matrix}.yaml").read_text(encoding="utf-8"))
    raw["name"] = f"{raw['name']}-{cfg.name}-best"
    tuned = {stage: [o for o in values if not o.startswith(("save_every", "proxy_prompts"))]
             for stage, values in trial_overrides(SweepConfig(**{**cfg.__dict__, "stage_overrides": {}}), params).items()}
    for size in raw["presets"][cfg.preset]["sizes"].values():
        for stage, values in tuned.items():
            size.setdefault("overrides", {}).setdefault(stage, []).extend(values)
    path = out / f"{cfg.matrix}-best.yaml"
    atomic_write_text(path, f"# Best trial of sweep {cfg.name}: {json.dumps(params)}\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def best_on_full_evaluation(cfg: SweepConfig, complete: list) -> tuple:
    """The `report_top` best trials by the sweep's value, re-evaluated with the preset's own evaluation: each
    with its interval and its paired difference to the best of them (the exported one). A sweep value read on a
    few items leads within noise; this says by how much, on more items."""
    top = sorted(complete, key=lambda t: t.value, reverse=True)[: cfg.report_top]
    scores = {}
    for trial in top:
        per_item = sample_scores(reevaluate(cfg, trial.user_attrs["checkpoint"]))
        scores[trial.number] = {c: 100.0 * np.array([[v for _, v in sorted(items.items())]])
                                for c, items in (per_item or {}).items()}
    estimates = {n: interval(s) for n, s in scores.items() if s}
    if not estimates:  # no per-sample scores: the sweep's own value decides
        return top[0], []
    leader = max(estimates, key=lambda n: estimates[n].mean)
    rows = []
    for trial in top:
        estimate = estimates.get(trial.number)
        delta = (paired_difference(scores[leader], scores[trial.number])
                 if estimate is not None and trial.number != leader else None)
        rows.append({"trial": trial.number, "sweep value": round(trial.value, 2),
                     "accuracy (full evaluation)": format_estimate(estimate),
                     "items": estimate.items if estimate else 0,
                     "minus the best": format_estimate(delta, signed=True) if delta else "-"})
    return next(t for t in top if t.number == leader), rows


def trials_table(study) -> pd.DataFrame:
    """One row per trial, one column per parameter, then its value, state and duration; completed trials first,
    best first. A pruned trial's value is its last intermediate value (teacher-likeness), not the objective: it is
    left blank and `stopped at` says where the pruner stopped it."""
    from optuna.trial import TrialState

    frame = study.trials_dataframe(attrs=("number", "params", "value", "state", "duration"))
    if frame.empty:
        return frame
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    complete = frame["state"] == TrialState.COMPLETE.name
    frame["value"] = frame["value"].where(complete)
    frame["state"] = frame["state"].str.lower()
    frame["duration"] = frame["duration"].dt.total_seconds().round(1)

    def stopped_at(number: int) -> str:
        trial = trials[number]
        if trial.state != TrialState.PRUNED or not trial.intermediate_values:
            return ""
        step = max(trial.intermediate_values)
        return f"step {step} (teacher-likeness {trial.intermediate_values[step]:.2f})"

    frame["stopped at"] = frame["number"].map(stopped_at)
    if not frame["stopped at"].any():
        frame = frame.drop(columns="stopped at")
    frame = frame.rename(columns=lambda c: c.removeprefix("params_")).rename(
        columns={"number": "trial", "duration": "duration (s)"})
    maximize = study.direction.name == "MAXIMIZE"
    frame = frame.sort_values(["value", "trial"], ascending=[not maximize, True], na_position="last")
    return frame.reset_index(drop=True)


def dashboard_command(storage_url: str) -> str:
    """The optuna-dashboard command that opens this storage: a SQLite path made absolute (the page may be read from
    anywhere), a server URL with its password hidden (the page is a file people share)."""
    if storage_url.startswith("sqlite:///"):
        url = f"sqlite:///{Path(storage_url.removeprefix('sqlite:///')).resolve().as_posix()}"
    else:
        from sqlalchemy.engine import make_url

        url = make_url(storage_url).render_as_string(hide_password=True)
    return f"optuna-dashboard {shlex.quote(url)}"


def _percent_list(shares: dict[str, float]) -> str:
    return ", ".join(f"{html.escape(name)} ({100 * share:.0f}%)" for name, share in shares.items())


def summary_html(cfg: SweepConfig, study, storage_url: str, exported=None, importances: dict | None = None,
                 best_file: Path | None = None) -> str:
    """The study in a few sentences: what it tunes, its direction, its trials by state, the best trial and the one
    exported, what mattered most, and how to open it in optuna-dashboard."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    states = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    tuned = (f"Study <b>{html.escape(study.study_name)}</b>: size {html.escape(cfg.size)} of matrix "
             f"{html.escape(cfg.matrix)}, preset {html.escape(cfg.preset)}; objective "
             f"<code>{html.escape(cfg.objective)}</code> (held-out accuracy, %), direction "
             f"{study.direction.name.lower()}.")
    items = [tuned, f"{len(trials)} trials: {states or 'none yet'}."]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        params = ", ".join(f"{html.escape(k)} = {html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}"
                           for k, v in best.params.items())
        items.append(f"Best trial by the sweep's value: #{best.number}, value {best.value:.2f}, with {params}.")
        if exported is not None:
            again = ("the same trial" if exported.number == best.number else
                     f"trial #{exported.number} (sweep value {exported.value:.2f})")
            items.append(f"Best after re-evaluation on the preset's own evaluation, and exported: {again}.")
    if importances:
        items.append("Parameter importances (share of the value's variation each parameter explains, Optuna's "
                     f"default evaluator): {_percent_list(importances)}.")
    if best_file is not None:
        items.append(f"Best configuration as a matrix file: <code>prism matrix plan {html.escape(str(best_file))}"
                     "</code>.")
    items.append(f"Open the study in optuna-dashboard (<code>pip install optuna-dashboard</code>): "
                 f"<code>{html.escape(dashboard_command(storage_url))}</code>.")
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def build_sweep_report(cfg: SweepConfig, storage: str | None = None) -> Path:
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    storage_url = storage or default_storage(cfg)
    never_run = ConfigError(f"sweep {cfg.name}: no study in {storage_url} yet: run `prism sweep run` on it first")
    if storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).is_file():
        raise never_run  # before open_storage, which would create an empty database
    try:
        study = optuna.load_study(study_name=cfg.name, storage=open_storage(storage_url))
    except KeyError:  # optuna's "Record does not exist."
        raise never_run from None
    out = SWEEP_ROOT / cfg.name / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary = {"study": cfg.name, "direction": study.direction.name.lower(), "trials": len(trials), "states": counts,
               "dashboard": dashboard_command(storage_url)}
    images = [_plot("history", lambda: plots.plot_optimization_history(study), out),
              _plot("intermediate", lambda: plots.plot_intermediate_values(study), out),
              _plot("parallel_coordinate", lambda: plots.plot_parallel_coordinate(study), out)]
    best, best_file, top_rows, importances = None, None, [], None
    if complete:
        best, top_rows = best_on_full_evaluation(cfg, complete)
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_checkpoint=best.user_attrs.get("checkpoint"), top_trials=top_rows)
        if len(complete) >= 2:
            importances = summary["importances"] = optuna.importance.get_param_importances(study)
            images.append(_plot("importances", lambda: plots.plot_param_importances(study), out))
        best_file = best_matrix_file(cfg, best.params, out)
        summary["best_matrix_file"] = str(best_file)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")

    head = ("<!doctype html><html><head><meta charset='utf-8'><title>sweep</title><style>body{font-family:sans-serif;"
            "margin:2em}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}"
            "img{max-width:100%}</style></head><body>")
    page = [head, f"<h1>Sweep {html.escape(cfg.name)}</h1>",
            "<h2>Summary</h2>" + summary_html(cfg, study, storage_url, best, importances, best_file)]
    if top_rows:
        header = "".join(f"<th>{html.escape(k)}</th>" for k in top_rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
                       for row in top_rows)
        page.append("<h2>Best trials, re-evaluated</h2><p>Accuracy (%) with its 95% interval on the preset's own "
                    "evaluation; each minus the best, paired on the same items (* : the interval excludes 0). "
                    "The best here is exported.</p><table><tr>" + header + "</tr>" + body + "</table>")
    page.append("<h2>Trials</h2><p>Best first; value: held-out accuracy (%) of a completed trial.</p>"
                + trials_table(study).to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    page += [f"<h2>{p.stem}</h2><img src='{p.name}' alt='{p.stem}'>" for p in images if p is not None]
    page.append("</body></html>")
    atomic_write_text(out / "index.html", "\n".join(page))
    return out
