"""HF rollouts: row order, masks, finish reasons, seeding, image alignment, log-prob agreement, compute dtype;
vLLM missing, and its engine's dtype."""

import dataclasses
import importlib.util
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from prism.kv_prefix import cache_kwarg, prefix_first
from prism.models import PRESETS, build_model, build_processor, build_tokenizer
from prism.models.tokenizer import EOS_TOKEN_ID
from prism.rollout import (
    HFRolloutBackend,
    RolloutBackend,
    RolloutError,
    RolloutPrompt,
    SamplingParams,
    VLLMRolloutBackend,
    expand_vision_inputs,
    response_mask_and_finish,
    sequence_log_probs,
)
from prism.rollout.hf import ReservingLayer, prefix_cache, reserving_cache, vision_token_ids


def _corpus(n=300, seed=0):
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circles", "squares", "triangles"]
    return [f"There are {rng.randint(1, 5)} {rng.choice(colours)} {rng.choice(shapes)}." for _ in range(n)]


def _image(seed):
    size = PRESETS["embedded-s"].image_size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer(_corpus()), image_size=PRESETS["embedded-s"].image_size)


@pytest.fixture(scope="module")
def backend(processor):
    return HFRolloutBackend(build_model("embedded-s", processor.tokenizer, seed=0), processor)


@pytest.fixture(scope="module")
def eos_backend(processor):
    """A model pushed towards <|im_end|> (a bias on its eos logit), so some rollouts stop and some do not."""
    model = build_model("embedded-s", processor.tokenizer, seed=0)
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[EOS_TOKEN_ID] = 4.5
    model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    return HFRolloutBackend(model, processor)


def _prompts():
    return [
        RolloutPrompt(question="How many red circles are there?", images=[_image(1)]),
        RolloutPrompt(question="How many?", images=[_image(2)]),  # shorter: left-padded
    ]


def test_sampling_params_are_validated():
    SamplingParams(max_new_tokens=4, temperature=0.0, top_p=0.5, seed=3)
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"seed": -1}):
        with pytest.raises(RolloutError):
            SamplingParams(**{"max_new_tokens": 4, **bad})
    with pytest.raises(RolloutError):
        RolloutPrompt(question="q", messages=[{"role": "user", "content": "q"}])


def test_shapes_row_order_and_vision_inputs_once_per_prompt(backend, processor):
    assert isinstance(backend, RolloutBackend)
    batch = backend.generate(_prompts(), n=3, sampling=SamplingParams(max_new_tokens=6, seed=0))
    assert batch.num_rows == 6 and batch.response_ids.shape == (6, 6)
    assert batch.behaviour_log_probs.shape == batch.response_mask.shape == (6, 6)
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(batch.texts) == len(batch.finish_reasons) == 6
    for p in range(2):  # the n rows of a prompt share its prompt ids
        rows = batch.prompt_ids[p * 3 : p * 3 + 3]
        assert (rows == rows[0]).all()
    # left padding: the shorter prompt 2 starts with pad, and every prompt ends with the generation prompt
    assert batch.prompt_mask[3, 0] == 0 and batch.prompt_ids[3, 0] == processor.tokenizer.pad_token_id
    assert (batch.prompt_mask[:, -1] == 1).all()
    # each image processed once (not n times); expansion repeats whole per-image blocks, prompt-major
    per_image = int(batch.image_grid_thw[0].prod())
    assert batch.pixel_values.shape[0] == 2 * per_image and batch.image_grid_thw.shape == (2, 3)
    pixels, grids = batch.row_vision_inputs()
    assert pixels.shape[0] == 6 * per_image and grids.shape == (6, 3)
    blocks = pixels.split(per_image)
    assert all(torch.equal(blocks[i], batch.pixel_values[:per_image]) for i in range(3))
    assert all(torch.equal(blocks[i], batch.pixel_values[per_image:]) for i in range(3, 6))
    assert expand_vision_inputs(None, None, [0, 0], 3) == (None, None)


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 9, 2, 9]])
    mask, finish = response_mask_and_finish(ids, [2, 0])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert finish == ["stop", "length", "stop"]


