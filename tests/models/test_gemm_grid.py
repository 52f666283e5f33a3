"""CPU bf16 linears on a grid of row counts: the grid, the padded GEMM's equality with F.linear, the class swap."""

import copy

import torch
import torch.nn.functional as F

from prism.models import build_model, build_tokenizer
from prism.models.gemm_grid import GridLinear, grid_linear, grid_rows, use_grid_linears


def test_grid_rows_rounds_up_by_at_most_a_sixteenth_and_keeps_few_sizes():
    assert [grid_rows(r) for r in (1, 16, 17, 256, 257, 300, 1000, 3000, 6035)] == \
        [16, 16, 32, 256, 272, 304, 1024, 3072, 6144]
    for rows in range(1, 20000, 7):
        padded = grid_rows(rows)
        assert padded >= rows and padded % 16 == 0
        assert rows <= 256 or (padded - rows) / rows <= 1 / 16
    # an SFT run's token counts (rows x width) of M's forwards fall on a few dozen sizes, each a kernel built once
    assert len({grid_rows(rows) for rows in range(2600, 7001)}) == 24


def _linear_calls(monkeypatch):
    rows, plain = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: rows.append(x.shape[:-1].numel()) or plain(x, w, b))
    return rows


def test_grid_linear_equals_linear_under_bf16_autocast_on_padded_rows(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 77, 64, generator=generator, requires_grad=True)
    weight = torch.randn(96, 64, generator=generator, requires_grad=True)
    bias = torch.randn(96, generator=generator, requires_grad=True)
    upstream = torch.randn(3, 77, 96, generator=generator)
    results = []
    for fn in (grid_linear, lambda *args: F.linear(*args)):
        rows = _linear_calls(monkeypatch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, weight, bias)
        grads = torch.autograd.grad((out.float() * upstream).sum(), (x, weight, bias))
        results.append((out, grads, rows))
        monkeypatch.undo()
    (ours, our_grads, our_rows), (theirs, their_grads, their_rows) = results
    assert our_rows == [240] and their_rows == [231]  # 3 x 77 rows padded to the grid
    assert ours.shape == (3, 77, 96) and ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    for mine, reference in zip(our_grads, their_grads):
        assert mine.dtype == torch.float32 and torch.equal(mine, reference)


def test_float32_calls_are_plain_linear(monkeypatch):
    rows = _linear_calls(monkeypatch)
    x, weight = torch.randn(5, 7, 8), torch.randn(4, 8)
    assert torch.equal(grid_linear(x, weight), torch.nn.functional.linear(x, weight))
    assert rows == [35, 35]


def test_models_built_or_loaded_run_their_linears_through_the_grid():
    model = build_model("embedded-s", build_tokenizer(["one two three"] * 20), seed=0)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is GridLinear for m in linears)
    copied = copy.deepcopy(model)
    assert all(type(m) is GridLinear for m in copied.modules() if isinstance(m, torch.nn.Linear))


def test_the_swap_keeps_parameters_and_state_dict():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    weights = list(plain.parameters())
    keys = list(plain.state_dict())
    swapped = use_grid_linears(plain)
    assert swapped is plain and [type(m) for m in plain] == [GridLinear, torch.nn.ReLU, GridLinear]
    assert all(a is b for a, b in zip(plain.parameters(), weights, strict=True)) and list(plain.state_dict()) == keys
