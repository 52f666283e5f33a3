"""Hooks of PRISM's published-benchmark tasks (loaded by file path through `!function utils.x`).

The logic lives in evaluation/published.py; this file only names one hook per benchmark and role.
`<b>_process_results` is rule-based; `<b>_process_results_judged` adds `judge_accuracy` and needs a judge.
Both also return the document's submission record (`SUBMISSION_FIELDS`) under `submission`: lmms-eval 0.7.3
saves samples without their document, but with every key process_results returned, so the benchmark's own ids
reach the saved samples and `prism submit` (reports/submit.py) keys the official prediction files by them.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:  # lmms-eval imports this file by path; the `evaluation` package lives at the repository root
    import evaluation.published  # noqa: F401
except ImportError:  # pragma: no cover - only when the project is not installed with `evaluation`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from evaluation import published  # noqa: E402
from evaluation.results import SUBMISSION_KEY  # noqa: E402

# Per benchmark, the fields of its own documents that a submission needs: its ids and, where the official
# prediction file repeats the benchmark's record (MathVerse, WeMath, HallusionBench), that record's fields;
# images never (the files name no image, or a path the hub datasets replace with the picture).
SUBMISSION_FIELDS: dict[str, tuple[str, ...]] = {
    "mathvista_testmini": ("pid",),
    "mathverse_testmini": ("sample_index", "problem_index", "problem_version", "question", "answer", "question_type",
                           "metadata", "query_wo", "query_cot"),
    "mathvision_testmini": ("id",),
    "wemath_testmini_reasoning": ("ID", "split", "knowledge concept", "question", "option", "answer", "key",
                                  "question number", "knowledge concept description"),
    "mmmu_val": ("id",),
    "mmmu_pro": ("id",),
    "hallusion_bench_image": ("category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note",
                              "question_id", "question", "gt_answer_details", "gt_answer", "filename"),
}


def submission_record(benchmark: str, doc: dict) -> dict:
    """The fields of `doc` named in SUBMISSION_FIELDS[benchmark] that the document has."""
    return {name: doc[name] for name in SUBMISSION_FIELDS[benchmark] if name in doc}


def process_results(benchmark: str, doc: dict, results: list[str], judged: bool) -> dict:
    """published.process_results and the document's submission record; lmms-eval aggregates only the keys in
    the task's metric_list (the record appears in the results JSON as an empty `submission,none`)."""
    scores = published.process_results(benchmark, doc, results, judged=judged)
    return {**scores, SUBMISSION_KEY: submission_record(benchmark, doc)}

_HOOK_NAMES = {
    "mathvista": "mathvista_testmini",
    "mathverse": "mathverse_testmini",
    "mathvision": "mathvision_testmini",
    "wemath": "wemath_testmini_reasoning",
    "mmmu": "mmmu_val",
    "mmmu_pro": "mmmu_pro",
    "hallusion": "hallusion_bench_image",
}


def _hooks(benchmark: str) -> dict:
    b = published.BENCHMARKS[benchmark]

    def doc_to_visual(doc):
        return b.visual(doc)

    def doc_to_text(doc, lmms_eval_specific_kwargs=None):
        return b.text(doc)

    def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
        return published.doc_to_messages(benchmark, doc)

    def rule_based(doc, results):
        return process_results(benchmark, doc, results, judged=False)

    def judged(doc, results):
        return process_results(benchmark, doc, results, judged=True)

    return {
        "doc_to_visual": doc_to_visual,
        "doc_to_text": doc_to_text,
        "doc_to_messages": doc_to_messages,
        "process_results": rule_based,
        "process_results_judged": judged,
    }


for _prefix, _benchmark in _HOOK_NAMES.items():
    for _role, _fn in _hooks(_benchmark).items():
        _fn.__name__ = _fn.__qualname__ = f"{_prefix}_{_role}"
        globals()[f"{_prefix}_{_role}"] = _fn

hallusion_question_pair_acc = published.hallusion_question_pair_acc
hallusion_figure_acc = published.hallusion_figure_acc
