import pytest
import torch
from transformers import Qwen3VLMoeTextConfig
from transformers.integrations.moe import grouped_mm_experts_forward
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

from prism.models import build_model, build_processor, build_tokenizer
from prism.models.discriminator import DiscriminatorSpec, build_discriminator
from prism.models.experts import PER_EXPERT, per_expert_forward
from tests.models.fixtures import shape_corpus


def _experts(num_experts=4, hidden=16, intermediate=24, seed=0):
    config = Qwen3VLMoeTextConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=num_experts)
    config._experts_implementation = "grouped_mm"
    experts = Qwen3VLMoeTextExperts(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return experts


def _gradients(forward, experts, hidden, index, weights):
    experts.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    out = forward(experts, hidden, index, weights)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), hidden.grad, experts.gate_up_proj.grad, experts.down_proj.grad


@pytest.mark.parametrize("unused_expert", [None, 2])
def test_per_expert_forward_matches_transformers_grouped_mm_in_output_and_every_gradient(unused_expert):
    experts = _experts()
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=generator)
    allowed = torch.tensor([e for e in range(4) if e != unused_expert])  # unused: no token routed to it
    index = torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:2]] for _ in range(37)])
    weights = torch.softmax(torch.randn(37, 2, generator=generator), dim=-1)
    ours = _gradients(per_expert_forward, experts, hidden, index, weights)
    theirs = _gradients(grouped_mm_experts_forward, experts, hidden, index, weights)
    for name, a, b in zip(("output", "d hidden", "d gate_up_proj", "d down_proj"), ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
    if unused_expert is not None:
        assert ours[2][unused_expert].abs().max() == 0 and ours[3][unused_expert].abs().max() == 0


def test_each_token_gets_its_experts_outputs_weighted_by_its_routing_weights():
    experts = _experts(num_experts=3, hidden=4, intermediate=6)
    hidden = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    index, weights = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[0.75, 0.25], [0.4, 0.6]])

    def expert(e, x):  # by hand, from the fused layout: gate rows first, then up rows
        gate, up = experts.gate_up_proj[e, :6], experts.gate_up_proj[e, 6:]
        return experts.down_proj[e] @ (torch.nn.functional.silu(gate @ x) * (up @ x))

    expected = torch.stack([0.75 * expert(0, hidden[0]) + 0.25 * expert(2, hidden[0]),
                            0.4 * expert(1, hidden[1]) + 0.6 * expert(0, hidden[1])])
    with torch.no_grad():
        assert torch.allclose(per_expert_forward(experts, hidden, index, weights), expected, atol=1e-6)


def test_an_upcycled_discriminator_runs_its_experts_with_the_per_expert_forward():
    tokenizer = build_tokenizer(shape_corpus())
    dense = build_model("embedded-s", build_processor(tokenizer, image_size=96).tokenizer, seed=0)
    discriminator = build_discriminator(dense, DiscriminatorSpec("moe"), num_experts=4, top_k=2,
                                        expert_noise_std=0.01, router_init_std=0.02, aux_loss_coef=0.01, seed=0)
    assert discriminator.backbone.config.text_config._experts_implementation == PER_EXPERT
