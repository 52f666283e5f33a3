"""Result tables of a matrix: our mean +- std over seeds beside the paper's value, and PRISM-minus-baseline deltas.

Everything is computed from the evaluation records the matrix wrote (outputs/matrix/evals/*.json): one row per
cell and seed, accuracies in %, then grouped over seeds. Columns are the suite's benchmarks: the embedded task
families (each beside the published benchmark it mirrors) or the seven published benchmarks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference"

# Embedded family -> the paper column it mirrors (docs/DESIGN.md, "The embedded world"); counting has none.
FAMILY_TO_PAPER = {"chart": "MathVista", "geometry": "MathVerse", "composite": "WeMath", "multichoice": "MMMU",
                   "presence": "HallusionBench", "counting": None}
FAMILIES = tuple(FAMILY_TO_PAPER)
BENCHMARK_TO_PAPER = {"mathvista_testmini": "MathVista", "mathverse_testmini": "MathVerse",
                      "mathvision_testmini": "MathVision", "wemath_testmini_reasoning": "WeMath", "mmmu_val": "MMMU",
                      "mmmu_pro": "MMMU-Pro", "hallusion_bench_image": "HallusionBench"}
PAPER_MODELS = ("Qwen3-VL-4B", "Qwen3-VL-8B")  # the matrix's first and second size
ROW_ORDER = [("instruct", "none"), *((p, rl) for p in ("sft", "sft+prism") for rl in ("none", "grpo", "dapo", "gspo"))]


def _column(row: dict) -> str | None:
    """Which table column an evaluation row (metric accuracy) belongs to."""
    if row["benchmark"] == "embedded":
        task = row["task"]
        if task == "prism_embedded":
            return None  # the average is recomputed over families
        return task.removeprefix("prism_embedded_")
    return BENCHMARK_TO_PAPER.get(row["benchmark"]) if row["task"].startswith("prism_") else None


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def results_frame(plan) -> pd.DataFrame:
    """One row per evaluated cell: its labels, accuracy per column (%), Avg, format rate and mean tokens."""
    rows = []
    for cell in plan.cells:
        record = read_record(Path(cell.eval_key))
        if record is None:
            continue
        out = {**cell.labels, "checkpoint": cell.checkpoint}
        for row in record["rows"]:
            value = float(row["value"])
            if row["metric"] == "accuracy":
                column = _column(row)
                if column is not None:
                    out[column] = 100.0 * value
            elif row["metric"] == "format_valid_rate" and row["task"] in ("prism_embedded", row["benchmark"]):
                out["format_valid"] = 100.0 * value
            elif row["metric"] == "mean_response_tokens" and row["task"] == "prism_embedded":
                out["mean_tokens"] = value
        columns = [c for c in out if c in FAMILIES or c in BENCHMARK_TO_PAPER.values()]
        out["Avg"] = sum(out[c] for c in columns) / len(columns) if columns else math.nan
        rows.append(out)
    frame = pd.DataFrame(rows)
    # lmms-eval lists metrics in a varying order: fix the columns so equal results give equal files
    labels = [c for c in ("size", "pipeline", "rl", "setting", "group", "seed", "checkpoint") if c in frame]
    rest = [c for c in ("format_valid", "mean_tokens") if c in frame]
    return frame[labels + rest + benchmark_columns(frame)] if len(frame) else frame


def benchmark_columns(frame: pd.DataFrame) -> list[str]:
    ordered = [*FAMILIES, *BENCHMARK_TO_PAPER.values()]
    return [c for c in ordered if c in frame.columns] + ["Avg"]


def _paper_table1() -> pd.DataFrame:
    return pd.read_csv(REFERENCE_DIR / "paper_table1.csv")


def _paper_column(column: str) -> str | None:
    return FAMILY_TO_PAPER.get(column, column) if column != "Avg" else "Avg"


def _paper_label(column: str) -> str | None:
    """Header of the paper's column beside ours: `MathVista (paper)` beside `chart`; None when nothing mirrors it."""
    name = _paper_column(column)
    return None if name is None else f"{name} (paper)"


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _paper_value(paper: pd.DataFrame, filters: dict, column: str) -> float:
    name = _paper_column(column)
    if name is None or name not in paper.columns:
        return math.nan
    match = paper
    for key, value in filters.items():
        match = match[match[key] == value]
    return float(match[name].iloc[0]) if len(match) else math.nan


