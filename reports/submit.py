"""Leaderboard submissions: `prism submit CHECKPOINT` bundles an evaluated checkpoint's predictions, lmms-eval
results and a model card, and `outputs/leaderboard.md` ranks every evaluated checkpoint.

Bundle (outputs/submissions/<checkpoint name>-<hash>/):
  predictions/mmmu_val.json                   MMMU's answer file: {id: answer}
  predictions/mathvista_testmini.json         MathVista's: {pid: {"response", "extraction"}}
  predictions/mathverse_testmini.json         MathVerse's result file (output_testmini.json): its records with
                                              "model_answer" (and "extraction", the <answer> text)
  predictions/mathvision_testmini.jsonl       MATH-V's (outputs/Random-Chance.jsonl): {id, model, response,
                                              model_answer, correct} per line
  predictions/wemath_testmini_reasoning.json  We-Math's result JSON: its records with "response"
  predictions/hallusion_bench_image.json      HallusionBench's HallusionBench_result.json: its records with
                                              "model_prediction"
  predictions/<task>.jsonl                    every other task: {doc_id, id, prediction, response} per sample
  lmms_eval/<entry>/<model>/<date>_results.json  lmms-eval's own results JSON, as written at evaluation time
  README.md                                   model card; its `model-index` front matter lists the results
Official files are keyed by the benchmark's own ids, which the published tasks carry into lmms-eval's saved
samples (evaluation/tasks/published/utils.py, SUBMISSION_FIELDS). Nothing is evaluated here: the bundle is
built from what `prism eval` recorded under outputs/evals/<hash>/.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from huggingface_hub import EvalResult

from evaluation.results import SUBMISSION_KEY, date_key, results_files, samples_files
from prism.atomic_io import atomic_directory, atomic_write_text
from prism.hub import parse_hub_ref
from prism.model_card import PIPELINE, checkpoint_card
from prism.response_format import read_answer

EVAL_ROOT = Path("outputs/evals")
SUBMISSION_ROOT = Path("outputs/submissions")
LEADERBOARD = Path("outputs/leaderboard.md")


class SubmitError(ValueError):
    """The checkpoint cannot be bundled (not evaluated yet, or no such folder): one line."""


def _samples(entry_dir: Path) -> dict[str, list[dict]]:
    return {task: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            for task, path in samples_files(entry_dir).items()}


def _response(sample: dict) -> str:
    response = sample.get("filtered_resps")  # lmms-eval saves a single response unwrapped, in memory a list
    return response[0] if isinstance(response, list) and response else str(response or "")


def _record(sample: dict) -> dict:
    """The benchmark's own fields of a sample's document: the record our published tasks return (lmms-eval 0.7.3
    saves samples without `doc`), else `doc` itself (the samples simple_evaluate returns in memory still hold it)."""
    return sample.get(SUBMISSION_KEY) or sample.get("doc") or {}


# One official file: (record, response, sample) per sample and the model's name -> the file's text.
Writer = Callable[[list[tuple[dict, str, dict]], str], str]


def _mmmu_val(predictions, model):
    return json.dumps({str(r["id"]): read_answer(text) or "" for r, text, _ in predictions}, indent=2)


def _mathvista(predictions, model):
    return json.dumps({str(r["pid"]): {"response": text, "extraction": read_answer(text) or ""}
                       for r, text, _ in predictions}, indent=2)


def _mathverse(predictions, model):
    return json.dumps([{**r, "model_answer": text, "extraction": read_answer(text) or ""}
                       for r, text, _ in predictions], indent=2, ensure_ascii=False)


def _mathvision(predictions, model):
    lines = [json.dumps({"id": str(r["id"]), "model": model, "response": text, "model_answer": read_answer(text) or "",
                         "correct": sample.get("accuracy") == 1.0}, ensure_ascii=False)
             for r, text, sample in predictions]
    return "\n".join(lines) + "\n"


def _wemath(predictions, model):
    return json.dumps([{**r, "response": text} for r, text, _ in predictions], indent=2, ensure_ascii=False)


def _hallusion(predictions, model):
    return json.dumps([{**r, "model_prediction": text} for r, text, _ in predictions], indent=2, ensure_ascii=False)


# Task -> (file name, the record fields the file is keyed by, writer): the formats the benchmarks' leaderboards or
# official evaluation code ask for (evaluation/README.md, "Submissions"). MMMU-Pro and the embedded world have none.
OFFICIAL_FORMATS: dict[str, tuple[str, tuple[str, ...], Writer]] = {
    "prism_mmmu_val": ("mmmu_val.json", ("id",), _mmmu_val),
    "prism_mathvista_testmini": ("mathvista_testmini.json", ("pid",), _mathvista),
    "prism_mathverse_testmini": ("mathverse_testmini.json", ("sample_index", "problem_version"), _mathverse),
    "prism_mathvision_testmini": ("mathvision_testmini.jsonl", ("id",), _mathvision),
    "prism_wemath_testmini_reasoning": ("wemath_testmini_reasoning.json", ("ID", "key"), _wemath),
    "prism_hallusion_bench_image": ("hallusion_bench_image.json",
                                    ("category", "subcategory", "set_id", "figure_id", "question_id"), _hallusion),
}


def prediction_files(task: str, samples: list[dict], model: str = "") -> dict[str, str]:
    """File name -> content for one task's samples, in the benchmark's official format where one exists, keyed by
    the benchmark's own ids (a sample without them is refused: its file would be keyed by lmms-eval's doc_id)."""
    predictions = [(_record(s), _response(s), s) for s in samples]
    if task in OFFICIAL_FORMATS:
        file_name, keys, write = OFFICIAL_FORMATS[task]
        missing = sorted({key for record, _, _ in predictions for key in keys if key not in record})
        if missing:
            raise SubmitError(f"{task}: samples without the benchmark's {', '.join(missing)} (evaluated before "
                              f"the tasks carried them into lmms-eval's samples): delete the evaluation folder and "
                              f"evaluate the checkpoint again")
        return {file_name: write(predictions, model)}
    lines = [json.dumps({"doc_id": s["doc_id"], "id": record.get("id"), "prediction": read_answer(text),
                         "response": text}) for record, text, s in predictions]
    return {f"{task}.jsonl": "\n".join(lines) + "\n"}


def _task_dataset(task: str) -> tuple[str, str | None, str | None]:
    """(dataset, config, split) of one of our lmms-eval tasks or groups as its YAML loads it, for model-index: the
    Hub dataset id where it reads one (a group: one that all its tasks read), else the task's own name (the
    embedded world's files have no Hub id)."""
    from evaluation.dataset_sources import task_datasets
    from evaluation.runner import EMBEDDED_TASKS_DIR, PUBLISHED_TASKS_DIR

    for tasks_dir in (PUBLISHED_TASKS_DIR, EMBEDDED_TASKS_DIR):
        try:
            datasets = task_datasets(task, tasks_dir)
        except KeyError:  # not a task of this folder
            continue
        if len({d.path for d in datasets}) != 1 or parse_hub_ref(datasets[0].path) is None:
            break
        splits = {d.split for d in datasets}
        return (datasets[0].path, datasets[0].name if len(datasets) == 1 else None,
                splits.pop() if len(splits) == 1 else None)
    return task, None, None


