"""Report figures (matplotlib, PNG + PDF), each drawn from what the matrix's runs recorded:
stage metrics.jsonl files, evaluation samples and the teacher corpus. A figure with nothing to draw is skipped."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from evaluation.results import samples_files
from prism.response_format import segment_counts

EVAL_ROOT = Path("outputs/evals")
KIND_STYLE = {"perception": "tab:blue", "reasoning": "tab:orange", "response": "tab:green"}
ALGORITHM_COLOUR = {"grpo": "tab:blue", "dapo": "tab:orange", "gspo": "tab:green"}


def _metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _save(figure, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    figure.tight_layout()
    for path in paths:
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return paths


def _label(node) -> str:
    return f"{node.cfg.model.preset} seed {node.cfg.seed}"


def _runs(plan, kind: str) -> list:
    return [n for n in plan.nodes.values() if n.kind == kind and n.done]


# ----------------------------------------------------------------------------------------------------
# Training curves: one figure per metric family, one line per matrix cell (mean and min-max band over seeds)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One axis of a family's figure: a metric a stage logs in its metrics.jsonl."""

    stage: str  # node kind whose runs are read (base | sft | disc_warmup | align | rlvr)
    metric: str  # key in those runs' metrics.jsonl
    title: str


@dataclass(frozen=True)
class Family:
    name: str  # file name (PNG, PDF)
    title: str
    panels: tuple[Panel, ...]


STEP_LABEL = {"base": "base step", "sft": "SFT step", "disc_warmup": "warm-up step", "align": "alignment step",
              "rlvr": "RL step"}


def _policy_panels(stage: str) -> tuple[Panel, ...]:
    return (Panel(stage, "entropy", "entropy"), Panel(stage, "clipfrac", "clip fraction"),
            Panel(stage, "ppo_kl", "KL to the rollout policy"), Panel(stage, "kl_ref", "KL to the reference"))


FAMILIES = (
    Family("lm_loss", "Base and SFT loss",
           (Panel("base", "loss", "base: next-token loss"), Panel("sft", "loss", "SFT: assistant-token loss"))),
    Family("disc_warmup", "Discriminator warm-up",
           (Panel("disc_warmup", "bt_loss", "Bradley-Terry loss"),
            *(Panel("disc_warmup", f"accuracy_{k}", f"P(s_teacher > s_student), {k}") for k in KIND_STYLE),
            *(Panel("disc_warmup", f"reward_gap_{k}", f"teacher - student score, {k}") for k in KIND_STYLE))),
    Family("alignment_w1", "Distance to the teacher during alignment",
           (Panel("align", "caption_bullets_w1", "W1, caption bullets"),
            Panel("align", "reasoning_steps_w1", "W1, reasoning steps"),
            *(Panel("align", f"reward_gap_{k}", f"reward gap (teacher - policy), {k}") for k in KIND_STYLE))),
    Family("disc_accuracy", "Discriminator accuracy during alignment",
           tuple(Panel("align", f"disc_accuracy_{k}", f"P(s_teacher > s_policy), {k}") for k in KIND_STYLE)),
    Family("alignment_policy", "Policy update during alignment", _policy_panels("align")),
    Family("rl_policy", "RLVR policy update", _policy_panels("rlvr")),
)


def _chain(plan, key: str, found: dict[str, str]) -> None:
    """Stage nodes that made the model at `key`. A warm-up's own dependencies (the discriminator's backbone,
    possibly another size's base) made no part of the policy, so the walk stops there."""
    node = plan.nodes[key]
    if node.kind in STEP_LABEL:
        found.setdefault(node.kind, key)
    if node.kind != "disc_warmup":
        for dep in node.deps:
            _chain(plan, dep, found)


def stage_runs(plan) -> dict[str, dict[str, list[Path]]]:
    """stage -> legend label -> finished run directories, one per seed. A run shared by several cells (the SFT of
    every pipeline that starts from it) is drawn once, labelled with what those cells have in common; the runs of
    different seeds that serve the same cells share a label."""
    cells_of: dict[str, list[dict]] = {}
    for cell in plan.cells:
        found: dict[str, str] = {}
        _chain(plan, cell.eval_key, found)
        for key in found.values():
            cells_of.setdefault(key, []).append(cell.labels)
    runs: dict[str, dict[str, list[Path]]] = {}
    label_of: dict[tuple, str] = {}
    for key, labels in cells_of.items():
        node = plan.nodes[key]
        if not node.done:
            continue
        served = frozenset(tuple(sorted((k, str(v)) for k, v in one.items() if k != "seed")) for one in labels)
        if (node.kind, served) not in label_of:
            common = {k: v for k, v in labels[0].items() if all(other.get(k) == v for other in labels[1:])}
            label = " · ".join(str(v) for k, v in common.items() if k != "seed") or Path(key).name
            if label in runs.get(node.kind, {}):  # other cells with the same shared labels: name the run
                label = f"{label} ({Path(key).name})"
            label_of[node.kind, served] = label
        runs.setdefault(node.kind, {}).setdefault(label_of[node.kind, served], []).append(Path(key))
    return runs


