"""Model presets: built tiny models are seeded and sane, checkpoints round-trip, full presets load only from paths."""

from types import SimpleNamespace

import pytest
import torch

from prism.models import (
    PRESETS,
    SPECIAL_TOKEN_IDS,
    ModelError,
    build_model,
    build_processor,
    build_tokenizer,
    count_parameters,
    load_model,
    load_processor,
    resolve_model,
    save_model,
)
from prism.models.presets import mrope_section
from tests.models.fixtures import noise_image, prompt, shape_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(shape_corpus())


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_processor(tokenizer, image_size=PRESETS["embedded-s"].image_size)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model("embedded-s", tokenizer, seed=0)


@pytest.fixture(scope="module")
def inputs(processor):
    return processor(images=[noise_image(96)], text=[prompt(processor, "How many red circles?")], return_tensors="pt")


def test_config_token_ids_match_the_tokenizer(model, tokenizer):
    config = model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") == SPECIAL_TOKEN_IDS["<|image_pad|>"]
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    assert config.text_config.vocab_size == len(tokenizer)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied


def test_mrope_section_splits_half_the_head_dim_like_qwen3_vl():
    assert mrope_section(128) == [24, 20, 20]
    for preset in PRESETS.values():
        if preset.kind == "embedded":
            assert sum(mrope_section(preset.head_dim)) == preset.head_dim // 2


def test_parameter_counts_of_embedded_presets(tokenizer):
    assert 0.7e6 < count_parameters(build_model("embedded-s", tokenizer, seed=0)) < 0.9e6
    assert 1.9e6 < count_parameters(build_model("embedded-m", tokenizer, seed=0)) < 2.4e6
    assert 3.3e6 < count_parameters(build_model("embedded-l", tokenizer, seed=0)) < 3.8e6


def test_build_is_deterministic_per_seed_and_leaves_the_global_rng_alone(model, tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    same, other = build_model("embedded-s", tokenizer, seed=0), build_model("embedded-s", tokenizer, seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    weights, same_weights, other_weights = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(weights[k], same_weights[k]) for k in weights)
    embed = "model.visual.patch_embed.linear_proj.weight"
    assert not torch.equal(weights[embed], other_weights[embed])
    assert not torch.equal(weights["lm_head.weight"], other_weights["lm_head.weight"])


def test_forward_with_an_image_gives_finite_logits(model, inputs, tokenizer):
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_left_padded_batched_greedy_generation_equals_unbatched(model, processor):
    texts = [prompt(processor, "How many?"), prompt(processor, "How many red circles are in the image?")]
    images = [noise_image(96, 1), noise_image(96, 2)]
    # An untrained model repeats one token, so compare every step's logits too, not only the tokens.
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
        assert batch["attention_mask"][0, 0] == 0  # the shorter prompt really is left-padded
        batched = model.generate(**batch, **settings)
        for row, (text, image) in enumerate(zip(texts, images)):
            single = processor(images=[image], text=[text], return_tensors="pt")
            alone = model.generate(**single, **settings)
            new_alone = alone.sequences[0, single["input_ids"].shape[1]:]
            assert torch.equal(new_alone, batched.sequences[row, batch["input_ids"].shape[1]:])
            for step_alone, step_batched in zip(alone.logits, batched.logits, strict=True):
                torch.testing.assert_close(step_alone[0], step_batched[row], rtol=0, atol=1e-5)


def test_save_and_load_round_trip_gives_identical_logits(model, processor, inputs, tmp_path):
    directory = tmp_path / "ckpt"
    save_model(model, processor, directory)
    save_model(model, processor, directory)  # overwriting an existing checkpoint swaps it in whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old folders left behind
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    loaded, loaded_processor = load_model(directory), load_processor(directory)
    again = loaded_processor(images=[noise_image(96)], text=[prompt(loaded_processor, "How many red circles?")], return_tensors="pt")
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**again).logits)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    # a path given to any preset loads it
    assert isinstance(resolve_model({"preset": "embedded-s", "path": str(directory)}), type(model))