def test_masks_finish_reasons_and_texts_with_eos(eos_backend, processor):
    for seed in range(20):  # the first seed whose rollouts both stop and run out of tokens
        batch = eos_backend.generate(_prompts(), n=4, sampling=SamplingParams(max_new_tokens=8, seed=seed))
        if set(batch.finish_reasons) == {"stop", "length"}:
            break
    assert set(batch.finish_reasons) == {"stop", "length"}, batch.finish_reasons
    stop_ids = set(eos_backend.model.generation_config.eos_token_id)
    for row, reason in enumerate(batch.finish_reasons):
        ids, mask = batch.response_ids[row], batch.response_mask[row]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # contiguous from the start
        stops = [i for i, t in enumerate(ids.tolist()) if t in stop_ids]
        if reason == "stop":
            assert stops[0] == length - 1  # mask includes the eos
        else:
            assert not stops and length == 8
        assert (batch.behaviour_log_probs[row, length:] == 0).all()
        assert (batch.behaviour_log_probs[row, :length] < 0).all()
        assert "<|im_end|>" not in batch.texts[row]
        assert batch.texts[row] == processor.tokenizer.decode(ids[:length], skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_seeds_differ(backend):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    a = backend.generate(_prompts(), n=2, sampling=params)
    b = backend.generate(_prompts(), n=2, sampling=params)
    c = backend.generate(_prompts(), n=2, sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=8))
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.behaviour_log_probs, b.behaviour_log_probs)
    assert not torch.equal(a.response_ids, c.response_ids)
    # the n rollouts of one prompt are different samples
    assert not torch.equal(a.response_ids[0], a.response_ids[1])


