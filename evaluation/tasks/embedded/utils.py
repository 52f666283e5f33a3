"""Hooks of the embedded suite's lmms-eval tasks (loaded by file path through `!function utils.x`).

Columns of `bench/<family>.parquet` (prism.data.export): id, family, question, image {bytes, path},
answer, answer_type (integer|number|yes_no|letter), choices (JSON object letter -> text, or null),
pair_id (presence questions come in yes/no pairs on one image).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:  # lmms-eval imports this file by path; the `evaluation` package lives at the repository root
    import evaluation.scoring  # noqa: F401
except ImportError:  # pragma: no cover - only when the project is not installed with `evaluation`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from evaluation.results import SUBMISSION_KEY  # noqa: E402
from evaluation.scoring import chat_messages, question_pair_acc, score_response  # noqa: E402

__all__ = [
    "doc_to_messages",
    "doc_to_text",
    "doc_to_visual",
    "process_docs",
    "process_results",
    "process_results_presence",
    "question_pair_acc",
]


def process_docs(dataset):
    """Decode the PNG struct column as images (parquet written by pyarrow carries no datasets features)."""
    import datasets

    if not isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    """PRISM system prompt, then the image, then the question: the layout the policy was trained on."""
    return chat_messages(doc_to_visual(doc), doc_to_text(doc))


def _choices(doc):
    return json.loads(doc["choices"]) if doc.get("choices") else None


def process_results(doc, results):
    """The scores, and the item's own id under SUBMISSION_KEY: lmms-eval keeps it in the saved samples (which
    drop `doc`), so `prism submit` keys predictions by it (lmms-eval aggregates only the metric_list keys)."""
    return {**score_response(results[0], doc["answer"], choices=_choices(doc)), SUBMISSION_KEY: {"id": doc["id"]}}


def process_results_presence(doc, results):
    scores = process_results(doc, results)
    scores["question_pair_acc"] = {"group": doc["pair_id"], "correct": scores["accuracy"]}
    return scores
