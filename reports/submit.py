"""Leaderboard submissions: `prism submit CHECKPOINT` bundles an evaluated checkpoint's predictions, lmms-eval
results and a model card, and `outputs/leaderboard.md` ranks every evaluated checkpoint.

Bundle (outputs/submissions/<checkpoint name>-<hash>/):
  predictions/mmmu_val.json         MMMU's official answer file: {question id: answer}
  predictions/mathvista_testmini.json  MathVista's submission file: {pid: {"response", "extraction"}}
  predictions/<task>.jsonl          every other task: {doc_id, id, prediction, response} per sample
  lmms_eval/<entry>/...results.json  lmms-eval's own results JSON, as written at evaluation time
  README.md                         model card; its `model-index` front matter lists the results
Nothing is evaluated here: the bundle is built from what `prism eval` recorded under outputs/evals/<hash>/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import yaml

from prism.atomic_io import atomic_directory, atomic_write_text
from prism.response_format import read_answer

EVAL_ROOT = Path("outputs/evals")
SUBMISSION_ROOT = Path("outputs/submissions")
LEADERBOARD = Path("outputs/leaderboard.md")
# Official id field of each benchmark's documents, when lmms-eval logged the document.
ID_FIELDS = ("id", "pid", "question_id", "sample_id")


class SubmitError(ValueError):
    """The checkpoint cannot be bundled (not evaluated yet, or no such folder): one line."""


def _samples(entry_dir: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for path in sorted(entry_dir.glob("*_samples_*.jsonl")):
        task = path.stem.split("_samples_", 1)[1]
        found[task] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return found


def _response(sample: dict) -> str:
    response = sample.get("filtered_resps")
    return response[0] if isinstance(response, list) and response else str(response or "")


def _sample_id(sample: dict) -> str:
    doc = sample.get("doc") or {}
    for name in ID_FIELDS:
        if name in doc:
            return str(doc[name])
    return str(sample["doc_id"])


def prediction_files(task: str, samples: list[dict]) -> dict[str, str]:
    """File name -> content for one task's samples, in the benchmark's official format where one exists."""
    rows = [(_sample_id(s), _response(s)) for s in samples]
    if task.endswith("mmmu_val"):
        return {"mmmu_val.json": json.dumps({i: read_answer(r) or "" for i, r in rows}, indent=2)}
    if task.endswith("mathvista_testmini"):
        return {"mathvista_testmini.json": json.dumps(
            {i: {"response": r, "extraction": read_answer(r) or ""} for i, r in rows}, indent=2)}
    lines = [json.dumps({"doc_id": s["doc_id"], "id": i, "prediction": read_answer(r), "response": r})
             for s, (i, r) in zip(samples, rows)]
    return {f"{task}.jsonl": "\n".join(lines) + "\n"}


def _model_card(name: str, checkpoint: Path, rows: pd.DataFrame) -> str:
    results = []
    for (benchmark, task), part in rows[rows["metric"] == "accuracy"].groupby(["benchmark", "task"]):
        results.append({
            "task": {"type": "visual-question-answering", "name": "Visual reasoning"},
            "dataset": {"name": task, "type": benchmark},
            "metrics": [{"type": "accuracy", "value": round(100 * float(part["value"].iloc[-1]), 2),
                         "name": "accuracy (%)"}],
        })
    front = yaml.safe_dump({"model-index": [{"name": name, "results": results}], "tags": ["prism", "qwen3-vl"]},
                           sort_keys=False)
    table = "\n".join(f"| {r['dataset']['name']} | {r['metrics'][0]['value']:.2f} |" for r in results)
    return (f"---\n{front}---\n\n# {name}\n\nCheckpoint `{checkpoint}`, evaluated with lmms-eval through "
            f"`prism eval`.\n\n| task | accuracy (%) |\n|---|---|\n{table}\n")


def submission_bundle(checkpoint: str | Path, out_root: Path = SUBMISSION_ROOT, eval_root: Path = EVAL_ROOT) -> Path:
    from evaluation.runner import checkpoint_digests

    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_dir():
        raise SubmitError(f"{checkpoint}: no such checkpoint folder")
    digest, _ = checkpoint_digests(checkpoint, eval_root / ".hash-cache.json")  # read, never written: a refusal leaves nothing
    entries = [d for d in sorted((eval_root / digest).glob("*")) if (d / "DONE").is_file()]
    if not entries:
        raise SubmitError(f"{checkpoint} has no finished evaluation under {eval_root / digest}: run "
                          f"`prism eval --checkpoint {checkpoint} --suite embedded|paper` first")
    name = f"{checkpoint.parent.name if checkpoint.name == 'model' else checkpoint.name}-{digest[:8]}"
    final = out_root / name
    with atomic_directory(final) as tmp:
        (tmp / "predictions").mkdir()
        rows = []
        for entry in entries:
            for task, samples in _samples(entry).items():
                for file_name, content in prediction_files(task, samples).items():
                    (tmp / "predictions" / file_name).write_text(content, encoding="utf-8")
            (tmp / "lmms_eval" / entry.name).mkdir(parents=True)
            for result in entry.glob("*_results.json"):
                shutil.copy2(result, tmp / "lmms_eval" / entry.name / result.name)
            if (entry / "rows.csv").is_file():
                rows.append(pd.read_csv(entry / "rows.csv"))
        table = pd.concat(rows) if rows else pd.DataFrame(columns=["benchmark", "task", "metric", "value"])
        (tmp / "README.md").write_text(_model_card(name, checkpoint, table), encoding="utf-8")
    return final


def _limited(eval_root: Path, digest: str, eval_key: str) -> bool:
    """Whether the evaluation ran with `--limit` (its manifest, eval.json, records the limit)."""
    for manifest in (eval_root / digest).glob(f"*-{eval_key}/eval.json"):
        return json.loads(manifest.read_text(encoding="utf-8")).get("limit") is not None
    return False


def write_leaderboard(eval_root: Path = EVAL_ROOT, out: Path = LEADERBOARD) -> Path:
    """Rank every evaluated checkpoint by its suite's mean accuracy (embedded: over all samples; paper: over the
    benchmarks) with its standard error, the newest full evaluation per (checkpoint, task): an evaluation run with
    `--limit` counts only where no full one exists, is marked, and ranks below every full one."""
    store = eval_root / "results.csv"
    if not store.is_file():
        raise SubmitError(f"{store}: no evaluations recorded yet (run `prism eval` first)")
    rows = pd.read_csv(store)
    rows = rows[rows["metric"] == "accuracy"].copy()
    rows["full"] = [not _limited(eval_root, d, k) for d, k in zip(rows["checkpoint_hash"], rows["eval_key"])]
    rows = rows.sort_values(["full", "date"]).groupby(["checkpoint_hash", "task"]).tail(1)
    ranked = []
    for (digest, suite), part in rows.groupby(["checkpoint_hash", "suite"]):
        if suite == "embedded":
            overall = part[part["task"] == "prism_embedded"]
            score = float(overall["value"].iloc[-1]) if len(overall) else float("nan")
            stderr = float(overall["stderr"].iloc[-1]) if len(overall) else float("nan")
            n = int(overall["n"].iloc[-1]) if len(overall) else 0
            full = bool(overall["full"].all()) if len(overall) else False
        else:
            per_benchmark = part.groupby("benchmark").agg(value=("value", "mean"), stderr=("stderr", "mean"))
            score, n, full = float(per_benchmark["value"].mean()), int(part["n"].sum()), bool(part["full"].all())
            stderr = float((per_benchmark["stderr"] ** 2).sum() ** 0.5 / len(per_benchmark))
        ranked.append({"checkpoint": part["checkpoint"].iloc[-1], "hash": digest, "suite": suite,
                       "accuracy (%)": round(100 * score, 2), "stderr (%)": round(100 * stderr, 2), "samples": n,
                       "full": full, "evaluated": part["date"].max()})
    board = pd.DataFrame(ranked).sort_values(["suite", "full", "accuracy (%)"], ascending=[True, False, False])
    lines = ["# Local leaderboard", "",
             "Every checkpoint evaluated under outputs/evals, best first per suite; ± is the standard error. "
             "Evaluations run with `--limit` (marked) rank below every full one.", "",
             "| rank | suite | accuracy (%) | samples | checkpoint | hash | evaluated |",
             "|---|---|---|---|---|---|---|"]
    for suite, part in board.groupby("suite", sort=False):
        for rank, row in enumerate(part.itertuples(index=False), start=1):
            limited = "" if row.full else " (--limit)"
            lines.append(f"| {rank} | {suite} | {row[3]:.2f} ± {row[4]:.2f} | {row.samples}{limited} "
                         f"| `{row.checkpoint}` | {row.hash} | {row.evaluated} |")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