def test_the_patch_embedding_runs_as_its_linear_and_checkpoints_keep_the_conv3d_layout(model, processor, inputs,
                                                                                     tmp_path):
    from safetensors.torch import load_file

    embed = model.model.visual.patch_embed
    assert isinstance(embed.linear_proj, torch.nn.Linear) and not hasattr(embed, "proj")
    conv = torch.nn.Conv3d(3, embed.embed_dim, kernel_size=(2, 16, 16), stride=(2, 16, 16))  # the module it replaces
    with torch.no_grad():
        conv.weight.copy_(embed.linear_proj.weight.view(conv.weight.shape))
        conv.bias.copy_(embed.linear_proj.bias)
        pixels = inputs["pixel_values"]
        expected = conv(pixels.view(-1, 3, 2, 16, 16)).view(-1, embed.embed_dim)
        torch.testing.assert_close(embed(pixels), expected, atol=1e-5, rtol=1e-5)
    save_model(model, processor, tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert torch.equal(saved["model.visual.patch_embed.proj.weight"], conv.weight)  # what other tools read
    assert not any("linear_proj" in name for name in saved)
    loaded = load_model(tmp_path / "ckpt").model.visual.patch_embed
    assert torch.equal(loaded.linear_proj.weight, embed.linear_proj.weight)


def test_loaded_models_never_use_hub_kernels(model, processor, tmp_path):
    # transformers' default kernelizes on load; on CUDA `.eval()` then fetched kernels-community code from the Hub
    save_model(model, processor, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    loaded.train()
    loaded.eval()
    assert loaded.use_kernels is False and loaded.kernels_mode is None


def test_missing_or_malformed_checkpoint_paths_raise_model_error_naming_them(tmp_path):
    with pytest.raises(ModelError, match="no_such_ckpt.*does not exist"):
        load_model(tmp_path / "no_such_ckpt")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="safetensors"):
        load_model(tmp_path)


def test_broken_checkpoints_are_named_in_one_line(model, processor, tmp_path):
    import json
    import shutil

    good = tmp_path / "good"
    save_model(model, processor, good)
    weights = (good / "model.safetensors").read_bytes()

    def broken(name: str):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    truncated = broken("truncated")
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) - 1000])
    with pytest.raises(ModelError, match=r"truncated/model.safetensors: truncated \("):
        load_model(truncated)
    pointer = broken("pointer")
    (pointer / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(ModelError, match="Git LFS pointer"):
        load_model(pointer)
    text_only = broken("text_only")
    config = json.loads((text_only / "config.json").read_text())
    (text_only / "config.json").write_text(json.dumps({**config["text_config"], "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ModelError, match=r"no vision-language model .*Qwen3ForCausalLM"):
        load_model(text_only)
    remote = broken("remote")
    (remote / "config.json").write_text(json.dumps({**config, "model_type": "shipped_vl", "auto_map": {
        "AutoModelForImageTextToText": "shipped.ShippedModel", "AutoConfig": "shipped.ShippedConfig"}}))
    (remote / "shipped.py").write_text("raise SystemExit('the shipped code ran')\n")
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_model(remote)


def test_full_presets_load_only_from_a_path(tokenizer):
    for name in ["qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-2b"]:
        assert PRESETS[name].kind == "local"
        with pytest.raises(ModelError, match=f"'{name}'.*path"):
            resolve_model(name, tokenizer=tokenizer)
    with pytest.raises(ModelError, match="unknown model preset 'qwen9'"):
        resolve_model("qwen9", tokenizer=tokenizer)


def test_resolve_builds_embedded_presets_from_names_mappings_and_config_objects(model, tokenizer):
    for cfg in ["embedded-s", {"preset": "embedded-s"}, SimpleNamespace(preset="embedded-s", path=None)]:
        built = resolve_model(cfg, tokenizer=tokenizer, seed=0)
        assert torch.equal(built.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ModelError, match="tokenizer"):
        resolve_model("embedded-s")
