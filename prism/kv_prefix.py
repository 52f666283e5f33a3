"""Prompt prefixes computed once: a Qwen3-VL forward of the distinct prompts whose key/value cache the rows that
continue them reuse (the n rollouts of a prompt, the teacher and student segments scored on it, the system prompt
every SFT row of a micro-batch and every prompt the discriminator scores begin with).

Shared by the rollout backend (decode and re-scoring), the discriminator (segment scoring) and the SFT recipe.
Gradients flow back through the cache, so a training forward that shares a prompt equals, up to float rounding,
one forward per row. Also the two places where transformers' API moved between versions (the cache argument and
output), and `head_on`, the output head run only at the positions a loss reads.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from transformers import DynamicCache


def cache_kwarg(model: Any) -> str:
    """The forward's key/value cache argument: `cache` from transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    return out.get("cache", None) or out.get("past_key_values", None)


@contextlib.contextmanager
def head_on(model: Any, positions: torch.Tensor):
    """Within the block, the output head projects only the hidden states at `positions` ([rows, length] bools,
    the shape of the hidden states it is given), flattened in row-major order: the logits come out [n, vocab]. The
    head's GEMM and everything done to its logits (softmax, gathers and their gradients) then scale with the
    positions read, not with rows x length x vocab (a forward pre-hook on the head of `model` or its `.module`)."""
    head = getattr(model, "module", model).get_output_embeddings()
    every = bool(positions.all())  # then a view: no gather forward, no scatter into zeros backward

    def pick(module, args):
        return (args[0].flatten(0, -2) if every else args[0][positions],)

    hook = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        hook.remove()


def opening_cache(model: Any, opening_ids: torch.Tensor, rows: int, **kwargs) -> tuple[Any, Any]:
    """One forward of `opening_ids` [1, P], the opening every row of a batch holds alike (a system prompt), and its
    key/value cache repeated for `rows` rows: the cache they continue on, gradients flowing back through the repeat.
    `kwargs` go to the forward (the opening's mask and M-RoPE positions, logits_to_keep, router logits). Returns
    (the forward's output, the cache)."""
    out = model(input_ids=opening_ids, use_cache=True, **kwargs)
    cache = output_cache(out)
    cache.batch_repeat_interleave(rows)
    return out, cache


class _GatherRows(torch.autograd.Function):
    """`source.index_select(0, index)` whose backward sums each source row's copies as one GEMM, a one-hot
    [sources, rows] matrix times the gradient: deterministic, as index_select's own backward (index_add_) is and
    advanced indexing's (parallel atomic adds) is not, and at the discriminator's cache shapes (8 prompts, 60 rows
    of [2, 137, 32], the gradient a slice of the concatenated cache) 0.32 ms against index_add_'s 0.74 ms at one
    thread."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.sources = source.shape[0]
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        one_hot = torch.nn.functional.one_hot(index, ctx.sources).to(grad.dtype).T
        return (one_hot @ grad.reshape(grad.shape[0], -1)).view(ctx.sources, *grad.shape[1:]), None


def gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`source.index_select(0, index)`, its backward one GEMM (`_GatherRows`)."""
    return _GatherRows.apply(source, index)


def gathered_cache(config: Any, layers: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   owner: torch.Tensor) -> DynamicCache:
    """A cache for rows continuing prompts: each layer's (keys, values) of the prompts [prompts, ...] gathered to
    row i's prompt `owner[i]` (`gather_rows`: a backward that sums a prompt's rows in a fixed order)."""
    cache = DynamicCache(config=config)
    for layer, (keys, values) in enumerate(layers):
        cache.update(gather_rows(keys, owner), gather_rows(values, owner), layer)
    return cache


