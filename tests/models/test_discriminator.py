"""The MoE discriminator: upcycling keeps the dense function, segments share their terminator, variants route and
see what they should, and a saved discriminator scores the same after loading."""

import argparse
import functools

import pytest
import torch
from safetensors.torch import load_file, save_file

from prism.models import (
    PRESETS,
    ModelError,
    build_model,
    build_processor,
    build_tokenizer,
)
from prism.models.discriminator import (
    Discriminator,
    DiscriminatorSpec,
    build_discriminator,
    encode_prompt,
    load_discriminator,
    read_authors_head,
    save_discriminator,
    segment_batch,
    upcycle,
)
from prism.response_format import SYSTEM_PROMPT, split_segments
from tests.models.fixtures import authors_discriminator_folder, noise_image, shape_corpus

MESSAGES = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "<image>How many red circles?"}]
TEACHER = "<caption>\n- a red circle\n- a blue square\n</caption>\n<think>\n1 red circle.\n</think>\n<answer>1</answer>"
# Same content, other spacing: a student's raw text must not differ from the teacher's in its layout or last token.
STUDENT = "  <caption>- a red circle</caption>\n\n\n<think>one</think>   <answer> 2 </answer>\n\n"


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer(shape_corpus()), image_size=PRESETS["embedded-s"].image_size)


@pytest.fixture(scope="module")
def dense(processor):
    return build_model("embedded-s", processor.tokenizer, seed=0)


def _kwargs(**overrides):
    return {"num_experts": 4, "top_k": 2, "expert_noise_std": 0.01, "router_init_std": 0.02,
            "aux_loss_coef": 0.01, "seed": 0, **overrides}


def _batch(processor, segments, uses_images=True):
    prompt = encode_prompt(processor, MESSAGES, [noise_image(96)], uses_images)
    return segment_batch(processor, [prompt] * len(segments), segments)


def test_upcycled_with_zero_noise_gives_the_dense_hidden_states_and_logits(processor, dense):
    moe = upcycle(dense, num_experts=4, top_k=2, expert_noise_std=0.0, router_init_std=0.02)
    assert type(moe).__name__ == "Qwen3VLMoeForConditionalGeneration"
    batch = _batch(processor, [split_segments(TEACHER).perception, split_segments(TEACHER).reasoning])
    with torch.no_grad():
        dense_out = dense(**batch, output_hidden_states=True)
        moe_out = moe(**batch, output_hidden_states=True)
    assert torch.allclose(dense_out.hidden_states[-1], moe_out.hidden_states[-1], atol=1e-5)
    assert torch.allclose(dense_out.logits, moe_out.logits, atol=1e-4)


def test_upcycling_copies_the_dense_mlp_into_each_expert_plus_noise_and_draws_fresh_routers(dense):
    noise, router_std = 0.01, 0.02
    moe = upcycle(dense, num_experts=4, top_k=2, expert_noise_std=noise, router_init_std=router_std, seed=3)
    dense_mlp = dense.model.language_model.layers[1].mlp
    moe_mlp = moe.model.language_model.layers[1].mlp
    gate_up = torch.cat([dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight])  # [2I, H], gate rows first
    deltas = moe_mlp.experts.gate_up_proj.detach() - gate_up  # [E, 2I, H]
    assert deltas.shape[0] == 4
    assert deltas.std().item() == pytest.approx(noise, rel=0.05)  # the noise, nothing else
    assert not torch.equal(deltas[0], deltas[1])  # each expert draws its own noise
    down = moe_mlp.experts.down_proj.detach() - dense_mlp.down_proj.weight
    assert down.std().item() == pytest.approx(noise, rel=0.05)
    assert moe_mlp.gate.weight.std().item() == pytest.approx(router_std, rel=0.1)
    # everything outside the MLPs is copied exactly
    assert torch.equal(moe.model.language_model.embed_tokens.weight, dense.model.language_model.embed_tokens.weight)
    assert torch.equal(moe.model.visual.patch_embed.linear_proj.weight, dense.model.visual.patch_embed.linear_proj.weight)
    again = upcycle(dense, num_experts=4, top_k=2, expert_noise_std=noise, router_init_std=router_std, seed=3)
    assert torch.equal(again.model.language_model.layers[1].mlp.experts.down_proj, moe_mlp.experts.down_proj)