def test_images_stay_aligned_with_their_prompt(backend):
    """Greedy: prompt 2 in a batch equals prompt 2 alone; same question, other image -> other log-probs."""
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    same_question = [RolloutPrompt(question="How many?", images=[_image(1)]), _prompts()[1]]
    both = backend.generate(same_question, n=2, sampling=greedy)
    alone = backend.generate([same_question[1]], n=1, sampling=greedy)
    for row in (2, 3):
        assert torch.equal(both.response_ids[row], alone.response_ids[0])
        torch.testing.assert_close(both.behaviour_log_probs[row], alone.behaviour_log_probs[0], atol=1e-5, rtol=0)
    assert torch.equal(both.response_ids[0], both.response_ids[1])  # greedy rows of a prompt agree
    # the two prompts differ only in their image: their scores must differ
    with torch.no_grad():
        logp = sequence_log_probs(backend.model, both)
        swapped = torch.cat(both.pixel_values.chunk(2)[::-1])  # prompt 1 gets image 2 and vice versa
        both_swapped = dataclasses.replace(both, pixel_values=swapped)
        logp_swapped = sequence_log_probs(backend.model, both_swapped)
    assert (logp - logp_swapped).abs().max() > 1e-4


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_behaviour_log_probs_match_recomputed(eos_backend, temperature, top_p):
    params = SamplingParams(max_new_tokens=8, temperature=temperature, top_p=top_p, seed=1)
    batch = eos_backend.generate(_prompts(), n=3, sampling=params)
    with torch.no_grad():
        recomputed = sequence_log_probs(eos_backend.model, batch)
    torch.testing.assert_close(recomputed, batch.behaviour_log_probs, atol=1e-5, rtol=0)
    if temperature not in (0.0, 1.0):  # the temperature is really applied: unscaled log-probs differ
        with torch.no_grad():
            unscaled = sequence_log_probs(eos_backend.model, batch, temperature=1.0)
        assert (unscaled - recomputed).abs().max() > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_and_entropy_equal_a_whole_row_forward(eos_backend, temperature):
    """The scores read the head only at response tokens; they equal every position's logits of one whole forward
    per row, softmaxed with the vision ids suppressed, 0 outside the response (entropy included)."""
    from prism.rollout import log_probs_and_entropy

    model = eos_backend.model
    batch = eos_backend.generate(_prompts(), n=3, sampling=SamplingParams(max_new_tokens=8, temperature=temperature,
                                                                          seed=4))
    assert batch.response_mask.min() == 0  # some responses stop early
    pixels, grids = batch.row_vision_inputs()
    with torch.no_grad():
        log_probs, entropy = log_probs_and_entropy(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels,
                       image_grid_thw=grids, mm_token_type_ids=(batch.input_ids == model.config.image_token_id).long(),
                       use_cache=False).logits
    resp_len = batch.response_ids.shape[1]
    scaled = logits[:, -resp_len - 1 : -1] / temperature
    scaled[..., vision_token_ids(model)] = float("-inf")
    logp = torch.log_softmax(scaled, -1)
    mask = batch.response_mask.float()
    expected = logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * mask
    probs = logp.exp()
    expected_entropy = -(probs * torch.where(probs > 0, logp, 0.0)).sum(-1) * mask
    torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=0)
    assert (log_probs[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all()


def test_sequence_log_probs_carry_gradients(backend):
    batch = backend.generate(_prompts()[:1], n=2, sampling=SamplingParams(max_new_tokens=4, seed=0))
    logp = sequence_log_probs(backend.model, batch)
    logp.sum().backward()
    grad = backend.model.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    backend.model.zero_grad(set_to_none=True)


def test_update_weights_switches_the_model(processor):
    first = build_model("embedded-s", processor.tokenizer, seed=0)
    second = build_model("embedded-s", processor.tokenizer, seed=1)
    hf = HFRolloutBackend(first, processor)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    before = hf.generate(_prompts()[:1], n=1, sampling=greedy)
    hf.update_weights(second)
    after = hf.generate(_prompts()[:1], n=1, sampling=greedy)
    assert hf.model is second
    assert not torch.allclose(before.behaviour_log_probs, after.behaviour_log_probs)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_missing_is_one_clear_line(processor):
    with pytest.raises(RolloutError) as info:
        VLLMRolloutBackend("unused/path", processor)
    message = str(info.value)
    assert "\n" not in message
    assert message == ("vLLM is not installed: pip install 'prism[gpu]' on a GPU node, or use rollout_backend=hf")
    assert isinstance(info.value, ValueError)


def test_prompt_without_images_mixes_with_image_prompts(backend):
    prompts = [RolloutPrompt(question="Count them.", images=[]), _prompts()[0], RolloutPrompt(question="Hi", images=[])]
    batch = backend.generate(prompts, n=2, sampling=SamplingParams(max_new_tokens=5, temperature=0.8, seed=3))
    assert batch.images_per_prompt == [0, 1, 0] and batch.image_grid_thw.shape == (1, 3)
    pixels, grids = batch.row_vision_inputs()
    assert grids.shape == (2, 3) and pixels.shape[0] == 2 * batch.pixel_values.shape[0]
    with torch.no_grad():
        recomputed = sequence_log_probs(backend.model, batch)
    torch.testing.assert_close(recomputed, batch.behaviour_log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_images", [True, False])
@pytest.mark.parametrize("split", ["one forward", "by length"])
def test_prompt_once_forward_equals_per_row_forward_with_gradients(processor, with_images, split, monkeypatch):
    """The shared-prompt forward (prompt and images once per prompt, cache gathered for its rows) gives the
    per-row forward's log-probs and the same parameter gradients, with and without images, over prompts of
    different lengths (left padding) and responses that stop early (right padding), with its rows in one forward
    or in forwards by response length (each forward free, so every length runs at its own width)."""
    import functools

    import prism.rollout.hf as hf_module
    from prism.rollout.hf import (
        response_logits_per_row,
        response_logits_shared_prompt,
        shares_prompts,
    )

    calls, length_buckets = [], hf_module.length_buckets

    def free_forwards(lengths):
        calls.append(length_buckets(lengths, forward_tokens=0))
        return calls[-1]

    monkeypatch.setattr(hf_module, "length_buckets", free_forwards)
    shared_logits = functools.partial(response_logits_shared_prompt, split_by_length=split == "by length")

    model = build_model("embedded-s", processor.tokenizer, seed=0)
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[EOS_TOKEN_ID] = 3.0  # some rollouts stop early
    model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    hf = HFRolloutBackend(model, processor, behaviour_log_probs=False)
    prompts = _prompts() if with_images else [RolloutPrompt(question="Count them all, please.", images=[]),
                                              RolloutPrompt(question="Hi", images=[])]
    batch = hf.generate(prompts, n=3, sampling=SamplingParams(max_new_tokens=7, temperature=1.0, seed=5))
    assert batch.prompt_mask.min() == 0 and batch.response_mask.min() == 0  # both paddings are exercised
    assert shares_prompts(model, batch)

    def loss_and_grads(logits_fn):
        model.zero_grad(set_to_none=True)
        pieces = logits_fn(model, batch, torch.device("cpu"))  # [(logits [k, V], row-major place [k])]
        logits, place = torch.cat([logits for logits, _ in pieces]), torch.cat([place for _, place in pieces])
        assert sorted(place.tolist()) == batch.response_mask.reshape(-1).nonzero().squeeze(-1).tolist()
        tokens = batch.response_ids.reshape(-1)[place]
        picked = torch.gather(torch.log_softmax(logits, -1), -1, tokens.unsqueeze(-1)).squeeze(-1)
        picked.sum().backward()
        scores = torch.zeros(batch.response_mask.numel()).index_put((place,), picked.detach())
        return scores, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, shared_grads = loss_and_grads(shared_logits)
    assert (len(calls[0]) > 2) if split == "by length" else not calls
    per_row, per_row_grads = loss_and_grads(response_logits_per_row)
    torch.testing.assert_close(shared, per_row, atol=1e-5, rtol=0)
    assert shared_grads.keys() == per_row_grads.keys()
    if with_images:
        assert any(name.startswith("model.visual") for name in shared_grads)
    for name in per_row_grads:
        torch.testing.assert_close(shared_grads[name], per_row_grads[name], atol=1e-5, rtol=1e-4)


def test_prompt_once_forward_is_off_where_it_cannot_apply(backend):
    from prism.rollout.hf import shares_prompts

    batch = backend.generate(_prompts(), n=2, sampling=SamplingParams(max_new_tokens=3, seed=0))
    single = backend.generate(_prompts(), n=1, sampling=SamplingParams(max_new_tokens=3, seed=0))
    assert shares_prompts(backend.model, batch) and not shares_prompts(backend.model, single)
    backend.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert not shares_prompts(backend.model, batch)  # a checkpointed layer would append to the cache twice
        with torch.no_grad():
            assert shares_prompts(backend.model, batch)  # no recomputation without a backward
    finally:
        backend.model.gradient_checkpointing_disable()


def test_draw_tokens_samples_the_softmax():
    from prism.rollout.hf import draw_tokens

    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    scores = probs.log().expand(40_000, -1)  # log 0 = -inf: never drawn
    counts = torch.bincount(draw_tokens(scores, torch.Generator().manual_seed(0)), minlength=4).float() / 40_000
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)  # 4 standard errors at most
    again = draw_tokens(scores[:50], torch.Generator().manual_seed(0))
    assert torch.equal(again, draw_tokens(scores[:50], torch.Generator().manual_seed(0)))


def test_top_p_keeps_the_smallest_set_reaching_p():
    from prism.rollout.hf import top_p_filter

    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # sorted ascending: 0.05, 0.15, 0.3, 0.5 -> cumulative 0.05, 0.2, 0.5, 1.0; drop cumulative <= 1 - p
    kept = lambda p: torch.isfinite(top_p_filter(scores, p)).squeeze(0).tolist()
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.3) == [True, False, False, False]
    assert kept(1e-6) == [True, False, False, False]  # at least one token survives


@pytest.mark.parametrize("top_p", [0.7, 0.95, 0.05])
def test_the_nucleus_warper_keeps_what_transformers_top_p_keeps(top_p):
    """numpy's sort in place of torch's: the same scores out, -inf entries (suppressed tokens) and a temperature's
    scaling included."""
    from transformers.generation import TopPLogitsWarper

    from prism.rollout.hf import NucleusWarper, sort_ascending

    scores = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 3
    scores[:, :5] = -float("inf")
    for rows in (scores, scores / 0.7):
        values, order = sort_ascending(rows)
        expected_values, _ = torch.sort(rows)
        assert torch.equal(values, expected_values) and torch.equal(rows.gather(-1, order), values)
        ids = torch.zeros(64, 1, dtype=torch.long)
        assert torch.equal(NucleusWarper(top_p)(ids, rows), TopPLogitsWarper(top_p)(ids, rows))


def test_generate_with_the_nucleus_warper_samples_what_transformers_top_p_does(eos_backend, processor):
    from transformers import LogitsProcessorList

    from prism.rollout.hf import NucleusWarper

    model, (inputs, _) = eos_backend.model, eos_backend.encode(_prompts())
    settings = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=0,
                    pad_token_id=processor.tokenizer.pad_token_id)
    torch.manual_seed(5)
    expected = model.generate(**inputs, **settings, top_p=0.7)
    torch.manual_seed(5)
    got = model.generate(**inputs, **settings, top_p=1.0, logits_processor=LogitsProcessorList([NucleusWarper(0.7)]))
    assert torch.equal(got, expected)


