"""Result tables of a matrix: our accuracies with their 95% intervals beside the paper's values, and paired deltas.

Everything is computed from the evaluation records the matrix wrote (outputs/matrix/evals/*.json) and lmms-eval's
per-sample scores beside them (outputs/evals/<checkpoint-hash>/<entry>-<key>/<model>/<date>_samples_<task>.jsonl):
one row per cell and seed, accuracies in %, then grouped over seeds. Columns are the suite's benchmarks: the embedded task
families (each beside the published benchmark it mirrors) or the seven published benchmarks.

Intervals and paired differences are reports.stats's: bootstrap over seeds and items, a difference paired on the
same items and seeds, its p-value. A table cell reads `mean [low, high]`; a delta marked `*` has an
interval that excludes 0.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from evaluation.results import read_rows, samples_files
from prism.workers import available_cores
from reports.stats import Estimate, above_level, format_estimate, interval, paired_difference

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference"
EVAL_ROOT = Path("outputs/evals")

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


def warmup_pairs(plan, cell) -> str:
    """Which pairs the cell's discriminator warmed up on: `fixed: <files>`, `policy rollouts`, or `-` (no
    alignment stage)."""
    stack, seen = [cell.checkpoint.removesuffix("/model")], set()
    while stack:
        key = stack.pop()
        node = plan.nodes.get(key)
        if node is None or key in seen:
            continue
        seen.add(key)
        if node.kind == "disc_warmup":
            files = node.cfg.data_files
            return "fixed: " + ", ".join(Path(f).name for f in files) if files else "policy rollouts"
        stack.extend(node.deps)
    return "-"


def results_frame(plan) -> pd.DataFrame:
    """One row per evaluated cell: its labels, accuracy per column (%), Avg, format rate and mean tokens."""
    rows = []
    for cell in plan.cells:
        record = read_record(Path(cell.eval_key))
        if record is None:
            continue
        out = {**cell.labels, "checkpoint": cell.checkpoint, "record": cell.eval_key,
               "warm-up pairs": warmup_pairs(plan, cell)}
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
    labels = [c for c in ("size", "pipeline", "rl", "setting", "group", "seed", "checkpoint", "record") if c in frame]
    rest = [c for c in ("warm-up pairs", "format_valid", "mean_tokens") if c in frame]
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


def sample_scores(record_path: str | Path, eval_root: Path | None = None) -> dict[str, dict[int, float]] | None:
    """Per table column, each item's score {doc_id: accuracy} from the samples lmms-eval logged for this record's
    evaluation; None when a column's samples file is missing (the table then shows the mean alone)."""
    record = read_record(Path(record_path))
    return None if record is None else row_scores(record["rows"], eval_root)


def row_scores(rows: list[dict], eval_root: Path | None = None) -> dict[str, dict[int, float]] | None:
    """`sample_scores` of an evaluation's rows (`run_eval(...).rows`, what a record holds)."""
    return scores_of(column_samples(rows, eval_root))


def evaluation_scores(folder: Path) -> dict[str, dict[int, float]]:
    """`row_scores` of one `prism eval` folder (`<out>/<checkpoint hash>`, its one `*/rows.csv`); ValueError naming
    the folder when it holds no or several evaluations, or lacks a samples file."""
    return evaluation_items(folder)[0]


def evaluation_items(folder: Path) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, str]] | None]:
    """`evaluation_scores` of one `prism eval` folder and its items' reference answers (`targets_of`; None where a
    sample carries none), from one reading of its samples files."""
    entries = sorted(folder.glob("*/rows.csv"))
    if len(entries) != 1:
        found = ", ".join(e.parent.name for e in entries) or "none"
        raise ValueError(f"{folder}: expected one evaluation (a */rows.csv), found {found}")
    samples = column_samples(read_rows(entries[0]), eval_root=folder.parent)
    scores = scores_of(samples)
    if not scores:
        raise ValueError(f"{entries[0]}: no per-sample scores (a samples file is missing)")
    return scores, targets_of(samples)


