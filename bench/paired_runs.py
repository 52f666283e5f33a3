"""Two runs of one matrix, cell by cell, paired on the items and seeds both evaluated: run B minus run A.

For a change that keeps the held-out items and the seeds (a world's SFT mix, a stage setting), run the matrix in two
folders (`prism matrix run` or `just reproduce` in each clone), then compare them. Each cell of B that A also holds
gets, per family and for Avg, B's accuracy and B - A with the report's paired bootstrap interval and p-value
(`reports.stats.paired_difference`, through `reports.tables.paired_estimates`); `*` marks an interval that
excludes 0. Prints a markdown table and writes the numbers as JSON.

    .venv/bin/python bench/paired_runs.py RUN_A RUN_B [--report table1-embedded] [--out outputs/bench/paired-runs.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import pandas as pd

from prism.atomic_io import atomic_write_text
from reports.stats import estimate_json, format_estimate
from reports.tables import benchmark_columns, cell_estimates, cell_items, paired_estimates

LABELS = ("size", "pipeline", "rl", "setting")


def run_cells(run: Path, report: str) -> tuple[dict[tuple, dict], list[str]]:
    """Per cell (its labels), per column a frame [seed x doc_id] of item scores in %, from the run's report."""
    results = run / "outputs" / "reports" / report / "results.csv"
    if not results.is_file():
        raise SystemExit(f"paired_runs: {results} not found: run `prism report` for that run first")
    frame = pd.read_csv(results)
    columns = benchmark_columns(frame)
    labels = [label for label in LABELS if label in frame]
    cells = {}
    with contextlib.chdir(run):  # records and evaluation folders are named relative to the run's folder
        for key, cell in frame.groupby(labels, sort=False):
            scores, _ = cell_items(cell, columns)
            if scores is None:
                raise SystemExit(f"paired_runs: {run}: cell {key} has no per-sample scores")
            cells[key] = scores
    return cells, columns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--report", default="table1-embedded", help="the report folder under outputs/reports/")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/paired-runs.json"))
    args = parser.parse_args(argv)

    cells_a, columns = run_cells(args.run_a, args.report)
    cells_b, _ = run_cells(args.run_b, args.report)
    rows = []
    print("| cell | " + " | ".join(f"{c}: B, B − A" for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for key, b in cells_b.items():
        if key not in cells_a:
            continue
        accuracy, delta = cell_estimates(b, columns), paired_estimates(cells_a[key], b, columns)
        rows.append({"cell": list(key), **{
            c: {"accuracy": estimate_json(accuracy[c]), "delta": estimate_json(delta[c])} for c in columns}})
        texts = [f"{accuracy[c].mean:.1f}, {format_estimate(delta[c], signed=True)}" for c in columns]
        print(f"| {' / '.join(map(str, key))} | " + " | ".join(texts) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"run_a": str(args.run_a), "run_b": str(args.run_b),
                                            "report": args.report, "cells": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
