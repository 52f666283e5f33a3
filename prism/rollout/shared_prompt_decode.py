"""One decode step of Qwen3-VL's text decoder written out in tensor operations, for the HF rollout loop.

At the tiny presets' widths a transformers forward of one token per row spends more time in Python (mask and
rotary rebuilding, module calls, the key/value cache's bookkeeping) than in arithmetic, and its cache holds each
prompt's keys and values once per rollout. `SharedPromptDecoder` computes the same function with:
- each prompt's keys and values held once, not n times: a step's attention scores the prompt part per prompt,
  the n rows' queries as one block (one GEMM instead of n small ones), and the response part per row, then takes
  one softmax over both;
- the q/k/v and gate/up projections each as one GEMM, over weights concatenated once per generate call;
- the rotary tables and the prompts' padding bias computed once per call.

It applies to a plain Qwen3-VL text decoder (`applies`): every projection a bare `nn.Linear` (or one that declares
`linear_function`, prism.models.gemm_grid's), SiLU, no forward hooks inside the decoder (an adapter, an offloading
hook or a sharded module would be skipped). Elsewhere the rollout loop runs transformers' forward. Logits agree with
that forward to float rounding (tests/rollout).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def text_decoder(model: Any) -> Any:
    """The Qwen3-VL text decoder inside a generation model (`model.model.language_model`), or None."""
    return getattr(getattr(model, "model", None), "language_model", None)


def applies(model: Any) -> bool:
    """Whether `model` is a Qwen3-VL whose text decoder this step computes exactly as transformers does."""
    text = text_decoder(model)
    if getattr(model.config, "model_type", None) != "qwen3_vl" or text is None or not hasattr(model, "lm_head"):
        return False
    if text.config.hidden_act != "silu" or (model.training and text.config.attention_dropout):
        return False
    for layer in text.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(p) is not torch.nn.Linear and not getattr(type(p), "linear_function", False) for p in projections):
            return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in text.modules())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-VL's RMSNorm, operation for operation (float32 statistics, the weight applied after the cast back)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it (rotate_half: the two halves swapped, the first negated)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def concatenated(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases, where they have them) of several projections of one input, as one projection."""
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([bias if bias is not None else weight.new_zeros(linear.out_features)
                              for bias, linear in zip(biases, linears)])


def kept_rows(buffer: torch.Tensor, indices: torch.Tensor, written: int) -> torch.Tensor:
    """Rows `indices` of a [rows, heads, capacity, d] key/value buffer in a new buffer of the same capacity, only
    their first `written` positions copied (the positions not yet decoded hold nothing)."""
    kept = buffer.new_empty(len(indices), *buffer.shape[1:])
    kept[:, :, :written] = buffer[:, :, :written].index_select(0, indices)
    return kept


