"""A matrix's report: tables (markdown, CSV, LaTeX), figures (PNG, PDF) and one static HTML page, written to
outputs/reports/<matrix>-<preset>/ from the runs the matrix recorded. Cells not yet evaluated show '-'."""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path

from experiments.matrix import MatrixError, Plan, build_plan, load_matrix
from prism.atomic_io import atomic_directory, atomic_write_text
from prism.data.formats import read_rl_parquet
from reports import figures
from reports.tables import (
    ablation_table,
    read_record,
    results_frame,
    table1,
    to_latex,
    to_markdown,
)

REPORT_ROOT = Path("outputs/reports")


NUMERIC_DELTA_COLUMNS = ("mean", "low", "high", "p", "excludes 0")  # printed inside "delta Avg (ours)"


def _teacher_texts(plan: Plan) -> list[str]:
    """The teacher corpus the alignment stage read (the world's teacher split in the embedded world)."""
    for node in plan.nodes.values():
        if node.kind == "align":
            texts = []
            for name in node.cfg.data_files:
                if Path(name).is_file():
                    texts += [f"{r.teacher_caption}\n{r.teacher_cot}" for r in read_rl_parquet(name)
                              if r.teacher_caption and r.teacher_cot]
            return texts
    return []


def _html(title: str, sections: list[tuple[str, str]], images: list[Path], root: Path) -> str:
    style = ("<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%;margin:1em 0}</style>")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"{style}</head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    if images:
        parts.append("<h2>Figures</h2>")
        for image in images:
            rel = image.relative_to(root).as_posix()
            parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(image.stem)}'>"
                         f"<figcaption>{html.escape(image.stem.replace('_', ' '))} "
                         f"(<a href='{html.escape(rel[:-4])}.pdf'>PDF</a>)</figcaption></figure>")
    # A self-check a headless browser can read back: how many figures actually decoded.
    parts.append("<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
                 "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(name: str, preset: str, seeds: int | None = None) -> Path:
    matrix = load_matrix(name, preset, seeds)
    plan = build_plan(matrix, preset)
    final = REPORT_ROOT / f"{matrix.name}-{preset}"
    frame = results_frame(plan)
    if frame.empty:  # a report of nothing would be all dashes: say what to run instead
        raise MatrixError(f"matrix {matrix.name} ({preset}) has no evaluated cell yet, nothing to report: run "
                          f"`prism matrix run {name} --preset {preset}{f' --seeds {seeds}' if seeds else ''}` first")
    with atomic_directory(final) as tmp:
        frame.to_csv(tmp / "results.csv", index=False)
        sections = []
        if matrix.kind == "table1":
            tables = table1(frame, list(matrix.presets[preset].sizes))
            note = ("Ours: accuracy (%), mean [95% interval] (bootstrap over seeds and items; `items` counts every "
                    "column's). `X (paper)`: the published value of benchmark X, beside the embedded family that "
                    "mirrors it (first size ↔ Qwen3-VL-4B, second ↔ 8B). Deltas: paired on the same items and seeds, "
                    "with a 95% bootstrap interval and a p-value (one seed: paired permutation test, exact (McNemar's) "
                    "where every item the cells score differently moves the mean by as much; several: the same "
                    "bootstrap); * marks an interval that excludes 0 (interval and p-value are computed apart, so at "
                    "the margin an interval just clear of 0 can sit beside a p just above 0.05). Majority: each "
                    "family's accuracy minus the share of its items that one constant answer, the one they most often "
                    "expect, gets right (shares and answers in the first row), with its interval and p-value (one "
                    "seed: exact binomial test); an interval above 0: the family was learned beyond that guess.")
        else:
            tables = ablation_table(frame, matrix.settings)
            note = ("Ours: accuracy (%), mean [95% interval] over seeds and items. `X (paper)`: the published 4B GRPO "
                    "ablation value. Deltas: each setting minus the first, paired on the same items and seeds; * "
                    "marks an interval that excludes 0. Majority: each family's accuracy minus the share of its items "
                    "that the answer they most often expect gets right (first row), with its interval and p-value.")
        for key in ("cells", "deltas_by_column", "majority_by_column"):  # numbers in long form, for other tools
            tables.pop(key).to_csv(tmp / f"{key}.csv", index=False)
        shown = {}
        for key, data in tables.items():
            data.to_csv(tmp / f"{key}.csv", index=False)  # every number; the printed tables show each once
            shown[key] = data.drop(columns=[c for c in NUMERIC_DELTA_COLUMNS if c in data and key == "deltas"])
            atomic_write_text(tmp / f"{key}.tex", to_latex(shown[key]))
            sections.append((key, f"<p>{html.escape(note)}</p>" + shown[key].to_html(index=False, na_rep="-")))
        markdown = "\n\n".join(f"### {key}\n\n{to_markdown(data)}" for key, data in shown.items())
        atomic_write_text(tmp / "table.md", f"# {matrix.name} ({preset})\n\n{note}\n\n{markdown}\n")

        fig_dir = tmp / "figures"
        images = figures.training_figures(plan, fig_dir)  # every stage's logged curves, one line per cell
        images += figures.alignment_figures(plan, fig_dir)
        images += figures.rl_curves(plan, fig_dir)
        images += figures.distribution_figure(plan, _teacher_texts(plan), lambda c: read_record(Path(c.eval_key)), fig_dir)
        images += figures.token_efficiency(frame, fig_dir)
        images += figures.delta_intervals(tables["deltas"], fig_dir)
        pngs = [p for p in images if p.suffix == ".png"]
        cells = f"{len(frame)} of {len(plan.cells)} cells evaluated"
        provenance = (f"<p>{html.escape(cells)}; every number and figure is computed from the runs under "
                      "outputs/stages and outputs/evals.</p>")
        sections.insert(0, ("runs", provenance))
        atomic_write_text(tmp / "index.html", _html(f"PRISM {matrix.name} ({preset})", sections, pngs, tmp))
    return final


def record_reproduce_time(plan: Plan, timings: dict[str, float], wall_seconds: float, cpu_seconds: float | None = None,
                          jobs: int = 1) -> Path:
    """outputs/bench/reproduce-<matrix>-<preset>.json: the wall time, the CPU time of the launcher and every node
    (and so the cores used: cpu_percent), what ran (0 nodes = all cached), and on which host."""
    from prism.runtime import host_info  # torch: imported here, so that `prism report` alone does without it

    by_kind: dict[str, float] = {}
    for key, seconds in timings.items():
        kind = plan.nodes[key].kind
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    out = Path("outputs/bench") / f"reproduce-{plan.matrix.name}-{plan.preset_name}.json"
    record = {
        "matrix": plan.matrix.name, "preset": plan.preset_name, "wall_seconds": round(wall_seconds, 1),
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
        "cpu_percent": None if cpu_seconds is None else round(100 * cpu_seconds / max(wall_seconds, 1e-9)),
        "jobs": jobs,
        "nodes_total": len(plan.nodes), "nodes_run": len(timings),
        "seconds_by_kind": {k: round(v, 1) for k, v in sorted(by_kind.items())},
        "seconds_by_node": {Path(k).name: round(v, 1) for k, v in timings.items()},
        "host": host_info(),
    }
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")  # the latest run
    with open(out.with_name(out.stem + "-history.jsonl"), "a", encoding="utf-8") as history:  # every run
        history.write(json.dumps({**record, "finished_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
                      + "\n")
    return out


__all__ = ["build_report", "record_reproduce_time"]
