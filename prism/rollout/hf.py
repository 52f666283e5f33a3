"""Rollouts with Hugging Face `generate` (CPU tests and small runs), and re-scoring under any HF model.

One processor call per batch: each prompt's images are processed once; `generate(num_return_sequences=n)`
repeats prompts and their per-image pixel blocks in prompt-major order. Sampling is pure temperature + top_p
(top_k is switched off). Behaviour log-probs come from `output_logits` (the raw logits of every step),
scaled by the temperature as described in prism.rollout.base.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from prism.rollout.base import (
    RolloutBatch,
    RolloutError,
    RolloutPrompt,
    SamplingParams,
    expand_vision_inputs,
    response_mask_and_finish,
)


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos)
    if not ids:
        raise RolloutError("the model's generation config names no eos token id")
    return ids


def vision_token_ids(model: Any) -> list[int]:
    """Placeholder ids a response must never contain: generation suppresses them (an untrained model samples
    them otherwise, and a response holding `<|image_pad|>` cannot be re-scored: the model would look for image
    features for it). Log-probs are computed with the same suppression, so they stay those of the sampler."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [getattr(model.config, name) for name in names if getattr(model.config, name, None) is not None]


def token_log_probs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, suppressed: list[int] = ()
) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, with `suppressed` ids at -inf; float32."""
    scaled = logits.float() / temperature
    if suppressed:
        scaled = scaled.index_fill(-1, torch.tensor(list(suppressed), device=scaled.device), float("-inf"))
    return torch.gather(F.log_softmax(scaled, dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


class HFRolloutBackend:
    """Batched, left-padded, KV-cached generation with a Hugging Face Qwen3-VL model and its processor."""

    def __init__(self, model: Any, processor: Any, behaviour_log_probs: bool = True):
        """`behaviour_log_probs=False` skips them (the batch holds None): a trainer that recomputes old
        log-probs does not need the [rows, R, vocab] logits `generate` must otherwise keep (10 GB in bf16
        for 64 x 512 tokens of a 152k vocabulary)."""
        self.model = model
        self.behaviour_log_probs = behaviour_log_probs
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.padding_side != "left":
            raise RolloutError("the tokenizer must pad on the left for batched generation (padding_side='left')")

    def update_weights(self, model: Any) -> None:
        """Generate with `model` from now on (HF shares the trainer's module: no copy is made)."""
        self.model = model

    def encode(self, prompts: list[RolloutPrompt]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Run the processor once over all prompts: left-padded ids, mask, mm_token_type_ids, vision inputs."""
        if not prompts:
            raise RolloutError("generate needs at least one prompt")
        texts = [self.processor.apply_chat_template(p.to_messages(), add_generation_prompt=True) for p in prompts]
        images = [image for p in prompts for image in p.images]
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        return dict(inputs), [len(p.images) for p in prompts]

    @torch.no_grad()
    def generate(self, prompts: list[RolloutPrompt], n: int, sampling: SamplingParams) -> RolloutBatch:
        if not isinstance(n, int) or n < 1:
            raise RolloutError(f"n must be a positive integer, got {n!r}")
        inputs, images_per_prompt = self.encode(prompts)
        device = self.model.device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        stop_ids = _stop_ids(self.model, self.tokenizer)
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "min_new_tokens": sampling.min_new_tokens or None,
            "num_return_sequences": 1 if sampling.greedy else n,  # HF refuses n > 1 for greedy
            "return_dict_in_generate": True,
            "use_cache": True,  # trainers switch model.config.use_cache off for their forwards
            "output_logits": self.behaviour_log_probs,
            "eos_token_id": stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "suppress_tokens": vision_token_ids(self.model),
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.random.fork_rng(devices=[], enabled=sampling.seed is not None):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(**inputs, **kwargs)
        inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        prompt_len = inputs["input_ids"].shape[1]
        response_ids = out.sequences[:, prompt_len:]
        log_probs = None
        if self.behaviour_log_probs:  # one step at a time: never a float32 [rows, R, V] copy
            suppressed = vision_token_ids(self.model)
            log_probs = torch.stack([
                token_log_probs(step_logits.unsqueeze(1), response_ids[:, t : t + 1], sampling.logprob_temperature,
                                suppressed).squeeze(1)
                for t, step_logits in enumerate(out.logits)
            ], dim=1).cpu()
        response_ids = response_ids.cpu()
        if sampling.greedy and n > 1:  # greedy rollouts of a prompt are identical: decode once, repeat rows
            response_ids = response_ids.repeat_interleave(n, 0)
            log_probs = log_probs.repeat_interleave(n, 0) if log_probs is not None else None
        response_mask, finish = response_mask_and_finish(response_ids, stop_ids)
        if log_probs is not None:
            log_probs = log_probs * response_mask
        texts = self.tokenizer.batch_decode(
            [ids[mask.bool()] for ids, mask in zip(response_ids, response_mask)], skip_special_tokens=True
        )
        return RolloutBatch(
            prompt_ids=inputs["input_ids"].repeat_interleave(n, dim=0),
            prompt_mask=inputs["attention_mask"].repeat_interleave(n, dim=0),
            response_ids=response_ids,
            response_mask=response_mask,
            behaviour_log_probs=log_probs,
            texts=texts,
            finish_reasons=finish,
            group_ids=torch.arange(len(prompts)).repeat_interleave(n),
            n=n,
            sampling=sampling,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            images_per_prompt=images_per_prompt,
        )


def sequence_log_probs(model: Any, batch: RolloutBatch, temperature: float | None = None) -> torch.Tensor:
    """Per-token log-probs [rows, R] of `batch`'s responses under `model` (see `log_probs_and_entropy`)."""
    return log_probs_and_entropy(model, batch, temperature, with_entropy=False)[0]


def log_probs_and_entropy(
    model: Any, batch: RolloutBatch, temperature: float | None = None, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [rows, R] of `batch`'s responses under `model`, 0 outside `response_mask`.

    Scaled by `temperature` (default: the batch's own logprob temperature, so the result is comparable with
    `behaviour_log_probs`). Runs under the caller's grad mode: wrap in `torch.no_grad()` for old/reference
    log-probs, leave gradients on for the policy loss. The vision tower sees each image once per row."""
    temperature = batch.sampling.logprob_temperature if temperature is None else temperature
    if not temperature > 0:
        raise RolloutError(f"temperature for log-probs must be > 0, got {temperature!r}")
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    response_ids, response_mask = batch.response_ids.to(device), batch.response_mask.to(device)
    pixel_values, image_grid_thw = expand_vision_inputs(
        batch.pixel_values, batch.image_grid_thw, batch.images_per_prompt, batch.n
    )
    core = getattr(model, "module", model)  # the HF model inside a DDP/FSDP wrapper
    image_token_id = core.config.image_token_id
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[:, : batch.prompt_ids.shape[1]] = (batch.prompt_ids.to(device) == image_token_id).long()
    extra = {}
    if pixel_values is not None:
        extra = {"pixel_values": pixel_values.to(device), "image_grid_thw": image_grid_thw.to(device)}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
        use_cache=False,
        **extra,
    )
    prompt_len, resp_len = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logits = out.logits[:, prompt_len - 1 : prompt_len + resp_len - 1]  # logits at t predict token t + 1
    suppressed = vision_token_ids(core)
    log_probs = token_log_probs(logits, response_ids, temperature, suppressed) * response_mask
    entropy = None
    if with_entropy:  # a metric, never a loss term here: no graph
        with torch.no_grad():
            scaled = logits.float() / temperature
            if suppressed:
                scaled = scaled.index_fill(-1, torch.tensor(suppressed, device=scaled.device), float("-inf"))
            logp = F.log_softmax(scaled, dim=-1)
            entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) * response_mask
    return log_probs, entropy