def column_samples(rows: list[dict], eval_root: Path | None = None) -> dict[str, tuple[str, list[dict]]] | None:
    """Per table column, (its metric, the samples lmms-eval logged for it); None when a samples file is missing."""
    eval_root = EVAL_ROOT if eval_root is None else eval_root
    out: dict[str, tuple[str, list[dict]]] = {}
    for row in rows:
        column = _column(row) if row["metric"] == "accuracy" else None
        if column is None:
            continue
        entry = sorted((eval_root / row["checkpoint_hash"]).glob(f"*-{row['eval_key']}"))
        path = samples_files(entry[-1]).get(row["task"]) if entry else None
        if path is None or not path.is_file():
            return None
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out[column] = (row["metric"], lines)
    return out


def scores_of(samples: dict[str, tuple[str, list[dict]]] | None) -> dict[str, dict[int, float]] | None:
    """Per column, each item's score {doc_id: metric} from `column_samples`; None without samples or where a sample's
    metric is not a number."""
    if samples is None:
        return None
    out: dict[str, dict[int, float]] = {}
    for column, (metric, lines) in samples.items():
        if any(not isinstance(sample.get(metric), (int, float)) for sample in lines):
            return None  # e.g. a judged metric logged another way
        out[column] = {int(sample["doc_id"]): float(sample[metric]) for sample in lines}
    return out


def targets_of(samples: dict[str, tuple[str, list[dict]]] | None) -> dict[str, dict[int, str]] | None:
    """Per column, each item's reference answer {doc_id: target} from `column_samples`; None without samples or
    where a sample carries no target."""
    if samples is None or any("target" not in sample for _, lines in samples.values() for sample in lines):
        return None
    return {column: {int(sample["doc_id"]): str(sample["target"]) for sample in lines}
            for column, (_, lines) in samples.items()}


def cell_items(cell: pd.DataFrame, columns: list[str]) -> tuple[dict[str, pd.DataFrame] | None,
                                                                 dict[str, dict[int, str]] | None]:
    """A cell's per-item scores in %: per column a frame [seed x doc_id], the items every seed evaluated (None
    without per-sample scores); and per column each item's reference answer, from its first evaluation (every seed
    holds the same items; None without targets). Each samples file is read once."""
    if not len(cell) or "record" not in cell:
        return None, None
    seeds = cell["seed"].tolist() if "seed" in cell else list(range(len(cell)))
    records = [read_record(Path(record)) for record in cell["record"]]
    samples = [None if record is None else column_samples(record["rows"]) for record in records]
    targets = targets_of(samples[0])
    per_seed = [scores_of(seed_samples) for seed_samples in samples]
    if any(scores is None for scores in per_seed):
        return None, targets
    out = {}
    for column in (c for c in columns if c != "Avg"):
        if any(column not in scores for scores in per_seed):
            return None, targets
        frame = 100.0 * pd.DataFrame([scores[column] for scores in per_seed], index=seeds)
        out[column] = frame.dropna(axis=1).sort_index().sort_index(axis=1)
    return out, targets


def cell_estimates(scores: dict[str, pd.DataFrame] | None, columns: list[str]) -> dict[str, Estimate | None]:
    """Per column, and Avg over the columns (each weighing the same), the cell's interval."""
    if scores is None:
        return dict.fromkeys(columns)
    arrays = {column: frame.to_numpy() for column, frame in scores.items()}
    return columns_and_avg(interval, {column: ({column: x},) for column, x in arrays.items()}, (arrays,))


def paired_estimates(a: dict[str, pd.DataFrame] | None, b: dict[str, pd.DataFrame] | None,
                     columns: list[str]) -> dict[str, Estimate | None]:
    """Per column and Avg, b - a on the seeds and items both cells hold; None without per-sample scores."""
    if a is None or b is None or a.keys() != b.keys():
        return dict.fromkeys(columns)
    pairs = {}
    for column in a:
        seeds = a[column].index.intersection(b[column].index)
        items = a[column].columns.intersection(b[column].columns)
        if not len(seeds) or not len(items):
            return dict.fromkeys(columns)
        pairs[column] = (a[column].loc[seeds, items].to_numpy(), b[column].loc[seeds, items].to_numpy())
    return columns_and_avg(paired_difference, {c: ({c: x}, {c: y}) for c, (x, y) in pairs.items()},
                           ({c: x for c, (x, _) in pairs.items()}, {c: y for c, (_, y) in pairs.items()}))


