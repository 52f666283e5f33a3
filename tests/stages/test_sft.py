"""The SFT recipe (and `base`, the same recipe): a short run, its outputs, accumulation, packing."""

import json

import pytest
import torch

from prism.config import ConfigError, ModelConfig, SFTConfig, load_config
from prism.data.encoding import IGNORE, Encoded, collate, collate_packed, encode_conversation
from prism.data.formats import DataError, read_sharegpt
from prism.models import load_processor
from prism.stages.sft import (
    MIN_SHARED_PREFIX,
    length_groups,
    prefix_groups,
    run,
    shared_prefix_length,
    summed_token_loss,
)

from .conftest import model_tensors


@pytest.fixture(scope="module")
def processor(world):
    return load_processor(world / "tokenizer")


def sft_overrides(world, policy_dir, out, *extra) -> list[str]:
    """A short SFT run's overrides: `sft_config` in-process, or the arguments of `prism train sft`."""
    return ["model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32", "model.mixed_precision=no",
            f"data_files=[{world}/sft.json]", "max_length=512", "per_device_batch_size=4",
            "gradient_accumulation_steps=2", "max_steps=6", "optim.lr=3e-3", "optim.warmup_steps=1",
            f"output_dir={out}", "save_every_steps=2", *extra]


def sft_config(world, policy_dir, out, *extra):
    return load_config(SFTConfig, overrides=sft_overrides(world, policy_dir, out, *extra))


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


def test_each_record_is_rendered_once_however_many_epochs(world, policy_dir, tmp_path, monkeypatch):
    import prism.stages.sft as sft

    rendered = []
    render = sft.render_conversation
    monkeypatch.setattr(sft, "render_conversation", lambda tokenizer, record, where: (
        rendered.append(where), render(tokenizer, record, where))[1])
    run(sft_config(world, policy_dir, tmp_path / "sft", "max_records=8", "max_steps=3"))  # 8 records a step: 3 epochs
    assert sorted(rendered) == sorted(f"record [{i}]" for i in range(8))


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
    read = lambda d, key: [json.loads(l)[key] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(a, "loss") == pytest.approx(read(b, "loss"), rel=1e-6)
    assert read(a, "grad_norm") == pytest.approx(read(b, "grad_norm"), rel=1e-6)
    # Adam divides by sqrt(v): float-rounding differences of near-zero gradients grow to ~lr * 1e-2
    ta, tb = model_tensors(a / "model"), model_tensors(b / "model")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-4) for k in ta)


def test_too_few_records_is_a_clear_error(world, policy_dir, tmp_path):
    cfg = sft_config(world, policy_dir, tmp_path / "x", "per_device_batch_size=64")
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        run(cfg)


def test_the_head_runs_only_on_labelled_positions_and_the_loss_and_gradients_equal_full_logits(
        world, processor, policy_dir):
    from prism.models import load_model

    model = load_model(policy_dir, dtype="float32")
    encoded = [encode_conversation(processor, r, 512) for r in read_sharegpt(world / "sft.json")[:4]]
    batch = collate(encoded, processor.tokenizer.pad_token_id, model.config.image_token_id)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    assert 0 < int(keep.sum()) < targets.numel() // 2  # prompts and padding are most of the positions

    rows_seen = []
    watch = model.lm_head.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape))
    model.zero_grad(set_to_none=True)
    loss = summed_token_loss(model, batch, share_prefix=False)
    loss.backward()
    watch.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert rows_seen == [torch.Size([int(keep.sum()), model.config.text_config.hidden_size])]
    assert not model.lm_head._forward_pre_hooks  # the selection hook is gone after the call

    # by hand: logits of every position, then the labelled ones
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-6, atol=1e-5)
    for name, grad in grads.items():  # the loss is a sum over tokens: rounding scales with each gradient's size
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-5,
                                   atol=1e-6 * float(grad.abs().max()))