def test_greedy_rollouts_equal_transformers_generate(backend, processor):
    inputs, _ = backend.encode(_prompts())
    expected = backend.model.generate(**inputs, max_new_tokens=6, do_sample=False, temperature=None, top_p=None,
                                      top_k=None, suppress_tokens=vision_token_ids(backend.model),
                                      pad_token_id=processor.tokenizer.pad_token_id)
    batch = backend.generate(_prompts(), n=1, sampling=SamplingParams(max_new_tokens=6, temperature=0.0))
    assert torch.equal(batch.response_ids, expected[:, inputs["input_ids"].shape[1]:])


@pytest.mark.parametrize("room", [12, 3])  # room for every token, and too little: it grows past it
def test_generate_on_a_reserving_cache_samples_what_the_default_cache_does(eos_backend, processor, room):
    model, (inputs, _) = eos_backend.model, eos_backend.encode(_prompts())
    settings = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                    pad_token_id=processor.tokenizer.pad_token_id)
    torch.manual_seed(3)
    expected = model.generate(**inputs, **settings)
    cache = reserving_cache(model.config, room)
    torch.manual_seed(3)
    got = model.generate(**inputs, **settings, **{cache_kwarg(model): cache})
    assert torch.equal(got, expected)
    assert all(isinstance(layer, ReservingLayer) for layer in cache.layers)
    prompt, written = inputs["input_ids"].shape[1], expected.shape[1] - 1  # the last token is never fed back
    for layer in cache.layers:
        assert layer.length == layer.keys.shape[2] == written
        # sized once at the prompt with the room asked for, or grown past too little room
        if room >= written - prompt:
            assert layer.key_buffer.shape[2] == prompt + room
        else:
            assert layer.key_buffer.shape[2] >= written
    with pytest.raises(NotImplementedError, match="no beam search"):
        cache.layers[0].reorder_cache(torch.tensor([0]))


