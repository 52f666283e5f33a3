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
from prism.rollout.prompts import rollout_prompt
from prism.stages import align
from prism.stages.align import discriminator_pass, run, teacher_segment, wasserstein_1
from tests.models.fixtures import authors_discriminator_folder

from .conftest import discriminator_dir, interrupted_after, model_tensors, scripted_text


def align_config(world, policy_dir, disc_dir, out, *extra):
    return load_config(AlignConfig, overrides=[
        "model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32", "model.mixed_precision=no",
        "discriminator.preset=embedded-s", f"discriminator.path={disc_dir}", "discriminator.dtype=float32",
        "discriminator.mixed_precision=no",
        f"data_files=[{world}/teacher.parquet]", "rollout.backend=hf", "rollout.prompts_per_step=2",
        "rollout.rollouts_per_prompt=4", "rollout.max_new_tokens=8", "update.micro_batch_size=4", "disc_micro_batch_size=8", "disc_max_length=512",
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
    assert row["disc_fallback"] == 0.0 and row["clipfrac"] == 0.0  # one update: the policy is its own old policy
    assert row["disc_loss"] == pytest.approx(row["disc_bt_loss"] + row["disc_score_reg"], rel=1e-5)
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


def test_align_starts_from_a_discriminator_saved_by_the_authors_code(world, policy_dir, disc_dir, tmp_path,
                                                                   scripted_rollouts):
    """discriminator.path may name the released prism-vlm/Qwen3-VL-2B-4X-Moe-warmup-120k as the authors saved it
    (tests/models/fixtures.py: authors_discriminator_folder); align writes its discriminator back in ours."""
    released = authors_discriminator_folder(disc_dir, tmp_path / "released", shards=2)
    out = run(align_config(world, policy_dir, released, tmp_path / "a", "steps=1", "proxy_prompts=0"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "discriminator" / "discriminator.json").read_text()) == {"variant": "moe",
                                                                                     "head_dropout": 0.1}


def test_all_invalid_rollouts_step_the_discriminator_on_the_fallback(world, policy_dir, disc_dir, tmp_path,
                                                                     scripted_rollouts):
    scripted_rollouts["invalid_every"] = 1
    out = run(align_config(world, policy_dir, disc_dir, tmp_path / "a", "steps=1", "proxy_prompts=0"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["format_rate"] == 0.0 and row["disc_fallback"] == 1.0 and row["disc_bt_loss"] == 0.0
    assert row["disc_loss"] == pytest.approx(row["disc_fallback_loss"] + row["disc_score_reg"], rel=1e-5)
    assert row["disc_fallback_loss"] > 0 and row["disc_grad_norm"] > 0
    before, after = model_tensors(disc_dir), model_tensors(out / "discriminator")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the published fallback step
    # every advantage is the format penalty alone: each group's scores are all replaced by -1, GN = 0
    assert row["advantage_std"] == 0.0
    assert not (out / "proxies.json").exists()


def _pass_inputs(world, disc_dir, *overrides):
    processor = load_processor(disc_dir)
    records = read_rl_parquet(world / "teacher.parquet")[:2]
    texts = [scripted_text(p, k) for p in range(2) for k in range(4)]  # rollout 3 of each prompt is invalid
    prompts = [encode_prompt(processor, r.prompt, rollout_prompt(r).images, True) for r in records]
    cfg = load_config(AlignConfig, overrides=["disc_micro_batch_size=8", "disc_max_length=512",
                                              "discriminator.mixed_precision=no", *overrides])
    return processor, records, texts, prompts, cfg


def test_one_discriminator_step_widens_the_gap_on_its_batch(world, disc_dir):
    processor, records, texts, prompts, cfg = _pass_inputs(world, disc_dir)
    discriminator = load_discriminator(disc_dir).train()
    discriminator.dropout.p = 0.0

    def gap(scored):
        ok = scored.valid
        return float((scored.teacher["perception"].repeat_interleave(4)[ok] - scored.student["perception"][ok]).mean())

    optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.05)
    first = discriminator_pass(discriminator, processor, prompts, records, texts, 4, cfg, batch_has_valid=True)
    assert first.valid.tolist() == [True, True, True, False] * 2 and first.fallback == 0.0
    optimizer.step()
    with torch.no_grad():
        second = discriminator_pass(discriminator, processor, prompts, records, texts, 4, cfg, batch_has_valid=True,
                                    backward=False)
    assert gap(second) > gap(first)


@pytest.mark.parametrize("micro", [8, 3])
def test_the_pass_equals_the_published_loss_on_per_rollout_teacher_forwards(world, disc_dir, micro):
    """Teacher scored once per rollout (its segment repeated for each of the G rows), invalid rollouts on their
    fallback split, the loss per micro-batch, the gradient their mean: the pass (one backbone forward per
    teacher segment) gives the same loss and gradients as the published layout computed row by row."""
    from prism.algorithms import discriminator_loss
    from prism.models.discriminator import score_segments
    from prism.response_format import scored_segments

    processor, records, texts, prompts, cfg = _pass_inputs(world, disc_dir, f"disc_micro_batch_size={micro}",
                                                          "score_clip=0.05", "score_reg_coef=0.5")
    discriminator = load_discriminator(disc_dir).train()
    discriminator.dropout.p = 0.0  # the two layouts draw their dropout masks in another order
    scored = discriminator_pass(discriminator, processor, prompts, records, texts, 4, cfg, batch_has_valid=True)
    ours = {name: p.grad.clone() for name, p in discriminator.named_parameters() if p.grad is not None}
    discriminator.zero_grad(set_to_none=True)

    micro_batches = [list(range(start, min(start + micro, 8))) for start in range(0, 8, micro)]
    total = 0.0
    for rows in micro_batches:
        teacher, student = {}, {}
        for kind in ("perception", "reasoning"):
            row_prompts = [prompts[row // 4] for row in rows]
            teacher[kind], _ = score_segments(discriminator, processor, row_prompts,
                                              [teacher_segment(records[row // 4], kind) for row in rows], kind, 1, 512)
            student[kind], _ = score_segments(discriminator, processor, row_prompts,
                                              [scored_segments(texts[row])[0][kind] for row in rows], kind, 1, 512)
        valid = torch.tensor([scored_segments(texts[row])[1] for row in rows])
        loss, _ = discriminator_loss(teacher, student, valid, batch_has_valid=True, score_clip=0.05,
                                     score_reg_coef=0.5, fallback_coef=0.01)
        (loss / len(micro_batches)).backward()
        total += float(loss.detach()) / len(micro_batches)
    assert scored.loss == pytest.approx(total, rel=1e-5)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, discriminator.get_parameter(name).grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["moe", "hard_routed"])
def test_micro_batches_sharing_a_forward_give_what_one_micro_batch_a_forward_gives(world, policy_dir, tmp_path,
                                                                                  monkeypatch, variant):
    """disc_forward_batch_size regroups the forwards only: micro-batches of 3 rollouts (prompt 0's four rows
    straddle the first two), two to a forward, with the head's dropout on and the same seed, give the scores,
    loss, aux loss and gradients of one micro-batch a forward, in fewer prompt forwards."""
    from prism.models.discriminator import Discriminator

    disc = discriminator_dir(policy_dir, tmp_path / "disc", variant)
    prefills = []
    real_prefill = Discriminator.prefill

    def counted_prefill(self, *args, **kwargs):
        prefills.append(1)
        return real_prefill(self, *args, **kwargs)

    monkeypatch.setattr(Discriminator, "prefill", counted_prefill)
    results = []
    for forward in ("null", "6"):
        processor, records, texts, prompts, cfg = _pass_inputs(world, disc, "disc_micro_batch_size=3",
                                                              f"disc_forward_batch_size={forward}",
                                                              "disc_aux_loss_coef=0.5")
        discriminator = load_discriminator(disc).train()
        discriminator.dropout.p = 0.5
        prefills.clear()
        torch.manual_seed(0)
        scored = discriminator_pass(discriminator, processor, prompts, records, texts, 4, cfg, batch_has_valid=True)
        grads = {name: p.grad for name, p in discriminator.named_parameters() if p.grad is not None}
        results.append((scored, grads, len(prefills)))
    (one, one_grads, one_prefills), (shared, shared_grads, shared_prefills) = results
    kinds = 2 if variant == "hard_routed" else 1  # prefills per forward
    assert (one_prefills, shared_prefills) == (3 * kinds, 2 * kinds)  # 8 rollouts: micro-batches of 3, 3, 2
    assert shared.loss == pytest.approx(one.loss, rel=1e-5) and shared.bt_loss == pytest.approx(one.bt_loss, rel=1e-5)
    for kind in one.student:
        torch.testing.assert_close(shared.student[kind], one.student[kind], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shared.teacher[kind], one.teacher[kind], rtol=1e-5, atol=1e-6)
    assert one_grads.keys() == shared_grads.keys()
    for name, grad in one_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_the_forward_batch_must_hold_whole_micro_batches():
    from prism.config.loader import ConfigError

    with pytest.raises(ConfigError, match="disc_forward_batch_size.*multiple of disc_micro_batch_size"):
        load_config(AlignConfig, overrides=["disc_micro_batch_size=8", "disc_forward_batch_size=12"])


def test_per_rollout_teacher_draws_its_own_dropout_and_shared_one_per_prompt(world, disc_dir, monkeypatch):
    from prism.stages import align as align_module

    seen = []
    real = align_module.discriminator_loss

    def spy(teacher, student, valid, **kwargs):
        seen.append({k: v.detach().clone() for k, v in teacher.items()})
        return real(teacher, student, valid, **kwargs)

    monkeypatch.setattr(align_module, "discriminator_loss", spy)
    discriminator = load_discriminator(disc_dir).train()
    discriminator.dropout.p = 0.5
    for scoring in ("per_rollout", "shared"):
        processor, records, texts, prompts, cfg = _pass_inputs(world, disc_dir, f"teacher_scoring={scoring}")
        scored = discriminator_pass(discriminator, processor, prompts, records, texts, 4, cfg, batch_has_valid=True)
        per_prompt = seen[-1]["perception"].reshape(2, 4)
        distinct = [len(set(row.tolist())) for row in per_prompt]
        assert distinct == ([4, 4] if scoring == "per_rollout" else [1, 1]), scoring
        # the scores the advantage reads carry no dropout: one value per teacher segment
        assert scored.teacher["perception"].shape == (2,)


@pytest.mark.parametrize("variant", ["dense", "text_only", "hard_routed", "whole_response"])
def test_each_variant_aligns(world, policy_dir, tmp_path, scripted_rollouts, variant):
    disc = discriminator_dir(policy_dir, tmp_path / "disc", variant)
    out = run(align_config(world, policy_dir, disc, tmp_path / "a", "steps=1", "proxy_prompts=0"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    kinds = ["response"] if variant == "whole_response" else ["perception", "reasoning"]
    assert all(f"reward_gap_{k}" in row for k in kinds) and row["disc_fallback"] == 0.0
    assert json.loads((out / "discriminator" / "discriminator.json").read_text())["variant"] == variant



def test_several_policy_updates_per_step_make_the_clip_act(world, policy_dir, disc_dir, tmp_path, scripted_rollouts):
    out = run(align_config(world, policy_dir, disc_dir, tmp_path / "a", "steps=1", "proxy_prompts=0",
                           "update.mini_batches=2", "update.micro_batch_size=4"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["clipfrac"] > 0 and row["ppo_kl"] != 0  # the second update sees a moved policy


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
