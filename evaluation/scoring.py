"""Per-sample scoring shared by the embedded and the published tasks, and their custom aggregations.

Every task reports, per sample:
  accuracy              1 when the last `<answer>` block answers the ground truth by `prism.rewards`
                        rules (letters, numbers with tolerance, yes/no, multi-part, math-verify fallback),
                        else 0. A response with no response tags at all (an instruct model's plain answer)
                        is read from its last line; one that opened the format without an `<answer>` is
                        wrong. The format is not a gate here: format_valid_rate reports it.
  format_valid_rate     1 when the whole response is format-valid (`prism.response_format.is_format_valid`).
  mean_response_tokens  how many tokens the model generated (up to its eos), as the prism adapters
                        record them (`note_response_tokens`); for a response they did not record (a model
                        lmms-eval builds itself), the text's length in the checkpoint's tokenizer.

Why recorded, not re-encoded: process_results sees only the text, and an untrained model's token string
is far from the tokenizer's canonical encoding of it (random byte tokens decode to replacement characters),
so re-encoding can count more tokens than were generated. The tokenizer for the fallback comes from
`register_tokenizer` (both adapters call it) or from the folder in $PRISM_EVAL_TOKENIZER.
"""

from __future__ import annotations

import math
import os
import threading
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from evaluation.config import EvalError
from prism.response_format import SYSTEM_PROMPT, is_format_valid, read_answer
from prism.rewards import answers_match

TOKENIZER_ENV = "PRISM_EVAL_TOKENIZER"

_lock = threading.Lock()
_tokenizer: Any = None
_tokenizer_source: str | None = None


def register_tokenizer(tokenizer: Any, source: str) -> None:
    """Count response tokens with `tokenizer` (`source` names it in errors and manifests)."""
    global _tokenizer, _tokenizer_source
    with _lock:
        _tokenizer, _tokenizer_source = tokenizer, source


def registered_tokenizer_source() -> str | None:
    return _tokenizer_source


def _get_tokenizer() -> Any:
    global _tokenizer, _tokenizer_source
    if _tokenizer is not None:
        return _tokenizer
    path = os.environ.get(TOKENIZER_ENV)
    if not path:
        raise EvalError(
            "mean_response_tokens needs the evaluated checkpoint's tokenizer: use the prism model adapters "
            f"(prism_hf / prism_vllm) or set ${TOKENIZER_ENV} to a folder with tokenizer files"
        )
    from transformers import AutoTokenizer

    with _lock:
        if _tokenizer is None:
            try:
                _tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as error:
                raise EvalError(f"${TOKENIZER_ENV}={path}: cannot load a tokenizer there ({error})") from None
            _tokenizer_source = path
    return _tokenizer


_generated: dict[str, int] = {}


def clear_response_tokens() -> None:
    """Forget recorded counts (an adapter calls it when a new batch of requests starts)."""
    with _lock:
        _generated.clear()


def note_response_tokens(text: str, count: int) -> None:
    """Record that `text` came from `count` generated tokens (keyed by the stripped text lmms-eval scores)."""
    with _lock:
        _generated[text.strip()] = int(count)


def response_tokens(text: str) -> int:
    with _lock:
        recorded = _generated.get(text.strip())
    if recorded is not None:
        return recorded
    tokenizer = _get_tokenizer()
    with _lock:  # a fast tokenizer object is not meant to be shared by threads mid-call
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def score_response(
    response: str,
    ground_truth: str,
    equivalent_answers: Sequence[str] = (),
    choices: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The three per-sample metrics. (Only metrics: lmms-eval turns every returned key into a result.)"""
    answer = read_answer(response)
    correct = answer is not None and answers_match(answer, str(ground_truth), [str(a) for a in equivalent_answers], choices)
    return {
        "accuracy": 1.0 if correct else 0.0,
        "format_valid_rate": 1.0 if is_format_valid(response) else 0.0,
        "mean_response_tokens": float(response_tokens(response)),
    }


def chat_messages(images: Iterable[Any], text: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """lmms-eval protocol messages: the PRISM system prompt, then the images before the question (as in training)."""
    content: list[dict] = [{"type": "image", "url": image} for image in images]
    content.append({"type": "text", "text": text})
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": content},
    ]


# ---------------------------------------------------------------------------------------------
# Aggregations over groups of questions (custom lmms-eval aggregation functions)
# ---------------------------------------------------------------------------------------------


def all_correct_rate(items: Sequence[Mapping[str, Any]], key: str = "group", size: int | None = None) -> float:
    """Fraction of groups (items sharing `item[key]`) whose every item is correct.

    With `size`, only complete groups count (a --limit may cut a pair in half); NaN when none is complete.
    """
    groups: dict[Any, list[float]] = defaultdict(list)
    for item in items:
        if item.get(key) is None:
            continue
        groups[item[key]].append(float(item["correct"]))
    values = [all(v == 1.0 for v in vs) for vs in groups.values() if size is None or len(vs) == size]
    return sum(values) / len(values) if values else math.nan


def question_pair_acc(items: Sequence[Mapping[str, Any]]) -> float:
    """Embedded presence family: both questions of a yes/no pair right (HallusionBench's qAcc)."""
    return all_correct_rate(items, key="group", size=2)
