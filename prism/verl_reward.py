"""The RLVR reward as a verl reward function: `custom_reward_function.path=<this file>`, `.name=compute_score`.

verl's reward managers (verl.workers.reward_manager.naive, and the experimental reward loop) call
`compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)` once per response, with the
row's `data_source`, `reward_model.ground_truth` and `extra_info` columns and the response decoded without
special tokens. A reward function sees no other column, so our RL parquet (prism.data.formats.write_rl_parquet)
repeats a multiple-choice row's options in `extra_info.choices` (JSON, letter -> option text).

verl loads this file by path, as a module of its own (no package around it): every import here is absolute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prism.data.formats import parse_choices
from prism.rewards import RewardInputError, compute_reward


def choices_from(extra_info: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The options a row's `extra_info.choices` holds (a JSON string, or an already decoded mapping); None: none."""
    raw = (extra_info or {}).get("choices")
    try:
        return parse_choices(raw) or None
    except ValueError as error:
        raise RewardInputError(f"extra_info.choices: {error}") from None


# What verl's newer reward loops pass besides the row, which a rule-based reward does not use. Anything else (a
# typo in custom_reward_function.reward_kwargs) is refused rather than ignored.
VERL_EXTRA_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Mapping[str, Any] | None = None,
                  accuracy_weight: float = 0.8, format_weight: float = 0.2, **verl_kwargs: Any) -> dict[str, Any]:
    """prism.rewards.compute_reward of one response, for verl: `score` is the reward (format-gated, accuracy_weight x
    accuracy + format_weight x format; the published 0.8 / 0.2, as RLVRConfig), `acc`, `format` and `pred` (the
    extracted answer) are what verl logs beside it (`pred` feeds its majority-vote metrics). The weights can be set
    with verl's `custom_reward_function.reward_kwargs`. `verl_kwargs` takes what newer reward loops pass besides
    (VERL_EXTRA_KWARGS), which a rule-based reward does not use; so is `data_source`."""
    unknown = sorted(set(verl_kwargs) - VERL_EXTRA_KWARGS)
    if unknown:
        raise RewardInputError(f"compute_score: unknown keyword(s) {', '.join(unknown)}: expected accuracy_weight, "
                               f"format_weight or what verl passes ({', '.join(sorted(VERL_EXTRA_KWARGS))})")
    result = compute_reward(solution_str, ground_truth, choices=choices_from(extra_info),
                            accuracy_weight=accuracy_weight, format_weight=format_weight)
    return {"score": result.score, "acc": result.accuracy, "format": result.format,
            "pred": result.extracted_answer or ""}