def metric_series(rows: list[dict], metric: str) -> dict[int, float]:
    """step -> value of `metric`, for the steps that logged it as a finite number."""
    return {int(r["step"]): float(r[metric]) for r in rows
            if isinstance(r.get(metric), (int, float)) and not isinstance(r[metric], bool) and math.isfinite(r[metric])}


def curve_figure(runs: dict[str, dict[str, list[Path]]], panels: tuple[Panel, ...], title: str):
    """One axis per panel that some run logged; one line per label: the run itself, or the mean over its seeds
    (on the steps every seed logged) with their min-max band. None when no panel has data: no empty figure."""
    rows = {path: _metrics(path) for by_label in runs.values() for paths in by_label.values() for path in paths}
    drawn = []
    for panel in panels:
        lines = {}
        for label, paths in runs.get(panel.stage, {}).items():
            series = [metric_series(rows[path], panel.metric) for path in paths]
            series = [s for s in series if s]
            if series:
                lines[label] = series
        if lines:
            drawn.append((panel, lines))
    if not drawn:
        return None
    columns = min(3, len(drawn))
    grid_rows = math.ceil(len(drawn) / columns)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(3.6 * columns, 2.8 * grid_rows + 0.5), squeeze=False)
    labels = list(dict.fromkeys(label for _, lines in drawn for label in lines))
    colours = {label: f"C{index % 10}" for index, label in enumerate(labels)}
    handles = {}
    for axis, (panel, lines) in zip(axes.flat, drawn, strict=False):
        for label, series in lines.items():
            if len(series) == 1:
                steps, values = zip(*sorted(series[0].items()), strict=True)
            else:
                steps = sorted(set.intersection(*(set(s) for s in series)))
                stacked = np.array([[s[step] for step in steps] for s in series])
                values = stacked.mean(axis=0)
                axis.fill_between(steps, stacked.min(axis=0), stacked.max(axis=0), color=colours[label], alpha=0.2,
                                  linewidth=0)
            legend = label if len(series) == 1 else f"{label} (mean, min-max of {len(series)} seeds)"
            (handles[legend],) = axis.plot(steps, values, color=colours[label], label=legend)
        axis.set(xlabel=STEP_LABEL[panel.stage], title=panel.title)
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(drawn):]:
        axis.remove()
    axes.flat[0].legend(handles=list(handles.values()), fontsize=6)
    figure.suptitle(title, fontsize=11)
    return figure


def training_figures(plan, out: Path) -> list[Path]:
    """Every family of FAMILIES that some finished run of the plan logged."""
    runs = stage_runs(plan)
    paths = []
    for family in FAMILIES:
        figure = curve_figure(runs, family.panels, family.title)
        if figure is not None:
            paths += _save(figure, out, family.name)
    return paths


