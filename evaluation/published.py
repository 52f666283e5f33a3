"""The seven published benchmarks as PRISM reads them: prompt, images, ground truth, scoring.

Our lmms-eval tasks (evaluation/tasks/published/, `prism_<benchmark>`) keep each benchmark's dataset,
split and question text, and replace the answer handling of lmms-eval's built-ins: the model is
prompted with the PRISM system prompt, its answer is the text of the last `<answer>` block, and it is
scored with `prism.rewards` (letters against the options, numbers with tolerance, yes/no), never by a
model, so `accuracy` needs no API. Benchmarks whose official protocol uses a model judge (MathVista,
MathVerse, HallusionBench) also report `judge_accuracy` when a judge endpoint is configured
(evaluation.judge); without one that metric fails with one line naming it.

Per benchmark, the fields read (as the datasets are published on the hub):
  mathvista_testmini        AI4Math/MathVista[testmini]: query, decoded_image, answer, choices
  mathverse_testmini        CaraJ/MathVerse-lmmseval/testmini: query_cot, image, answer (letter or value)
  mathvision_testmini       MathLLMs/MathVision[testmini]: question, options, decoded_image, answer
  wemath_testmini_reasoning We-Math/We-Math[testmini]: question, option, image_path, answer (letter)
  mmmu_val                  MMMU validation: question, options (a Python list literal), image_1..7, answer
  mmmu_pro                  MMMU/MMMU_Pro standard (10 options) / vision [test]: as MMMU; vision: image only
  hallusion_bench_image     HallusionBench[image]: question, image, gt_answer (1 yes / 0 no), and the ids
                            that group questions (category, subcategory, set_id, figure_id, question_id)
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Callable

from evaluation.judge import judge_equivalent, require_judge
from evaluation.scoring import all_correct_rate, chat_messages, score_response
from prism.response_format import read_answer

LETTERS = [chr(ord("A") + i) for i in range(26)]


@dataclass(frozen=True)
class Target:
    ground_truth: str
    equivalents: tuple[str, ...] = ()
    choices: dict[str, str] | None = None

    @property
    def reference(self) -> str:
        """The ground truth as a judge should read it: for a choice, its letter with the option's text."""
        if self.choices and self.ground_truth in self.choices:
            return f"{self.ground_truth} ({self.choices[self.ground_truth]})"
        for letter, text in (self.choices or {}).items():
            if text.strip() == self.ground_truth.strip():
                return f"{letter} ({text})"
        return self.ground_truth


def _options(options: list[str]) -> dict[str, str]:
    return {LETTERS[i]: str(option) for i, option in enumerate(options)}