def eval_results(rows: pd.DataFrame) -> list[EvalResult]:
    """The model-index entries of recorded evaluation rows: each task's last accuracy, in percent."""
    results = []
    for (_, task), part in rows[rows["metric"] == "accuracy"].groupby(["benchmark", "task"]):
        value = float(part["value"].iloc[-1])
        if not math.isfinite(value):
            continue
        dataset, config, split = _task_dataset(task)
        results.append(EvalResult(
            task_type=PIPELINE, task_name="Visual reasoning", dataset_type=dataset, dataset_name=task,
            dataset_config=config, dataset_split=split, metric_type="accuracy", metric_value=round(100 * value, 2),
            metric_name="accuracy (%)"))
    return results


def _model_card(name: str, checkpoint: Path, rows: pd.DataFrame) -> str:
    """The bundle's README.md: prism.model_card's builder, as every stage's model folder has it, with model-index."""
    return str(checkpoint_card(checkpoint, name, eval_results(rows)))


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
                try:
                    files = prediction_files(task, samples, model=name)
                except SubmitError as error:  # name the evaluation to delete before evaluating again
                    raise SubmitError(f"{entry}: {error}") from None
                for file_name, content in files.items():
                    (tmp / "predictions" / file_name).write_text(content, encoding="utf-8")
            for result in results_files(entry):  # lmms-eval's layout: <model_name_sanitized>/<date>_results.json
                copy = tmp / "lmms_eval" / entry.name / result.relative_to(entry)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(result, copy)
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
    rows["when"] = rows["date"].map(date_key)  # lmms-eval's date format and the one written before sort together
    rows = rows.sort_values(["full", "when"], kind="stable").groupby(["checkpoint_hash", "task"]).tail(1)
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
                       "full": full, "evaluated": part.sort_values("when")["date"].iloc[-1]})
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
