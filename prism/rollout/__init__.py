"""Rollout backends behind one interface: `generate(prompts, n, sampling) -> RolloutBatch`.

`hf` runs anywhere (CPU tests, small runs); `vllm` is the colocated GPU engine (imported lazily);
`backends.make_backend` builds one by name. `prompts` holds the RL prompt stream and the sampling seeds.
"""

from prism.rollout.base import (
    RolloutBackend,
    RolloutBatch,
    RolloutError,
    RolloutPrompt,
    SamplingParams,
    expand_vision_inputs,
    response_mask_and_finish,
)
from prism.rollout.hf import (
    HFRolloutBackend,
    log_probs_and_entropy,
    sequence_log_probs,
    token_log_probs,
    vision_token_ids,
)
from prism.rollout.vllm import VLLMRolloutBackend

__all__ = [
    "HFRolloutBackend",
    "RolloutBackend",
    "RolloutBatch",
    "RolloutError",
    "RolloutPrompt",
    "SamplingParams",
    "VLLMRolloutBackend",
    "expand_vision_inputs",
    "log_probs_and_entropy",
    "response_mask_and_finish",
    "sequence_log_probs",
    "token_log_probs",
    "vision_token_ids",
]
