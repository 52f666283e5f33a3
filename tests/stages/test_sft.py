"""The SFT recipe (and `base`, the same recipe): labels, batches, data order, a short run, its outputs."""

import json
from pathlib import Path

import pytest
import torch

from prism.config import SFTConfig, load_config
from prism.data.formats import Conversation, DataError, read_sharegpt
from prism.models import load_processor
from prism.stages.sft import IGNORE, collate, encode_conversation, run, step_records

from .conftest import model_tensors


@pytest.fixture(scope="module")
def processor(world):
    return load_processor(world / "tokenizer")


def test_labels_are_exactly_the_assistant_turn_and_its_end_token(world, processor):
    conversation = read_sharegpt(world / "sft.json")[0]
    encoded = encode_conversation(processor, conversation, max_length=512)
    labelled = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE]
    assert processor.tokenizer.decode(labelled) == conversation.messages[-1]["content"] + "<|im_end|>"
    # the image became one token per merged patch: a 96 px image is 3 x 3 cells
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert encoded.input_ids.count(image_token) == 9 == int(encoded.image_grid_thw.prod() // 4)


def test_every_assistant_turn_is_labelled_and_no_user_turn(world, processor):
    image = read_sharegpt(world / "sft.json")[0].images
    messages = [{"role": "user", "content": "<image>How many?"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "And red?"}, {"role": "assistant", "content": "one"}]
    encoded = encode_conversation(processor, Conversation(messages, image), max_length=512)
    labelled = processor.tokenizer.decode([t for t, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE])
    assert labelled == "two<|im_end|>one<|im_end|>"


def test_truncation_inside_an_image_names_the_record(world, processor):
    conversation = read_sharegpt(world / "sft.json")[0]
    with pytest.raises(DataError, match=r"record \[7\].*max_length=5"):
        encode_conversation(processor, conversation, max_length=5, where="record [7]")


def test_collate_pads_right_and_marks_image_tokens(world, processor):
    records = read_sharegpt(world / "sft.json")[:3]
    encoded = [encode_conversation(processor, r, 512) for r in records]
    batch = collate(encoded, pad_id=0, image_token_id=6)
    width = max(len(e.input_ids) for e in encoded)
    assert batch["input_ids"].shape == (3, width)
    for row, e in enumerate(encoded):
        assert batch["attention_mask"][row].sum() == len(e.input_ids)
        assert (batch["labels"][row, len(e.input_ids):] == IGNORE).all()
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == 6).long())
    assert batch["pixel_values"].shape[0] == sum(e.pixel_values.shape[0] for e in encoded)


def test_data_order_covers_each_epoch_once_and_splits_over_processes():
    one = step_records(0, 2, 8, 16, seed=5, rank=0, world=1, per_device=4, accumulation=2)
    rank0 = step_records(0, 2, 8, 16, seed=5, rank=0, world=2, per_device=2, accumulation=2)
    rank1 = step_records(0, 2, 8, 16, seed=5, rank=1, world=2, per_device=2, accumulation=2)
    flat = lambda micro: sorted(i for m in micro for i in m)  # noqa: E731
    assert flat(one) == sorted(flat(rank0) + flat(rank1))
    second = step_records(1, 2, 8, 16, seed=5, rank=0, world=1, per_device=4, accumulation=2)
    assert sorted(flat(one) + flat(second)) == list(range(16))  # the epoch, each record once
    next_epoch = step_records(2, 2, 8, 16, seed=5, rank=0, world=1, per_device=4, accumulation=2)
    assert flat(next_epoch) != flat(one)  # a new permutation per epoch


def sft_config(world, policy_dir, out, *extra):
    return load_config(SFTConfig, overrides=[
        "model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32",
        f"data_files=[{world}/sft.json]", "max_length=512", "per_device_batch_size=4",
        "gradient_accumulation_steps=2", "max_steps=6", "optim.lr=3e-3", "optim.warmup_steps=1",
        f"output_dir={out}", "save_every_steps=2", *extra])


def test_short_run_learns_and_writes_every_output(world, policy_dir, tmp_path):
    out = run(sft_config(world, policy_dir, tmp_path / "sft"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5  # a random model learns the format's tokens fast
    before, after = model_tensors(policy_dir), model_tensors(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"]["path"] == str(policy_dir) and manifest["checkpoint"]["step"] == 6
    assert set(manifest["upstream"]) == {f"data:{world}/sft.json"}
    assert (out / "DONE").is_file() and (out / "config.yaml").is_file()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000004", "step-000006"]  # keep 2
    # finished: a second call does nothing
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert run(sft_config(world, policy_dir, tmp_path / "sft")) == out
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_different_config_never_reuses_a_run_directory(world, policy_dir, tmp_path):
    run(sft_config(world, policy_dir, tmp_path / "x", "max_steps=2"))
    with pytest.raises(FileExistsError, match="another SFTConfig"):
        run(sft_config(world, policy_dir, tmp_path / "x", "max_steps=3"))
    # bookkeeping (how often to save or log) is not the run's identity
    assert run(sft_config(world, policy_dir, tmp_path / "x", "max_steps=2", "save_every_steps=5")) == tmp_path / "x"


def test_gradient_accumulation_equals_one_large_batch(world, policy_dir, tmp_path):
    # 2 micro-batches of 4 vs one of 8: the same records, the same summed-token loss
    a = run(sft_config(world, policy_dir, tmp_path / "a", "max_steps=2"))
    b = run(sft_config(world, policy_dir, tmp_path / "b", "max_steps=2", "per_device_batch_size=8",
                       "gradient_accumulation_steps=1"))
    read = lambda d, key: [json.loads(l)[key] for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731,E741
    assert read(a, "loss") == pytest.approx(read(b, "loss"), rel=1e-6)
    assert read(a, "grad_norm") == pytest.approx(read(b, "grad_norm"), rel=1e-6)
    # Adam divides by sqrt(v): float-rounding differences of near-zero gradients grow to ~lr * 1e-2
    ta, tb = model_tensors(a / "model"), model_tensors(b / "model")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-4) for k in ta)


def test_too_few_records_is_a_clear_error(world, policy_dir, tmp_path):
    cfg = sft_config(world, policy_dir, tmp_path / "x", "per_device_batch_size=64")
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        run(cfg)


def test_packing_is_refused_clearly(world, policy_dir, tmp_path):
    with pytest.raises(NotImplementedError, match="packing"):
        run(sft_config(world, policy_dir, tmp_path / "x", "packing=true"))
