"""Evaluations run by hand, compared paired on the same items and seeds: each label minus the first.

For checkpoints trained outside a matrix (a stage rerun with another data file or schedule), evaluate each with
`prism eval --checkpoint ... --suite embedded --out DIR`, then name each variant's evaluation folders
(`DIR/<checkpoint hash>`), one per training seed, in the same seed order for every label. Per label, each column's
accuracy with its interval over seeds and items (`reports.tables.cell_estimates`); per later label, its paired
difference from the first label (`reports.tables.paired_estimates`: the report's two-level bootstrap and p-value) on
the seeds and items both hold; `*` marks an interval that excludes 0. Prints a markdown table and writes the numbers
as JSON.

    .venv/bin/python bench/paired_evals.py base=outputs/evals/1d37,outputs/evals/37dc \\
        longer=outputs/evals/3807,outputs/evals/ebb5 [--out outputs/bench/paired-evals.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from prism.atomic_io import atomic_write_text
from reports.stats import estimate_json, format_estimate
from reports.tables import FAMILIES, cell_estimates, evaluation_scores, paired_estimates

AVG = "Avg"


def label_cell(spec: str) -> tuple[str, dict[str, pd.DataFrame]]:
    """`LABEL=DIR[,DIR...]` -> the label and, per column, a frame [seed x doc_id] of scores in %."""
    label, sep, listed = spec.partition("=")
    if not sep or not label or not listed:
        raise SystemExit(f"paired_evals: {spec!r}: expected LABEL=DIR[,DIR...]")
    folders = listed.split(",")
    try:
        per_seed = [evaluation_scores(Path(folder)) for folder in folders]
    except ValueError as error:
        raise SystemExit(f"paired_evals: {error}") from None
    # the report's column order, which its bootstrap draws follow
    columns = [f for f in FAMILIES if f in per_seed[0]] + sorted(set(per_seed[0]) - set(FAMILIES))
    for folder, scores in zip(folders, per_seed):
        if set(scores) != set(columns):
            raise SystemExit(f"paired_evals: {folder}: columns {sorted(scores)}, expected {sorted(columns)} as in "
                             f"{label}'s first folder")
    return label, {c: 100 * pd.DataFrame({seed: s[c] for seed, s in enumerate(per_seed)}).T.sort_index(axis=1)
                   for c in columns}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", nargs="+", metavar="LABEL=DIR[,DIR...]", help="the first label is the baseline")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/paired-evals.json"))
    args = parser.parse_args(argv)
    if len(args.labels) < 2:
        raise SystemExit("paired_evals: name at least two labels, the first being the baseline")

    cells = dict(label_cell(spec) for spec in args.labels)
    if len(cells) != len(args.labels):
        raise SystemExit("paired_evals: a label is named twice; give each variant its own label")
    (base, base_cell), *others = cells.items()
    columns = [*base_cell, AVG]
    for label, cell in others:
        if list(cell) != list(base_cell):
            raise SystemExit(f"paired_evals: {label} holds columns {list(cell)}, {base} holds {list(base_cell)}")
    print("| label | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    out = {"baseline": base, "labels": {}}
    for label, cell in cells.items():
        accuracy = cell_estimates(cell, columns)
        delta = paired_estimates(base_cell, cell, columns) if label != base else dict.fromkeys(columns)
        seeds = len(next(iter(cell.values())))
        out["labels"][label] = {"seeds": seeds, **{
            c: {"accuracy": estimate_json(accuracy[c]), "delta": estimate_json(delta[c])} for c in columns}}
        texts = [format_estimate(accuracy[c]) + ("" if delta[c] is None else
                                                  f"; {format_estimate(delta[c], signed=True)}") for c in columns]
        counted = f"{seeds} seed{'s' if seeds != 1 else ''}{'' if label == base else ', minus ' + base}"
        print(f"| {label} ({counted}) | " + " | ".join(texts) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
