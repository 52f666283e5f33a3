"""Chat encoding and batching: labels, images, truncation, padding, length buckets and packing."""

import itertools
import random

import pytest
import torch

from prism.data.encoding import (
    IGNORE,
    bucket_inverse,
    collate,
    encode_conversation,
    encode_conversations,
    expand_image_tokens,
    length_buckets,
    pack_rows,
    patches_as_processed,
    process_images,
    render_conversation,
)
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


def test_a_rendered_conversation_encodes_as_rendering_it_again(world, processor):
    for conversation in read_sharegpt(world / "sft.json")[:3] + read_sharegpt(world / "base.json")[:3]:
        rendered = render_conversation(processor.tokenizer, conversation)
        kept = (list(rendered[0]), list(rendered[1]))
        once, again = (encode_conversation(processor, conversation, 512, rendered=rendered),
                       encode_conversation(processor, conversation, 512))
        assert once.input_ids == again.input_ids and once.labels == again.labels
        assert torch.equal(once.pixel_values, again.pixel_values)
        assert len(once.input_ids) > len(rendered[0])  # the image expanded in a copy: the kept pair is untouched
        assert rendered == kept


def test_conversations_encoded_together_equal_each_alone(world, processor, tmp_path):
    """One image-processor call for a micro-batch's images gives each record the pixels, grid and ids it gets
    alone: records of two sizes of image, one with two images, one without."""
    from PIL import Image

    records = read_sharegpt(world / "sft.json")[:3]
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(small)
    Image.new("RGB", (128, 96), (20, 30, 230)).save(large)
    two = Conversation([{"role": "user", "content": "<image><image>Which is red?"},
                        {"role": "assistant", "content": "the first"}], [str(small), str(large)])
    text_only = Conversation([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}], [])
    conversations = [records[0], two, text_only, records[1], records[2]]
    together = encode_conversations(processor, conversations, 512)
    for conversation, batched in zip(conversations, together):
        alone = encode_conversation(processor, conversation, 512)
        assert batched.input_ids == alone.input_ids and batched.labels == alone.labels
        if alone.pixel_values is None:
            assert batched.pixel_values is None and batched.image_grid_thw is None
        else:
            assert torch.equal(batched.pixel_values, alone.pixel_values)
            assert torch.equal(batched.image_grid_thw, alone.image_grid_thw)
    assert together[1].image_grid_thw.shape == (2, 3) and together[1].image_grid_thw[0].tolist() != \
        together[1].image_grid_thw[1].tolist()


def _processed(processor, images):
    vision = processor.image_processor(images=images, return_tensors="pt")
    return vision["pixel_values"], vision["image_grid_thw"]


def test_a_batch_of_one_size_is_patched_as_the_processor_patches_each_image(world, processor):
    from PIL import Image

    images = []
    for conversation in read_sharegpt(world / "base.json")[:24]:
        with Image.open(conversation.images[0]) as image:
            images.append(image.convert("RGB"))
    batched = patches_as_processed(processor.image_processor, images)
    assert batched is not None  # 96 px RGB images: the batch path applies
    pixel_values, grid = _processed(processor, images)
    assert torch.equal(batched[0], pixel_values) and torch.equal(batched[1], grid)
    assert process_images(processor, images)[2] == [9] * 24  # 6 x 6 patches, merged 2 x 2


def test_images_the_processor_would_resample_or_mix_go_through_the_processor(processor):
    from PIL import Image

    odd = [Image.new("RGB", (100, 90), (10, 200, 30))]  # resized to a multiple of 32 by the processor
    mixed = [Image.new("RGB", (96, 96), (1, 2, 3)), Image.new("RGB", (64, 64), (4, 5, 6))]
    grey = [Image.new("L", (96, 96), 128)]
    for images in (odd, mixed, grey):
        assert patches_as_processed(processor.image_processor, images) is None
        pixel_values, grid, _ = process_images(processor, images)
        assert torch.equal(pixel_values, _processed(processor, images)[0])


def test_a_probe_that_differs_from_the_processor_keeps_the_processor(processor, monkeypatch):
    from PIL import Image

    from prism.data import encoding

    real = encoding.batch_patches
    monkeypatch.setattr(encoding, "PROBE_VERDICTS", {})
    monkeypatch.setattr(encoding, "batch_patches", lambda ip, images: (real(ip, images)[0] + 1e-6,
                                                                       real(ip, images)[1]))
    assert patches_as_processed(processor.image_processor, [Image.new("RGB", (96, 96), (9, 9, 9))]) is None


