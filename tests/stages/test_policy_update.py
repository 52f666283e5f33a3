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
