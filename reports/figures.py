"""Report figures (matplotlib, PNG + PDF), each drawn from what the matrix's runs recorded:
stage metrics.jsonl files, evaluation samples and the teacher corpus. A figure with nothing to draw is skipped."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt
import pandas as pd

from prism.response_format import segment_counts

EVAL_ROOT = Path("outputs/evals")
KIND_STYLE = {"perception": "tab:blue", "reasoning": "tab:orange", "response": "tab:green"}
LINE_STYLES = ("-", "--", ":", "-.")
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


def _curves(nodes: list, keys: list[tuple[str, str]], ylabel: str, title: str, out: Path, name: str) -> list[Path]:
    """One line per (run, metric key); `keys` are (metric, legend suffix)."""
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    drawn = 0
    for index, node in enumerate(nodes):  # colour: the expert view; line style: the run
        rows = _metrics(node.key)
        for key, suffix in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            if points:
                axis.plot(*zip(*points), label=f"{_label(node)} {suffix}".strip(), color=KIND_STYLE.get(suffix),
                          linestyle=LINE_STYLES[index % len(LINE_STYLES)], alpha=0.9)
                drawn += 1
    if not drawn:
        plt.close(figure)
        return []
    axis.set(xlabel="alignment step", ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, out, name)


def alignment_figures(plan, out: Path) -> list[Path]:
    nodes = _runs(plan, "align")
    kinds = [(f"reward_gap_{k}", k) for k in KIND_STYLE]
    paths = _curves(nodes, kinds, "teacher score - policy score", "Reward gap per expert view", out, "reward_gap")
    paths += _curves(nodes, [(f"disc_accuracy_{k}", k) for k in KIND_STYLE], "P(s_teacher > s_policy)",
                     "Discriminator accuracy", out, "disc_accuracy")
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
        paths += _save(figure, out, "format_and_length")
    else:
        plt.close(figure)
    return paths


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
    for path in sorted((EVAL_ROOT / checkpoint_hash).glob("*/*_samples_*.jsonl")):
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
