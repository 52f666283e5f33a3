"""Rollouts with a Hugging Face model (CPU tests and small runs), and re-scoring under any HF model.

One processor call per batch: each prompt's images are processed once. `sample_responses` is a KV-cached
decode loop that prefills each prompt once (the prompts' common opening, the system prompt, once for all:
`prefill_prompts`) and, for a plain Qwen3-VL, decodes on that cache held once per prompt
(prism.rollout.shared_prompt_decode), else repeats it for the n rows (HF `generate` would prefill n copies);
sampling is pure temperature + top_p (no top_k), with `generate`'s processors. Behaviour log-probs are log
softmax(logits / temperature) of the raw logits, as described in prism.rollout.base. Re-scoring
(`log_probs_and_entropy`) also runs each prompt once per group.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation import TopPLogitsWarper
from transformers.integrations.fsdp import is_fsdp_managed_module

from prism.data.encoding import length_buckets
from prism.kv_prefix import (
    cache_kwarg,
    cache_may_carry_gradients,
    continuation_positions,
    gathered_cache,
    head_on,
    image_token_types,
    opening_cache,
    output_cache,
    prefix_first,
)
from prism.rollout import shared_prompt_decode as shared_prompt
from prism.rollout.base import (
    RolloutBatch,
    RolloutError,
    RolloutPrompt,
    SamplingParams,
    expand_vision_inputs,
    response_mask_and_finish,
)
from prism.runtime import autocast


def is_sharded_module(model: torch.nn.Module) -> bool:
    """Whether `model` is FSDP-managed: FSDP1, transformers' FSDP2, or `fully_shard` as accelerate's FSDP2
    plugin applies it (which sets no transformers flag, so is_fsdp_managed_module alone misses it)."""
    from torch.distributed.fsdp import FSDPModule

    return is_fsdp_managed_module(model) or isinstance(model, FSDPModule)


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


def scaled_log_softmax(logits: torch.Tensor, temperature: float, suppressed: list[int] = ()) -> torch.Tensor:
    """log softmax(logits / temperature) over the vocabulary, with `suppressed` ids at -inf; float32."""
    scaled = logits.float()
    if temperature != 1.0:  # x / 1.0 is x: skipping it saves a pass over the logits and one in the backward
        scaled = scaled / temperature
    if suppressed:
        scaled = scaled.index_fill(-1, torch.tensor(list(suppressed), device=scaled.device), float("-inf"))
    return F.log_softmax(scaled, dim=-1)


def token_log_probs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, suppressed: list[int] = ()
) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, with `suppressed` ids at -inf; float32."""
    return torch.gather(scaled_log_softmax(logits, temperature, suppressed), -1, tokens.unsqueeze(-1)).squeeze(-1)