def table1(frame: pd.DataFrame, sizes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(main table, deltas). Main: one row per (size, pipeline, rl), cells 'mean ± std' with the paper's value in a
    `paper <column>` column beside each. Deltas: per size and RL algorithm, PRISM minus baseline on Avg."""
    paper = _paper_table1()
    columns = benchmark_columns(frame)
    table_rows, delta_rows = [], []
    for index, size in enumerate(sizes):
        model = PAPER_MODELS[index] if index < len(PAPER_MODELS) else None
        part = frame[frame["size"] == size] if len(frame) else frame
        for pipeline, rl in ROW_ORDER:
            cell = part[(part["pipeline"] == pipeline) & (part["rl"] == rl)] if len(part) else part
            row = {"size": size, "pipeline": pipeline, "rl": rl, "seeds": len(cell)}
            for column in columns:
                values = cell[column].dropna() if column in cell else pd.Series(dtype=float)
                std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                row[column] = _fmt(float(values.mean()) if len(values) else math.nan, std, len(values))
                if _paper_label(column):
                    row[_paper_label(column)] = _paper_value(
                        paper, {"model": model, "pipeline": pipeline, "rl_algorithm": rl}, column) if model else math.nan
            table_rows.append(row)
        for rl in ("none", "grpo", "dapo", "gspo"):
            base = part[(part["pipeline"] == "sft") & (part["rl"] == rl)]["Avg"] if len(part) else pd.Series(dtype=float)
            prism = part[(part["pipeline"] == "sft+prism") & (part["rl"] == rl)]["Avg"] if len(part) else pd.Series(dtype=float)
            ours = float(prism.mean() - base.mean()) if len(base) and len(prism) else math.nan
            theirs = (_paper_value(paper, {"model": model, "pipeline": "sft+prism", "rl_algorithm": rl}, "Avg")
                      - _paper_value(paper, {"model": model, "pipeline": "sft", "rl_algorithm": rl}, "Avg")) if model else math.nan
            delta_rows.append({"size": size, "rl": rl, "delta Avg (ours)": round(ours, 2) if not math.isnan(ours) else math.nan,
                               "delta Avg (paper)": round(theirs, 2) if not math.isnan(theirs) else math.nan})
    return pd.DataFrame(table_rows), pd.DataFrame(delta_rows)


def ablation_table(frame: pd.DataFrame, settings: list) -> pd.DataFrame:
    paper = pd.read_csv(REFERENCE_DIR / "paper_ablations.csv")
    columns = benchmark_columns(frame)
    rows = []
    for setting in settings:
        cell = frame[frame["setting"] == setting.name] if len(frame) else frame
        row = {"group": setting.group, "setting": setting.name, "seeds": len(cell)}
        for column in columns:
            values = cell[column].dropna() if column in cell else pd.Series(dtype=float)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            row[column] = _fmt(float(values.mean()) if len(values) else math.nan, std, len(values))
            if _paper_label(column):
                row[_paper_label(column)] = _paper_value(paper, {"setting": setting.name}, column)
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table (no tabulate dependency): NaN prints as '-'."""
    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"

    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:g}"
        return str(value)

    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (no jinja2 dependency); ± and % are escaped for LaTeX."""

    def cell(value) -> str:
        if isinstance(value, float):
            text = "--" if math.isnan(value) else f"{value:g}"
        else:
            text = str(value)
        return text.replace("±", r"$\pm$").replace("%", r"\%").replace("_", r"\_").replace("&", r"\&")

    spec = "l" * len(table.columns)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(cell(c) for c in table.columns) + r" \\",
             r"\midrule"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
