"""Hooks of PRISM's published-benchmark tasks (loaded by file path through `!function utils.x`).

The logic lives in evaluation/published.py; this file only names one hook per benchmark and role.
`<b>_process_results` is rule-based; `<b>_process_results_judged` adds `judge_accuracy` and needs a judge.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:  # lmms-eval imports this file by path; the `evaluation` package lives at the repository root
    import evaluation.published  # noqa: F401
except ImportError:  # pragma: no cover - only when the project is not installed with `evaluation`
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from evaluation import published  # noqa: E402

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

    def process_results(doc, results):
        return published.process_results(benchmark, doc, results, judged=False)

    def process_results_judged(doc, results):
        return published.process_results(benchmark, doc, results, judged=True)

    return {
        "doc_to_visual": doc_to_visual,
        "doc_to_text": doc_to_text,
        "doc_to_messages": doc_to_messages,
        "process_results": process_results,
        "process_results_judged": process_results_judged,
    }


for _prefix, _benchmark in _HOOK_NAMES.items():
    for _role, _fn in _hooks(_benchmark).items():
        _fn.__name__ = _fn.__qualname__ = f"{_prefix}_{_role}"
        globals()[f"{_prefix}_{_role}"] = _fn

hallusion_question_pair_acc = published.hallusion_question_pair_acc
hallusion_figure_acc = published.hallusion_figure_acc
