"""Linear layers whose CPU bf16 GEMMs run on a grid of row counts.

torch runs a CPU bf16 matmul through oneDNN, which builds (JIT-compiles) a kernel for every new shape: 2.7 ms for a
[3000, 192] x [192, 576] linear on the Intel Xeon host here, about what the GEMM takes in float32, while a kernel
once built runs it at several times float32's rate on cores with AMX (`just bench-throughput`: `bf16_gflops`
against `bf16_gflops_new_shapes`). Float32 goes to MKL, which builds nothing. The recipes' row counts change with
every batch (rows x width, the tokens routed to an expert, the positions the output head reads), so under autocast
every GEMM paid the build. `grid_linear` pads a CPU bf16 linear's rows (every dimension but the last, flattened)
with zeros up to the next size of a geometric grid (`grid_rows`: 16 sizes per doubling, at most 6% more rows),
runs the GEMM on them and drops the padding: rows never mix in a GEMM, so the real rows' outputs and every gradient
are the unpadded call's, and a run meets a few dozen shapes per layer, each built once. Other calls (float32, CUDA)
are plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_rows(rows: int) -> int:
    """The smallest grid size >= rows: multiples of 16 up to 256, then 16 sizes per doubling."""
    if rows <= 256:
        return max(16, -(-rows // 16) * 16)
    step = 1 << (rows.bit_length() - 5)  # a sixteenth of the power of two at or below rows
    return -(-rows // step) * step


def bf16_autocast_on_cpu(x: torch.Tensor) -> bool:
    """Whether a matmul of `x` here would run in bf16 through oneDNN."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def grid_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, its rows padded to `grid_rows` under CPU bf16 autocast."""
    if not bf16_autocast_on_cpu(x) or x.numel() == 0:
        return F.linear(x, weight, bias)
    features = x.shape[-1]
    rows = x.numel() // features
    flat = x.reshape(rows, features)
    padded = grid_rows(rows)
    if padded > rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, features)])
    return F.linear(flat, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class GridLinear(torch.nn.Linear):
    """nn.Linear through `grid_linear`: the same parameters, state dict and function (the padding changes no
    result). `linear_function` says so to code that computes a linear layer from its weights itself
    (prism.rollout.shared_prompt_decode), which takes only bare linears otherwise."""

    linear_function = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grid_linear(x, self.weight, self.bias)


def use_grid_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Every plain nn.Linear of `model` becomes a GridLinear, in place (a class swap: parameters, hooks and state
    dict stay as they are); returns the model."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = GridLinear
    return model
