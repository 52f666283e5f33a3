"""The torchvision-free Qwen3-VL processor: image token counts, placeholders, save/load, assistant masks,
and a saved checkpoint opened by stock transformers (Auto classes)."""

import json

import pytest
import torch
from transformers import Qwen3VLProcessor
from transformers.utils import is_torchvision_available

from prism.models import (
    ModelError,
    Qwen3VLImageTextProcessor,
    build_model,
    build_processor,
    build_tokenizer,
    load_model,
    load_processor,
    num_image_tokens,
    save_model,
    save_processor,
)
from tests.models.fixtures import noise_image, prompt, shape_corpus

IMAGE_PAD = 6


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_tokenizer(shape_corpus()), image_size=96)


def test_a_96px_image_becomes_9_image_tokens(processor):
    batch = processor(images=[noise_image(96)], text=[prompt(processor, "How many?")], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6]]  # 6 x 6 patches of 16 px, merged 2 x 2
    assert batch["pixel_values"].shape == (36, 3 * 2 * 16 * 16)
    assert int((batch["input_ids"] == IMAGE_PAD).sum()) == 9 == num_image_tokens(processor, 96, 96)
    # the model needs mm_token_type_ids for M-RoPE: 1 exactly on image tokens
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == IMAGE_PAD).long())


@pytest.mark.parametrize("size", [64, 192])
def test_any_square_image_is_resized_to_the_fixed_token_count(processor, size):
    batch = processor(images=[noise_image(size)], text=[prompt(processor, "How many?")], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6]]


def test_image_size_sets_the_token_count_and_must_be_a_multiple_of_32():
    tokenizer = build_tokenizer(shape_corpus(50))
    assert num_image_tokens(build_processor(tokenizer, image_size=64), 64, 64) == 4
    with pytest.raises(ValueError, match="multiple of 32"):
        build_processor(tokenizer, image_size=100)


def test_batches_are_left_padded(processor):
    texts = [prompt(processor, "How many?"), prompt(processor, "How many red circles are there?")]
    batch = processor(images=[noise_image(96, 1), noise_image(96, 2)], text=texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["pixel_values"].shape[0] == 72 and (batch["input_ids"] == IMAGE_PAD).sum(1).tolist() == [9, 9]


def test_save_and_load_round_trip_gives_identical_tensors(processor, tmp_path):
    save_processor(processor, tmp_path)
    loaded = load_processor(tmp_path)
    assert isinstance(loaded, Qwen3VLImageTextProcessor)
    assert loaded.chat_template == processor.chat_template
    texts, images = [prompt(processor, "How many blue squares?")], [noise_image(96, 3)]
    expected = processor(images=images, text=texts, return_tensors="pt")
    got = loaded(images=images, text=texts, return_tensors="pt")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # stock tools (vLLM, lmms-eval) see a released-style Qwen3-VL folder
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    assert (tmp_path / "preprocessor_config.json").is_file()


def test_loading_a_missing_folder_names_it(tmp_path):
    with pytest.raises(ModelError, match="nowhere"):
        load_processor(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="tokenizer_config.json"):
        load_processor(tmp_path)


def test_a_tokenizer_with_custom_code_is_refused_without_a_prompt(processor, tmp_path, monkeypatch):
    save_processor(processor, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="ShippedTokenizer", auto_map={"AutoTokenizer": ["shipped.ShippedTokenizer", None]})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ran = tmp_path / "code-ran"
    (tmp_path / "shipped.py").write_text(f"open({str(ran)!r}, 'w').close()\n"
                                         "from transformers import PreTrainedTokenizerFast as ShippedTokenizer\n")

    def no_prompt(*args):
        raise AssertionError("transformers asked whether to run the checkpoint's code")

    monkeypatch.setattr("builtins.input", no_prompt)
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_processor(tmp_path)
    assert not ran.exists()


def test_processor_assistant_mask_skips_expanded_image_tokens(processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": noise_image(96)}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": "There are 2 red circles."},
    ]
    batch = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = batch["input_ids"][0], batch["assistant_masks"][0].bool()
    assert int((ids == IMAGE_PAD).sum()) == 9 and not mask[ids == IMAGE_PAD].any()
    assert processor.tokenizer.decode(ids[mask]) == "There are 2 red circles.<|im_end|>"
    assert mask.nonzero().flatten().tolist() == list(range(int(mask.nonzero()[0]), len(ids) - 1))  # one run, then "\n"


@pytest.fixture(scope="module")
def checkpoint(processor, tmp_path_factory):
    """A tiny policy saved as a finished stage's `model/` folder (save_model: model and processor)."""
    model = build_model("embedded-s", processor.tokenizer, seed=0)
    return save_model(model, processor, tmp_path_factory.mktemp("stage") / "model")


def test_stock_auto_model_loads_a_saved_checkpoint(checkpoint):
    from transformers import AutoModelForImageTextToText

    stock = AutoModelForImageTextToText.from_pretrained(str(checkpoint)).eval()  # no prism code, no arguments
    assert type(stock).__name__ == "Qwen3VLForConditionalGeneration"
    ours = load_processor(checkpoint)
    batch = ours(images=[noise_image(96, 4)], text=[prompt(ours, "How many red circles?")], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(stock(**batch).logits, load_model(checkpoint)(**batch).logits)


@pytest.mark.xfail(
    not is_torchvision_available(), raises=ImportError, strict=True,
    reason="transformers loads Qwen3VLProcessor's video processor, which needs torchvision (prism/models/processor.py)",
)
def test_stock_auto_processor_encodes_like_load_processor(checkpoint):
    from transformers import AutoProcessor

    stock = AutoProcessor.from_pretrained(str(checkpoint))
    assert type(stock) is Qwen3VLProcessor
    ours = load_processor(checkpoint)
    texts, images = [prompt(ours, "How many red circles?")], [noise_image(96, 4)]
    assert prompt(stock, "How many red circles?") == texts[0]  # the same chat template
    expected = ours(images=images, text=texts, return_tensors="pt")
    got = stock(images=images, text=texts, return_tensors="pt")
    assert expected.keys() == got.keys()
    # where torchvision is installed the stock image processor is its torchvision version: equal up to rounding
    assert torch.allclose(expected.pop("pixel_values"), got.pop("pixel_values"), atol=1e-5)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