class SharedPromptDecoder:
    """Decodes the rows of `n` rollouts per prompt, prompt-major (row p * n + i), on the prompts' prefill cache.

    `cache` holds each prompt once (not repeated); `prompt_mask` [prompts, P] its padding; `start` [rows] each
    row's first response position (every M-RoPE axis alike for generated text). `step(tokens, active, t)` feeds
    response token t of the `active` rows (indices into all rows, ascending) and returns their next-token logits;
    `keep(indices, written)` drops the other active rows from the response keys and values."""

    @torch.no_grad()
    def __init__(self, model: Any, cache: Any, prompt_mask: torch.Tensor, n: int, max_new_tokens: int,
                 start: torch.Tensor) -> None:
        text = text_decoder(model)
        config = text.config
        self.model, self.text, self.n, self.start = model, text, n, start
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.groups = self.heads // self.kv_heads
        self.prompts, self.prompt_len = prompt_mask.shape
        self.rows = self.prompts * n
        device = prompt_mask.device
        # rotary tables over every position a row can reach, looked up by position - low
        self.low = int(start.min())
        positions = torch.arange(self.low, int(start.max()) + max_new_tokens, device=device)
        anchor = text.embed_tokens.weight[:1].detach()  # dtype and device only (a parameter view trips FlopCounterMode)
        cos, sin = text.rotary_emb(anchor, positions[None, None].expand(3, 1, -1))
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim]
        self.padding_bias = torch.zeros(self.prompts, 1, 1, self.prompt_len, device=device).masked_fill(
            prompt_mask[:, None, None, :] == 0, float("-inf"))
        self.layers = []
        for index, layer in enumerate(text.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prompt_keys, prompt_values = cache.layers[index].keys, cache.layers[index].values  # [prompts, kv, P, d]
            self.layers.append({
                "qkv": concatenated(attn.q_proj, attn.k_proj, attn.v_proj),
                "gate_up": concatenated(mlp.gate_proj, mlp.up_proj),
                "o": (attn.o_proj.weight, attn.o_proj.bias), "down": (mlp.down_proj.weight, mlp.down_proj.bias),
                "norms": (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm),
                "scale": attn.scaling,
                "prompt_keys": prompt_keys, "prompt_values": prompt_values,
                "keys": prompt_keys.new_empty(self.rows, self.kv_heads, max_new_tokens, self.head_dim),
                "values": prompt_values.new_empty(self.rows, self.kv_heads, max_new_tokens, self.head_dim),
            })
        self.intermediate = config.intermediate_size

    def keep(self, indices: torch.Tensor, written: int) -> None:
        """Keep the response keys and values of the active rows `indices` (`kept_rows`)."""
        for layer in self.layers:
            layer["keys"], layer["values"] = (kept_rows(layer[name], indices, written) for name in ("keys", "values"))

    def per_prompt(self, x: torch.Tensor, right: torch.Tensor, active: torch.Tensor | None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x` [active, kv, groups, K] times its prompt's `right` [prompts, kv, K, M] (+ `bias`, broadcast over
        a prompt's block) -> [active, kv, groups, M]: each prompt's n rows as one block, one GEMM per prompt and
        head. Once rows have left the batch they are scattered into the all-rows layout first (the rows that left
        hold zeros, whose products are dropped: a GEMM's output row reads only its own input row)."""
        if active is not None:
            x = x.new_zeros(self.rows, *x.shape[1:]).index_copy_(0, active, x)
        width, out_width = x.shape[-1], right.shape[-1]
        block = x.reshape(self.prompts, self.n, self.kv_heads, self.groups, width).transpose(1, 2)
        out = torch.matmul(block.reshape(self.prompts, self.kv_heads, self.n * self.groups, width), right)
        if bias is not None:
            out = out + bias
        out = out.view(self.prompts, self.kv_heads, self.n, self.groups, out_width).transpose(1, 2)
        out = out.reshape(self.rows, self.kv_heads, self.groups, out_width)
        return out if active is None else out.index_select(0, active)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, active: torch.Tensor, t: int) -> torch.Tensor:
        """Logits [active rows, vocab] after feeding response token `t` (`tokens` [active rows])."""
        rows = tokens.shape[0]
        compacted = active if rows < self.rows else None
        where = self.start.index_select(0, active) + (t - self.low)
        cos, sin = self.cos[where][:, None], self.sin[where][:, None]  # [rows, 1, d]
        heads, kv_heads, groups, d = self.heads, self.kv_heads, self.groups, self.head_dim
        hidden = F.embedding(tokens, self.text.embed_tokens.weight)
        for layer in self.layers:
            input_norm, post_norm, q_norm, k_norm = layer["norms"]
            x = rms_norm(hidden, input_norm.weight, input_norm.variance_epsilon)
            q, k, v = F.linear(x, *layer["qkv"]).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
            q = rotate(rms_norm(q.view(rows, heads, d), q_norm.weight, q_norm.variance_epsilon), cos, sin)
            k = rotate(rms_norm(k.view(rows, kv_heads, d), k_norm.weight, k_norm.variance_epsilon), cos, sin)
            layer["keys"][:, :, t] = k
            layer["values"][:, :, t] = v.view(rows, kv_heads, d)
            q = (q * layer["scale"]).view(rows, kv_heads, groups, d)
            prompt_part = self.per_prompt(q, layer["prompt_keys"].transpose(-1, -2), compacted, self.padding_bias)
            response_part = torch.matmul(q, layer["keys"][:, :, : t + 1].transpose(-1, -2))
            weights = torch.cat([prompt_part, response_part], dim=-1).softmax(-1, dtype=torch.float32).to(q.dtype)
            out = self.per_prompt(weights[..., : self.prompt_len], layer["prompt_values"], compacted)
            out = out + torch.matmul(weights[..., self.prompt_len :], layer["values"][:, :, : t + 1])
            hidden = hidden + F.linear(out.reshape(rows, heads * d), *layer["o"])
            x = rms_norm(hidden, post_norm.weight, post_norm.variance_epsilon)
            gate, up = F.linear(x, *layer["gate_up"]).split([self.intermediate, self.intermediate], dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, *layer["down"])
        norm = self.text.norm
        return self.model.lm_head(rms_norm(hidden, norm.weight, norm.variance_epsilon))
