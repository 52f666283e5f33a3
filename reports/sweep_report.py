"""A sweep's report: best trial, parameter importances, optimisation history, intermediate values and a
parallel-coordinate plot (Optuna's matplotlib plots) in one HTML page, and the best configuration exported as a
matrix file whose preset carries the best overrides (`prism matrix plan outputs/sweeps/<name>/<matrix>-best.yaml`)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib
import numpy as np

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


def build_sweep_report(cfg: SweepConfig, storage: str | None = None) -> Path:
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    study = optuna.load_study(study_name=cfg.name, storage=open_storage(storage or default_storage(cfg)))
    out = SWEEP_ROOT / cfg.name / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary = {"study": cfg.name, "trials": len(trials), "states": counts}
    images = [_plot("history", lambda: plots.plot_optimization_history(study), out),
              _plot("intermediate", lambda: plots.plot_intermediate_values(study), out),
              _plot("parallel_coordinate", lambda: plots.plot_parallel_coordinate(study), out)]
    best_file, top_rows = None, []
    if complete:
        best, top_rows = best_on_full_evaluation(cfg, complete)
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_checkpoint=best.user_attrs.get("checkpoint"), top_trials=top_rows)
        if len(complete) >= 2:
            summary["importances"] = optuna.importance.get_param_importances(study)
            images.append(_plot("importances", lambda: plots.plot_param_importances(study), out))
        best_file = best_matrix_file(cfg, best.params, out)
        summary["best_matrix_file"] = str(best_file)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    def outcome(trial) -> str:  # a pruned trial's value is its last intermediate value, not an accuracy
        if trial.state == TrialState.COMPLETE:
            return f"{trial.value:.2f}"
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            step = max(trial.intermediate_values)
            return f"pruned at step {step} (teacher-likeness {trial.intermediate_values[step]:.2f})"
        return ""

    rows = "".join(f"<tr><td>{t.number}</td><td>{t.state.name}</td><td>{outcome(t)}</td>"
                   f"<td>{html.escape(json.dumps(t.params))}</td></tr>" for t in trials)
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>sweep</title><style>body{font-family:sans-serif;"
            "margin:2em}td,th{border:1px solid #ccc;padding:3px}img{max-width:100%}</style></head><body>")
    page = [head,
            f"<h1>Sweep {html.escape(cfg.name)}</h1><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre>",
            "<h2>Trials</h2><table><tr><th>#</th><th>state</th><th>accuracy (%)</th><th>params</th></tr>" + rows + "</table>"]
    if top_rows:
        header = "".join(f"<th>{html.escape(k)}</th>" for k in top_rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
                       for row in top_rows)
        page.insert(2, "<h2>Best trials, re-evaluated</h2><p>Accuracy (%) with its 95% interval on the preset's own "
                       "evaluation; each minus the best, paired on the same items (* : the interval excludes 0). "
                       "The best here is exported.</p><table><tr>" + header + "</tr>" + body + "</table>")
    page += [f"<h2>{p.stem}</h2><img src='{p.name}' alt='{p.stem}'>" for p in images if p is not None]
    page.append("</body></html>")
    atomic_write_text(out / "index.html", "\n".join(page))
    return out