def alignment_figures(plan, out: Path) -> list[Path]:
    """Format-valid rate and response length over alignment and RLVR steps."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    drawn = 0
    for kind, style in (("align", "-"), ("rlvr", "--")):
        for node in _runs(plan, kind):
            rows = _metrics(node.key)
            label = f"{kind}{'-' + node.cfg.algorithm if kind == 'rlvr' else ''} {_label(node)}"
            steps = [r["step"] for r in rows]
            if "format_rate" in (rows[0] if rows else {}):
                left.plot(steps, [r["format_rate"] for r in rows], style, label=label)
                right.plot(steps, [r["response_length"] for r in rows], style, label=label)
                drawn += 1
    if drawn:
        left.set(xlabel="step", ylabel="format-valid rate", title="Format rate")
        right.set(xlabel="step", ylabel="mean response tokens", title="Response length")
        for axis in (left, right):
            axis.grid(alpha=0.3)
        right.legend(fontsize=6)
        return _save(figure, out, "format_and_length")
    plt.close(figure)
    return []


def rl_curves(plan, out: Path) -> list[Path]:
    nodes = _runs(plan, "rlvr")
    if not nodes:
        return []
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for node in nodes:
        rows = _metrics(node.key)
        prism = "align-" in (node.cfg.model.path or "")
        style = "-" if prism else "--"
        label = f"{node.cfg.algorithm} {'sft+prism' if prism else 'sft'} {_label(node)}"
        colour = ALGORITHM_COLOUR.get(node.cfg.algorithm)
        left.plot([r["step"] for r in rows], [r["reward"] for r in rows], style, color=colour, label=label)
        right.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], style, color=colour, label=label)
    left.set(xlabel="RL step", ylabel="mean reward", title="RLVR reward (solid: after PRISM)")
    right.set(xlabel="RL step", ylabel="rollout accuracy", title="RLVR training accuracy")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    right.legend(fontsize=6)
    return _save(figure, out, "rl_curves")


def _eval_texts(checkpoint_hash: str) -> list[str]:
    texts = []
    paths = [path for entry in sorted((EVAL_ROOT / checkpoint_hash).iterdir()) if entry.is_dir()
             for path in samples_files(entry).values()] if (EVAL_ROOT / checkpoint_hash).is_dir() else []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                response = json.loads(line).get("filtered_resps")
                texts.append(response[0] if isinstance(response, list) else str(response))
    return texts


def distribution_figure(plan, teacher_texts: list[str], record_of: Callable[[object], dict | None],
                        out: Path) -> list[Path]:
    """Caption bullets and reasoning steps: teacher / SFT / PRISM / after RLVR (first size, first seed, GRPO)."""
    sources: dict[str, list[str]] = {"teacher": teacher_texts} if teacher_texts else {}
    wanted = {("sft", "none"): "SFT", ("sft+prism", "none"): "SFT -> PRISM", ("sft", "grpo"): "SFT -> GRPO",
              ("sft+prism", "grpo"): "SFT -> PRISM -> GRPO"}
    first = plan.cells[0].labels if plan.cells else {}
    for cell in plan.cells:
        key = (cell.labels.get("pipeline"), cell.labels.get("rl"))
        if key in wanted and cell.labels.get("size") == first.get("size") and cell.labels.get("seed") == first.get("seed"):
            record = record_of(cell)
            if record is not None:
                sources[wanted[key]] = _eval_texts(record["checkpoint_hash"])
    counted = {name: segment_counts(texts) for name, texts in sources.items()}
    counted = {name: c for name, c in counted.items() if c[0]}
    if len(counted) < 2:
        return []
    figure, axes = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for axis, index, title in ((axes[0], 0, "Caption bullets"), (axes[1], 1, "Reasoning steps")):
        top = max(max(c[index]) for c in counted.values())
        bins = [b - 0.5 for b in range(top + 2)]
        for name, values in counted.items():
            mean = sum(values[index]) / len(values[index])
            axis.hist(values[index], bins=bins, density=True, histtype="step", linewidth=1.5,
                      label=f"{name} (mean {mean:.2f})")
        axis.set(xlabel="count per format-valid response", ylabel="share", title=title)
        axis.legend(fontsize=6)
    return _save(figure, out, "distributions")


def token_efficiency(frame: pd.DataFrame, out: Path) -> list[Path]:
    if frame.empty or "mean_tokens" not in frame:
        return []
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    keys = ["setting"] if "setting" in frame else ["pipeline", "rl"]
    for group, part in frame.groupby(keys):
        name = " / ".join(str(g) for g in (group if isinstance(group, tuple) else (group,)))
        axis.scatter(part["mean_tokens"], part["Avg"], label=name, marker="^" if "prism" in name else "o")
    axis.set(xlabel="mean response tokens", ylabel="average accuracy (%)", title="Token efficiency")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6)
    return _save(figure, out, "token_efficiency")


def delta_intervals(deltas: pd.DataFrame, out: Path) -> list[Path]:
    """Each paired delta on Avg with its 95% interval (ours) beside the paper's delta, one row per comparison."""
    if deltas.empty or "mean" not in deltas or deltas["mean"].isna().all():
        return []
    labels = [f"{row['size']} · {row['comparison']}" if "size" in deltas else str(row["comparison"])
              for _, row in deltas.iterrows()]
    positions = range(len(deltas))
    figure, axis = plt.subplots(figsize=(7.0, 0.32 * len(deltas) + 1.4))
    ours = deltas["mean"].to_numpy(float)
    errors = [ours - deltas["low"].to_numpy(float), deltas["high"].to_numpy(float) - ours]
    axis.errorbar(ours, positions, xerr=errors, fmt="o", color="tab:blue", capsize=3, label="ours (95% interval)")
    axis.scatter(deltas["delta Avg (paper)"], positions, marker="x", color="tab:red", zorder=3, label="paper")
    axis.axvline(0.0, color="grey", linewidth=0.8)
    axis.set_yticks(list(positions), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set(xlabel="paired difference in average accuracy (points)", title="Deltas with their intervals")
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, out, "delta_intervals")