def cache_may_carry_gradients(model: Any) -> bool:
    """Whether a forward under the current grad mode may run a prefix once and continue rows on its cache: no
    activation checkpointing while gradients are on (it recomputes layers and would append to the cache twice),
    and a model that is bare or in DDP (whose gradient hooks live on the parameters, so a forward of the inner
    module still synchronises; an FSDP1 wrapper must see every forward). FSDP2's `fully_shard` leaves no wrapper
    to see: callers that cannot run on its shards check for it."""
    core = getattr(model, "module", model)
    checkpointing = getattr(core, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(core, "is_gradient_checkpointing", False)
    if torch.is_grad_enabled() and checkpointing:
        return False
    return model is core or isinstance(model, torch.nn.parallel.DistributedDataParallel)


# Below this many shared tokens a prefix's own forward call costs more than it saves.
MIN_SHARED_PREFIX = 16


def common_prefix_length(ids: torch.Tensor, mask: torch.Tensor, image_token_id: int) -> int:
    """How many leading columns every row of a right-padded batch holds alike and unpadded, up to the first image
    placeholder (a shared prefix runs without the vision inputs): the system prompt and the chat template's
    opening, where the rows carry the same one."""
    same = (ids == ids[:1]).all(0) & (ids[0] != image_token_id) & (mask == 1).all(0)
    return int(same.long().cumprod(0).sum())


def prefix_first(ids: torch.Tensor, mask: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, int]:
    """For a left-padded batch: the column order [shared prefix | padding | the rest of each row] (gather each of
    `ids`, `mask` and per-token inputs along columns with it) and the prefix's length: the tokens every row opens
    with, up to the first image placeholder and short of each row's last token (rows keep at least one token past
    the prefix). Each row's tokens keep their order, and the padding is masked wherever it sits, so a forward
    (positions included, which count unmasked tokens) sees each row as before, while the prefix now sits in the same
    columns for all rows: computed once, its cache serves them all. 0 (and the identity order) where there is none,
    or where the batch is not left-padded (a row ending in padding)."""
    rows, width = ids.shape
    columns = torch.arange(width, device=ids.device)
    if not bool(mask[:, -1].all()):
        return columns.expand(rows, width), 0
    starts = width - mask.sum(1, keepdim=True)  # each row's first token
    right = ids.gather(1, (columns + starts).clamp_max(width - 1))  # the rows left-aligned (tails: filler)
    length = common_prefix_length(right, (columns < width - starts).long(), image_token_id)
    length = min(length, int((width - starts).min()) - 1)
    if length <= 0:
        return columns.expand(rows, width), 0
    # column j of the new order: a prefix token, padding, or a token after the prefix (at its own column)
    order = torch.where(columns < length, columns + starts,
                        torch.where(columns < length + starts, columns - length, columns))
    return order, length


def image_token_types(image_token_id: int, prompt_ids: torch.Tensor, total_len: int) -> torch.Tensor:
    """`mm_token_type_ids`: 1 at the prompt's image placeholders, 0 elsewhere (M-RoPE needs it with images)."""
    types = torch.zeros(prompt_ids.shape[0], total_len, dtype=torch.long, device=prompt_ids.device)
    types[:, : prompt_ids.shape[1]] = (prompt_ids == image_token_id).long()
    return types


def continuation_positions(vl_model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                           rope_deltas: torch.Tensor | None = None) -> torch.Tensor:
    """Per prompt (left- or right-padded), the position (in every M-RoPE axis) of the first token after it: its
    last position + 1, as a whole forward numbers it. `vl_model` is the Qwen3-VL base model (`.model` of the
    generation class). Computed here, never read from the model's `rope_deltas`, which an earlier call may have
    left for another batch; `rope_deltas`: what `get_rope_index` returned for these same prompts, where the caller
    already has it."""
    if image_grid_thw is None:  # text only: a whole forward numbers every column, padding included
        columns = torch.arange(1, prompt_ids.shape[1] + 1, device=prompt_ids.device)
        return (prompt_mask.to(columns.dtype) * columns).amax(-1)  # the last unpadded column + 1
    if rope_deltas is None:
        _, rope_deltas = vl_model.get_rope_index(input_ids=prompt_ids, mm_token_type_ids=mm_token_type_ids,
                                                 image_grid_thw=image_grid_thw.to(prompt_ids.device),
                                                 attention_mask=prompt_mask)
    return prompt_mask.sum(-1) + rope_deltas.reshape(-1).to(prompt_ids.device)
