"""Chat encoding and batching shared by every trainer: sharegpt messages -> token ids, labels and vision inputs;
right-padded and packed batches.

- `chat_messages` turns sharegpt strings with `<image>` placeholders into chat-template parts.
- `encode_conversation` (`encode_conversations` for several, their images in one processor call) renders a
  conversation with the chat template (`render_conversation`: ids, and labels on each assistant turn through its
  `<|im_end|>`) and expands each `<|image_pad|>` to its number of merged patches: each image is processed once
  here (`process_images`; images of one size that the processor would not resample, a batch at once:
  `patches_as_processed`), so the processor's text pass is not needed.
- `collate` pads rows on the right; `length_buckets` splits a batch's rows into a few forwards by length, each
  padded to its own longest row; `collate_packed` packs samples into rows of `max_length` tokens with positions
  restarting per sample (block-diagonal attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from prism.data.formats import IMAGE_TOKEN, Conversation, DataError

IGNORE = -100  # label of positions without a loss (torch cross-entropy's ignore_index)


# ----------------------------------------------------------------------------------------------------
# Encoding: a sharegpt conversation -> ids, labels and pixel values
# ----------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside assistant tokens
    pixel_values: torch.Tensor | None  # [patches, D]
    image_grid_thw: torch.Tensor | None  # [images, 3]


def chat_messages(messages: list[dict[str, str]]) -> list[dict]:
    """sharegpt strings with `<image>` placeholders -> chat-template parts ({"type": "image"} / text)."""
    out = []
    for message in messages:
        pieces = message["content"].split(IMAGE_TOKEN)
        parts: list[dict] = []
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": message["role"], "content": parts})
    return out


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def process_images(processor, images: list) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(pixel_values, image_grid_thw, image tokens per image after merging): each image processed once, so the
    caller expands each `<|image_pad|>` itself and skips the processor's text pass. Images the processor would not
    resample go through `patches_as_processed` (the same values, a batch at a time)."""
    image_processor = processor.image_processor
    merge = image_processor.merge_size ** 2
    patched = patches_as_processed(image_processor, images)
    if patched is not None:
        return *patched, [int(patched[1][0].prod()) // merge] * len(images)
    vision = image_processor(images=images, return_tensors="pt")
    return vision["pixel_values"], vision["image_grid_thw"], (vision["image_grid_thw"].prod(-1) // merge).tolist()


def patches_as_processed(image_processor, images: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(pixel_values, image_grid_thw) equal to Qwen2-VL's PIL image processor's for RGB images of one size that
    its resize keeps as they are, computed for the whole batch at once; None where that does not hold (another
    processor, sizes or modes, a resize that resamples, or a probe image that came out different).

    The processor works image by image in numpy (resize, rescale in float64, normalise, cut into patches): 11.5 ms
    for a base or SFT micro-batch of 32 images of 96 px at one thread, 4.0 ms here, where the same steps run on the
    stacked uint8 pixels in torch. Before a size is first used, an image of that size holding every uint8 level in
    every channel goes through both, and only equal results let the batch path be used: the pixels are uint8, so
    every input value and every patch position has been compared."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
    except ImportError:  # an older transformers: its processor, as it is
        return None
    ip = image_processor
    if (type(ip) is not Qwen2VLImageProcessorPil or not images
            or not all(isinstance(image, Image.Image) and image.mode == "RGB" for image in images)):
        return None
    width, height = images[0].size
    factor = ip.patch_size * ip.merge_size
    low, high = getattr(ip.size, "shortest_edge", None), getattr(ip.size, "longest_edge", None)
    if (any(image.size != (width, height) for image in images) or height % factor or width % factor
            or (ip.do_resize and (low is None or high is None or smart_resize(
                height, width, factor=factor, min_pixels=low, max_pixels=high) != (height, width)))):
        return None
    return batch_patches(ip, images) if probe_agrees(ip, width, height) else None


def probe_agrees(ip, width: int, height: int) -> bool:
    """Whether `batch_patches` gives the processor's values on an image of this size holding every uint8 level in
    every channel (asked once per processor configuration and size)."""
    key = (ip.to_json_string(), width, height)
    if key not in PROBE_VERDICTS:
        rng, levels = np.random.default_rng(0), np.arange(height * width) % 256  # h * w >= factor^2 > 256
        probe = np.stack([rng.permutation(levels) for _ in range(3)], axis=-1).astype(np.uint8)
        probe = [Image.fromarray(probe.reshape(height, width, 3))]
        processed, ours = ip(images=probe, return_tensors="pt"), batch_patches(ip, probe)
        PROBE_VERDICTS[key] = (torch.equal(processed["pixel_values"], ours[0])
                               and torch.equal(processed["image_grid_thw"], ours[1]))
    return PROBE_VERDICTS[key]


PROBE_VERDICTS: dict[tuple, bool] = {}  # (processor configuration, width, height) -> `probe_agrees`


def batch_patches(ip, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's steps for same-size RGB images it does not resample, on the batch at once."""
    count, channels, patch, merge, temporal = len(images), 3, ip.patch_size, ip.merge_size, ip.temporal_patch_size
    width, height = images[0].size
    grid_h, grid_w = height // patch, width // patch
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))  # [N, H, W, C] uint8
    # the processor's patch order: (block row, block column, row in block, column in block, C, ph, pw)
    pixels = pixels.reshape(count, grid_h // merge, merge, patch, grid_w // merge, merge, patch, channels)
    values = pixels.permute(0, 1, 4, 2, 5, 7, 3, 6).contiguous()
    if ip.do_rescale:  # in float64, then float32, as the processor rescales (float32 alone differs in the last bit)
        values = (values.double() * ip.rescale_factor).float()
    else:
        values = values.float()
    if ip.do_normalize:
        shape = (1, 1, 1, 1, 1, channels, 1, 1)
        values = (values - torch.tensor(ip.image_mean, dtype=torch.float32).view(shape)) / torch.tensor(
            ip.image_std, dtype=torch.float32).view(shape)
    values = values.unsqueeze(6).expand(*values.shape[:6], temporal, patch, patch)  # each frame twice, as processed
    return (values.reshape(count * grid_h * grid_w, channels * temporal * patch * patch),
            torch.tensor([[1, grid_h, grid_w]] * count))


def expand_image_tokens(ids: list[int], image_token: int, tokens_per_image: Sequence[int], where: str,
                        labels: list[int] | None = None) -> tuple[list[int], list[int] | None]:
    """`ids` with the k-th `image_token` repeated `tokens_per_image[k]` times (its image's tokens after merging),
    and `labels` (if given) repeated alike. `where` names the record in the error when the counts disagree."""
    placeholders = ids.count(image_token)
    if placeholders != len(tokens_per_image):
        raise DataError(f"{where}: {placeholders} image placeholders in the rendered text for "
                        f"{len(tokens_per_image)} images")
    counts = iter(tokens_per_image)
    repeats = [next(counts) if token == image_token else 1 for token in ids]
    expanded_ids = [token for token, repeat in zip(ids, repeats) for _ in range(repeat)]
    if labels is None:
        return expanded_ids, None
    return expanded_ids, [label for label, repeat in zip(labels, repeats) for _ in range(repeat)]


def render_conversation(tokenizer, conversation: Conversation, where: str = "record") -> tuple[list[int], list[int]]:
    """The chat template's ids and labels (each assistant turn up to its `<|im_end|>`), one `<|image_pad|>` per
    image: what `encode_conversation` expands. Trainers keep it per record, since epochs after the first would
    render the same text again (about half of a record's encoding)."""
    messages = chat_messages(conversation.messages)
    ids = _ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:turn], add_generation_prompt=True))
        prefix_ids = ids if turn == len(messages) - 1 else _ids(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        end = len(prefix_ids)
        if ids[:end] != prefix_ids:
            raise DataError(f"{where}: the chat template does not render turn {turn} as a prefix of the conversation")
        turn_ids = ids[start:end]
        stop = max((i for i, t in enumerate(turn_ids) if t == eos), default=len(turn_ids) - 1)
        labels[start : start + stop + 1] = ids[start : start + stop + 1]
    return ids, labels


def encode_conversation(processor, conversation: Conversation, max_length: int, where: str = "record",
                        rendered: tuple[list[int], list[int]] | None = None) -> Encoded:
    """Render with the chat template (or take `render_conversation`'s `rendered`), label each assistant turn,
    expand images."""
    return encode_conversations(processor, [conversation], max_length, [where], [rendered])[0]


def encode_conversations(processor, conversations: Sequence[Conversation], max_length: int,
                         wheres: Sequence[str] | None = None,
                         rendered: Sequence[tuple[list[int], list[int]] | None] | None = None) -> list[Encoded]:
    """`encode_conversation` of each conversation, their images in one image-processor call: the call's fixed cost
    is most of a small image's processing (embedded-s's 96 px images: 0.35 ms an image alone, 0.25 ms in a call
    of 32), and each image's pixels are the same either way (the processor resizes and normalises image by
    image)."""
    tokenizer = processor.tokenizer
    wheres = wheres or [f"record [{i}]" for i in range(len(conversations))]
    rendered = rendered or [None] * len(conversations)
    image_token = processor.image_token_id if hasattr(processor, "image_token_id") else tokenizer.convert_tokens_to_ids("<|image_pad|>")
    images = []
    for conversation in conversations:
        for path in conversation.images:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
    if images:
        pixel_values, image_grid_thw, tokens_per_image = process_images(processor, images)
        first_row = [0, *np.cumsum(image_grid_thw.prod(-1).tolist()).tolist()]  # of each image in pixel_values
    out, first = [], 0  # first: the conversation's first image
    for conversation, where, text in zip(conversations, wheres, rendered):
        ids, labels = text if text is not None else render_conversation(tokenizer, conversation, where)
        pixels = grid = None
        if conversation.images:
            end = first + len(conversation.images)
            pixels, grid = pixel_values[first_row[first]:first_row[end]], image_grid_thw[first:end]
            ids, labels = expand_image_tokens(ids, image_token, tokens_per_image[first:end], where, labels)
            first = end
        if len(ids) > max_length:
            if image_token in ids[max_length:]:
                raise DataError(f"{where}: {len(ids)} tokens exceed max_length={max_length} inside an image; raise max_length")
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            raise DataError(f"{where}: no assistant token left to train on (max_length={max_length})")
        out.append(Encoded(ids, labels, pixels, grid))
    return out


def collate(encoded: list[Encoded], pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; vision inputs concatenated in row order."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        attention_mask[row, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "mm_token_type_ids": (input_ids == image_token_id).long()}
    pixels = [e.pixel_values for e in encoded if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in encoded if e.image_grid_thw is not None])
    return batch


def length_buckets(lengths: Sequence[int], max_buckets: int = 4, forward_tokens: int = 128) -> list[list[int]]:
    """Rows (their indices, in order) grouped into at most `max_buckets` forwards by length, each run at its
    longest row's width: the grouping of the sorted lengths that minimises the padded tokens run plus
    `forward_tokens` for each extra forward (what a forward's fixed cost is worth in tokens). Rows never interact,
    so the forwards give what one would, to float rounding. Used by the discriminator's continuation rows (about
    30% of a micro-batch's segment tokens of the embedded world were padding in one forward) and by base and SFT
    micro-batches (`split_by_length`)."""
    rows = len(lengths)
    if rows < 2 or max_buckets < 2:
        return [list(range(rows))]
    order = sorted(range(rows), key=lambda row: lengths[row])
    ordered = np.array([lengths[row] for row in order], dtype=np.float64)
    # cost[k, end]: the cheapest grouping of the `end` shortest rows into k forwards; cut[k, end] its last start.
    # Each k is one [end, begin] table (rows <= a forward's rows, so it is small); argmin keeps the first of equal
    # costs, the order a loop over begin with a strict < would keep.
    cost = np.full((max_buckets + 1, rows + 1), np.inf)
    cut = np.zeros((max_buckets + 1, rows + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    end, begin = np.arange(1, rows + 1)[:, None], np.arange(rows)[None, :]
    for k in range(1, max_buckets + 1):
        total = cost[k - 1, :rows][None, :] + (end - begin) * ordered[end - 1] + (forward_tokens if k > 1 else 0)
        total = np.where((begin >= k - 1) & (begin < end), total, np.inf)
        cut[k, 1:] = total.argmin(axis=1)
        cost[k, 1:] = total[np.arange(rows), cut[k, 1:]]
    k = min(range(1, max_buckets + 1), key=lambda count: cost[count, rows])
    buckets, last = [], rows
    while k:
        first = int(cut[k, last])
        buckets.append(sorted(order[first:last]))
        last, k = first, k - 1
    return buckets[::-1]


def bucket_inverse(buckets: Sequence[Sequence[int]], device: torch.device | None = None) -> torch.Tensor:
    """The index that puts rows concatenated bucket by bucket (`length_buckets`' order) back in their own order."""
    return torch.argsort(torch.tensor([row for bucket in buckets for row in bucket], dtype=torch.long, device=device))


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row holding at most max_length tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate_packed(encoded: list[Encoded], pad_id: int, image_token_id: int, max_length: int,
                   rope_index) -> dict[str, torch.Tensor]:
    """The same samples as `collate`, packed into as few rows of at most max_length tokens as fit.

    No attention mask: each sample's positions restart at 0, which transformers reads as packed sequences
    (a block-diagonal causal mask; flash-attention's variable-length kernels on GPU), so no token sees
    another sample. Positions are [4, rows, L]: the text position, then the sample's own M-RoPE positions
    (`rope_index(ids, mm_token_type_ids, image_grid_thw)` per sample). Vision inputs follow the packed order."""
    rows = pack_rows([len(e.input_ids) for e in encoded], max_length)
    width = max(sum(len(encoded[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((4, len(rows), width), dtype=torch.long)
    pixels, grids = [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = encoded[i]
            ids = torch.tensor(e.input_ids)
            end = at + len(ids)
            input_ids[r, at:end] = ids
            labels[r, at:end] = torch.tensor(e.labels)
            labels[r, at] = IGNORE  # never predicted from the previous sample's last token
            positions[0, r, at:end] = torch.arange(len(ids))
            if e.image_grid_thw is not None:
                positions[1:, r, at:end] = rope_index(ids[None], (ids[None] == image_token_id).long(),
                                                      e.image_grid_thw)[:, 0]
                pixels.append(e.pixel_values)
                grids.append(e.image_grid_thw)
            else:
                positions[1:, r, at:end] = torch.arange(len(ids))
            at = end
        positions[:, r, at:] = torch.arange(width - at)  # the padding tail is a segment of its own
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat(grids)
    return batch