def test_truncation_inside_an_image_names_the_record(world, processor):
    conversation = read_sharegpt(world / "sft.json")[0]
    with pytest.raises(DataError, match=r"record \[7\].*max_length=5"):
        encode_conversation(processor, conversation, max_length=5, where="record [7]")


def test_each_image_placeholder_becomes_its_own_images_tokens_and_labels_follow():
    ids, labels = expand_image_tokens([5, 9, 6, 9, 7], 9, [2, 3], "record [0]", labels=[-1, -1, 1, -1, 2])
    assert ids == [5, 9, 9, 6, 9, 9, 9, 7]
    assert labels == [-1, -1, -1, 1, -1, -1, -1, 2]
    assert expand_image_tokens([5, 9], 9, [4], "prompt") == ([5, 9, 9, 9, 9], None)


@pytest.mark.parametrize("placeholders, images", [(1, 2), (2, 1)])
def test_placeholders_and_images_that_disagree_name_the_record(placeholders, images):
    with pytest.raises(DataError, match=rf"record \[3\]: {placeholders} image placeholders .* for {images} images"):
        expand_image_tokens([5] + [9] * placeholders, 9, [4] * images, "record [3]")


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


def test_length_buckets_minimise_padded_tokens_plus_a_cost_per_forward():
    # one forward: 4 x 50 = 200 tokens; rows 0, 2, 3 at width 10 and row 1 at 50: 30 + 50 + 16 = 96; three
    # forwards ([9], [10, 10], [50]): 9 + 20 + 50 + 2 x 16 = 111
    assert length_buckets([10, 50, 9, 10], forward_tokens=16) == [[0, 2, 3], [1]]
    assert length_buckets([10, 50, 9, 10], forward_tokens=128) == [[0, 1, 2, 3]]  # 30 + 50 + 128 > 200
    # free forwards: every length its own, up to max_buckets; two: [10, 20] + [30, 40] = 40 + 80 = 120 beats
    # [10] + [20, 30, 40] = 130 and [10, 20, 30] + [40] = 130; rows keep their order inside a bucket
    assert length_buckets([40, 10, 30, 20], max_buckets=4, forward_tokens=0) == [[1], [3], [2], [0]]
    assert length_buckets([40, 10, 30, 20], max_buckets=2, forward_tokens=0) == [[1, 3], [0, 2]]
    assert length_buckets([40, 10, 30, 20], max_buckets=1, forward_tokens=0) == [[0, 1, 2, 3]]
    assert length_buckets([7]) == [[0]] and length_buckets([]) == [[]]


def test_bucket_inverse_puts_rows_run_bucket_by_bucket_back_in_order():
    buckets = [[1], [3], [2], [0]]  # length_buckets([40, 10, 30, 20], forward_tokens=0)
    run = torch.tensor([10, 20, 30, 40])  # each row's value, bucket by bucket: rows 1, 3, 2, 0
    assert run.index_select(0, bucket_inverse(buckets)).tolist() == [40, 10, 30, 20]
    assert bucket_inverse([[0, 1, 2]]).tolist() == [0, 1, 2]


def test_length_buckets_cost_no_more_than_any_grouping_of_the_sorted_lengths():
    def cost(buckets, lengths, forward_tokens):
        return sum(len(b) * max(lengths[r] for r in b) for b in buckets) + forward_tokens * (len(buckets) - 1)

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, rng.choice([5, 60])) for _ in range(rng.randint(2, 9))]
        max_buckets, forward_tokens = rng.randint(2, 4), rng.choice([0, 8, 128])
        chosen = length_buckets(lengths, max_buckets=max_buckets, forward_tokens=forward_tokens)
        assert sorted(r for b in chosen for r in b) == list(range(len(lengths))) and len(chosen) <= max_buckets
        ordered = sorted(range(len(lengths)), key=lambda r: lengths[r])
        best = min(cost([ordered[a:b] for a, b in itertools.pairwise((0, *cuts, len(lengths)))], lengths,
                        forward_tokens)
                   for count in range(max_buckets) for cuts in itertools.combinations(range(1, len(lengths)), count))
        assert cost(chosen, lengths, forward_tokens) == best, (lengths, max_buckets, forward_tokens)
