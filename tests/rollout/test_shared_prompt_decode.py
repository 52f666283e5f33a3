"""The written-out Qwen3-VL decode step: its logits against transformers' forward on a per-row cache (left-padded
prompts, with and without images, rows leaving the batch, both presets' head layouts), and where it does not apply."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from prism.models import PRESETS, build_model, build_processor, build_tokenizer
from prism.rollout import HFRolloutBackend, RolloutPrompt, SamplingParams
from prism.rollout.hf import prefill_prompts, reserve_cache, sample_responses
from prism.rollout.shared_prompt_decode import SharedPromptDecoder, applies


def _corpus(n=300, seed=0):
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circles", "squares", "triangles"]
    return [f"There are {rng.randint(1, 5)} {rng.choice(colours)} {rng.choice(shapes)}." for _ in range(n)]


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer(_corpus()), image_size=PRESETS["embedded-s"].image_size)


def _image(seed):
    size = PRESETS["embedded-s"].image_size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def _inputs(processor, model, with_images=True):
    prompts = [RolloutPrompt(question="How many red circles are there in the picture?", images=[_image(1)]),
               RolloutPrompt(question="How many?", images=[_image(2)]),  # shorter: left-padded
               RolloutPrompt(question="Is there a green square?", images=[_image(3)])]
    if not with_images:
        prompts = [RolloutPrompt(question=p.question) for p in prompts]
    inputs, _ = HFRolloutBackend(model, processor).encode(prompts)
    return dict(inputs)


@pytest.mark.parametrize("preset", ["embedded-s", "embedded-m"])
@pytest.mark.parametrize("with_images", [True, False])
@torch.no_grad()
def test_step_logits_equal_transformers_forward_on_a_repeated_cache(processor, preset, with_images):
    """Teacher-forced: the same tokens through both, rows 1, 4 and 7 leaving after step 3 (each prompt keeps
    rows of its own, one prompt keeps one)."""
    torch.manual_seed(0)
    model = build_model(preset, processor.tokenizer, seed=0).eval()
    inputs = _inputs(processor, model, with_images)
    n, steps = 3, 6
    prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
    assert (prompt_mask == 0).any()  # left padding is exercised
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if inputs.get(k) is not None}
    tokens = torch.randint(10, 200, (prompt_ids.shape[0] * n, steps))

    _, cache, start, cache_mask = prefill_prompts(model, prompt_ids, prompt_mask, vision, n)
    reserve_cache(cache, steps)
    mask = torch.cat([cache_mask.repeat_interleave(n, 0), torch.ones(len(tokens), steps, dtype=torch.long)], 1)
    first, shared_cache, shared_start, cache_mask = prefill_prompts(model, prompt_ids, prompt_mask, vision, n,
                                                                    repeat_cache=False)
    decoder = SharedPromptDecoder(model, shared_cache, cache_mask, n, steps, shared_start)
    active = torch.arange(len(tokens))
    worst = 0.0
    for t in range(steps):
        if t == 3:
            keep = torch.tensor([i for i in range(len(active)) if i not in (1, 4, 7)])
            active, start, mask = active[keep], start[keep], mask[keep]
            cache.batch_select_indices(keep)
            decoder.keep(keep, written=t)  # positions 0 .. t - 1 hold keys and values
        step_tokens = tokens[active, t]
        expected = model(input_ids=step_tokens[:, None], attention_mask=mask[:, : prompt_ids.shape[1] + t + 1],
                         position_ids=(start + t)[None, :, None].expand(3, -1, -1), use_cache=True,
                         cache=cache).logits[:, -1]
        got = decoder.step(step_tokens, active, t)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        worst = max(worst, float((got - expected).abs().max()))
        assert got.shape == (len(active), model.config.text_config.vocab_size)
    assert worst < 1e-5 and expected.abs().max() > 0.1  # logits that carry something, matched to rounding


@pytest.mark.parametrize("preset", ["embedded-s", "embedded-m"])
def test_prompts_that_open_alike_run_the_opening_once_with_the_same_logits_and_gradients(processor, preset):
    """The system prompt once, the prompts continuing on its cache (the columns moved ahead of the padding), then
    two response tokens a row on the prompts' cache: logits and every parameter's gradient equal the whole
    prompts' forward to float rounding."""
    model = build_model(preset, processor.tokenizer, seed=0)
    with torch.no_grad():  # larger weights: logits and gradients that depend on the context
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4.0)
    inputs = _inputs(processor, model)
    prompt_ids, prompt_mask, n = inputs["input_ids"], inputs["attention_mask"], 2
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    tokens = torch.randint(10, 200, (prompt_ids.shape[0] * n, 2), generator=torch.Generator().manual_seed(0))

    def run(share_prefix):
        model.zero_grad()
        first, cache, start, cache_mask = prefill_prompts(model, prompt_ids, prompt_mask, vision, n,
                                                          share_prefix=share_prefix)
        mask = torch.cat([cache_mask.repeat_interleave(n, 0), torch.ones_like(tokens)], 1)
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=(start[:, None] + torch.arange(2))[None]
                       .expand(3, -1, -1), use_cache=True, cache=cache).logits
        (first.square().mean() + logits.square().mean()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return first.detach(), logits.detach(), start, cache_mask, grads

    first, logits, start, moved_mask, grads = run(True)
    first_whole, logits_whole, start_whole, mask_whole, grads_whole = run(False)
    assert torch.equal(mask_whole, prompt_mask) and not torch.equal(moved_mask, prompt_mask)  # the opening moved
    assert torch.equal(start, start_whole)
    torch.testing.assert_close(first, first_whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, logits_whole, atol=1e-5, rtol=1e-4)
    assert logits_whole.std() > 0.5  # logits that carry something
    assert grads.keys() == grads_whole.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads[name], grads_whole[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sampled_rollouts_equal_those_of_transformers_forward(processor):
    """Seeded sampling through the whole loop: the same tokens and, to rounding, the same behaviour log-probs."""
    model = build_model("embedded-s", processor.tokenizer, seed=0).eval()
    inputs = _inputs(processor, model)
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    pad = processor.tokenizer.pad_token_id
    shared = sample_responses(model, inputs, 4, sampling, [2], pad, True, shared_prompt_decode=True)
    per_row = sample_responses(model, inputs, 4, sampling, [2], pad, True, shared_prompt_decode=False)
    assert torch.equal(shared[0], per_row[0])
    torch.testing.assert_close(shared[1], per_row[1], atol=1e-5, rtol=0)


def test_rollouts_can_be_flop_counted_as_bench_throughput_does(processor):
    """FlopCounterMode's module tracker hooks every module call; a parameter view passed to one (no grad_fn but
    requires_grad) made it fail."""
    model = build_model("embedded-s", processor.tokenizer, seed=0).eval()
    inputs = _inputs(processor, model)
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3)
    pad = processor.tokenizer.pad_token_id
    plain = sample_responses(model, inputs, 2, sampling, [2], pad, True, shared_prompt_decode=True)
    with FlopCounterMode(display=False) as counter:
        counted = sample_responses(model, inputs, 2, sampling, [2], pad, True, shared_prompt_decode=True)
    assert torch.equal(counted[0], plain[0]) and counter.get_total_flops() > 0


def test_it_steps_aside_for_adapters_hooks_and_other_models(processor):
    model = build_model("embedded-s", processor.tokenizer, seed=0)
    assert applies(model)

    class Adapted(torch.nn.Linear):  # what a LoRA layer is to this check: not a bare Linear
        pass

    attn = model.model.language_model.layers[0].self_attn
    plain = attn.q_proj
    attn.q_proj = Adapted(plain.in_features, plain.out_features, bias=False)
    assert not applies(model)
    attn.q_proj = plain

    calls = []
    handle = model.model.language_model.layers[1].register_forward_hook(lambda *args: calls.append(1))
    assert not applies(model)
    inputs = _inputs(processor, model)
    sample_responses(model, inputs, 2, SamplingParams(max_new_tokens=3, seed=0), [2], 0, False)
    assert len(calls) == 4  # the prefill (the shared opening, then the prompts), two decode steps: transformers'
    handle.remove()
    assert applies(model)

    model.config.model_type = "qwen2_5_vl"
    assert not applies(model)
