"""Chat encoding and batching: labels, images, truncation, padding and packing."""

import pytest
import torch

from prism.data.encoding import IGNORE, collate, encode_conversation, pack_rows
from prism.data.formats import Conversation, DataError, read_sharegpt
from prism.models import load_processor


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


def test_pack_rows_is_first_fit_decreasing():
    # lengths 5, 3, 4, 2 into rows of 7: 5 opens row 0 (2 left), 4 opens row 1 (3 left), 3 fills row 1,
    # 2 fills row 0
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert pack_rows([7, 7], 7) == [[0], [1]]
    assert pack_rows([1, 1, 1], 7) == [[0, 1, 2]]
