"""Shared prompt prefixes: the rows' gather of a prompt cache and its gradient."""

import torch

from prism.kv_prefix import gather_rows


def test_gather_rows_copies_each_rows_prompt_and_sums_its_gradient_over_the_rows_that_hold_it():
    source = torch.arange(12.0).view(3, 2, 2).requires_grad_()
    index = torch.tensor([2, 0, 2, 2])  # prompt 1 has no row
    gathered = gather_rows(source, index)
    assert torch.equal(gathered, source.detach()[[2, 0, 2, 2]])
    grad = torch.arange(1.0, 17.0).view(4, 2, 2)
    gathered.backward(grad)
    expected = torch.stack([grad[1], torch.zeros(2, 2), grad[0] + grad[2] + grad[3]])  # by hand
    assert torch.equal(source.grad, expected)


def test_gather_rows_gradient_equals_index_selects_for_a_gradient_that_is_a_view():
    torch.manual_seed(0)
    source = torch.randn(8, 2, 13, 4, requires_grad=True)
    index = torch.randint(0, 8, (30,))
    grad = torch.randn(30, 2, 17, 4)[:, :, :13]  # a slice, as the cache's concatenation hands it back
    mine = torch.autograd.grad(gather_rows(source, index), source, grad)[0]
    reference = torch.autograd.grad(source.index_select(0, index), source, grad)[0]
    torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)
