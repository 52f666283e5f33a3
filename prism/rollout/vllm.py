"""Rollouts with a colocated `vllm.LLM` on GPU nodes (design; NOT exercised by the CPU test suite).

Design (the TRL/verl "colocate" pattern):
- one `vllm.LLM` lives in the trainer process on the same GPU(s), built from the policy's checkpoint folder
  with `enable_sleep_mode=True`; between phases `sleep()` frees its KV cache (level 1 keeps weights) and
  `wake_up()` brings it back before generating;
- `update_weights(model)` pushes the trainer's current parameters into the engine's model with
  `load_weights` (no checkpoint round-trip); with FSDP the caller must gather full parameters first;
- the engine runs in the trainer's compute dtype (`dtype`, bfloat16 under mixed precision), not in the dtype of
  its float32 master weights: they are cast one tensor at a time as they are pushed;
- each prompt goes in once with `SamplingParams(n=...)` and its PIL images as `multi_modal_data`, so each
  image is processed once per prompt; token ids, finish reasons and sampled-token log-probs come back and
  are packed into the same `RolloutBatch` as the HF backend (the vision inputs for re-scoring come from our
  own processor, once per prompt).

Honest limits: vLLM is not installed here and there is no GPU in CI, so none of this has been run. Which
distribution vLLM's returned log-probs refer to depends on its `logprobs_mode` (raw logits by default in
recent versions, i.e. NOT temperature-scaled); we request "processed_logprobs" where supported, but the
trainer should treat them as approximate and recompute old log-probs with `prism.rollout.sequence_log_probs`
(as verl does) until this has been checked on a GPU node.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from prism.rollout.base import (
    RolloutBatch,
    RolloutError,
    RolloutPrompt,
    SamplingParams,
    response_mask_and_finish,
)

VLLM_MISSING = "vLLM is not installed: pip install 'prism[gpu]' on a GPU node, or use rollout_backend=hf"


def _import_vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise RolloutError(VLLM_MISSING) from None


class VLLMRolloutBackend:
    """A colocated vLLM engine behind the RolloutBackend interface (untested here; see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        processor: Any,
        *,
        gpu_memory_utilization: float = 0.4,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        enable_sleep_mode: bool = True,
    ):
        vllm = _import_vllm()
        self._vllm = vllm
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.enable_sleep_mode = enable_sleep_mode
        self.dtype = getattr(torch, dtype)
        self.llm = vllm.LLM(
            model=str(model_path),
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            limit_mm_per_prompt={"image": 8},
            logprobs_mode="processed_logprobs",
        )
        self.asleep = False

    def sleep(self) -> None:
        if self.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def update_weights(self, model: Any) -> None:
        """Load the trainer's parameters into the engine (full, unsharded tensors expected), cast to its dtype."""
        self.wake_up()
        weights = ((name, param.detach().to(self.dtype)) for name, param in model.state_dict().items())
        engine_model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        engine_model.load_weights(weights)
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompts: list[RolloutPrompt], n: int, sampling: SamplingParams) -> RolloutBatch:
        self.wake_up()
        params = self._vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.min_new_tokens,
            seed=sampling.seed,
            logprobs=0,  # the sampled token's log-prob only
        )
        texts = [self.processor.apply_chat_template(p.to_messages(), add_generation_prompt=True) for p in prompts]
        requests = [
            {"prompt": text, "multi_modal_data": {"image": p.images}} if p.images else {"prompt": text}
            for text, p in zip(texts, prompts)
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        images = [image for p in prompts for image in p.images]
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        pad = self.tokenizer.pad_token_id
        rows = [completion for output in outputs for completion in output.outputs]  # prompt-major
        resp_len = max(len(c.token_ids) for c in rows)
        response_ids = torch.full((len(rows), resp_len), pad, dtype=torch.long)
        log_probs = torch.zeros((len(rows), resp_len), dtype=torch.float32)
        for r, c in enumerate(rows):
            response_ids[r, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            for t, (token, entry) in enumerate(zip(c.token_ids, c.logprobs or [])):
                log_probs[r, t] = entry[token].logprob
        stop_ids = [self.tokenizer.eos_token_id]
        response_mask, _ = response_mask_and_finish(response_ids, stop_ids)
        return RolloutBatch(
            prompt_ids=inputs["input_ids"].repeat_interleave(n, 0),
            prompt_mask=inputs["attention_mask"].repeat_interleave(n, 0),
            response_ids=response_ids,
            response_mask=response_mask,
            behaviour_log_probs=log_probs * response_mask,
            texts=[c.text for c in rows],
            finish_reasons=["stop" if c.finish_reason == "stop" else "length" for c in rows],
            group_ids=torch.arange(len(prompts)).repeat_interleave(n),
            n=n,
            sampling=sampling,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            images_per_prompt=[len(p.images) for p in prompts],
        )
