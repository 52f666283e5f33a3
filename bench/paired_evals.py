"""Evaluations run by hand, compared paired on the same items and seeds: each label minus the first.

For checkpoints trained outside a matrix (a stage rerun with another data file or schedule), evaluate each with
`prism eval --checkpoint ... --suite embedded --out DIR`, then name each variant's evaluation folders
(`DIR/<checkpoint hash>`), one per training seed, in the same seed order for every label. Per label, each column's
accuracy with its interval over seeds and items (`reports.tables.cell_estimates`); per later label, its paired
difference from the first label (`reports.tables.paired_estimates`: the report's two-level bootstrap and p-value) on
the seeds and items both hold; `*` marks an interval that excludes 0. Prints a markdown table and writes the numbers
as JSON.

`--learned COLUMN` counts, per label, the runs (seeds) that learned a column: those whose accuracy on it minus the
share of its items that the one most expected answer gets right (`reports.tables.against_majority`, the report's
interval) has an interval above 0. Each later label's count is set against the first's by Fisher's exact test
(`scipy.stats.fisher_exact`): a change that makes a family learned more reliably shows there, over many seeds, where a
mean over seeds mixes runs that learned it with runs that did not.

    .venv/bin/python bench/paired_evals.py base=outputs/evals/1d37,outputs/evals/37dc \\
        longer=outputs/evals/3807,outputs/evals/ebb5 [--learned presence] [--out outputs/bench/paired-evals.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from scipy import stats

from prism.atomic_io import atomic_write_text
from reports.stats import estimate_json, format_estimate
from reports.tables import FAMILIES, against_majority, cell_estimates, evaluation_items, paired_estimates

AVG = "Avg"


def label_cell(spec: str) -> tuple[str, dict[str, pd.DataFrame], list[tuple[str, dict | None]]]:
    """`LABEL=DIR[,DIR...]` -> the label; per column, a frame [seed x doc_id] of scores in %; and per seed, its
    folder and its items' reference answers (None where the samples carry none)."""
    label, sep, listed = spec.partition("=")
    if not sep or not label or not listed:
        raise SystemExit(f"paired_evals: {spec!r}: expected LABEL=DIR[,DIR...]")
    folders = listed.split(",")
    try:
        items = [evaluation_items(Path(folder)) for folder in folders]
    except ValueError as error:
        raise SystemExit(f"paired_evals: {error}") from None
    per_seed = [scores for scores, _ in items]
    # the report's column order, which its bootstrap draws follow
    columns = [f for f in FAMILIES if f in per_seed[0]] + sorted(set(per_seed[0]) - set(FAMILIES))
    for folder, scores in zip(folders, per_seed):
        if set(scores) != set(columns):
            raise SystemExit(f"paired_evals: {folder}: columns {sorted(scores)}, expected {sorted(columns)} as in "
                             f"{label}'s first folder")
    return label, {c: 100 * pd.DataFrame({seed: s[c] for seed, s in enumerate(per_seed)}).T.sort_index(axis=1)
                   for c in columns}, [(folder, targets) for folder, (_, targets) in zip(folders, items)]


def learned_runs(column: str, cells: dict[str, dict[str, pd.DataFrame]],
                 targets: dict[str, list[tuple[str, dict | None]]]) -> dict[str, dict]:
    """Per label, each seed's `column` above its majority answer and whether that is learned (the interval excludes
    0 from above), the count of learned runs, and Fisher's exact p of that count against the first label's."""
    out: dict[str, dict] = {}
    for label, cell in cells.items():
        if column not in cell:
            raise SystemExit(f"paired_evals: --learned {column}: {label}'s evaluations hold no such column "
                             f"({', '.join(cell)})")
        runs = []
        for seed, (folder, seed_targets) in enumerate(targets[label]):
            if seed_targets is None:
                raise SystemExit(f"paired_evals: --learned {column}: {folder}: its samples carry no reference answers")
            frame = cell[column].iloc[[seed]]
            estimates, answers = against_majority({column: frame}, seed_targets, [column])
            estimate = estimates[column]
            if estimate is None:
                raise SystemExit(f"paired_evals: --learned {column}: {folder}: no reference answer for some item")
            runs.append({"folder": folder, "accuracy": float(frame.to_numpy().mean()),
                         "majority_answer": answers[column][0], "majority_share": answers[column][1],
                         "above_majority": estimate_json(estimate), "learned": bool(estimate.low > 0)})
        out[label] = {"runs": runs, "learned": sum(run["learned"] for run in runs), "of": len(runs)}
    (_, first), *others = out.items()
    for _, result in others:
        table = [[run["learned"], run["of"] - run["learned"]] for run in (first, result)]
        result["fisher_p"] = float(stats.fisher_exact(table).pvalue)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", nargs="+", metavar="LABEL=DIR[,DIR...]", help="the first label is the baseline")
    parser.add_argument("--learned", metavar="COLUMN", help="count the runs of each label that learned this column")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/paired-evals.json"))
    args = parser.parse_args(argv)
    if len(args.labels) < 2:
        raise SystemExit("paired_evals: name at least two labels, the first being the baseline")

    read = [label_cell(spec) for spec in args.labels]
    cells = {label: cell for label, cell, _ in read}
    targets = {label: seed_targets for label, _, seed_targets in read}
    if len(cells) != len(args.labels):
        raise SystemExit("paired_evals: a label is named twice; give each variant its own label")
    (base, base_cell), *others = cells.items()
    columns = [*base_cell, AVG]
    for label, cell in others:
        if list(cell) != list(base_cell):
            raise SystemExit(f"paired_evals: {label} holds columns {list(cell)}, {base} holds {list(base_cell)}")
    learned = None if args.learned is None else learned_runs(args.learned, cells, targets)  # its mistakes first
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
    if learned is not None:
        out["learned"] = {"column": args.learned, "labels": learned}
        print(f"\n| label | {args.learned} per seed (majority answer's share; x: not above it) | learned | "
              f"Fisher's exact p against {base} |")
        print("|---|---|---|---|")
        for label, result in learned.items():
            per_seed = " / ".join(f"{run['accuracy']:.1f}{'' if run['learned'] else ' x'}" for run in result["runs"])
            shares = sorted({f"{run['majority_share']:.1f}" for run in result["runs"]})
            p = "" if label == base else f"{result['fisher_p']:.2g}"
            print(f"| {label} | {per_seed} ({', '.join(shares)}) | {result['learned']} of {result['of']} | {p} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
