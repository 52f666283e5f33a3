"""Supervised fine-tuning recipe (also the embedded world's `base` stage): config -> checkpoint.

  prism train sft --config experiments/configs/embedded/sft.yaml model.path=... [key=value ...]

Loss on assistant tokens only (each assistant turn through its `<|im_end|>`), summed over the tokens of
the whole optimizer step and divided by their count, so gradient accumulation and data parallelism give
the gradient of one large batch. Each image is processed once; its `<|image_pad|>` is expanded here to
the number of merged patches, so the processor's text pass is not needed. Data order is a pure function
of (seed, step): a resumed run sees exactly the batches an uninterrupted one would.
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
    if cfg.packing:
        raise NotImplementedError("packing: true is not implemented; batches are right-padded per micro-batch")
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

    logger = MetricsLogger(run_dir, cfg.tracking, project="prism", resume_step=start, config=None) \
        if accelerator.is_main_process else None
    progress = Progress(total_steps, desc=stage, initial=start) if accelerator.is_main_process else None
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    started, tokens_seen = time.perf_counter(), 0
    for step in range(start, total_steps):
        step_started = time.perf_counter()
        micro_batches = [
            collate([encode_conversation(processor, records[i], cfg.max_length, where=f"record [{i}]") for i in idx],
                    tokenizer.pad_token_id, image_token_id)
            for idx in step_records(step, steps_per_epoch, global_batch, len(records), cfg.seed, rank, world,
                                    cfg.per_device_batch_size, cfg.gradient_accumulation_steps)
        ]
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
        step_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches) * world
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
