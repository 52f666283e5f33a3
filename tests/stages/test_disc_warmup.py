"""The discriminator warm-up: pairs in the published schema, Bradley-Terry training per kind, variants, resume."""

import json

import pytest
import torch

from prism.config import DiscWarmupConfig, load_config
from prism.data.formats import (
    WARMUP_FIELDS,
    read_rl_parquet,
    read_warmup_pairs,
)
from prism.response_format import split_segments
from prism.stages import disc_warmup
from prism.stages.disc_warmup import run, split_heldout

from .conftest import interrupted_after, model_tensors, scripted_text


def warmup_config(world, policy_dir, out, *extra):
    return load_config(DiscWarmupConfig, overrides=[
        "model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32", "model.mixed_precision=no",
        "policy.preset=embedded-s", f"policy.path={policy_dir}", "policy.dtype=float32", "policy.mixed_precision=no",
        f"teacher_files=[{world}/teacher.parquet]", "rollout_backend=hf", "rollouts_per_prompt=2",
        "max_new_tokens=8", "effective_batch_size=8", "micro_batch_size=4", "max_length=512",
        "expert_noise_std=0.002", "head_dropout=0.0", "optim.lr=1e-3", "optim.warmup_ratio=0.0",
        "max_steps=2", f"output_dir={out}", "save_every_steps=1", *extra])


def test_heldout_split_is_seeded_and_disjoint():
    train, held = split_heldout(20, 0.1, seed=0)
    assert len(held) == 2 and sorted(train + held) == list(range(20))
    assert split_heldout(20, 0.1, seed=0) == (train, held) and split_heldout(20, 0.1, seed=1)[1] != held
    assert split_heldout(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])


def test_generated_pairs_follow_the_published_schema(world, policy_dir, tmp_path, scripted_rollouts):
    scripted_rollouts["invalid_every"] = 2  # rollout 1 of each prompt is format-invalid: no pair
    out = run(warmup_config(world, policy_dir, tmp_path / "w"))
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    teacher = read_rl_parquet(world / "teacher.parquet")
    assert len(rows) == len(teacher)  # one valid rollout of two per prompt
    assert set(rows[0]) == set(WARMUP_FIELDS)
    expected = split_segments(scripted_text(0, 0))
    assert rows[0]["student_caption"] == expected.perception and rows[0]["student_cot"] == expected.reasoning
    assert rows[0]["teacher_caption"] == teacher[0].teacher_caption
    pairs = read_warmup_pairs(out / "pairs.jsonl")  # images resolve against the file's folder
    assert pairs[0].image.is_file() and pairs[0].image.read_bytes() == teacher[0].images[0]


def test_warmup_learns_to_separate_teacher_from_student(world, policy_dir, tmp_path, degraded_pairs):
    out = run(warmup_config(world, policy_dir, tmp_path / "w", f"data_files=[{degraded_pairs}]",
                            "max_steps=16", "optim.lr=3e-3", "heldout_fraction=0.2"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    first, last = rows[0], rows[-5:]
    assert sum(r["bt_loss"] for r in last) / 5 < first["bt_loss"] - 0.2
    for kind in ("perception", "reasoning"):
        assert min(r[f"accuracy_{kind}"] for r in last) >= 0.875
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["after"]["heldout_pairs"] == heldout["before"]["heldout_pairs"] >= 4
    for kind in ("perception", "reasoning"):
        assert heldout["after"][f"heldout_accuracy_{kind}"] >= 0.875
        assert heldout["after"][f"heldout_gap_{kind}"] > heldout["before"][f"heldout_gap_{kind}"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["heldout"]["after"] == heldout["after"] and (out / "model" / "value_head.safetensors").is_file()


def test_warmup_trains_on_pairs_in_the_authors_layout_with_text_only_pairs(world, policy_dir, tmp_path,
                                                                          degraded_pairs):
    """Pairs spelt as the PRISM authors' reader takes them (github.com/XIAO4579/PRISM, moe/train_moe_vl_warmup.py:
    93-101; train_moe_vl_warmup_fast.py:107-155): `question` instead of `prompt`, an absolute image path, and half
    of the pairs without an image (text only), mixed in the same micro-batches as pairs with one."""
    rows = []
    for index, pair in enumerate(read_warmup_pairs(degraded_pairs)):
        question = pair.prompt.replace("<image>", "")
        row = {"question": question, "teacher_caption": pair.teacher_caption, "student_caption": pair.student_caption,
               "teacher_cot": pair.teacher_cot, "student_cot": pair.student_cot}
        rows.append({**row, "image": str(pair.image.resolve())} if index % 2 else row)
    authors = tmp_path / "qwen3_vl_moe_warmup_pairwise_120k.jsonl"
    authors.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = read_warmup_pairs(authors)
    assert sum(pair.image is None for pair in pairs) == (len(pairs) + 1) // 2
    out = run(warmup_config(world, policy_dir, tmp_path / "w", f"data_files=[{authors}]", "heldout_fraction=0.2"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["bt_loss"] == m["bt_loss"] for m in metrics)  # trained, not NaN
    assert json.loads((out / "heldout.json").read_text())["after"]["heldout_pairs"] >= 2


@pytest.mark.parametrize("variant", ["moe", "dense", "text_only", "hard_routed", "whole_response"])
def test_each_variant_trains(world, policy_dir, tmp_path, degraded_pairs, variant):
    out = run(warmup_config(world, policy_dir, tmp_path / variant, f"data_files=[{degraded_pairs}]",
                            f"variant={variant}"))
    kinds = ["response"] if variant == "whole_response" else ["perception", "reasoning"]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(f"accuracy_{k}" in row for k in kinds) and ("accuracy_perception" in row) == (len(kinds) == 2)
    assert (row["aux_loss"] == 0.0) == (variant == "dense")
    trained, start = model_tensors(out / "model"), model_tensors(policy_dir)
    embed = "model.language_model.embed_tokens.weight"
    assert not torch.equal(trained[embed], start[embed])
    assert json.loads((out / "model" / "discriminator.json").read_text())["variant"] == variant



def test_interrupted_warmup_resumes_bit_identical_without_regenerating_pairs(world, policy_dir, tmp_path,
                                                                             monkeypatch, scripted_rollouts):
    steps = ["max_steps=4", "save_every_steps=2", "head_dropout=0.1"]
    whole = run(warmup_config(world, policy_dir, tmp_path / "whole", *steps))
    with interrupted_after(monkeypatch, disc_warmup, step=2):
        run(warmup_config(world, policy_dir, tmp_path / "cut", *steps))
    monkeypatch.setattr(disc_warmup, "generate_pairs", lambda *a: pytest.fail("pairs were generated again"))
    torch.manual_seed(999)  # the checkpoint must restore the RNG (head dropout draws from it)
    resumed = run(warmup_config(world, policy_dir, tmp_path / "cut", *steps))
    a, b = model_tensors(whole / "model"), model_tensors(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(whole / "model/value_head.safetensors"))["weight"],
                       load_file(str(resumed / "model/value_head.safetensors"))["weight"])
    strip = lambda out: [{k: v for k, v in json.loads(l).items() if k != "seconds"}
                         for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip(whole) == strip(resumed)