def test_the_shared_system_prompt_runs_once_with_the_whole_rows_loss_and_gradients(world, processor, policy_dir):
    from prism.models import load_model

    model = load_model(policy_dir, dtype="float32")
    records = read_sharegpt(world / "sft.json")[:6]
    batch = collate([encode_conversation(processor, r, 512) for r in records],
                    processor.tokenizer.pad_token_id, model.config.image_token_id)
    # by hand: the system turn and the user turn's opening up to its image, the same in every row
    system = next(m["content"] for m in records[0].messages if m["role"] == "system")
    opening = processor.tokenizer(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    prefix = len(opening["input_ids"])
    assert all(next(m["content"] for m in r.messages if m["role"] == "system") == system for r in records)
    assert shared_prefix_length(batch, model.config.image_token_id) == prefix >= MIN_SHARED_PREFIX
    assert batch["input_ids"][0, prefix] == model.config.image_token_id

    def loss_and_grads(share_prefix):
        widths = []
        watch = model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(tuple(out.shape[:2])))
        model.zero_grad(set_to_none=True)
        loss = summed_token_loss(model, batch, share_prefix=share_prefix)
        loss.backward()
        watch.remove()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, widths

    loss_a, grads_a, widths_a = loss_and_grads(False)
    loss_b, grads_b, widths_b = loss_and_grads(True)
    rows, width = batch["input_ids"].shape
    assert widths_a == [(rows, width)] and widths_b == [(1, prefix), (rows, width - prefix)]
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:  # the prefix's gradient is summed over the rows in another order: rounding only
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)


def test_the_shared_prefix_stops_where_rows_differ_before_an_image_and_before_the_first_labelled_prediction():
    image = 100
    ids = torch.arange(1, 41).repeat(3, 1)
    labels = torch.full_like(ids, IGNORE)
    labels[:, 35:] = ids[:, 35:]
    batch = lambda: {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert shared_prefix_length(batch(), image) == 34  # position 34 predicts the first labelled token
    ids[1, 30] = 0
    assert shared_prefix_length(batch(), image) == 30  # the first column where the rows differ
    ids[:, 20] = image
    assert shared_prefix_length(batch(), image) == 20  # the prefix runs without the vision inputs
    ids[:, MIN_SHARED_PREFIX - 1] = image
    assert shared_prefix_length(batch(), image) == 0  # too short to pay for its own forward
    ids[:, MIN_SHARED_PREFIX - 1] = 0
    assert shared_prefix_length({k: v[:1] for k, v in batch().items()}, image) == 0  # one row
    assert shared_prefix_length({**batch(), "position_ids": ids}, image) == 0  # packed rows
    left_padded = torch.ones_like(ids)
    left_padded[2, :MIN_SHARED_PREFIX + 2] = 0
    assert shared_prefix_length({**batch(), "attention_mask": left_padded}, image) == 0  # padding is not shared
    assert shared_prefix_length({**batch(), "labels": torch.full_like(ids, IGNORE)}, image) == 0  # nothing to learn


def test_samples_that_open_with_the_most_common_tokens_run_as_their_own_forward():
    system, other = list(range(1, MIN_SHARED_PREFIX + 5)), list(range(50, 50 + MIN_SHARED_PREFIX + 5))
    sample = lambda opening, tail: Encoded(opening + [tail], [IGNORE] * len(opening) + [tail], None, None)
    a1, b1, a2, a3 = sample(system, 7), sample(other, 8), sample(system, 9), sample(system, 6)
    c1 = sample(other[:3] + system, 5)
    image = 99
    assert prefix_groups([a1, b1, a2, c1, a3], image) == [[a1, a2, a3], [b1, c1]]  # each group in its order
    assert prefix_groups([b1, a1, c1, a2], image) == [[a1, a2], [b1, c1]]  # ties: the first opening seen
    assert prefix_groups([a1, a2, a3], image) == [[a1, a2, a3]]  # all alike: one forward
    assert prefix_groups([a1, b1, c1], image) == [[a1, b1, c1]]  # nothing to share: one forward
    assert prefix_groups([a1], image) == [[a1]]
    image = system[3]  # the prefix runs without images: an opening holding one is not shared
    assert prefix_groups([a1, b1, a2, b1], image) == [[b1, b1], [a1, a2]]
    # every forward keeps an image where any sample has one: DDP's synchronised backward needs the vision tower's
    with_image = lambda s: Encoded(s.input_ids, s.labels, torch.zeros(4, 3), torch.tensor([[1, 2, 2]]))
    d1, d2, e1 = with_image(a1), with_image(a2), with_image(b1)
    assert prefix_groups([d1, b1, d2], 99) == [[d1, b1, d2]]  # b1 alone would run without one
    assert prefix_groups([d1, e1, d2], 99) == [[d1, d2], [e1]]


def assert_forwards_equal_one(model, pad, image, samples, groups):
    """The summed token loss and the parameter gradients of `groups` (one forward each) equal one forward of
    `samples`, to float rounding."""
    def loss_and_grads(forwards):
        model.zero_grad(set_to_none=True)
        loss = sum(summed_token_loss(model, collate(group, pad, image)) for group in forwards)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads([samples]), loss_and_grads(groups)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)


