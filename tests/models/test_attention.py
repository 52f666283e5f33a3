"""The CPU grouped-query SDPA path registered as "sdpa": transformers' outputs, gradients to rounding, and what it
hands back to transformers."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from prism.models import build_model, build_tokenizer
from prism.models.attention import sdpa_native_gqa


class Attention(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def _qkv(batch=3, q_len=7, k_len=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, 4, q_len, 8), (batch, 2, k_len, 8), (batch, 2, k_len, 8)]
    return [torch.randn(*shape, generator=generator, requires_grad=True) for shape in shapes]


def _grads(fn, tensors, mask, **kwargs):
    out, _ = fn(Attention(), *tensors, mask, scaling=0.3, **kwargs)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # every output element weighs differently
    grads = torch.autograd.grad((out * weights).sum(), tensors)
    return out, grads


@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal"])
def test_outputs_equal_transformers_and_gradients_to_rounding(mask_kind):
    tensors = _qkv()
    mask = None
    if mask_kind != "causal":
        keep = torch.ones(3, 1, 7, 11, dtype=torch.bool).tril(4)
        keep[0, :, :, :3] = False  # left padding in the first row
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    ours, our_grads = _grads(sdpa_native_gqa, tensors, mask)
    theirs, their_grads = _grads(sdpa_attention_forward, tensors, mask)
    assert ours.shape == (3, 7, 4, 8)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    for mine, reference in zip(our_grads, their_grads):
        assert reference.abs().max() > 0.1
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


def test_grouped_heads_are_not_copied(monkeypatch):
    """The native path never calls transformers' repeat_kv; a one-token decode step is handed to transformers."""
    calls = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *args: calls.append(1) or original(*args))
    keep = torch.ones(3, 1, 7, 11, dtype=torch.bool)
    sdpa_native_gqa(Attention(), *_qkv(), keep)
    assert not calls
    sdpa_attention_forward(Attention(), *_qkv(), keep)
    assert calls  # transformers' own function copies them with a mask
    q, k, v = _qkv(q_len=1)
    handed, _ = sdpa_native_gqa(Attention(), q, k, v, keep[:, :, :1])
    torch.testing.assert_close(handed, sdpa_attention_forward(Attention(), q, k, v, keep[:, :, :1])[0], atol=0, rtol=0)


def test_models_run_it_under_transformers_sdpa_name():
    assert AttentionInterface()["sdpa"] is sdpa_native_gqa
    model = build_model("embedded-s", build_tokenizer(["one two three"] * 20), seed=0)
    assert model.config.text_config._attn_implementation == "sdpa"
    seen = []
    AttentionInterface.register("sdpa", lambda *args, **kwargs: seen.append(1) or sdpa_native_gqa(*args, **kwargs))
    try:
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False)
    finally:
        AttentionInterface.register("sdpa", sdpa_native_gqa)
    assert seen


def test_under_cpu_autocast_attention_computes_in_float32_and_returns_bf16(monkeypatch):
    """After the rotary embedding queries and keys are float32 and values bf16; autocast would run the kernel in
    bf16 (slow on CPU). The kernel sees float32 inputs, and the output is the float32 attention rounded to bf16."""
    q, k, v = (t.detach() for t in _qkv())
    v = v.to(torch.bfloat16)
    keep = torch.ones(3, 1, 7, 11, dtype=torch.bool).tril(4)
    dtypes, kernel = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: dtypes.append({a.dtype for a in args[:3]}) or kernel(*args, **kwargs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sdpa_native_gqa(Attention(), q, k, v, keep, scaling=0.3)
    reference, _ = sdpa_native_gqa(Attention(), q, k, v.float(), keep, scaling=0.3)
    assert dtypes[0] == {torch.float32}
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.to(torch.bfloat16))