def majority_answers(scores: dict[str, pd.DataFrame] | None,
                     targets: dict[str, dict[int, str]] | None) -> dict[str, tuple[str, float]] | None:
    """Per column, the answer the cell's items most often expect and its share of them (%): what a model that
    ignores its input gets right at best on these items. Ties go to the answer of the lowest doc_id. None without
    per-sample scores or targets."""
    if scores is None or targets is None or any(column not in targets for column in scores):
        return None
    answers = {}
    for column, frame in scores.items():
        expected = [targets[column].get(int(doc)) for doc in frame.columns]
        if None in expected:
            return None
        answer, count = Counter(expected).most_common(1)[0]
        answers[column] = (answer, 100.0 * count / len(expected))
    return answers


def against_majority(scores: dict[str, pd.DataFrame] | None, targets: dict[str, dict[int, str]] | None,
                     columns: list[str]) -> tuple[dict[str, Estimate | None], dict[str, tuple[str, float]]]:
    """Per column (no Avg), the cell's accuracy minus its items' majority-answer share (`majority_answers`,
    `reports.stats.above_level`), and each column's (answer, share %); None estimates without scores or targets."""
    answers = majority_answers(scores, targets)
    family_columns = [c for c in columns if c != "Avg"]
    if answers is None:
        return dict.fromkeys(family_columns), {}
    per_column = {c: ({c: scores[c].to_numpy()}, answers[c][1]) for c in family_columns}
    return columns_and_avg(above_level, per_column, None), answers


def columns_and_avg(function, per_column: dict[str, tuple], avg: tuple | None) -> dict[str, Estimate]:
    """{column: function(*per_column[column]), ..., "Avg": function(*avg)} (no Avg where `avg` is None), the calls
    taken in order by a thread per core. The bootstraps and permutation tests are numpy array work, which runs
    without the GIL, and each call seeds its own generator, so the results equal a loop's. Avg goes first: it holds
    as many items as the other columns together, so with two threads it runs beside them."""
    calls = [*([avg] if avg is not None else []), *per_column.values()]
    workers = min(available_cores(), len(calls))
    if workers < 2:
        results = [function(*args) for args in calls]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(function, *zip(*calls)))
    if avg is None:  # the columns alone
        return dict(zip(per_column, results))
    return {**dict(zip(per_column, results[1:])), "Avg": results[0]}


def _cell_text(estimate: Estimate | None, values: pd.Series) -> str:
    """`mean [low, high]`; the mean over seeds alone where no per-sample scores were logged."""
    if estimate is not None:
        return format_estimate(estimate)
    return f"{values.mean():.1f}" if len(values) else "-"


def _paper_value(paper: pd.DataFrame, filters: dict, column: str) -> float:
    name = _paper_column(column)
    if name is None or name not in paper.columns:
        return math.nan
    match = paper
    for key, value in filters.items():
        match = match[match[key] == value]
    return float(match[name].iloc[0]) if len(match) else math.nan


def _delta_row(labels: dict, estimates: dict[str, Estimate | None], paper_delta: float) -> dict:
    avg = estimates["Avg"]
    missing = avg is None
    return {**labels,
            "delta Avg (ours)": "-" if missing else format_estimate(avg, signed=True),
            "mean": math.nan if missing else round(avg.mean, 2),
            "low": math.nan if missing else round(avg.low, 2),
            "high": math.nan if missing else round(avg.high, 2),
            "p": math.nan if missing else avg.p_value,
            "excludes 0": False if missing else avg.excludes_zero,
            "items": 0 if missing else avg.items, "seeds": 0 if missing else avg.seeds,
            "delta Avg (paper)": round(paper_delta, 2) if not math.isnan(paper_delta) else math.nan}


def _long_rows(labels: dict, estimates: dict[str, Estimate | None]) -> list[dict]:
    return [{**labels, "column": column, "mean": e.mean, "low": e.low, "high": e.high, "p": e.p_value,
             "seeds": e.seeds, "items": e.items} for column, e in estimates.items() if e is not None]


def _majority_rows(labels: dict, estimates: dict[str, Estimate | None], answers: dict[str, tuple[str, float]],
                   shares_labels: dict | None) -> tuple[list[dict], list[dict]]:
    """A cell's printed row of the majority table, after a row of the answers and their shares (labelled
    `shares_labels`) where that is given and they are known; and its long rows with each column's answer and share."""
    shares = [{**shares_labels, **{c: f"{share:.1f} ({answer})" for c, (answer, share) in answers.items()}}
              ] if shares_labels is not None and answers else []
    printed = {**labels, **{c: format_estimate(e, signed=True) for c, e in estimates.items()}}
    long = [{**row, "answer": answers[row["column"]][0], "share": answers[row["column"]][1]}
            for row in _long_rows(labels, estimates)]
    return [*shares, printed], long


