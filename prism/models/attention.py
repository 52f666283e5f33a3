"""transformers' SDPA attention, with grouped-query attention run natively on CPU, registered as "sdpa".

With a mask and fewer key/value heads than query heads (every Qwen3-VL text decoder here: 4 query heads on 2
key/value heads in the tiny presets), transformers' `sdpa_attention_forward` copies the keys and values once per
query head (`repeat_kv`), since CUDA's fused kernels fall back to the math kernel for a masked GQA call. torch's CPU
flash kernel takes the grouped heads as they are (`enable_gqa=True`): the same outputs, no copies, and a backward
that writes each key/value head's gradient once instead of summing per-query-head copies. On the tiny presets'
shapes (one attention call forward and backward, 2 threads) that took 0.6-0.85x the time of `repeat_kv`.

`sdpa_native_gqa` runs that path for CPU calls of more than one query token (training forwards, prefills, the
discriminator's continuations) and hands every other call to transformers' own function: CUDA, one-token decode
steps (where transformers packs the query heads instead, faster there), position biases. Registered under
transformers' own name on import, so every model keeps `attn_implementation="sdpa"` and every check transformers
makes for that name still holds. Same outputs as transformers' function; gradients to float summation order
(tests/models/test_attention.py).

Under CPU autocast (`mixed_precision: bf16`) every CPU call computes attention in float32 and returns bf16, as
autocast's kernel would: torch's CPU flash kernel in bf16 ran its backward about 6x slower than in float32 on the
discriminator's continuations, while the GEMMs around attention are what AMX speeds up (README, "bf16 where AMX
pays"). The rotary embedding has already promoted queries and keys to float32 there, and autocast would have cast
all three down again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NATIVE_GQA = torch.__version__ >= "2.5"  # SDPA's enable_gqa (pyproject allows torch 2.4)


def sdpa_native_gqa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [batch, heads, q, d], key and value [batch, kv_heads, k, d] -> ([batch, q, heads, d], None), as
    transformers' `sdpa_attention_forward` returns it."""
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_native_gqa(module, query.float(), key.float(), value.float(), attention_mask,
                                           dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        return out.to(torch.get_autocast_dtype("cpu")), weights
    q_length, groups = query.shape[2], getattr(module, "num_key_value_groups", 1)
    if (not NATIVE_GQA or query.device.type != "cpu" or q_length == 1 or groups == 1
            or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # transformers' rules for the causal flag and for an empty static cache's prefill, as in its function
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=is_causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sdpa", sdpa_native_gqa)