@pytest.fixture(scope="module")
def sharp_model(processor):
    """A random model whose matrices are scaled up 16x: its tokens depend on the whole context (at the usual init
    a wrong mask still gave the same tokens here)."""
    model = build_model("embedded-s", processor.tokenizer, seed=0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(16.0)
    return model


@pytest.mark.parametrize("with_images", [True, False])
@pytest.mark.parametrize("do_sample", [True, False])
def test_generate_from_the_shared_prefix_cache_samples_what_a_whole_prefill_does(sharp_model, processor, do_sample,
                                                                                 with_images):
    """Evaluation's layout: the prompts' common opening moved to the front of every left-padded row and computed
    once; `generate` runs the rest and samples the same tokens (text-only prompts too: there `generate` numbers
    positions from the mask alone)."""
    model = sharp_model
    prompts = _prompts() + _prompts()[:1]
    if not with_images:
        prompts = [dataclasses.replace(prompt, images=[]) for prompt in prompts]
    inputs, _ = HFRolloutBackend(model, processor).encode(prompts)
    settings = dict(max_new_tokens=12, do_sample=do_sample, top_p=1.0, top_k=0,
                    pad_token_id=processor.tokenizer.pad_token_id, **({"temperature": 1.0} if do_sample else {}))
    torch.manual_seed(3)
    expected = model.generate(**inputs, **settings, **{cache_kwarg(model): reserving_cache(model.config, 12)})
    order, prefix = prefix_first(inputs["input_ids"], inputs["attention_mask"], model.config.image_token_id)
    assert prefix > 50  # the system prompt and the template's opening (up to the image, where there is one)
    moved = {k: v.gather(1, order) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
             for k, v in inputs.items()}
    width = inputs["input_ids"].shape[1]

    def from_prefix(prefix_ids):
        torch.manual_seed(3)
        with torch.inference_mode():
            cache = prefix_cache(model, prefix_ids, 3, width - prefix + 12)
            return model.generate(**moved, **settings, **{cache_kwarg(model): cache}), cache

    got, cache = from_prefix(moved["input_ids"][:1, :prefix])
    assert torch.equal(got[:, width:], expected[:, width:])
    assert cache.layers[0].key_buffer.shape[2] == width + 12  # room for the rest and the responses: no copy
    # the tokens come from the cache: another prefix's cache samples other tokens
    wrong, _ = from_prefix(moved["input_ids"][:1, 1 : prefix + 1])
    assert not torch.equal(wrong[:, width:], expected[:, width:])


def test_prefix_first_moves_the_common_opening_before_the_padding():
    pad, image = 0, 9
    ids = torch.tensor([[pad, pad, 5, 6, 7, 1],
                        [5, 6, 7, 2, 3, 4],
                        [pad, 5, 6, 8, 9, 9]])
    mask = (ids != pad).long()
    order, prefix = prefix_first(ids, mask, image)
    assert prefix == 2  # 5 6: the third column differs (7, 7, 8)
    assert ids.gather(1, order).tolist() == [[5, 6, pad, pad, 7, 1], [5, 6, 7, 2, 3, 4], [5, 6, pad, 8, 9, 9]]
    assert mask.gather(1, order).tolist() == [[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]]
    # an image placeholder ends the prefix (it runs without the vision inputs); each row keeps a token past it
    assert prefix_first(torch.tensor([[5, 9, 1], [5, 9, 2]]), torch.ones(2, 3, dtype=torch.long), image)[1] == 1
    assert prefix_first(torch.tensor([[5, 6], [5, 6]]), torch.ones(2, 2, dtype=torch.long), image)[1] == 1
    none, length = prefix_first(torch.tensor([[5, 6], [7, 6]]), torch.ones(2, 2, dtype=torch.long), image)
    assert length == 0 and none.tolist() == [[0, 1], [0, 1]]
    right_padded = torch.tensor([[5, 6, 7], [5, 6, pad]])
    assert prefix_first(right_padded, (right_padded != pad).long(), image)[1] == 0  # not left-padded: left alone


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_stopped_rows_leave_the_batch_without_changing_any_row(eos_backend, monkeypatch, top_p, shared):
    from transformers.cache_utils import Cache

    from prism.rollout.hf import sample_responses
    from prism.rollout.shared_prompt_decode import SharedPromptDecoder

    inputs, _ = eos_backend.encode(_prompts())
    model, pad = eos_backend.model, eos_backend.tokenizer.pad_token_id
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=top_p, seed=4)
    batch_sizes = []
    owner = SharedPromptDecoder if shared else Cache  # where the rows that stopped leave
    method = "keep" if shared else "batch_select_indices"
    select = getattr(owner, method)
    monkeypatch.setattr(owner, method, lambda self, keep, **kwargs: (batch_sizes.append(len(keep)),
                                                                     select(self, keep, **kwargs))[1])
    compact_ids, compact_logp = sample_responses(model, inputs, 8, sampling, [EOS_TOKEN_ID], pad, True,
                                                 shared_prompt_decode=shared)
    assert batch_sizes and batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < 16
    whole_ids, whole_logp = sample_responses(model, inputs, 8, sampling, [EOS_TOKEN_ID], pad, True,
                                             compact_rows=False, shared_prompt_decode=shared)
    assert len(batch_sizes) == len(set(batch_sizes))  # no compaction in the second call
    assert torch.equal(compact_ids, whole_ids)
    mask, _ = response_mask_and_finish(whole_ids, [EOS_TOKEN_ID])
    torch.testing.assert_close(compact_logp * mask, whole_logp * mask, atol=1e-5, rtol=1e-5)