def _options_block(options: dict[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def _literal_list(value: Any) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value)
            return list(parsed) if isinstance(parsed, (list, tuple)) else [value]
        except (ValueError, SyntaxError):
            return [value]
    return [] if value in (None, "") else [value]


def _image(value: Any) -> list:
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return [value.convert("RGB") if hasattr(value, "convert") else value]


# --- MathVista ---------------------------------------------------------------------------------


def mathvista_visual(doc):
    return _image(doc.get("decoded_image"))


def mathvista_text(doc):
    return doc["query"]  # the benchmark's own prompt: hint, question and lettered choices


def mathvista_target(doc) -> Target:
    choices = _options(doc["choices"]) if doc.get("choices") else None
    return Target(str(doc["answer"]), choices=choices)  # for choices the answer is the option's text


# --- MathVerse ---------------------------------------------------------------------------------


def mathverse_visual(doc):
    return _image(doc.get("image"))


def mathverse_text(doc):
    return doc.get("query_cot") or doc["question"]


def mathverse_target(doc) -> Target:
    return Target(str(doc["answer"]))


# --- MathVision --------------------------------------------------------------------------------


def mathvision_visual(doc):
    return _image(doc.get("decoded_image"))


def mathvision_text(doc):
    options = _options(doc.get("options") or [])
    if options:
        return f"{doc['question']}\nChoices:\n{_options_block(options)}\nAnswer with the option's letter."
    return doc["question"]


def mathvision_target(doc) -> Target:
    options = _options(doc.get("options") or [])
    return Target(str(doc["answer"]), choices=options or None)


# --- WeMath ------------------------------------------------------------------------------------


def wemath_visual(doc):
    return _image(doc.get("image_path"))


def wemath_text(doc):
    return f"{doc['question']}\n{doc['option']}".strip()


def wemath_target(doc) -> Target:
    return Target(str(doc["answer"]))


# --- MMMU (val) and MMMU-Pro -------------------------------------------------------------------

_IMAGE_REF = re.compile(r"<image (\d+)>")


def _referenced_images(doc, texts: list[str]) -> list:
    numbers = sorted({int(n) for text in texts for n in _IMAGE_REF.findall(text)})
    return [image for n in numbers for image in _image(doc.get(f"image_{n}"))]


def mmmu_visual(doc):
    if "question" not in doc:  # MMMU-Pro vision: question and options are drawn in the one image
        return _image(doc.get("image"))
    return _referenced_images(doc, [doc["question"], str(doc.get("options", ""))])


def mmmu_text(doc):
    if "question" not in doc:
        return "Answer the multiple-choice question shown in the image with the option's letter."
    options = _options(_literal_list(doc.get("options")))
    if doc.get("question_type", "multiple-choice") == "multiple-choice" and options:
        return f"{doc['question']}\nOptions:\n{_options_block(options)}\nAnswer with the option's letter."
    return doc["question"]


def mmmu_target(doc) -> Target:
    options = _options(_literal_list(doc.get("options"))) or None
    answers = [str(a) for a in _literal_list(doc["answer"])] or [str(doc["answer"])]
    return Target(answers[0], tuple(answers[1:]), options)


# --- HallusionBench ----------------------------------------------------------------------------


def hallusion_visual(doc):
    return _image(doc.get("image"))


def hallusion_text(doc):
    return doc["question"]


def hallusion_target(doc) -> Target:
    return Target("yes" if str(doc["gt_answer"]).strip() == "1" else "no")


def _hallusion_keys(doc) -> dict:
    question = "_".join(str(doc[k]) for k in ("category", "subcategory", "set_id", "question_id"))
    figure = "_".join(str(doc[k]) for k in ("category", "subcategory", "set_id", "figure_id"))
    no_figure = str(doc["category"]) == "VS" and str(doc["figure_id"]) == "0"
    return {"question": question, "figure": None if no_figure else figure}


def hallusion_question_pair_acc(items) -> float:
    """qAcc: every version (figure) of a question answered right."""
    return all_correct_rate(items, key="group")


def hallusion_figure_acc(items) -> float:
    """fAcc: every question about a figure answered right (VS questions without a figure left out)."""
    return all_correct_rate(items, key="group")


# --- the table and the hooks -------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str
    visual: Callable[[dict], list]
    text: Callable[[dict], str]
    target: Callable[[dict], Target]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("mathvista_testmini", "prism_mathvista_testmini", mathvista_visual, mathvista_text, mathvista_target),
        Benchmark("mathverse_testmini", "prism_mathverse_testmini", mathverse_visual, mathverse_text, mathverse_target),
        Benchmark("mathvision_testmini", "prism_mathvision_testmini", mathvision_visual, mathvision_text, mathvision_target),
        Benchmark("wemath_testmini_reasoning", "prism_wemath_testmini_reasoning", wemath_visual, wemath_text, wemath_target),
        Benchmark("mmmu_val", "prism_mmmu_val", mmmu_visual, mmmu_text, mmmu_target),
        Benchmark("mmmu_pro", "prism_mmmu_pro", mmmu_visual, mmmu_text, mmmu_target),
        Benchmark("hallusion_bench_image", "prism_hallusion_bench_image", hallusion_visual, hallusion_text, hallusion_target),
    )
}


def doc_to_messages(benchmark: str, doc: dict) -> list[dict]:
    b = BENCHMARKS[benchmark]
    return chat_messages(b.visual(doc), b.text(doc))


def process_results(benchmark: str, doc: dict, results: list[str], judged: bool) -> dict:
    """Rule-based metrics of one response; with `judged`, the judge's verdict as `judge_accuracy` too."""
    b = BENCHMARKS[benchmark]
    target = b.target(doc)
    scores = score_response(results[0], target.ground_truth, target.equivalents, target.choices)
    if judged:
        judge = require_judge("judge_accuracy", b.task)
        verdict = judge_equivalent(judge, b.text(doc), target.reference, read_answer(results[0]))
        scores["judge_accuracy"] = 1.0 if verdict else 0.0
    if benchmark == "hallusion_bench_image":
        keys = _hallusion_keys(doc)
        scores["question_pair_acc"] = {"group": keys["question"], "correct": scores["accuracy"]}
        scores["figure_acc"] = {"group": keys["figure"], "correct": scores["accuracy"]}
    return scores
