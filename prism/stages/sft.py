"""Supervised fine-tuning recipe (also the embedded world's `base` stage): config -> checkpoint.

  prism train sft --config experiments/configs/embedded/sft.yaml model.path=... [key=value ...]

Loss on assistant tokens only (each assistant turn through its `<|im_end|>`), summed over the tokens of
the whole optimizer step and divided by their count, so gradient accumulation and data parallelism give
the gradient of one large batch. Each image is processed once; its `<|image_pad|>` is expanded here to
the number of merged patches, so the processor's text pass is not needed. Data order is a pure function
of (seed, step): a resumed run sees exactly the batches an uninterrupted one would. With `packing: true`
each micro-batch's samples share rows of max_length tokens instead of being padded to the longest; without it the
tokens every row begins with (the system prompt) run once per micro-batch, the rows continuing on their cache,
and with `split_by_length: true` a micro-batch runs as up to four forwards by sample length (`length_groups`).
Forwards run in the compute dtype (autocast, `model.mixed_precision`); AdamW updates the float32 master weights.
With `torch_compile: true` each decoder layer and vision block runs compiled (prism.stages.common).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from prism.config import BaseConfig, SFTConfig
from prism.data.encoding import (
    IGNORE,
    Encoded,
    collate,
    collate_packed,
    encode_conversations,
    length_buckets,
    render_conversation,
)
from prism.data.formats import Conversation, DataError, read_sharegpt
from prism.data.order import step_records
from prism.kv_prefix import (
    MIN_SHARED_PREFIX,  # also the opening by which `prefix_groups` sorts a micro-batch's samples
    cache_kwarg,
    cache_may_carry_gradients,
    common_prefix_length,
    head_on,
    opening_cache,
)
from prism.models.peft import final_model_saver
from prism.runtime import MetricsLogger, Progress, autocast, check_finite, seed_everything
from prism.stages.common import (
    build_optimizer,
    build_scheduler,
    compile_repeated_blocks,
    finish_stage,
    is_sharded,
    load_policy,
    make_accelerator,
    no_sync,
    plain_norm,
    preempted,
    prepare_and_resume,
    record_config,
    save_progress,
    setup_policy_training,
    start_stage,
    stop_preempted,
)


def prefix_sharing_applies(model) -> bool:
    """Whether `summed_token_loss` may run a shared prefix once: its cache can carry gradients
    (prism.kv_prefix.cache_may_carry_gradients), the model is not FSDP2-sharded (whose unsharded parameters
    the second forward would not find for the first one's backward), and no dropout is active (one pass of the
    prefix would give every row the same mask, where whole rows each draw their own)."""
    core = getattr(model, "module", model)
    dropout = core.training and (
        any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in core.modules())
        or getattr(getattr(core.config, "text_config", core.config), "attention_dropout", 0.0) > 0)
    return cache_may_carry_gradients(model) and not is_sharded(model) and not dropout


def shared_prefix_length(batch: dict[str, torch.Tensor], image_token_id: int) -> int:
    """How many leading tokens every row of a right-padded micro-batch holds alike (the system prompt and the
    chat template's opening), to run once as one row: up to the first column where the rows differ or one holds
    padding, never into an image (the prefix runs without the vision inputs), and ending before the position that
    predicts the first labelled token (the prefix's own outputs feed no loss). 0 where it does not pay: one row,
    packed rows (their own position ids), no labelled token, or fewer than MIN_SHARED_PREFIX tokens."""
    ids = batch["input_ids"]
    if ids.shape[0] < 2 or "position_ids" in batch:
        return 0
    length = common_prefix_length(ids, batch["attention_mask"], image_token_id)
    labelled = batch["labels"] != IGNORE
    if not labelled.any():
        return 0
    length = min(length, int(labelled.long().argmax(1)[labelled.any(1)].min()) - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


def images_in_all_or_none(parts: list[list[Encoded]]) -> bool:
    """Whether every part holds an image or none does: a part without images would leave the vision tower out
    of its backward, and DDP's synchronised backward waits for the vision tower's gradients."""
    with_images = [any(sample.pixel_values is not None for sample in part) for part in parts]
    return all(with_images) or not any(with_images)


def prefix_groups(samples: list[Encoded], image_token_id: int) -> list[list[Encoded]]:
    """A micro-batch's samples as the forwards that run them: those whose first MIN_SHARED_PREFIX tokens are
    the most common such opening (text only: the prefix runs without images), then the rest, each in their
    original order. Where only some samples carry the system prompt (half of the base stage's corpus) its
    holders then share it (`summed_token_loss`); where all or none open alike, one forward as before. The
    step's loss is summed over tokens and divided by the step's token count, so the split changes only float
    rounding."""
    def opening(sample: Encoded) -> tuple[int, ...] | None:
        ids = sample.input_ids[:MIN_SHARED_PREFIX]
        return tuple(ids) if len(ids) == MIN_SHARED_PREFIX and image_token_id not in ids else None

    openings = [opening(sample) for sample in samples]
    candidates = [o for o in openings if o is not None]
    if not candidates:
        return [samples]
    common = Counter(candidates).most_common(1)[0][0]  # ties: the opening seen first
    sharing = [sample for sample, o in zip(samples, openings) if o == common]
    rest = [sample for sample, o in zip(samples, openings) if o != common]
    if len(sharing) < 2 or not rest:
        return [samples]
    return [sharing, rest] if images_in_all_or_none([sharing, rest]) else [samples]


def length_groups(samples: list[Encoded]) -> list[list[Encoded]]:
    """A forward's samples as up to four forwards by length (`length_buckets`), each padded to its own longest
    sample, each in the original order. In the embedded SFT corpus padding is about 13% of a micro-batch's tokens;
    split, a step runs about a sixth fewer tokens than one forward on the shared prefix. Kept whole where a part would
    run without images that another part has (DDP's synchronised backward needs the vision tower's gradients)."""
    parts = [[samples[i] for i in bucket] for bucket in length_buckets([len(s.input_ids) for s in samples])]
    return parts if images_in_all_or_none(parts) else [samples]


def summed_token_loss(model, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled positions (float32).

    The output head runs only on the positions whose next token is labelled (`head_on`): logits of every
    position would cost the head's GEMMs, and zero-filled gradients of batch x length x vocab floats, for the
    prompt and padding positions the loss never reads. The model is called as given (a DDP or FSDP wrapper's
    forward).

    The rows' shared prefix (`shared_prefix_length`; in the embedded world the system prompt, 99 of a row's ~215
    tokens) runs once, and the rows continue on its key/value cache, repeated per row. Gradients flow back
    through the repeat, so loss and gradients equal whole rows' up to float rounding. `share_prefix=False`, or a
    model where it does not apply (`prefix_sharing_applies`), runs whole rows."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]
    keep = targets != IGNORE
    predicts_labelled = F.pad(keep, (0, 1))  # position t predicts token t + 1
    core = getattr(model, "module", model)
    prefix = 0
    if share_prefix and prefix_sharing_applies(model):
        prefix = shared_prefix_length(batch, core.config.image_token_id)
    if prefix:
        logits = continue_on_shared_prefix(model, inputs, prefix, predicts_labelled[:, prefix:])
    else:
        with head_on(model, predicts_labelled):
            logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def continue_on_shared_prefix(model, inputs: dict[str, torch.Tensor], prefix: int, keep: torch.Tensor) -> torch.Tensor:
    """The batch's forward with its first `prefix` columns run as one row, whose key/value cache is repeated for
    the rows; they continue on it at the positions (M-RoPE) a whole forward gives them. Returns the logits at
    the continuation's `keep` positions."""
    core = getattr(model, "module", model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = core.model.get_rope_index(input_ids=ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                          image_grid_thw=inputs.get("image_grid_thw"), attention_mask=mask)[0]
    with head_on(core, torch.zeros(1, prefix, dtype=torch.bool, device=ids.device)):  # its logits feed no loss
        _, cache = opening_cache(core, ids[:1, :prefix], ids.shape[0], attention_mask=mask[:1, :prefix],
                                 position_ids=positions[:, :1, :prefix])
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    with head_on(model, keep):
        return model(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions[:, :, prefix:],
                     mm_token_type_ids=inputs["mm_token_type_ids"][:, prefix:], use_cache=True,
                     **{cache_kwarg(core): cache}, **vision).logits


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def load_conversations(cfg: BaseConfig | SFTConfig) -> list[Conversation]:
    if not cfg.data_files:
        raise DataError("data_files is empty: name at least one sharegpt JSON file")
    records: list[Conversation] = []
    for name in cfg.data_files:
        records.extend(read_sharegpt(Path(name)))
    limit = getattr(cfg, "max_records", None)
    return records[:limit] if limit else records  # the first N: a smaller corpus, nested in the larger one


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


def run(cfg: BaseConfig | SFTConfig, stage: str = "sft") -> Path:
    """Train to the end (resuming from the newest checkpoint) and return the stage directory."""
    accelerator = make_accelerator(cfg.model)
    run_dir, finished, local = start_stage(stage, cfg)  # local: Hub ids and folders made local
    if finished:
        print(f"{stage}: already finished in {run_dir}", flush=True)
        return run_dir

    seed_everything(cfg.seed)
    records = load_conversations(local)
    model, processor = load_policy(local.model, cfg.seed)
    adapters = setup_policy_training(model, cfg, local, accelerator)  # model.freeze_vision, model.lora_r
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
    # a plain checkpoint is restored before prepare, an FSDP run's sharded one into the shards after it
    model, optimizer, restored = prepare_and_resume(run_dir, accelerator, model, optimizer, scheduler)
    start = restored["step"] if restored else 0
    model.train()
    policy = accelerator.unwrap_model(model)
    if cfg.torch_compile:
        compile_repeated_blocks(policy)  # after FSDP wrapping and the restore, as regional compilation wants

    def rope_index(ids, mm_token_type_ids, image_grid_thw):
        return policy.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm_token_type_ids,
                                           image_grid_thw=image_grid_thw)[0]

    def batch_of(samples: list[Encoded]) -> dict[str, torch.Tensor]:
        if cfg.packing:
            return collate_packed(samples, tokenizer.pad_token_id, image_token_id, cfg.max_length, rope_index)
        return collate(samples, tokenizer.pad_token_id, image_token_id)

    # The run's first write: data, model and checkpoint have all loaded.
    record_config(run_dir, cfg, accelerator)
    logger = MetricsLogger(run_dir, cfg.tracking, project="prism", resume_step=start, config=None) \
        if accelerator.is_main_process else None
    progress = Progress(total_steps, desc=stage, initial=start) if accelerator.is_main_process else None
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    share_prefix = not cfg.packing and prefix_sharing_applies(model)  # then base micro-batches split (prefix_groups)
    rendered: dict[int, tuple[list[int], list[int]]] = {}  # record -> its chat template's ids and labels

    def encoded(indices: list[int]) -> list[Encoded]:  # a micro-batch's records, their images in one call
        wheres = [f"record [{i}]" for i in indices]
        for i, where in zip(indices, wheres):
            if i not in rendered:  # once per run: later epochs render the same text
                rendered[i] = render_conversation(tokenizer, records[i], where)
        return encode_conversations(processor, [records[i] for i in indices], cfg.max_length, wheres,
                                    [rendered[i] for i in indices])

    started, tokens_seen = time.perf_counter(), 0
    for step in range(start, total_steps):
        step_started = time.perf_counter()
        micro_samples = [
            encoded(idx)
            for idx in step_records(step, steps_per_epoch, global_batch, len(records), cfg.seed, rank, world,
                                    cfg.per_device_batch_size, cfg.gradient_accumulation_steps)
        ]
        groups = [group for samples in micro_samples
                  for group in (prefix_groups(samples, image_token_id) if share_prefix else [samples])]
        if cfg.split_by_length:
            groups = [part for group in groups for part in length_groups(group)]
        micro_batches = [batch_of(group) for group in groups]
        local_tokens = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)))
        total_tokens = accelerator.reduce(local_tokens, reduction="sum") if world > 1 else local_tokens
        loss_sum = torch.zeros((), device=accelerator.device)
        total_tokens = total_tokens.to(accelerator.device)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with no_sync(accelerator, model, last_micro_step=i == len(micro_batches) - 1):
                with autocast(accelerator.device, cfg.model.autocast_dtype):  # bf16 compute, fp32 weights
                    loss = summed_token_loss(model, batch, share_prefix=share_prefix)
                # DDP averages gradients over processes: scale by `world` so the result is sum / total_tokens.
                accelerator.backward(loss * world / total_tokens)
            loss_sum += loss.detach()
        loss_mean = (accelerator.reduce(loss_sum, reduction="sum") if world > 1 else loss_sum) / total_tokens
        check_finite(loss_mean, accelerator.unwrap_model(model), step=step + 1)
        grad_norm = plain_norm(accelerator.clip_grad_norm_(model.parameters(), clip))
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
                                  "forwards": len(micro_batches),
                                  "tokens_per_s": step_tokens / seconds, "seconds": seconds,
                                  "epoch": done / steps_per_epoch})
            progress.update(1, loss=round(float(loss_mean), 4), lr=f"{lr:.2e}")
        stop = done < total_steps and preempted(accelerator)  # a preemption signal: save this step and stop
        if (cfg.save_every_steps and done % cfg.save_every_steps == 0) or done == total_steps or stop:
            epoch, offset = divmod(done, steps_per_epoch)
            save_progress(run_dir, done, cfg, accelerator, model, optimizer, scheduler,
                          data_position={"epoch": epoch, "records_into_epoch": offset * global_batch})
        if stop:
            stop_preempted(stage, run_dir, done, accelerator, progress, logger)

    if accelerator.is_main_process:
        progress.close()
        logger.close()
    elapsed = time.perf_counter() - started
    save = final_model_saver(adapters)  # LoRA: the merged model and model/adapter/; else the plain save
    final = finish_stage(run_dir, cfg, accelerator, model, processor, local=local, save=save, extra={
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