def test_base_corpus_grouped_by_system_prompt_gives_the_one_forward_loss_and_gradients(world, processor, policy_dir):
    """Half the base corpus carries the system prompt: its holders share it in their own forward, the rest run
    whole; the summed loss and the gradients are those of one forward of every sample."""
    from prism.models import load_model

    model = load_model(policy_dir, dtype="float32")
    pad, image = processor.tokenizer.pad_token_id, model.config.image_token_id
    samples = [encode_conversation(processor, r, 512) for r in read_sharegpt(world / "base.json")[:12]]
    groups = prefix_groups(samples, image)
    assert len(groups) == 2 and sorted(map(id, groups[0] + groups[1])) == sorted(map(id, samples))
    assert shared_prefix_length(collate(groups[0], pad, image), image) >= MIN_SHARED_PREFIX

    assert_forwards_equal_one(model, pad, image, samples, groups)


def test_micro_batches_split_by_length_give_the_one_forward_loss_and_gradients(world, processor, policy_dir):
    """SFT samples in forwards by length, each padded to its own longest sample and sharing the system prompt
    within it: the summed loss and the gradients are those of one forward, and fewer padded tokens run."""
    from prism.models import load_model

    model = load_model(policy_dir, dtype="float32")
    pad, image = processor.tokenizer.pad_token_id, model.config.image_token_id
    samples = [encode_conversation(processor, r, 512) for r in read_sharegpt(world / "sft.json")[:16]]
    parts = length_groups(samples)
    assert len(parts) > 1 and sorted(map(id, sum(parts, []))) == sorted(map(id, samples))
    assert [samples.index(s) for s in parts[0]] == sorted(samples.index(s) for s in parts[0])  # in their order
    width = lambda part: len(part) * max(len(s.input_ids) for s in part)
    assert sum(map(width, parts)) < width(samples)

    assert_forwards_equal_one(model, pad, image, samples, parts)


def test_length_groups_keep_images_in_every_forward_or_in_none():
    short, long = list(range(1, 20)), list(range(1, 400))
    text = lambda ids: Encoded(ids, ids, None, None)
    pictured = lambda ids: Encoded(ids, ids, torch.zeros(4, 3), torch.tensor([[1, 2, 2]]))
    a, b, c = text(short), text(long), text(short)
    assert length_groups([a, b, c]) == [[a, c], [b]]
    d, e = pictured(short), pictured(long)
    assert length_groups([d, e, d]) == [[d, d], [e]]
    assert length_groups([a, e, c]) == [[a, e, c]]  # [a, c] would run without the image [e] has
    assert length_groups([a]) == [[a]]


