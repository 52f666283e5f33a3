"""lmms-eval results JSON -> tidy rows, the CSV row store that reports read with pandas, and where an
evaluation's lmms-eval files lie.

An evaluation folder (outputs/evals/<checkpoint-hash>/<entry>-<key>/) is the `--output_path` of lmms-eval's
CLI: its EvaluationTracker writes `<model_name_sanitized>/<date>_results.json` and
`<model_name_sanitized>/<date>_samples_<task>.jsonl` under it (`results_files`, `samples_files` find them;
evaluations written before that layout hold them directly in the folder, and are read too).

lmms-eval's results (what `simple_evaluate` returns and its EvaluationTracker writes as
`<date>_results.json`):
    results:       {task_or_group: {"alias": ..., "<metric>,<filter>": value, "<metric>_stderr,<filter>": value|"N/A", ...}}
    n-samples:     {task: {"original": N, "effective": n}}        (tasks only)
    group_subtasks {group: [task, ...]}
    configs, versions, higher_is_better, config, lmms_eval_version, date, ...

Keys `<metric>_stderr*` (lmms-eval also writes `_stderr_clt` and `_stderr_clustered`) are not metrics;
`stderr` is the `<metric>_stderr` one.

One row per (task or group, metric): checkpoint, checkpoint_hash, suite, benchmark, task, metric, value,
stderr, n, eval_key, date. The filter is dropped from the metric name when it is "none" (ours always).
A group's n is the sum of its tasks' n. stderr is NaN where lmms-eval reports "N/A".
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from filelock import FileLock

from prism.atomic_io import atomic_path

STORE_COLUMNS = (
    "checkpoint", "checkpoint_hash", "suite", "benchmark", "task", "metric", "value", "stderr", "n", "eval_key", "date",
)
_NOT_METRICS = {"alias", "samples", " ", "name", "sample_len", "sample_count"}
# The key under which the published tasks' process_results return each document's own ids (and the fields its
# benchmark's official prediction file needs): lmms-eval 0.7.3 drops `doc` from saved samples but keeps every
# key process_results returns (as its own mmmu_val does with "submission"); reports/submit.py reads it.
SUBMISSION_KEY = "submission"


def _number(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _n_samples(results: Mapping, name: str) -> int | None:
    n_samples = results.get("n-samples", {})
    if name in n_samples:
        entry = n_samples[name]
        return int(entry.get("effective", entry.get("original"))) if isinstance(entry, Mapping) else int(entry)
    subtasks = results.get("group_subtasks", {}).get(name)
    if subtasks:
        counts = [_n_samples(results, task) for task in subtasks]
        return sum(c for c in counts if c is not None) if any(c is not None for c in counts) else None
    return None


def parse_results(results: Mapping | str | Path, **columns: Any) -> list[dict]:
    """Tidy rows from an lmms-eval results dict or results JSON file; `columns` fill the other fields."""
    if not isinstance(results, Mapping):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    rows = []
    for name, metrics in results.get("results", {}).items():
        n = _n_samples(results, name)
        for key, value in metrics.items():
            if key in _NOT_METRICS or "," not in key:
                continue
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric:  # "<m>_stderr", and lmms-eval's "<m>_stderr_clt" / "_stderr_clustered"
                continue
            if not (value is None or isinstance(value, (int, float, str))):  # a list or dict is no score
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({
                **{column: None for column in STORE_COLUMNS},
                "date": results.get("date"),
                **columns,
                "task": name,
                "metric": metric if filter_name in ("none", "") else f"{metric},{filter_name}",
                "value": _number(value),
                "stderr": _number(stderr),
                "n": n,
            })
    return rows


def results_files(entry_dir: Path) -> list[Path]:
    """The lmms-eval results JSON files of an evaluation folder, oldest first (file names start with the date)."""
    return sorted([*entry_dir.glob("*/*_results.json"), *entry_dir.glob("*_results.json")], key=lambda p: p.name)


def samples_files(entry_dir: Path) -> dict[str, Path]:
    """{task: its newest `<date>_samples_<task>.jsonl`} of an evaluation folder."""
    found: dict[str, Path] = {}
    for path in sorted([*entry_dir.glob("*/*_samples_*.jsonl"), *entry_dir.glob("*_samples_*.jsonl")],
                       key=lambda p: p.name):
        found[path.name[: -len(".jsonl")].split("_samples_", 1)[1]] = path
    return found


def date_key(date: Any) -> str:
    """An evaluation date as YYYYMMDDhhmmss, for ordering: lmms-eval's `20260105_143000` (what `prism eval` writes,
    in UTC) and the `20260105T143000_123456Z` of evaluations written before sort together."""
    return re.sub(r"\D", "", str(date))[:14]


def write_rows(path: Path, rows: Iterable[Mapping]) -> None:
    """Write rows as a CSV file (a run's own rows.csv)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=STORE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


def append_to_store(store: Path, rows: Iterable[Mapping]) -> None:
    """Append rows to the store (a CSV, created with its header); safe beside other appending processes."""
    rows = list(rows)
    if not rows:
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{store}.lock"), open(store, "a+", newline="", encoding="utf-8") as handle:
        handle.seek(0, os.SEEK_END)
        writer = csv.DictWriter(handle, fieldnames=STORE_COLUMNS, extrasaction="ignore")
        if handle.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()


def read_store(store: Path | str):
    """The store as a pandas DataFrame, one row per (evaluation, task, metric): a re-appended row replaces its twin."""
    import pandas as pd

    store = Path(store)
    if not store.is_file():
        return pd.DataFrame(columns=list(STORE_COLUMNS))
    frame = pd.read_csv(store)
    return frame.drop_duplicates(subset=["checkpoint_hash", "eval_key", "task", "metric"], keep="last").reset_index(drop=True)


TABLE_ORDER = ("accuracy", "format_valid_rate", "mean_response_tokens")


def metrics_table(rows: Iterable[Mapping], metrics: Iterable[str] | None = None) -> str:
    """A plain-text table: one line per task, one column per metric (value, with stderr where known)."""
    rows = list(rows)
    order: list[str] = []
    found: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    n_of: dict[str, Any] = {}
    for row in rows:
        if row["task"] not in order:
            order.append(row["task"])
        if row["metric"] not in found:
            found.append(row["metric"])
        value, stderr = _number(row["value"]), _number(row["stderr"])
        text = "nan" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        if not math.isnan(stderr):
            text += f" ±{stderr:.3f}" if abs(stderr) < 10 else f" ±{stderr:.1f}"
        cells[(row["task"], row["metric"])] = text
        n_of[row["task"]] = row.get("n")
    # lmms-eval's metric order varies from run to run: a fixed order keeps tables comparable side by side.
    columns = list(metrics) if metrics is not None else sorted(
        found, key=lambda m: (TABLE_ORDER.index(m) if m in TABLE_ORDER else len(TABLE_ORDER), m))
    header = ["task", "n", *columns]
    lines = [[task, "" if n_of.get(task) is None else str(int(_number(n_of[task]))), *(cells.get((task, m), "") for m in columns)]
             for task in order]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = lambda items: "  ".join(str(x).ljust(w) for x, w in zip(items, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])
