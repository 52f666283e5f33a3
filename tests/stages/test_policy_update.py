"""The shared policy update: each preset's loss settings reach the loss exactly as computed by hand."""

import math

import pytest
import torch

from prism.algorithms import aggregate_loss
from prism.config import AlignConfig, RLVRConfig, load_config
from prism.stages.policy_update import policy_loss_fn

# three tokens of one response: ratio 1.35 with A = +1 (the upper clip acts), ratio 12 with A = -1 (the dual
# clip acts), ratio 0.9 with A = +1 (inside the clip range)
RATIOS = [1.35, 12.0, 0.9]
ADVANTAGES = torch.tensor([[1.0, -1.0, 1.0]], dtype=torch.float64)
MASK = torch.ones(1, 3)


def preset_loss(update, log_ratios, advantages):
    old = torch.zeros(1, len(log_ratios), dtype=torch.float64)
    loss_mat, _ = policy_loss_fn(update)(old + torch.tensor([log_ratios], dtype=torch.float64), old, advantages,
                                         torch.ones(1, len(log_ratios)))
    return float(aggregate_loss(loss_mat, torch.ones(1, len(log_ratios)), update.loss_agg))


@pytest.mark.parametrize("algorithm, clip_high, dual_clip", [("grpo", 0.2, 3.0), ("dapo", 0.28, 10.0)])
def test_token_level_presets_reach_the_loss(algorithm, clip_high, dual_clip):
    update = load_config(RLVRConfig, overrides=[f"algorithm={algorithm}"]).update
    # token-mean of: -min(1.35, 1 + clip_high), min(12, dual_clip), -0.9
    expected = (-(1 + clip_high) + dual_clip - 0.9) / 3
    assert preset_loss(update, [math.log(r) for r in RATIOS], ADVANTAGES) == pytest.approx(expected, abs=1e-12)


def test_dapo_differs_from_grpo_by_its_clip_higher_and_dual_clip_exactly():
    grpo, dapo = (load_config(RLVRConfig, overrides=[f"algorithm={a}"]).update for a in ("grpo", "dapo"))
    log_ratios = [math.log(r) for r in RATIOS]
    # clip-higher: 1.28 instead of 1.2 on the first token; dual clip 10 instead of 3 on the second
    difference = ((-1.28 + 10.0) - (-1.2 + 3.0)) / 3
    assert preset_loss(dapo, log_ratios, ADVANTAGES) - preset_loss(grpo, log_ratios, ADVANTAGES) == pytest.approx(
        difference, abs=1e-12)


def test_alignment_preset_uses_the_published_dual_clip():
    update = AlignConfig().update
    expected = (-1.2 + 3.0 - 0.9) / 3
    assert preset_loss(update, [math.log(r) for r in RATIOS], ADVANTAGES) == pytest.approx(expected, abs=1e-12)
    # a user's bounds keep their names from the override to the loss
    wider = load_config(AlignConfig, overrides=["update.clip_high=0.3", "update.dual_clip_c=5"]).update
    assert preset_loss(wider, [math.log(r) for r in RATIOS], ADVANTAGES) == pytest.approx((-1.3 + 5.0 - 0.9) / 3)


def test_gspo_preset_clips_the_sequence_ratio():
    update = load_config(RLVRConfig, overrides=["algorithm=gspo"]).update
    # log-ratios 0.1 and 0.3: one sequence ratio exp(0.2) = 1.2214, far outside [1 - 3e-4, 1 + 4e-4]
    up = preset_loss(update, [0.1, 0.3], torch.tensor([1.0], dtype=torch.float64))
    down = preset_loss(update, [0.1, 0.3], torch.tensor([-1.0], dtype=torch.float64))
    assert up == pytest.approx(-(1 + 4e-4), abs=1e-12)  # A > 0: the clipped ratio, every token
    assert down == pytest.approx(math.exp(0.2), abs=1e-12)  # A < 0: the unclipped ratio, no dual clip


def test_old_log_probs_are_recomputed_by_the_trainer_never_taken_from_the_sampler(monkeypatch):
    """The vllm backend's sampler (bfloat16 weights, its own kernels) gives other log-probs than the trainer. As
    verl, the update recomputes old log-probs with the trainer's model: with several mini-batches once, before
    the first update (policy_update.py, `old_log_probs`), with one the policy is its own old policy
    (`log_prob.detach()`). A batch's behaviour_log_probs never reach the loss: garbage there changes nothing."""
    import copy
    import dataclasses

    import numpy as np
    from accelerate import Accelerator
    from PIL import Image

    import prism.stages.policy_update as policy_update_module
    from prism.models import PRESETS, build_model, build_processor, build_tokenizer
    from prism.rollout import HFRolloutBackend, RolloutPrompt, SamplingParams, log_probs_and_entropy
    from prism.stages.policy_update import Group, policy_update

    size = PRESETS["embedded-s"].image_size
    processor = build_processor(build_tokenizer([f"There are {i % 5 + 1} red squares." for i in range(200)]),
                                image_size=size)
    processor.tokenizer.padding_side = "left"
    initial = build_model("embedded-s", processor.tokenizer, seed=0)
    images = [Image.fromarray(np.random.RandomState(s).randint(0, 256, (size, size, 3), dtype=np.uint8))
              for s in (0, 1)]
    sampled = HFRolloutBackend(initial, processor).generate(
        [RolloutPrompt(question="How many squares?", images=[image]) for image in images], n=2,
        sampling=SamplingParams(max_new_tokens=5, seed=0))
    update = load_config(RLVRConfig, overrides=["update.mini_batches=2"]).update
    advantages = torch.tensor([[1.0, -1.0], [-0.5, 0.5]])
    real = policy_update_module.policy_loss_fn

    def run(batch):
        seen = []

        def spying(cfg):
            loss = real(cfg)

            def wrapped(log_prob, old, adv, mask):
                seen.append((log_prob.detach().clone(), old.detach().clone()))
                return loss(log_prob, old, adv, mask)
            return wrapped

        monkeypatch.setattr(policy_update_module, "policy_loss_fn", spying)
        model = copy.deepcopy(initial).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        groups = [Group(batch, p, advantages[p]) for p in range(2)]
        stats = policy_update(model, optimizer, scheduler, Accelerator(cpu=True), groups, update, grad_clip=1.0,
                              filler=groups[0], step=1)
        return model, stats, seen

    model, stats, seen = run(sampled)
    garbage = dataclasses.replace(sampled, behaviour_log_probs=sampled.behaviour_log_probs - 3.0)  # as vLLM's, wrong
    other, other_stats, other_seen = run(garbage)
    assert stats == pytest.approx(other_stats, rel=0, abs=0, nan_ok=True)  # kl_ref is nan: no reference
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seen, other_seen))
    # update 1: old = the trainer's log-probs before any update (ratio 1); update 2: still the pre-update ones
    with torch.no_grad():
        before = [log_probs_and_entropy(initial, sampled.select_prompts([p]), with_entropy=False)[0] for p in (0, 1)]
    (log_prob_1, old_1), (log_prob_2, old_2) = seen
    assert torch.allclose(old_1, log_prob_1, atol=1e-6) and torch.allclose(old_1, before[0], atol=1e-6)
    assert torch.allclose(old_2, before[1], atol=1e-6) and not torch.allclose(old_2, log_prob_2, atol=1e-4)
    mask = sampled.select_prompts([1]).response_mask.bool()
    assert not torch.allclose(old_2[mask], garbage.select_prompts([1]).behaviour_log_probs[mask])
