"""The discriminator's experts forward on CPU: one GEMM per expert and projection, registered with transformers.

transformers' `grouped_mm` experts forward (its default) multiplies every routed row by the fused `gate_up_proj`
in one grouped GEMM, splits the output into strided gate and up halves, gathers rows with an indexing whose
backward is `index_put`, and on CPU its grouped kernel is a loop of GEMMs anyway. At the embedded sizes (a few
thousand rows of width 128) the operations around the GEMMs cost as much as the GEMMs. `per_expert_forward` does
the same arithmetic with less around it:
- rows sorted by expert once, gathered with `index_select` and split into one contiguous block per expert;
- gate and up as two GEMMs on their own weight rows, so `act(gate) * up` runs on contiguous tensors;
- the weights split per expert with `split`/`unbind`, whose backward is one `cat`/`stack`, not a zero-filled
  copy of the whole [E, 2I, H] tensor per expert;
- the weighted outputs summed back per token with `index_add` (backward: a gather).
Same result as `grouped_mm` up to float summation order (a relative 1e-7 on the gradients here, tested); on CUDA
it hands over to transformers' `grouped_mm`, whose grouped kernel is the fast path there.
`bench/disc_split.py` measures both on the discriminator's pass.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from prism.models.gemm_grid import grid_linear

PER_EXPERT = "prism_per_expert"


def per_expert_forward(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [tokens, H], top_k_index / top_k_weights [tokens, k] -> [tokens, H]: the sum over each token's
    k experts of weight * down(act(gate(x)) * up(x)), for transformers' fused Qwen3-VL-MoE experts layout
    (`gate_up_proj` [E, 2I, H], gate rows first; `down_proj` [E, H, I])."""
    if hidden_states.device.type != "cpu":
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    top_k = top_k_index.size(-1)
    expert_of_pair = top_k_index.reshape(-1)
    order = torch.argsort(expert_of_pair, stable=True)
    counts = torch.bincount(expert_of_pair, minlength=experts.num_experts).tolist()
    token_of_pair = order // top_k
    rows = hidden_states.index_select(0, token_of_pair).split(counts)
    gate_weights, up_weights = experts.gate_up_proj.split(experts.intermediate_dim, dim=1)
    outputs = [grid_linear(experts.act_fn(grid_linear(x, gate)) * grid_linear(x, up), down)
               for x, gate, up, down, n in zip(rows, gate_weights.unbind(0), up_weights.unbind(0),
                                               experts.down_proj.unbind(0), counts) if n]
    if not outputs:  # no tokens
        return hidden_states.new_zeros(hidden_states.shape)
    pair_weights = top_k_weights.reshape(-1)[order].unsqueeze(-1).to(hidden_states.dtype)
    weighted = torch.cat(outputs) * pair_weights
    return hidden_states.new_zeros(hidden_states.shape).index_add(0, token_of_pair, weighted)


ALL_EXPERTS_FUNCTIONS.register(PER_EXPERT, per_expert_forward)
