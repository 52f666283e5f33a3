"""The PRISM alignment stage: METHOD.md's loop (score before the update, multi-reward advantages, one
discriminator and one policy update), its diagnostics, the all-invalid fallback, variants and resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from prism.config import AlignConfig, load_config
from prism.data.formats import read_rl_parquet
from prism.models import load_processor
from prism.models.discriminator import encode_prompt, load_discriminator
from prism.stages import align
from prism.stages.align import (
    discriminator_loss_groups,
    run,
    score_batch,
    wasserstein_1,
)
from prism.stages.rlvr import rollout_prompt

from .conftest import discriminator_dir, interrupted_after, model_tensors, scripted_text


def align_config(world, policy_dir, disc_dir, out, *extra):
    return load_config(AlignConfig, overrides=[
        "model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32",
        "discriminator.preset=embedded-s", f"discriminator.path={disc_dir}", "discriminator.dtype=float32",
        f"data_files=[{world}/teacher.parquet]", "rollout_backend=hf", "prompts_per_step=2", "rollouts_per_prompt=4",
        "max_new_tokens=8", "micro_batch_size=4", "disc_micro_batch_size=8", "disc_max_length=512",
        "policy_optim.lr=1e-2", "disc_optim.lr=1e-3", "steps=2", "proxy_prompts=3", f"output_dir={out}",
        "save_every_steps=1", *extra])


def test_wasserstein_1_by_hand():
    assert wasserstein_1([1, 2], [2, 3]) == pytest.approx(1.0)  # every unit of mass moves 1
    assert wasserstein_1([0, 0, 1], [1]) == pytest.approx(2 / 3)  # two thirds of the mass move 1
    assert wasserstein_1([4, 4], [4]) == 0.0
    assert wasserstein_1([], [1]) != wasserstein_1([], [1])  # NaN


@pytest.fixture(scope="module")
def disc_dir(policy_dir, tmp_path_factory):
    return discriminator_dir(policy_dir, tmp_path_factory.mktemp("disc") / "moe")


def test_align_updates_both_models_and_logs_every_diagnostic(world, policy_dir, disc_dir, tmp_path, scripted_rollouts):
    out = run(align_config(world, policy_dir, disc_dir, tmp_path / "a"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    row = rows[-1]
    assert row["format_rate"] == 0.75  # every 4th scripted rollout is format-invalid
    for kind in ("perception", "reasoning"):
        assert 0.0 <= row[f"disc_accuracy_{kind}"] <= 1.0
        assert row[f"reward_gap_{kind}"] == pytest.approx(row[f"teacher_score_{kind}"] - row[f"policy_score_{kind}"],
                                                          abs=0.5)
    for name in ("caption_bullets", "reasoning_steps", "caption_bullets_w1", "reasoning_steps_w1", "response_length",
                 "seconds_generate", "seconds_disc_score", "seconds_disc_update", "seconds_policy_update"):
        assert name in row and row[name] == row[name], name  # present and not NaN
    assert row["disc_updated"] == 1.0 and row["clipfrac"] == 0.0  # one update: the policy is its own old policy
    # both models moved
    embed = "model.language_model.embed_tokens.weight"
    assert not torch.equal(model_tensors(out / "model")[embed], model_tensors(policy_dir)[embed])
    assert not torch.equal(model_tensors(out / "discriminator")[embed], model_tensors(disc_dir)[embed])
    proxies = json.loads((out / "proxies.json").read_text())
    assert set(proxies) == {"prompts", "teacher", "before", "after"} and proxies["prompts"] == 3
    # proxy rollouts are scripted rollout 0 of prompts 0, 1, 2: 1, 2 and 3 caption bullets, 1 step each
    assert proxies["before"]["caption_bullets"] == proxies["after"]["caption_bullets"] == 2.0
    assert proxies["before"]["reasoning_steps"] == 1.0
    assert proxies["teacher"]["reasoning_steps"] > 1.0 and proxies["before"]["reasoning_steps_w1"] > 0
    assert json.loads((out / "manifest.json").read_text())["upstream"].keys() >= {"data:" + f"{world}/teacher.parquet"}


def test_all_invalid_rollouts_leave_the_discriminator_untouched(world, policy_dir, disc_dir, tmp_path,
                                                                scripted_rollouts):
    scripted_rollouts["invalid_every"] = 1
    out = run(align_config(world, policy_dir, disc_dir, tmp_path / "a", "steps=1", "proxy_prompts=0"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["format_rate"] == 0.0 and row["disc_updated"] == 0.0
    before, after = model_tensors(disc_dir), model_tensors(out / "discriminator")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # every advantage is the format penalty alone: each group's scores are all replaced by -1, GN = 0
    assert row["advantage_std"] == 0.0
    assert not (out / "proxies.json").exists()


def test_one_discriminator_step_widens_the_gap_on_its_batch(world, disc_dir):
    processor = load_processor(disc_dir)
    discriminator = load_discriminator(disc_dir).train()
    discriminator.dropout.p = 0.0
    records = read_rl_parquet(world / "teacher.parquet")[:2]
    texts = [scripted_text(p, k) for p in range(2) for k in range(4)]
    prompts = [encode_prompt(processor, r.prompt, rollout_prompt(r).images, True) for r in records]
    cfg = load_config(AlignConfig, overrides=["disc_micro_batch_size=8", "disc_max_length=512"])

    def gap():
        scores = score_batch(discriminator, processor, prompts, records, texts, 4, cfg)
        s = scores["student_perception"]
        ok = ~torch.isnan(s)
        return float((scores["teacher_perception"].repeat_interleave(4)[ok] - s[ok]).mean())

    before = gap()
    optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.05)
    valid_pairs = 2 * sum(1 for t in texts if "</answer>" in t)
    losses = list(discriminator_loss_groups(discriminator, processor, prompts, records, texts, 4, cfg, valid_pairs))
    assert len(losses) == 2 and sum(int(m["num_valid"]) for _, m in losses) == valid_pairs == 12
    for loss, _ in losses:
        loss.backward()
    optimizer.step()
    assert gap() > before


@pytest.mark.parametrize("variant", ["dense", "text_only", "hard_routed", "whole_response"])
def test_each_variant_aligns(world, policy_dir, tmp_path, scripted_rollouts, variant):
    disc = discriminator_dir(policy_dir, tmp_path / "disc", variant)
    out = run(align_config(world, policy_dir, disc, tmp_path / "a", "steps=1", "proxy_prompts=0"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    kinds = ["response"] if variant == "whole_response" else ["perception", "reasoning"]
    assert all(f"reward_gap_{k}" in row for k in kinds) and row["disc_updated"] == 1.0
    assert json.loads((out / "discriminator" / "discriminator.json").read_text())["variant"] == variant



def test_interrupted_alignment_resumes_bit_identical(world, policy_dir, disc_dir, tmp_path, monkeypatch,
                                                     scripted_rollouts):
    steps = ["steps=3", "save_every_steps=1"]
    whole = run(align_config(world, policy_dir, disc_dir, tmp_path / "whole", *steps))
    with interrupted_after(monkeypatch, align, step=2):
        run(align_config(world, policy_dir, disc_dir, tmp_path / "cut", *steps))
    torch.manual_seed(4321)
    resumed = run(align_config(world, policy_dir, disc_dir, tmp_path / "cut", *steps))
    for folder in ("model", "discriminator"):
        a, b = model_tensors(whole / folder), model_tensors(resumed / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    head = "discriminator/value_head.safetensors"
    assert torch.equal(load_file(str(whole / head))["weight"], load_file(str(resumed / head))["weight"])
    timing = lambda k: k.startswith("seconds")
    strip = lambda out: [{k: v for k, v in json.loads(line).items() if not timing(k)}
                         for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip(whole) == strip(resumed)
    assert json.loads((whole / "proxies.json").read_text()) == json.loads((resumed / "proxies.json").read_text())