def test_min_new_tokens_holds_back_the_stop_token(eos_backend):
    early = eos_backend.generate(_prompts(), n=4, sampling=SamplingParams(max_new_tokens=8, seed=0))
    assert min(int(m.sum()) for m in early.response_mask) < 5  # the eos bias stops some rollouts early
    held = eos_backend.generate(_prompts(), n=4, sampling=SamplingParams(max_new_tokens=8, min_new_tokens=5, seed=0))
    assert min(int(m.sum()) for m in held.response_mask) >= 6  # 5 tokens, then the stop token at the earliest


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_prompt_once_forward_synchronises_gradients_under_ddp(tmp_path):
    """2 processes under torchrun: the gradient through DDP equals the mean of the processes' own gradients,
    although the prompt forward bypasses the wrapper (DDP's hooks sit on the parameters) and the responses run
    through it in several forwards by length before one backward."""
    import json
    from pathlib import Path

    from tests.torchrun import torchrun

    result = torchrun([str(Path(__file__).with_name("ddp_log_probs_worker.py")), str(tmp_path / "out.json")])
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["same_keys"] and out["scale"] > 0
    assert out["worst"] <= 1e-5 * max(1.0, out["scale"])
    assert min(out["response_forwards"]) > 1


@pytest.mark.parametrize("compute_dtype, expected", [(None, torch.float32), ("float32", torch.float32),
                                                     ("bfloat16", torch.bfloat16)])
