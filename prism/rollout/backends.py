"""Building a rollout backend by name: `hf` (any device; shares the trainer's module) or `vllm` (a colocated
GPU engine built from a checkpoint folder, imported only when asked for)."""

from __future__ import annotations

from typing import Any

from prism.rollout.base import RolloutBackend, RolloutError
from prism.rollout.hf import HFRolloutBackend


def make_backend(name: str, model: Any, processor: Any, *, model_path: str | None, compute_dtype: str,
                 path_field: str = "model.path") -> RolloutBackend:
    """The `name` backend generating with `model` (hf) or with the checkpoint at `model_path` (vllm), both in
    `compute_dtype` (the model config's: bfloat16 under mixed precision, not the float32 master weights' dtype).

    Old log-probs are recomputed by the trainers with their own model (prism.stages.policy_update), so neither
    backend returns the sampler's behaviour log-probs.
    `path_field` names the config field that sets `model_path`, for the error a user sees."""
    if name == "hf":
        processor.tokenizer.padding_side = "left"
        return HFRolloutBackend(model, processor, behaviour_log_probs=False, compute_dtype=compute_dtype)
    if name == "vllm":
        if model_path is None:
            raise RolloutError(f"rollout backend vllm needs {path_field} (vLLM builds its engine from a checkpoint folder)")
        from prism.rollout.vllm import VLLMRolloutBackend

        return VLLMRolloutBackend(model_path, processor, dtype=compute_dtype, behaviour_log_probs=False)
    raise RolloutError(f"unknown rollout backend {name!r}; known: hf, vllm")