class HFRolloutBackend:
    """Batched, left-padded, KV-cached generation with a Hugging Face Qwen3-VL model and its processor."""

    def __init__(self, model: Any, processor: Any, behaviour_log_probs: bool = True,
                 compute_dtype: str | None = None):
        """`behaviour_log_probs=False` skips them (the batch holds None): a trainer that recomputes old
        log-probs does not need the [rows, R, vocab] logits `generate` must otherwise keep (10 GB in bf16
        for 64 x 512 tokens of a 152k vocabulary). `compute_dtype` (e.g. "bfloat16") is the dtype generation
        computes in, under autocast when the parameters are in another (float32 master weights); None = theirs."""
        self.model = model
        self.behaviour_log_probs = behaviour_log_probs
        self.compute_dtype = compute_dtype
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.padding_side != "left":
            raise RolloutError("the tokenizer must pad on the left for batched generation (padding_side='left')")

    def update_weights(self, model: Any) -> None:
        """Generate with `model` from now on (HF shares the trainer's module: no copy is made)."""
        self.model = model

    def autocast_dtype(self) -> str | None:
        """compute_dtype when the model's parameters are in another dtype, else None (no autocast)."""
        if self.compute_dtype is None or next(self.model.parameters()).dtype == getattr(torch, self.compute_dtype):
            return None
        return self.compute_dtype

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
        rows_per_prompt = 1 if sampling.greedy else n  # greedy rollouts of a prompt are identical
        with autocast(device, self.autocast_dtype()):
            response_ids, log_probs = sample_responses(self.model, inputs, rows_per_prompt, sampling, stop_ids,
                                                       self.tokenizer.pad_token_id, self.behaviour_log_probs)
        inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        response_ids = response_ids.cpu()
        log_probs = log_probs.cpu() if log_probs is not None else None
        if rows_per_prompt < n:  # decode once, repeat rows
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
    log-probs, leave gradients on for the policy loss.

    The n rows of a prompt share their prompt, so the prompt (and its images) goes through the model once per
    prompt and its key/value cache is gathered for the rows, which run in up to four forwards by response length
    (`response_logits_shared_prompt`); gradients flow back through the gather. Where a cache cannot carry
    gradients (gradient checkpointing recomputes layers and would append to it twice) or the model sits in a
    wrapper that must see every forward (FSDP1), every row runs whole (`response_logits_per_row`). Both give the
    same log-probs up to float rounding. Either way the head and the softmax run only at the response tokens
    (`response_mask`): padding never reaches the vocabulary-sized work."""
    temperature = batch.sampling.logprob_temperature if temperature is None else temperature
    if not temperature > 0:
        raise RolloutError(f"temperature for log-probs must be > 0, got {temperature!r}")
    core = getattr(model, "module", model)  # the HF model inside a DDP/FSDP wrapper
    device = next(core.parameters()).device
    scores = response_logits_shared_prompt if shares_prompts(model, batch) else response_logits_per_row
    response_ids = batch.response_ids.to(device).reshape(-1)
    suppressed = vision_token_ids(core)
    picked, entropies, places = [], [], []
    for logits, place in scores(model, batch, device):  # the pieces' own order: no copy of their logits
        logp = scaled_log_softmax(logits, temperature, suppressed)  # once, for both results
        picked.append(torch.gather(logp, -1, response_ids.index_select(0, place).unsqueeze(-1)).squeeze(-1))
        places.append(place)
        if with_entropy:  # a metric, never a loss term here: no graph
            with torch.no_grad():
                logp = logp.detach()
                entropies.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1))
    shape, place = batch.response_mask.shape, torch.cat(places)
    log_probs = spread(torch.cat(picked), place, shape)
    entropy = spread(torch.cat(entropies), place, shape) if with_entropy else None
    return log_probs, entropy


def spread(values: torch.Tensor, where: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[n] values put at the row-major positions `where` of a zero matrix of `shape` (gradients flow back)."""
    return values.new_zeros(shape.numel()).index_copy(0, where, values).view(shape)


def shares_prompts(model: Any, batch: RolloutBatch) -> bool:
    """Whether the prompt-once forward applies: several rows per prompt, a cache that may carry gradients,
    and a model that is bare or in DDP (whose gradient hooks live on the parameters, so a forward of the
    inner module still synchronises)."""
    return batch.n > 1 and batch.response_ids.shape[1] > 0 and cache_may_carry_gradients(model)