def test_generation_computes_in_the_compute_dtype_over_float32_weights(processor, compute_dtype, expected):
    model = build_model("embedded-s", processor.tokenizer, seed=0)
    seen = set()
    model.lm_head.register_forward_hook(lambda module, args, output: seen.add(output.dtype))
    hf = HFRolloutBackend(model, processor, compute_dtype=compute_dtype)
    batch = hf.generate(_prompts()[:1], n=2, sampling=SamplingParams(max_new_tokens=2, seed=0))
    assert seen == {expected} and batch.behaviour_log_probs.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the master weights are left alone


def test_vllm_engine_runs_in_the_compute_dtype_and_gets_weights_cast_to_it(processor, monkeypatch):
    """vLLM is not installed here: a fake engine records what the backend asks of it (test_vllm_weight_sync.py
    tests the weight sync itself)."""
    import prism.rollout.vllm as vllm_module
    from prism.config import ModelConfig
    from prism.rollout.backends import make_backend

    from .fake_vllm import fake_vllm

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm())
    monkeypatch.setattr(vllm_module, "_launcher_environment", lambda: None)
    backend = make_backend("vllm", None, processor, model_path="ckpt", compute_dtype=ModelConfig().compute_dtype)
    assert backend.llm.kwargs["dtype"] == "bfloat16"  # the compute dtype, not the float32 master weights'
    backend.update_weights(torch.nn.Linear(2, 2))
    loaded = backend.llm.model.received
    assert [name for name, _ in loaded] == ["weight", "bias"] and {t.dtype for _, t in loaded} == {torch.bfloat16}