def table1(frame: pd.DataFrame, sizes: list[str]) -> dict[str, pd.DataFrame]:
    """{"table", "deltas", "majority", "cells", "deltas_by_column", "majority_by_column"}.

    table: one row per (size, pipeline, rl), cells `mean [low, high]` (%), the paper's value in an `X (paper)`
    column beside each. deltas: per size, SFT minus the instruct model, PRISM minus SFT for each RL algorithm (and
    without RL), and each RL run minus its start (SFT or SFT -> PRISM); then the second size minus the first after
    SFT and after SFT -> PRISM (the same items and seed numbers); on Avg: the paired difference, its interval and
    p-value, beside the paper's. majority: per size, each family of every cell minus the share of its items that the
    answer they most often expect gets right (`against_majority`), under a row of those shares and answers: a family
    whose interval stays above 0 was learned beyond a constant guess. cells, deltas_by_column and majority_by_column:
    the same numbers per column, in long form."""
    paper = _paper_table1()
    columns = benchmark_columns(frame)
    table_rows, delta_rows, cell_rows, delta_long, majority_rows, majority_long = [], [], [], [], [], []
    scores_by_size: dict[str, dict] = {}
    for index, size in enumerate(sizes):
        model = PAPER_MODELS[index] if index < len(PAPER_MODELS) else None
        part = frame[frame["size"] == size] if len(frame) else frame
        scores, targets = {}, {}
        for pipeline, rl in ROW_ORDER:
            cell = part[(part["pipeline"] == pipeline) & (part["rl"] == rl)] if len(part) else part
            scores[pipeline, rl], targets[pipeline, rl] = cell_items(cell, columns)
            estimates = cell_estimates(scores[pipeline, rl], columns)
            row = {"size": size, "pipeline": pipeline, "rl": rl, "seeds": len(cell),
                   "items": estimates["Avg"].items if estimates["Avg"] is not None else 0}
            for column in columns:
                values = cell[column].dropna() if column in cell else pd.Series(dtype=float)
                row[column] = _cell_text(estimates[column], values)
                if _paper_label(column):
                    row[_paper_label(column)] = _paper_value(
                        paper, {"model": model, "pipeline": pipeline, "rl_algorithm": rl}, column) if model else math.nan
            table_rows.append(row)
            cell_rows += _long_rows({"size": size, "pipeline": pipeline, "rl": rl}, estimates)

        def paper_avg(pipeline: str, rl: str) -> float:
            if model is None:
                return math.nan
            return _paper_value(paper, {"model": model, "pipeline": pipeline, "rl_algorithm": rl}, "Avg")

        scores_by_size[size] = scores
        shares_shown = False
        for pipeline, rl in ROW_ORDER:  # each family against the answer its items most often expect
            estimates, answers = against_majority(scores[pipeline, rl], targets[pipeline, rl], columns)
            shares = None if shares_shown else {"size": size, "pipeline": "majority answer", "rl": "share % (answer)"}
            printed, long = _majority_rows({"size": size, "pipeline": pipeline, "rl": rl}, estimates, answers, shares)
            shares_shown = shares_shown or bool(answers)
            majority_rows += printed
            majority_long += long
        comparisons = [("SFT - instruct", ("instruct", "none"), ("sft", "none"))]
        comparisons += [(f"PRISM - SFT ({rl})", ("sft", rl), ("sft+prism", rl))
                        for rl in ("none", "grpo", "dapo", "gspo")]
        comparisons += [(f"{rl.upper()} - start ({pipeline})", (pipeline, "none"), (pipeline, rl))
                        for pipeline in ("sft", "sft+prism") for rl in ("grpo", "dapo", "gspo")]
        for name, base, other in comparisons:
            estimates = paired_estimates(scores[base], scores[other], columns)
            labels = {"size": size, "comparison": name, "rl": other[1]}
            delta_rows.append(_delta_row(labels, estimates, paper_avg(*other) - paper_avg(*base)))
            delta_long += _long_rows(labels, estimates)
    if len(sizes) >= 2:  # the size axis: does the larger model end higher?
        small, large = sizes[:2]
        for pipeline in ("sft", "sft+prism"):
            estimates = paired_estimates(scores_by_size[small][pipeline, "none"],
                                         scores_by_size[large][pipeline, "none"], columns)
            labels = {"size": f"{large} - {small}", "comparison": f"{large.upper()} - {small.upper()} ({pipeline})",
                      "rl": "none"}
            paper_avgs = [_paper_value(paper, {"model": model, "pipeline": pipeline, "rl_algorithm": "none"}, "Avg")
                          for model in PAPER_MODELS]
            delta_rows.append(_delta_row(labels, estimates, paper_avgs[1] - paper_avgs[0]))
            delta_long += _long_rows(labels, estimates)
    return {"table": pd.DataFrame(table_rows), "deltas": pd.DataFrame(delta_rows),
            "majority": pd.DataFrame(majority_rows), "cells": pd.DataFrame(cell_rows),
            "deltas_by_column": pd.DataFrame(delta_long), "majority_by_column": pd.DataFrame(majority_long)}