def response_logits_per_row(model: Any, batch: RolloutBatch,
                            device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(logits [n, V], place [n])]: the logits predicting each response token where `response_mask` is set, and
    its row-major position in [rows, R] (one piece); one whole forward per row (images once per row)."""
    core = getattr(model, "module", model)
    input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    pixel_values, image_grid_thw = expand_vision_inputs(
        batch.pixel_values, batch.image_grid_thw, batch.images_per_prompt, batch.n
    )
    extra = {}
    if pixel_values is not None:
        extra = {"pixel_values": pixel_values.to(device), "image_grid_thw": image_grid_thw.to(device)}
    resp_len = batch.response_ids.shape[1]
    # the last resp_len + 1 positions: from the prompt's last (predicting response token 0) to the response's last
    valid = batch.response_mask.to(device).bool()
    with head_on(core, F.pad(valid, (0, 1))):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=image_token_types(core.config.image_token_id, batch.prompt_ids.to(device),
                                                input_ids.shape[1]),
            use_cache=False,
            logits_to_keep=resp_len + 1,  # no hidden states of the prompt reach the head
            **extra,
        ).logits
    return [(logits, valid.reshape(-1).nonzero().squeeze(-1))]


def response_logits_shared_prompt(model: Any, batch: RolloutBatch, device: torch.device,
                                  split_by_length: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(logits [k, V], place [k])] per forward: the logits predicting each response token where `response_mask`
    is set, and its row-major position in [rows, R]. One forward of the unique prompts (images once per prompt;
    it predicts each row's first token), then the rows' responses on its key/value cache, gathered per row.
    `split_by_length`: the rows run in up to four forwards by response length (`length_buckets`), each as wide as
    its longest response, instead of one forward as wide as the batch's; rows never interact, so the logits are one
    forward's to float rounding."""
    core = getattr(model, "module", model)
    first_rows = torch.arange(0, batch.num_rows, batch.n)
    vision = {}
    if batch.pixel_values is not None:
        vision = {"pixel_values": batch.pixel_values.to(device), "image_grid_thw": batch.image_grid_thw.to(device)}
    prompt_mask = batch.prompt_mask[first_rows].to(device)
    first_logits, cache, start, prompt_mask = prefill_prompts(  # first_logits [rows, V]: response token 0
        core, batch.prompt_ids[first_rows].to(device), prompt_mask, vision, batch.n, repeat_cache=False)
    response_ids, response_mask = batch.response_ids.to(device), batch.response_mask.to(device)
    valid = response_mask.bool()
    place = torch.arange(valid.numel(), device=device).view(valid.shape)  # row-major positions in [rows, R]
    first = valid[:, 0]
    pieces = [(first_logits, place[:, 0]) if first.all() else (first_logits[first], place[:, 0][first])]
    lengths = [max(length - 1, 0) for length in response_mask.sum(-1).tolist()]  # tokens each row runs
    buckets = length_buckets(lengths) if split_by_length else [list(range(batch.num_rows))]
    owner = torch.arange(batch.num_rows, device=device) // batch.n
    prompt_layers = [(entry.keys, entry.values) for entry in cache.layers]
    wrapper_called = False
    for bucket in buckets:
        width = max(lengths[row] for row in bucket) if split_by_length else response_ids.shape[1] - 1
        if not width:
            continue
        rows = torch.tensor(bucket, dtype=torch.long, device=device)
        prompts = owner.index_select(0, rows)
        bucket_cache = gathered_cache(core.config, prompt_layers, prompts)
        positions = start.index_select(0, rows)[:, None] + torch.arange(width, device=device)
        attention_mask = torch.cat([prompt_mask.index_select(0, prompts),
                                    response_mask.index_select(0, rows)[:, :width]], dim=1)
        predicts = valid.index_select(0, rows)[:, 1 : width + 1]  # column t predicts response token t + 1
        # one call of the wrapper per process whatever the bucket count: a DDP forward is a collective
        # (buffer broadcast), and DDP's gradient hooks sit on the parameters, so the inner module's forwards
        # (the prompts' too) still synchronise
        forward, wrapper_called = (core if wrapper_called else model), True
        with head_on(core, predicts):
            logits = forward(input_ids=response_ids.index_select(0, rows)[:, :width], attention_mask=attention_mask,
                             position_ids=positions[None].expand(3, -1, -1), use_cache=True,
                             **{cache_kwarg(core): bucket_cache}).logits
        pieces.append((logits, place.index_select(0, rows)[:, 1 : width + 1][predicts]))
    return pieces


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values sit in a buffer sized for the whole decode: a step writes its
    token in place instead of copying the whole cache (`torch.cat`), a tenth of a tiny model's decode time."""

    @classmethod
    def taking_over(cls, layer: DynamicLayer, extra_tokens: int) -> PreallocatedLayer:
        new = cls()
        new.__dict__.update(layer.__dict__)
        rows, heads, length, dim = layer.keys.shape
        new.key_buffer = layer.keys.new_empty(rows, heads, length + extra_tokens, dim)
        new.value_buffer = layer.values.new_empty(rows, heads, length + extra_tokens, layer.values.shape[-1])
        new.key_buffer[:, :, :length] = layer.keys
        new.value_buffer[:, :, :length] = layer.values
        new.length = length
        return new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`: their written positions, in new buffers of the same capacity."""
        self.key_buffer = shared_prompt.kept_rows(self.key_buffer, indices, self.length)
        self.value_buffer = shared_prompt.kept_rows(self.value_buffer, indices, self.length)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


class ReservingLayer(PreallocatedLayer):
    """A PreallocatedLayer that sizes its buffer at its first update (the prompt), with room for `extra_tokens`
    more: an empty cache of these handed to transformers' `generate` decodes without copying (`reserving_cache`).
    Past the room it grows by copying, as a DynamicLayer does each step. The batch reshapes of beam search and
    assisted decoding are not implemented for it."""

    def __init__(self, extra_tokens: int):
        super().__init__()
        self.extra_tokens = extra_tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.key_buffer, self.value_buffer, self.length = key_states[:, :, :0], value_states[:, :, :0], 0
        if self.length + key_states.shape[-2] > self.key_buffer.shape[-2]:  # the prompt, or past the room
            self.key_buffer = self._grown(self.key_buffer, key_states)
            self.value_buffer = self._grown(self.value_buffer, value_states)
        return super().update(key_states, value_states)

    def _grown(self, buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The written positions, then room for `new` and `extra_tokens` more."""
        room = buffer.new_empty(*new.shape[:2], new.shape[2] + self.extra_tokens, new.shape[3])
        return torch.cat([buffer[:, :, : self.length], room], dim=2)

    def _not_implemented(self, *args, **kwargs):
        raise NotImplementedError("ReservingLayer keeps sampled and greedy decoding only (no beam search, cropping "
                                  "or repeated rows); use a DynamicCache for those")

    batch_repeat_interleave = reorder_cache = crop = _not_implemented


def reserving_cache(config: Any, extra_tokens: int) -> DynamicCache:
    """An empty cache for `generate`: each full-attention layer a ReservingLayer with room for `extra_tokens`
    beyond the prompt (sliding-window layers stay as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservingLayer(extra_tokens) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def prefix_cache(model: Any, prefix_ids: torch.Tensor, rows: int, extra_tokens: int) -> DynamicCache:
    """The key/value cache of `prefix_ids` [1, P] (text only: no vision inputs), computed once and repeated for
    `rows` rows, each layer with room for `extra_tokens` more: hand it to `generate` with the rows' full prompts
    (their prefix first, `prism.kv_prefix.prefix_first`), which then runs only the rest. The model's stored
    `rope_deltas` are cleared, so `generate` numbers the rows' positions itself."""
    _, cache = opening_cache(model, prefix_ids, rows, logits_to_keep=1)
    reserve_cache(cache, extra_tokens)
    base = getattr(model, "model", None)
    if hasattr(base, "rope_deltas"):  # left by this forward (batch 1): not the rows'
        base.rope_deltas = None
    return cache


def reserve_cache(cache: Any, extra_tokens: int) -> None:
    """Give each plain DynamicLayer of `cache` room for `extra_tokens` more (other caches are left alone)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            layers[i] = PreallocatedLayer.taking_over(layer, extra_tokens)


def prefill_prompts(
    core: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vision: dict[str, torch.Tensor], n: int,
    repeat_cache: bool = True, share_prefix: bool = True,
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """One forward of the unique prompts (and their images), its cache repeated for n rows each (or left one
    per prompt): the logits [rows, V] predicting each row's first response token, the cache, each row's first
    response position, and the prompts' mask [prompts, P] in the columns the cache holds them.

    Where the prompts carry images and open alike (the system prompt: about 100 of an embedded prompt's ~150
    tokens), the opening runs once and the prompts continue on its cache repeated for them, at the positions a
    whole forward gives them (M-RoPE numbers only unmasked tokens there): `prism.kv_prefix.prefix_first` moves it
    ahead of each row's left padding, so the cache and the returned mask hold the prompts in that column order.
    Gradients flow back through the repeat, as in SFT; logits and cache equal one forward's to float rounding.
    Not for a sharded model, whose processes must run the same forwards whatever their prompts, nor with
    `share_prefix=False`."""
    image_token_id = core.config.image_token_id
    mm_token_type_ids = image_token_types(image_token_id, prompt_ids, prompt_ids.shape[1])
    prefix, deltas = 0, None
    if (share_prefix and vision.get("image_grid_thw") is not None and prompt_ids.shape[0] > 1
            and not is_sharded_module(core)):
        order, prefix = prefix_first(prompt_ids, prompt_mask, image_token_id)
    if prefix:
        prompt_ids, prompt_mask, mm_token_type_ids = (t.gather(1, order)
                                                      for t in (prompt_ids, prompt_mask, mm_token_type_ids))
        positions, deltas = core.model.get_rope_index(input_ids=prompt_ids, mm_token_type_ids=mm_token_type_ids,
                                                      image_grid_thw=vision["image_grid_thw"],
                                                      attention_mask=prompt_mask)
        _, cache = opening_cache(core, prompt_ids[:1, :prefix], prompt_ids.shape[0],
                                 position_ids=positions[:, :1, :prefix], logits_to_keep=1)
        out = core(input_ids=prompt_ids[:, prefix:], attention_mask=prompt_mask, position_ids=positions[:, :, prefix:],
                   mm_token_type_ids=mm_token_type_ids[:, prefix:], use_cache=True, logits_to_keep=1,
                   **{cache_kwarg(core): cache}, **vision)
    else:
        out = core(input_ids=prompt_ids, attention_mask=prompt_mask, mm_token_type_ids=mm_token_type_ids,
                   use_cache=True, logits_to_keep=1, **vision)
    cache = output_cache(out)
    if repeat_cache:
        cache.batch_repeat_interleave(n)
    start = continuation_positions(core.model, prompt_ids, prompt_mask, mm_token_type_ids,
                                   vision.get("image_grid_thw"), deltas)
    return out.logits[:, -1].repeat_interleave(n, dim=0), cache, start.repeat_interleave(n), prompt_mask


@torch.no_grad()
def sample_responses(
    model: Any, inputs: dict[str, torch.Tensor], n: int, sampling: SamplingParams, stop_ids: list[int],
    pad_id: int, with_log_probs: bool, compact_rows: bool = True, shared_prompt_decode: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n sampled responses per prompt, rows prompt-major: [rows, R] ids (pad after the stop token) and, if
    asked, their behaviour log-probs [rows, R] (0 after the stop token is masked later).

    What `generate(num_return_sequences=n)` does, minus its per-step machinery: the prompts (and images) are
    prefilled once, not n times, and their key/value cache is repeated for the n rows; tokens are drawn with
    one uniform per row (`draw_tokens`). Processors, in `generate`'s order: vision placeholders
    suppressed, stop tokens masked before `min_new_tokens`, temperature, then top-p (HF's nucleus: the
    smallest set of tokens whose probability reaches top_p, at least one).

    With `compact_rows`, rows that have stopped leave the batch (`generate` decodes them to the longest row's
    end): once an eighth of the rows still decoding have stopped, the batch, its cache and its mask keep only
    the others. Every step still draws one uniform for every row, so a row's tokens do not depend on when others
    stopped (the same as without compaction, up to the float rounding of a smaller batch).

    With `shared_prompt_decode`, where it applies (prism.rollout.shared_prompt_decode), the decode steps run
    that module's step on the prompts' cache held once per prompt instead of transformers' forward on a cache
    repeated per row: the same logits up to float rounding, in 58% (embedded-s) to 69% (embedded-m) of the time."""
    device = inputs["input_ids"].device
    prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if inputs.get(k) is not None}
    shared = shared_prompt_decode and not is_sharded_module(model) and shared_prompt.applies(model)
    logits, cache, start, prompt_mask = prefill_prompts(model, prompt_ids, prompt_mask, vision, n,
                                                        repeat_cache=not shared)
    rows, max_new = logits.shape[0], sampling.max_new_tokens
    if shared:
        decoder = shared_prompt.SharedPromptDecoder(model, cache, prompt_mask, n, max_new, start)
    else:
        reserve_cache(cache, max_new)
        attention_mask = torch.ones(rows, prompt_ids.shape[1] + max_new, dtype=prompt_mask.dtype, device=device)
        attention_mask[:, : prompt_ids.shape[1]] = prompt_mask.repeat_interleave(n, dim=0)
    suppressed = torch.tensor(vision_token_ids(model), dtype=torch.long, device=device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens = torch.full((rows, max_new), pad_id, dtype=torch.long, device=device)
    log_probs = torch.zeros(rows, max_new, device=device) if with_log_probs else None
    active = torch.arange(rows, device=device)  # the rows still decoding; logits, cache and mask hold only these
    finished = torch.zeros(rows, dtype=torch.bool, device=device)  # of the active rows
    cache_arg, steps = cache_kwarg(model), 0
    # Under FSDP every process must join every forward: go on until all processes are done (as `generate`'s
    # synced_gpus does), and keep the batch whole (an empty batch could not join).
    synced = (torch.distributed.is_available() and torch.distributed.is_initialized()
              and torch.distributed.get_world_size() > 1 and is_sharded_module(model))
    for t in range(max_new):
        scores = logits.float().index_fill(-1, suppressed, float("-inf"))
        if t < sampling.min_new_tokens:
            scores = scores.index_fill(-1, stops, float("-inf"))
        if sampling.greedy:
            next_tokens = scores.argmax(-1)
        else:
            scores = scores / sampling.temperature
            if sampling.top_p < 1.0:
                scores = top_p_filter(scores, sampling.top_p)
            uniforms = torch.rand(rows, 1, device=device, generator=generator)  # every row's, active or not
            next_tokens = draw_tokens(scores, uniforms=uniforms[active])
        next_tokens = next_tokens.masked_fill(finished, pad_id)
        if log_probs is not None:  # the documented behaviour distribution: no min-length mask, no top-p
            log_probs[active, t] = token_log_probs(logits, next_tokens, sampling.logprob_temperature,
                                                   suppressed.tolist())
        tokens[active, t] = next_tokens
        steps = t + 1
        finished |= torch.isin(next_tokens, stops)
        done = finished.all().float()
        if synced:
            torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        if bool(done) or steps == max_new:
            break
        stopped = int(finished.sum())
        if compact_rows and not synced and stopped and stopped * 8 >= len(active):
            keep = (~finished).nonzero().squeeze(-1)
            active, next_tokens, finished = active[keep], next_tokens[keep], finished[keep]
            if shared:
                decoder.keep(keep, written=t)  # response positions 0 .. t - 1 are in its buffers
            else:
                start, attention_mask = start[keep], attention_mask[keep]
                cache.batch_select_indices(keep)
        if shared:
            logits = decoder.step(next_tokens, active, t)
            continue
        positions = (start + t)[None, :, None].expand(3, -1, -1)
        out = model(input_ids=next_tokens[:, None], attention_mask=attention_mask[:, : prompt_ids.shape[1] + t + 1],
                    position_ids=positions, use_cache=True, **{cache_arg: cache})
        logits = out.logits[:, -1]
    return tokens[:, :steps], (log_probs[:, :steps] if log_probs is not None else None)


def draw_tokens(scores: torch.Tensor, generator: torch.Generator | None = None,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(scores), by inverting the cumulative distribution with one uniform per
    row (on CPU, `torch.multinomial` took about 1 ms per step for 64 rows x 512 tokens, 7% of a tiny model's
    decode step). A token of probability 0 is never drawn: the first index whose CDF exceeds u is taken.
    `uniforms` [rows, 1] in [0, 1) are used when given, else drawn from `generator`."""
    cdf = torch.softmax(scores.float(), dim=-1).cumsum(-1)
    if uniforms is None:
        uniforms = torch.rand(scores.shape[0], 1, device=scores.device, generator=generator)
    u = uniforms * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(scores.shape[-1] - 1)


def sort_ascending(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.sort(scores)` along the last dimension, ascending: (values, indices). On CPU numpy's argsort (a
    vectorised quicksort) is about 5x faster at a tiny model's vocabulary (200 rows x 512: 0.66 against 3.3-3.5 ms
    at one thread, 13% of an evaluation's decode at top_p 0.7). The sorted values are the same; only equal values
    may come in another order."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        order = torch.from_numpy(np.argsort(scores.detach().numpy(), axis=-1))
        return scores.gather(-1, order), order
    return torch.sort(scores, descending=False)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose probability reaches top_p (always >= 1): what
    transformers' TopPLogitsWarper keeps, op for op."""
    sorted_scores, order = sort_ascending(scores)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1] = False
    return scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


class NucleusWarper(TopPLogitsWarper):
    """transformers' top-p warper for `generate`, its sort on `sort_ascending`: the same kept tokens (unless two
    tokens of equal logit straddle the nucleus's edge). Passed as a logits processor with `top_p=1.0` in the
    generation settings, so it runs where transformers would run its own: after the temperature."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.min_tokens_to_keep != 1 or self.filter_value != -float("inf"):
            return super().__call__(input_ids, scores)
        return top_p_filter(scores, self.top_p)