def test_split_by_length_trains_as_one_forward_does_and_is_refused_with_packing(world, policy_dir, tmp_path):
    one = run(sft_config(world, policy_dir, tmp_path / "one", "max_steps=2", "per_device_batch_size=16",
                         "gradient_accumulation_steps=1"))
    split = run(sft_config(world, policy_dir, tmp_path / "split", "max_steps=2", "per_device_batch_size=16",
                           "gradient_accumulation_steps=1", "split_by_length=true"))
    read = lambda d, key: [json.loads(l)[key] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(split, "loss") == pytest.approx(read(one, "loss"), rel=1e-6)
    assert read(split, "grad_norm") == pytest.approx(read(one, "grad_norm"), rel=1e-5)
    assert read(one, "forwards") == [1, 1] and min(read(split, "forwards")) > 1
    with pytest.raises(ConfigError, match="split_by_length"):
        sft_config(world, policy_dir, tmp_path / "x", "packing=true", "split_by_length=true")


def test_no_shared_prefix_where_one_pass_would_share_a_dropout_mask(policy_dir):
    from prism.models import load_model
    from prism.stages.sft import prefix_sharing_applies

    model = load_model(policy_dir, dtype="float32").train()
    assert prefix_sharing_applies(model)
    model.config.text_config.attention_dropout = 0.1
    assert not prefix_sharing_applies(model)
    assert prefix_sharing_applies(model.eval())  # no dropout at evaluation
    model.config.text_config.attention_dropout = 0.0
    model.model.language_model.layers[0].mlp.down_proj = torch.nn.Sequential(
        torch.nn.Dropout(0.1), model.model.language_model.layers[0].mlp.down_proj)  # as a LoRA dropout sits
    assert not prefix_sharing_applies(model.train())


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(world, processor, policy_dir):
    """Samples sharing a row see only themselves: the summed loss and every gradient equal the padded
    batch's, with images, on fewer rows."""
    from prism.models import load_model

    model = load_model(policy_dir, dtype="float32")
    encoded = [encode_conversation(processor, r, 512) for r in read_sharegpt(world / "sft.json")[:6]]
    pad, image = processor.tokenizer.pad_token_id, model.config.image_token_id
    padded = collate(encoded, pad, image)

    def rope_index(ids, types, grid):
        return model.model.get_rope_index(input_ids=ids, mm_token_type_ids=types, image_grid_thw=grid)[0]

    packed = collate_packed(encoded, pad, image, 512, rope_index)
    assert packed["input_ids"].shape[0] < len(encoded) and "attention_mask" not in packed
    assert (packed["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum()

    def loss_and_grads(batch):  # whole rows for both: this is about packing
        model.zero_grad(set_to_none=True)
        loss = summed_token_loss(model, batch, share_prefix=False)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(padded), loss_and_grads(packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-4)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)


def test_packed_run_trains_like_the_padded_run(world, policy_dir, tmp_path):
    a = run(sft_config(world, policy_dir, tmp_path / "a", "max_steps=2"))
    b = run(sft_config(world, policy_dir, tmp_path / "b", "max_steps=2", "packing=true"))
    read = lambda d, key: [json.loads(l)[key] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(b, "loss") == pytest.approx(read(a, "loss"), rel=1e-5)
    assert read(b, "tokens") == read(a, "tokens")  # real tokens, not padding
    ta, tb = model_tensors(a / "model"), model_tensors(b / "model")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-4) for k in ta)


# ----------------------------------------------------------------------------------------------------
# Mixed precision (issue #17): float32 master weights and AdamW state, bf16 compute. One record per step keeps
# these runs to seconds: bf16 matmuls are slow on CPUs without AMX.
# ----------------------------------------------------------------------------------------------------

DEFAULT_PRECISION = [f"model.dtype={ModelConfig.dtype}", f"model.mixed_precision={ModelConfig.mixed_precision}"]
PURE_BF16 = ["model.dtype=bfloat16", "model.mixed_precision=no"]
TINY_LR = ["per_device_batch_size=1", "gradient_accumulation_steps=1", "max_steps=2", "optim.lr=1e-6",
           "optim.weight_decay=0.0", "optim.lr_scheduler=constant", "save_every_steps=0"]


def moved_elements(out, initial) -> dict[str, torch.Tensor]:
    """Per tensor of the final model: which elements differ from the initial weights in the final dtype."""
    final = model_tensors(out / "model")
    return {name: final[name] != initial[name].to(final[name].dtype) for name in initial}


def test_lost_update_fp32_master_weights_keep_every_update_that_pure_bf16_rounds_away(world, policy_dir, tmp_path):
    """At lr 1e-6 an AdamW step moves a weight by about 1e-6, far below the spacing of bf16 numbers at a weight's
    size (1.2e-4 at 0.02, 7.8e-3 at 1.0): pure bf16 parameters lose most updates, float32 master weights under
    bf16 autocast (the default) keep every one."""
    initial = model_tensors(policy_dir)
    mixed_cfg = sft_config(world, policy_dir, tmp_path / "mixed", *TINY_LR, *DEFAULT_PRECISION)
    assert mixed_cfg.model.autocast_dtype == "bfloat16"
    mixed = run(mixed_cfg)
    assert {t.dtype for t in model_tensors(mixed / "model").values()} == {torch.float32}
    kept = moved_elements(mixed, initial)
    assert all(moved.any() for moved in kept.values())  # every trainable tensor moved
    assert sum(int(m.sum()) for m in kept.values()) / sum(m.numel() for m in kept.values()) > 0.9

    pure = run(sft_config(world, policy_dir, tmp_path / "pure", *TINY_LR, *PURE_BF16))
    lost = moved_elements(pure, initial)
    assert sum(int(m.sum()) for m in lost.values()) / sum(m.numel() for m in lost.values()) < 0.1  # ~2% moved
    assert not all(moved.any() for moved in lost.values())  # the norms' weights (1.0) never move at all

    # the mixed run computed in bf16: its loss is not the float32 run's
    fp32 = run(sft_config(world, policy_dir, tmp_path / "fp32", *TINY_LR))
    first_loss = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first_loss(mixed) != first_loss(fp32) and first_loss(mixed) == pytest.approx(first_loss(fp32), rel=1e-2)