def ablation_table(frame: pd.DataFrame, settings: list) -> dict[str, pd.DataFrame]:
    """{"table", "deltas", "majority", "cells", "deltas_by_column", "majority_by_column"}: each setting's cells with
    intervals beside the paper's, each setting minus the reference setting (the first; `full`), paired, beside the
    paper's delta, and each setting's families against their majority answer (as `table1`'s)."""
    paper = pd.read_csv(REFERENCE_DIR / "paper_ablations.csv")
    columns = benchmark_columns(frame)
    rows, cell_rows, delta_rows, delta_long, majority_rows, majority_long = [], [], [], [], [], []
    scores, shares_shown = {}, False
    for setting in settings:
        cell = frame[frame["setting"] == setting.name] if len(frame) else frame
        scores[setting.name], targets = cell_items(cell, columns)
        against, answers = against_majority(scores[setting.name], targets, columns)
        printed, long = _majority_rows({"setting": setting.name}, against, answers,
                                       None if shares_shown else {"setting": "majority answer"})
        shares_shown = shares_shown or bool(answers)
        majority_rows += printed
        majority_long += long
        estimates = cell_estimates(scores[setting.name], columns)
        row = {"group": setting.group, "setting": setting.name,
               "warm-up pairs": cell["warm-up pairs"].iloc[0] if "warm-up pairs" in cell and len(cell) else "-",
               "seeds": len(cell), "items": estimates["Avg"].items if estimates["Avg"] is not None else 0}
        for column in columns:
            values = cell[column].dropna() if column in cell else pd.Series(dtype=float)
            row[column] = _cell_text(estimates[column], values)
            if _paper_label(column):
                row[_paper_label(column)] = _paper_value(paper, {"setting": setting.name}, column)
        rows.append(row)
        cell_rows += _long_rows({"setting": setting.name}, estimates)
    reference = settings[0].name if settings else None
    for setting in settings[1:]:
        estimates = paired_estimates(scores[reference], scores[setting.name], columns)
        labels = {"setting": setting.name, "comparison": f"{setting.name} - {reference}"}
        paper_delta = (_paper_value(paper, {"setting": setting.name}, "Avg")
                       - _paper_value(paper, {"setting": reference}, "Avg"))
        delta_rows.append(_delta_row(labels, estimates, paper_delta))
        delta_long += _long_rows(labels, estimates)
    return {"table": pd.DataFrame(rows), "deltas": pd.DataFrame(delta_rows), "majority": pd.DataFrame(majority_rows),
            "cells": pd.DataFrame(cell_rows), "deltas_by_column": pd.DataFrame(delta_long),
            "majority_by_column": pd.DataFrame(majority_long)}


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table (pandas through tabulate): NaN prints as '-'."""
    return table.astype(object).where(table.notna(), None).to_markdown(
        index=False, tablefmt="github", floatfmt="g", missingval="-")


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (pandas' Styler through jinja2), every LaTeX special character escaped; NaN is '--';
    ± as $\\pm$, which compiles under any input encoding."""
    return table.to_latex(index=False, escape=True, na_rep="--", float_format="{:g}".format).replace("±", r"$\pm$")