def test_teacher_and_student_segments_end_in_the_same_terminator(processor):
    teacher, student = split_segments(TEACHER), split_segments(STUDENT)
    terminator = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for t, s, closing in ((teacher.perception, student.perception, "</caption>"),
                          (teacher.reasoning, student.reasoning, "</answer>")):
        batch = _batch(processor, [t, s])
        last = batch["attention_mask"].sum(-1) - 1  # where the score is read
        ids = batch["input_ids"]
        assert ids[0, last[0]] == ids[1, last[1]] == terminator
        closing_ids = processor.tokenizer(closing, add_special_tokens=False)["input_ids"]
        k = len(closing_ids)
        assert ids[0, last[0] - k : last[0]].tolist() == ids[1, last[1] - k : last[1]].tolist() == closing_ids
    # the raw student text ended in whitespace; the scored segment is the canonical rendering
    assert student.reasoning.endswith("<answer>2</answer>") and student.perception.startswith("<caption>\n")


def test_text_only_prompts_hold_no_image(processor):
    with_image = encode_prompt(processor, MESSAGES, [noise_image(96)], uses_images=True)
    text_only = encode_prompt(processor, MESSAGES, [noise_image(96)], uses_images=False)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert with_image.ids.count(image_token) == 9 and with_image.pixel_values is not None  # 96 px: 3 x 3 tokens
    assert image_token not in text_only.ids and text_only.pixel_values is None


def test_hard_routed_perception_scores_ignore_the_reasoning_experts(processor, dense):
    disc = build_discriminator(dense, DiscriminatorSpec("hard_routed", head_dropout=0.0), **_kwargs()).eval()
    batch = _batch(processor, [split_segments(TEACHER).perception])
    with torch.no_grad():
        perception, _ = disc(**batch, kind="perception")
        reasoning, _ = disc(**batch, kind="reasoning")
        for layer in disc.backbone.model.language_model.layers:  # perturb experts 2 and 3 (the reasoning half)
            layer.mlp.experts.gate_up_proj[2:] += 1.0
        perception_after, _ = disc(**batch, kind="perception")
        reasoning_after, _ = disc(**batch, kind="reasoning")
    assert torch.equal(perception, perception_after)
    assert not torch.allclose(reasoning, reasoning_after)
    with pytest.raises(ModelError, match="perception or reasoning"):
        disc(**batch, kind="response")


