"""The offline tokenizer: fixed special ids, determinism, save/load, the Qwen chat template and assistant masks."""


import pytest
from transformers import AutoTokenizer

from prism.models import SPECIAL_TOKENS, assistant_token_mask, build_tokenizer
from tests.models.fixtures import shape_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(shape_corpus())


CONVERSATION = [
    {"role": "system", "content": "You count shapes."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]},
    {"role": "assistant", "content": "There are 2 red circles."},
    {"role": "user", "content": "And blue squares?"},
    {"role": "assistant", "content": [{"type": "text", "text": "There are 3 blue squares."}]},
]


def test_special_tokens_have_fixed_ids_and_roles(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(8))
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.padding_side == "left"
    # a special token in text is one token, never split into bytes
    assert tokenizer("<|vision_start|><|image_pad|><|vision_end|>")["input_ids"] == [3, 6, 4]


def test_same_corpus_gives_same_vocabulary_and_vocab_size_is_bounded(tokenizer):
    again = build_tokenizer(shape_corpus())
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(build_tokenizer(shape_corpus(), vocab_size=300)) <= 300 < len(tokenizer) <= 512


def test_any_text_round_trips_even_unseen_characters(tokenizer):
    text = "Zürich: 3 × ▲ and 🙂 — not in the corpus"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_save_and_load_round_trip_encodes_identically(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = shape_corpus(20, seed=1) + ["<|im_start|>user\nhi<|im_end|>"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 2, "left")
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_chat_template_renders_qwen_layout_with_image_placeholder(tokenizer):
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou count shapes.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many red circles?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    full = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert full == prompt + "There are 2 red circles.<|im_end|>\n"


def test_assistant_mask_covers_exactly_the_assistant_tokens(tokenizer):
    input_ids, mask = assistant_token_mask(tokenizer, CONVERSATION)
    assert len(input_ids) == len(mask) and set(mask) == {0, 1}
    # the masked tokens, run by run, are the two answers each with its <|im_end|>
    runs, current = [], []
    for token, keep in zip(input_ids, mask):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert [tokenizer.decode(run) for run in runs] == [
        "There are 2 red circles.<|im_end|>",
        "There are 3 blue squares.<|im_end|>",
    ]
    # and the prompt part is exactly the generation prompt: what the model sees before it answers
    first = mask.index(1)
    assert tokenizer.decode(input_ids[:first]) == tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    )
