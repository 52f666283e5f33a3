"""Supervised fine-tuning recipe (also the embedded world's `base` stage): config -> checkpoint.

  prism train sft --config experiments/configs/embedded/sft.yaml model.path=... [key=value ...]

Loss on assistant tokens only (each assistant turn through its `<|im_end|>`), summed over the tokens of
the whole optimizer step and divided by their count, so gradient accumulation and data parallelism give
the gradient of one large batch. Each image is processed once; its `<|image_pad|>` is expanded here to
the number of merged patches, so the processor's text pass is not needed. Data order is a pure function
of (seed, step): a resumed run sees exactly the batches an uninterrupted one would. With `packing: true`
each micro-batch's samples share rows of max_length tokens instead of being padded to the longest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from prism.config import BaseConfig, SFTConfig
from prism.data.formats import Conversation, DataError, read_sharegpt
from prism.runtime import MetricsLogger, Progress, check_finite, seed_everything
from prism.stages.common import (
    build_optimizer,
    build_scheduler,
    finish_stage,
    load_policy,
    make_accelerator,
    no_sync,
    resume,
    save_progress,
    start_stage,
)

IGNORE = -100
IMAGE_PLACEHOLDER = "<image>"


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
        pieces = message["content"].split(IMAGE_PLACEHOLDER)
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
    caller expands each `<|image_pad|>` itself and skips the processor's text pass."""
    vision = processor.image_processor(images=images, return_tensors="pt")
    merge = processor.image_processor.merge_size ** 2
    return vision["pixel_values"], vision["image_grid_thw"], (vision["image_grid_thw"].prod(-1) // merge).tolist()


def encode_conversation(processor, conversation: Conversation, max_length: int, where: str = "record") -> Encoded:
    """Render with the chat template, label each assistant turn (up to its `<|im_end|>`), expand images."""
    tokenizer = processor.tokenizer
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

    pixel_values = image_grid_thw = None
    image_token = processor.image_token_id if hasattr(processor, "image_token_id") else tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if conversation.images:
        images = []
        for path in conversation.images:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        pixel_values, image_grid_thw, tokens_per_image = process_images(processor, images)
        counts = iter(tokens_per_image)
        expanded_ids, expanded_labels = [], []
        for token, label in zip(ids, labels):
            repeat = next(counts) if token == image_token else 1
            expanded_ids.extend([token] * repeat)
            expanded_labels.extend([label] * repeat)
        if next(counts, None) is not None:
            raise DataError(f"{where}: fewer image tokens in the rendered text than images")
        ids, labels = expanded_ids, expanded_labels
    if len(ids) > max_length:
        if image_token in ids[max_length:]:
            raise DataError(f"{where}: {len(ids)} tokens exceed max_length={max_length} inside an image; raise max_length")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        raise DataError(f"{where}: no assistant token left to train on (max_length={max_length})")
    return Encoded(ids, labels, pixel_values, image_grid_thw)


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


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled positions (float32, logits only where labelled)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")


# ----------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------


def load_conversations(cfg: BaseConfig | SFTConfig) -> list[Conversation]:
    if not cfg.data_files:
        raise DataError("data_files is empty: name at least one sharegpt JSON file")
    records: list[Conversation] = []
    for name in cfg.data_files:
        records.extend(read_sharegpt(Path(name)))
    limit = getattr(cfg, "max_records", None)
    return records[:limit] if limit else records  # the first N: a smaller corpus, nested in the larger one


def epoch_order(num_records: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_records, generator=generator)


def step_records(step: int, steps_per_epoch: int, global_batch: int, num_records: int, seed: int,
                 rank: int, world: int, per_device: int, accumulation: int) -> list[list[int]]:
    """Record indices of optimizer step `step` for one process: `accumulation` micro-batches of `per_device`."""
    epoch, offset = divmod(step, steps_per_epoch)
    order = epoch_order(num_records, seed, epoch)[offset * global_batch : (offset + 1) * global_batch].tolist()
    mine = order[rank::world]
    return [mine[i * per_device : (i + 1) * per_device] for i in range(accumulation)]


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


def run(cfg: BaseConfig | SFTConfig, stage: str = "sft") -> Path:
    """Train to the end (resuming from the newest checkpoint) and return the stage directory."""
    accelerator = make_accelerator()
    run_dir, finished = start_stage(stage, cfg, accelerator)
    if finished:
        print(f"{stage}: already finished in {run_dir}", flush=True)
        return run_dir

    seed_everything(cfg.seed)
    records = load_conversations(cfg)
    model, processor = load_policy(cfg.model, cfg.seed)
    tokenizer = processor.tokenizer
    image_token_id = model.config.image_token_id
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = len(records) // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"{len(records)} records are fewer than one optimizer step's batch ({global_batch} = "
                        "per_device_batch_size x gradient_accumulation_steps x processes)")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    restored = resume(run_dir, model, optimizer, scheduler, accelerator)
    start = restored["step"] if restored else 0
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    policy = accelerator.unwrap_model(model)

    def rope_index(ids, mm_token_type_ids, image_grid_thw):
        return policy.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm_token_type_ids,
                                           image_grid_thw=image_grid_thw)[0]

    def batch_of(samples: list[Encoded]) -> dict[str, torch.Tensor]:
        if cfg.packing:
            return collate_packed(samples, tokenizer.pad_token_id, image_token_id, cfg.max_length, rope_index)
        return collate(samples, tokenizer.pad_token_id, image_token_id)

    logger = MetricsLogger(run_dir, cfg.tracking, project="prism", resume_step=start, config=None) \
        if accelerator.is_main_process else None
    progress = Progress(total_steps, desc=stage, initial=start) if accelerator.is_main_process else None
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    started, tokens_seen = time.perf_counter(), 0
    for step in range(start, total_steps):
        step_started = time.perf_counter()
        micro_samples = [
            [encode_conversation(processor, records[i], cfg.max_length, where=f"record [{i}]") for i in idx]
            for idx in step_records(step, steps_per_epoch, global_batch, len(records), cfg.seed, rank, world,
                                    cfg.per_device_batch_size, cfg.gradient_accumulation_steps)
        ]
        micro_batches = [batch_of(samples) for samples in micro_samples]
        local_tokens = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)))
        total_tokens = accelerator.reduce(local_tokens, reduction="sum") if world > 1 else local_tokens
        loss_sum = torch.zeros((), device=accelerator.device)
        total_tokens = total_tokens.to(accelerator.device)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with no_sync(accelerator, model, last_micro_step=i == len(micro_batches) - 1):
                loss = summed_token_loss(model, batch)
                # DDP averages gradients over processes: scale by `world` so the result is sum / total_tokens.
                accelerator.backward(loss * world / total_tokens)
            loss_sum += loss.detach()
        loss_mean = (accelerator.reduce(loss_sum, reduction="sum") if world > 1 else loss_sum) / total_tokens
        check_finite(loss_mean, accelerator.unwrap_model(model), step=step + 1)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        step_tokens = sum(len(e.input_ids) for samples in micro_samples for e in samples) * world
        tokens_seen += step_tokens
        if accelerator.is_main_process:
            seconds = time.perf_counter() - step_started
            if done % cfg.log_every_steps == 0 or done == total_steps:
                logger.log(done, {"loss": loss_mean, "lr": lr, "grad_norm": grad_norm,
                                  "assistant_tokens": total_tokens, "tokens": step_tokens,
                                  "tokens_per_s": step_tokens / seconds, "seconds": seconds,
                                  "epoch": done / steps_per_epoch})
            progress.update(1, loss=round(float(loss_mean), 4), lr=f"{lr:.2e}")
        if (cfg.save_every_steps and done % cfg.save_every_steps == 0) or done == total_steps:
            epoch, offset = divmod(done, steps_per_epoch)
            save_progress(run_dir, done, cfg, accelerator, model, optimizer, scheduler,
                          data_position={"epoch": epoch, "records_into_epoch": offset * global_batch})

    if accelerator.is_main_process:
        progress.close()
        logger.close()
    elapsed = time.perf_counter() - started
    final = finish_stage(run_dir, cfg, accelerator, model, processor, extra={
        "steps": total_steps, "records": len(records), "processes": world,
        "train_seconds_this_session": round(elapsed, 2),
        "tokens_per_s_this_session": round(tokens_seen / elapsed, 1) if elapsed > 0 else None,
    })
    if accelerator.is_main_process:
        print(f"{stage}: finished, model at {final}", flush=True)
    return run_dir


def run_base(cfg: BaseConfig) -> Path:
    """The embedded world's base stage: the same recipe on untagged captioning / QA data."""
    return run(cfg, stage="base")
