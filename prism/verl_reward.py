"""The RLVR reward as a verl reward function: `custom_reward_function.path=<this file>`, `.name=compute_score`.

verl's reward managers (verl.workers.reward_manager.naive, and the experimental reward loop) call
`compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)` once per response, with the
row's `data_source`, `reward_model.ground_truth` and `extra_info` columns and the response decoded without
special tokens. A reward function sees no other column, so our RL parquet (prism.data.formats.write_rl_parquet)
repeats a multiple-choice row's options in `extra_info.choices` (JSON, letter -> option text).

verl loads this file by path, as a module of its own (no package around it): every import here is absolute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from prism.rewards import RewardInputError, compute_reward


def choices_from(extra_info: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The options a row's `extra_info.choices` holds (a JSON string, or an already decoded mapping); None: none."""
    raw = (extra_info or {}).get("choices")
    if raw is None or raw == "":
        return None
    try:
        choices = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, Mapping) or not all(isinstance(text, str) for text in choices.values()):
        raise RewardInputError(f"extra_info.choices: expected a JSON object of letter -> option text, got {raw!r}")
    return dict(choices) or None


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Mapping[str, Any] | None = None,
                  accuracy_weight: float = 0.8, format_weight: float = 0.2, **_verl_kwargs: Any) -> dict[str, Any]:
    """prism.rewards.compute_reward of one response, for verl: `score` is the reward (format-gated, accuracy_weight x
    accuracy + format_weight x format; the published 0.8 / 0.2, as RLVRConfig), `acc`, `format` and `pred` (the
    extracted answer) are what verl logs beside it (`pred` feeds its majority-vote metrics). The weights can be set
    with verl's `custom_reward_function.reward_kwargs`. `_verl_kwargs` takes what newer reward loops pass besides
    (a reward-model router address, its tokenizer), which a rule-based reward does not use; so is `data_source`."""
    result = compute_reward(solution_str, ground_truth, choices=choices_from(extra_info),
                            accuracy_weight=accuracy_weight, format_weight=format_weight)
    return {"score": result.score, "acc": result.accuracy, "format": result.format,
            "pred": result.extracted_answer or ""}