def test_routing_sums_give_transformers_load_balancing_loss_and_its_gradient():
    """Per-row sums, a shared opening's counted once per row that holds it, give transformers' loss of the whole
    rows, padding masked, and the same gradient; on one token by hand: E * sum_e share_e * mean probability_e."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

    from prism.models.discriminator import RoutingSums, balancing_loss, routing_sums

    # one token, 4 experts, top-2: probabilities 0.4 / 0.3 / 0.2 / 0.1 -> assignments 1 / 1 / 0 / 0
    one = routing_sums([torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()], torch.ones(1, 1), top_k=2)
    assert one.assignments.tolist() == [[1.0, 1.0, 0.0, 0.0]] and one.tokens.tolist() == [1.0]
    assert balancing_loss(one, 4).item() == pytest.approx(4 * (0.4 + 0.3))

    torch.manual_seed(0)
    rows, opening, tail, experts, layers = 3, 4, 5, 4, 2
    opening_logits = [torch.randn(opening, experts, requires_grad=True) for _ in range(layers)]
    tail_logits = [torch.randn(rows * tail, experts, requires_grad=True) for _ in range(layers)]
    mask = torch.ones(rows, opening + tail)
    mask[1, -4:], mask[2, -3:] = 0, 0  # padding
    whole = tuple(torch.cat([o.expand(rows, -1, -1), t.view(rows, tail, -1)], 1).flatten(0, 1)
                  for o, t in zip(opening_logits, tail_logits))
    expected = load_balancing_loss_func(whole, experts, 2, mask)
    first, second = routing_sums(opening_logits, mask[:, :opening], 2), routing_sums(tail_logits, mask[:, opening:], 2)
    got = balancing_loss(RoutingSums(*(a.sum(0) + b.sum(0) for a, b in zip(first, second))), experts)
    torch.testing.assert_close(got, expected)
    assert abs(got - load_balancing_loss_func(whole, experts, 2)) > 1e-3  # the padding's mask matters here
    grads = torch.autograd.grad(got, opening_logits + tail_logits)
    for grad, want in zip(grads, torch.autograd.grad(expected, opening_logits + tail_logits)):
        torch.testing.assert_close(grad, want)
    assert grads[-1].view(rows, tail, -1)[1, -4:].abs().sum() == 0  # padding gets no gradient


def test_free_routing_uses_every_expert_and_reports_the_aux_loss(processor, dense):
    disc = build_discriminator(dense, DiscriminatorSpec("moe", head_dropout=0.0), **_kwargs()).eval()
    batch = _batch(processor, [split_segments(TEACHER).perception, split_segments(TEACHER).reasoning])
    with torch.no_grad():
        out = disc.backbone.model(**batch, output_router_logits=True)
        scores, aux = disc(**batch, kind="perception")
    chosen = torch.cat([logits.topk(2, dim=-1).indices.flatten() for logits in out.router_logits])
    assert set(chosen.tolist()) == {0, 1, 2, 3}
    assert scores.shape == (2,) and aux.item() > 0


def test_variant_and_backbone_must_agree(dense):
    with pytest.raises(ModelError, match="needs an MoE backbone"):
        Discriminator(dense, DiscriminatorSpec("text_only"))
    moe = upcycle(dense, num_experts=2, top_k=1, expert_noise_std=0.0, router_init_std=0.02)
    with pytest.raises(ModelError, match="needs a dense backbone"):
        Discriminator(moe, DiscriminatorSpec("dense"))
    with pytest.raises(ModelError, match="not one of"):
        DiscriminatorSpec("sparse")


def test_dense_variant_keeps_the_dense_backbone(processor, dense):
    disc = build_discriminator(dense, DiscriminatorSpec("dense", head_dropout=0.0), **_kwargs())
    assert type(disc.backbone).__name__ == "Qwen3VLForConditionalGeneration"
    scores, aux = disc(**_batch(processor, [split_segments(TEACHER).perception]), kind="perception")
    assert scores.shape == (1,) and aux.item() == 0.0


@pytest.mark.parametrize("variant", ["hard_routed", "dense"])
def test_saved_discriminator_scores_the_same_after_loading(processor, dense, tmp_path, variant):
    disc = build_discriminator(dense, DiscriminatorSpec(variant, head_dropout=0.1), **_kwargs()).eval()
    folder = save_discriminator(disc, processor, tmp_path / "disc")
    assert (folder / "config.json").is_file() and (folder / "value_head.safetensors").is_file()
    loaded = load_discriminator(folder).eval()
    assert loaded.spec == disc.spec
    batch = _batch(processor, [split_segments(TEACHER).reasoning, split_segments(STUDENT).reasoning])
    with torch.no_grad():
        assert torch.equal(disc(**batch, kind="reasoning")[0], loaded(**batch, kind="reasoning")[0])
    (folder / "value_head.safetensors").unlink()
    with pytest.raises(ModelError, match="value_head.safetensors is missing"):
        load_discriminator(folder)


@pytest.mark.parametrize("variant", ["moe", "hard_routed", "text_only", "dense"])
def test_rows_sharing_a_prompt_run_it_once_and_match_whole_rows_in_scores_aux_and_gradients(processor, dense,
                                                                                           variant):
    from prism.models.discriminator import distinct_prompts, segment_hidden, segment_rows

    backbone = dense if variant == "dense" else None
    discriminator = (Discriminator(backbone, DiscriminatorSpec("dense")) if backbone is not None
                     else build_discriminator(dense, DiscriminatorSpec(variant), **_kwargs()))
    uses_images = variant != "text_only"
    first = encode_prompt(processor, MESSAGES, [noise_image(96, seed=1)], uses_images)
    second = encode_prompt(processor, [MESSAGES[0], {"role": "user", "content": "<image>Which shape is largest?"}],
                           [noise_image(64, seed=2)], uses_images)  # another length and image size
    prompts = [first, second, first, first, second]  # 5 rows, 2 distinct prompts
    segments = [split_segments(TEACHER).perception, split_segments(STUDENT).perception, "- a red circle",
                "- two\n- three\n- four", "- a blue square"]
    vision_calls = []
    hook = discriminator.backbone.model.visual.register_forward_hook(lambda *_: vision_calls.append(1))

    def run(shared: bool):
        discriminator.zero_grad(set_to_none=True)
        if shared:
            hidden, aux = segment_hidden(discriminator, processor, prompts, segments, "perception", 8)
        else:  # every row whole: the prompt (and image) once per row
            hidden, aux = discriminator.last_hidden(**segment_batch(processor, prompts, segments), kind="perception")
        (hidden.square().sum() + 10 * aux).backward()
        grads = {name: p.grad.clone() for name, p in discriminator.named_parameters() if p.grad is not None}
        return hidden.detach(), aux.detach(), grads

    shared_hidden, shared_aux, shared_grads = run(shared=True)
    assert len(vision_calls) == (1 if uses_images else 0)  # one tower call for the 2 distinct prompts
    whole_hidden, whole_aux, whole_grads = run(shared=False)
    hook.remove()
    assert torch.allclose(shared_hidden, whole_hidden, atol=1e-4)
    assert torch.allclose(shared_aux, whole_aux, atol=1e-6)
    assert (shared_aux > 0) == discriminator.is_moe
    assert shared_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        scale = grad.abs().max()  # float sums in another order: tolerance relative to the tensor's scale
        assert (shared_grads[name] - grad).abs().max() <= 1e-3 * scale + 1e-7, name
    if uses_images:
        assert whole_grads["backbone.model.visual.patch_embed.linear_proj.weight"].abs().sum() > 0
    # The prefix layout holds each prompt once, and cuts a long segment as the whole-row layout does
    distinct, owner = distinct_prompts(prompts)
    assert distinct == [first, second] and owner == [0, 1, 0, 0, 1]
    cut = max(len(first.ids), len(second.ids)) + 3
    rows = segment_rows(processor, distinct, owner, segments, max_length=cut)
    whole = segment_batch(processor, prompts, segments, max_length=cut)
    for row, prompt in enumerate(prompts):
        kept = whole["input_ids"][row][whole["attention_mask"][row].bool()].tolist()
        assert kept == prompt.ids + rows.segment_ids[row][rows.segment_mask[row].bool()].tolist()


def test_groups_of_rows_in_one_forward_keep_each_groups_hidden_states_and_aux_loss(processor, dense):
    """Teacher and student segments (of other lengths) run as one forward with `parts`: each group's hidden states
    and aux loss equal those of its own forward, the padding that the longer group adds masked out of the aux."""
    from prism.models.discriminator import prompt_prefix, segment_rows

    discriminator = build_discriminator(dense, DiscriminatorSpec("moe"), **_kwargs())
    prompts = [encode_prompt(processor, MESSAGES, [noise_image(96, seed=1)], True),
               encode_prompt(processor, [MESSAGES[0], {"role": "user", "content": "<image>Which shape?"}],
                             [noise_image(64, seed=2)], True)]
    teacher = ([0, 1], [split_segments(TEACHER).reasoning, "<think>\nTwo.\n</think>\n<answer>2</answer>"])
    student = ([0, 0, 1], ["<think>one</think><answer>1</answer>", "<answer>3</answer>",
                           split_segments(STUDENT).reasoning])
    prefill = discriminator.prefill(prompt_prefix(processor, prompts))
    alone = [discriminator.continue_hidden(prefill, segment_rows(processor, prompts, *group))
             for group in (teacher, student)]
    rows = segment_rows(processor, prompts, teacher[0] + student[0], teacher[1] + student[1])
    hidden, aux = discriminator.continue_hidden(prefill, rows, parts=[2, 3])
    assert rows.segment_mask[:2].sum(-1).max() > rows.segment_mask[2:].sum(-1).max()  # the students are padded
    torch.testing.assert_close(hidden, torch.cat([alone[0][0], alone[1][0]]), rtol=1e-5, atol=1e-5)
    assert aux.shape == (2,) and aux[0] != aux[1]
    torch.testing.assert_close(aux, torch.stack([alone[0][1], alone[1][1]]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="do not add up to the 5 rows"):
        discriminator.continue_hidden(prefill, rows, parts=[2, 2])


def test_rows_split_by_length_give_the_one_forward_hidden_states_aux_and_gradients(processor, dense, monkeypatch):
    import prism.models.discriminator as discriminator_module
    from prism.models.discriminator import prompt_prefix, segment_rows

    discriminator = build_discriminator(dense, DiscriminatorSpec("moe"), **_kwargs())
    prompts = [encode_prompt(processor, MESSAGES, [noise_image(96, seed=1)], True),
               encode_prompt(processor, [MESSAGES[0], {"role": "user", "content": "<image>Which shape?"}],
                             [noise_image(64, seed=2)], True)]
    owner = [0, 1, 1, 0, 1]
    segments = ["<answer>1</answer>", split_segments(TEACHER).reasoning, "<answer>3</answer>",
                split_segments(STUDENT).reasoning, "<answer>2</answer>"]
    rows = segment_rows(processor, prompts, owner, segments)
    widths = []
    hook = discriminator.backbone.model.language_model.embed_tokens.register_forward_hook(
        lambda module, args, out: widths.append(tuple(args[0].shape)))
    # free extra forwards, at most two: the three short answers apart from the two chains
    monkeypatch.setattr(discriminator_module, "length_buckets",
                        functools.partial(discriminator_module.length_buckets, max_buckets=2, forward_tokens=0))

    def run(split: bool):
        discriminator.zero_grad(set_to_none=True)
        prefill = discriminator.prefill(prompt_prefix(processor, prompts))
        hidden, aux = discriminator.continue_hidden(prefill, rows, parts=[2, 3], split_by_length=split)
        (hidden.square().sum() + 10 * aux.sum()).backward()
        return hidden.detach(), aux.detach(), {n: p.grad.clone() for n, p in discriminator.named_parameters()
                                               if p.grad is not None}

    one = run(split=False)
    split = run(split=True)
    hook.remove()
    lengths = rows.segment_mask.sum(-1).tolist()
    short = max(lengths[i] for i in (0, 2, 4))
    # each prefill: the prompts' common opening (the system prompt) once, then the two prompts' rest on its cache
    prompt_width = max(len(prompt.ids) for prompt in prompts)
    assert widths[0][0] == 1 and widths[0][1] >= 16 and widths[1] == (2, prompt_width - widths[0][1])
    assert widths[2] == (5, max(lengths))
    assert widths[3:5] == widths[:2] and widths[5:] == [(3, short), (2, max(lengths))]
    torch.testing.assert_close(split[0], one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[1], one[1], rtol=1e-6, atol=1e-7)
    assert split[2].keys() == one[2].keys()
    for name, grad in one[2].items():
        assert (split[2][name] - grad).abs().max() <= 1e-3 * grad.abs().max() + 1e-7, name  # as whole rows vs shared


@pytest.fixture(scope="module")
def saved_moe(processor, dense, tmp_path_factory):
    """A saved `moe` discriminator whose weights are exactly bfloat16 numbers (the authors train in bf16)."""
    disc = build_discriminator(dense, DiscriminatorSpec("moe", head_dropout=0.1), **_kwargs())
    disc.to(torch.bfloat16).to(torch.float32)
    return save_discriminator(disc, processor, tmp_path_factory.mktemp("saved") / "disc")


@pytest.mark.parametrize("shards", [1, 3])
def test_the_authors_released_discriminator_layout_loads_as_the_same_discriminator(processor, saved_moe, tmp_path,
                                                                                   shards):
    """The folder layout of prism-vlm/Qwen3-VL-2B-4X-Moe-warmup-120k, as the authors' moe/value_head.py:430-471
    writes it under transformers 4.57 (tests/models/fixtures.py: authors_discriminator_folder): no
    discriminator.json; the head as `v_head.1.weight` in the (sharded) weights and in value_head.pt."""
    authors = authors_discriminator_folder(saved_moe, tmp_path / "released", shards=shards)
    assert not (authors / "discriminator.json").exists() and (authors / "value_head.pt").is_file()
    loaded, ours = load_discriminator(authors).eval(), load_discriminator(saved_moe).eval()
    assert loaded.spec == DiscriminatorSpec("moe", head_dropout=0.1)
    mine = ours.state_dict()
    assert loaded.state_dict().keys() == mine.keys()
    assert all(torch.equal(tensor, mine[name]) for name, tensor in loaded.state_dict().items())  # experts transposed
    batch = _batch(processor, [split_segments(TEACHER).perception, split_segments(STUDENT).perception])
    with torch.no_grad():
        assert torch.equal(loaded(**batch, kind="perception")[0], ours(**batch, kind="perception")[0])


def test_the_authors_head_is_read_from_value_head_pt_alone(saved_moe, tmp_path):
    authors = authors_discriminator_folder(saved_moe, tmp_path / "released")
    weights = load_file(authors / "model.safetensors")
    head = weights.pop("v_head.1.weight")
    save_file(weights, authors / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(read_authors_head(authors, hidden_size=head.shape[1]), head)


def test_a_released_head_that_prism_cannot_hold_is_refused_naming_the_file_and_tensor(saved_moe, tmp_path):
    authors = authors_discriminator_folder(saved_moe, tmp_path / "released")
    head = torch.load(authors / "value_head.pt", weights_only=True)["v_head.summary.weight"]
    hidden = head.shape[1]
    pt = authors / "value_head.pt"
    torch.save({"v_head.summary.weight": head + 1}, pt)
    with pytest.raises(ModelError, match=r"value_head.pt and .*model.safetensors hold different value heads"):
        load_discriminator(authors)
    torch.save({"v_head.summary.weight": head, "v_head.summary.bias": torch.zeros(1)}, pt)
    with pytest.raises(NotImplementedError, match=r"value_head.pt: tensor 'v_head.summary.bias': the value head has a bias"):
        load_discriminator(authors)
    torch.save({"v_head.summary.weight": head.repeat(2, 1)}, pt)
    with pytest.raises(NotImplementedError, match=r"value_head.pt: tensor 'v_head.summary.weight': .* gives 2 scores"):
        read_authors_head(authors, hidden)
    torch.save({"v_head.summary.weight": torch.zeros(1, hidden + 1)}, pt)
    with pytest.raises(ModelError, match=rf"value_head.pt: tensor 'v_head.summary.weight': expected a float tensor of "
                                         rf"shape \[1, {hidden}\] .*got torch.float32 \[1, {hidden + 1}\]"):
        read_authors_head(authors, hidden)
    torch.save({"v_head.summary.weight": argparse.Namespace(weight=head)}, pt)  # pickled objects are not loaded
    with pytest.raises(ModelError, match="value_head.pt: not a weights-only torch file"):
        read_authors_head(authors, hidden)
    torch.save({"other": head}, pt)
    with pytest.raises(ModelError, match="value_head.pt: no tensor 'v_head.1.weight' or 'v_head.summary.weight'"):
        read_authors_head(authors, hidden)
    pt.unlink()
    (authors / "model.safetensors").unlink()  # no head anywhere: neither ours nor theirs
    (authors / "model.safetensors").write_bytes((saved_moe / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="discriminator.json is missing .*no value_head.pt, no v_head"):
        load_discriminator(authors)
