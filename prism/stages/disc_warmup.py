"""Stage 2a: build the MoE discriminator and warm it up on (teacher, student) segment pairs: config -> checkpoint.

  prism train disc_warmup --config experiments/configs/embedded/disc_warmup.yaml \
      model.path=<base>/model policy.path=<sft>/model

1. pairs: read the pair files (published warm-up JSONL), or generate them once: roll out the SFT policy on the
   teacher prompts (seeded) and pair each format-valid rollout's caption and think+answer segments with the
   teacher's. Generated pairs are written to `pairs.jsonl` (+ `pair_images/`) in the stage directory, in the
   published schema, and reused on resume. A seeded share is held out.
2. discriminator: sparse-upcycle the dense backbone (prism.models.discriminator; `variant: dense` keeps it dense).
3. train: Bradley-Terry `-log sigmoid(D(x, y_teacher) - D(x, y_student))` over both segment kinds (their pairs
   pooled, so each kind weighs by its pairs) + aux_loss_coef * the router load-balancing loss; AdamW, warm-up
   then cosine. Every step logs loss, accuracy and mean scores per kind; held-out accuracy per kind is measured
   before training and at the end (`heldout.json`). The discriminator computes in `model`'s compute dtype
   (autocast, `model.mixed_precision`) over float32 master weights; pair generation in `policy`'s.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image

from prism.algorithms import bradley_terry_loss
from prism.atomic_io import atomic_write_text
from prism.config import DiscWarmupConfig
from prism.data.encoding import chat_messages
from prism.data.formats import (
    IMAGE_TOKEN,
    DataError,
    WarmupPair,
    read_rl_parquet,
    read_warmup_pairs,
    write_warmup_pairs,
)
from prism.data.order import epoch_order, step_records
from prism.models.discriminator import (
    Discriminator,
    DiscriminatorSpec,
    build_discriminator,
    encode_prompt,
    save_discriminator,
    score_segments,
)
from prism.response_format import SYSTEM_PROMPT, split_segments
from prism.rollout import RolloutPrompt, SamplingParams
from prism.rollout.backends import make_backend
from prism.runtime import MetricsLogger, Progress, autocast, check_finite, seed_everything
from prism.stages.common import (
    average_gradients,
    build_optimizer,
    build_scheduler,
    finish_stage,
    is_fsdp,
    load_policy,
    make_accelerator,
    plain_norm,
    preempted,
    prepare_and_resume,
    record_config,
    save_progress,
    shard_whole,
    start_stage,
    stop_preempted,
    write_stage_config,
)

PAIRS_FILE = "pairs.jsonl"
DISCRIMINATOR_FORWARDS = ("prefill", "continue_hidden", "head_scores")  # called instead of forward (FSDP2 hooks)
GENERATION_PROMPTS = 16  # teacher prompts per generate call


# ----------------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------------


def generate_pairs(cfg: DiscWarmupConfig, out: Path, before_writing=None) -> int:
    """Roll the SFT policy out on the teacher prompts; write one pair per format-valid rollout to `out`.
    `before_writing()` is called once the teacher prompts and the policy have loaded, before the first write."""
    if not cfg.teacher_files:
        raise DataError("disc_warmup needs data_files (pair JSONL) or teacher_files (RL parquet with teacher segments)")
    records = [r for name in cfg.teacher_files for r in read_rl_parquet(Path(name))]
    missing = [r.id for r in records if not (r.teacher_caption and r.teacher_cot)]
    if missing:
        raise DataError(f"{cfg.teacher_files}: record {missing[0]} has no teacher_caption/teacher_cot")
    bad = [r for r in records if len(r.images) != 1]
    if bad:
        raise DataError(f"{cfg.teacher_files}: record {bad[0].id} has {len(bad[0].images)} images; a pair takes one")
    policy, processor = load_policy(cfg.policy, cfg.seed)
    backend = make_backend(cfg.rollout_backend, policy.eval(), processor, model_path=cfg.policy.path,
                           compute_dtype=cfg.policy.compute_dtype, path_field="policy.path")
    if before_writing is not None:
        before_writing()
    image_dir = out.parent / "pair_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    pairs: list[WarmupPair] = []
    progress = Progress(len(records), desc="disc_warmup pairs")
    for start in range(0, len(records), GENERATION_PROMPTS):
        chunk = records[start : start + GENERATION_PROMPTS]
        prompts = []
        for record in chunk:
            with Image.open(io.BytesIO(record.images[0])) as image:
                prompts.append(RolloutPrompt(messages=chat_messages(record.prompt), images=[image.convert("RGB")]))
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  seed=(cfg.seed * 1_000_003 + start) % (2**31 - 1))
        batch = backend.generate(prompts, cfg.rollouts_per_prompt, sampling)
        for row, text in enumerate(batch.texts):
            record = chunk[row // cfg.rollouts_per_prompt]
            segments = split_segments(text)
            if segments is None:
                continue
            image = image_dir / f"{record.id}.png"
            if not image.exists():
                image.write_bytes(record.images[0])
            user = next(m["content"] for m in record.prompt if m["role"] == "user")
            pairs.append(WarmupPair(prompt=user, image=image, teacher_caption=record.teacher_caption,
                                    student_caption=segments.perception, teacher_cot=record.teacher_cot,
                                    student_cot=segments.reasoning))
        progress.update(len(chunk), pairs=len(pairs))
    progress.close()
    if not pairs:
        raise DataError("the policy produced no format-valid rollout on the teacher prompts: no pairs to train on")
    return write_warmup_pairs(out, pairs)


def pair_messages(pair: WarmupPair) -> list[dict[str, str]]:
    """The scored prompt: the system prompt, then the user turn with its image placeholder (none: text only)."""
    user = pair.prompt if pair.image is None or IMAGE_TOKEN in pair.prompt else IMAGE_TOKEN + pair.prompt
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def pair_segments(pair: WarmupPair, kind: str) -> tuple[str, str]:
    """(teacher, student) segment of one kind; `response` joins caption and think+answer as Segments.text does."""
    if kind == "perception":
        return pair.teacher_caption, pair.student_caption
    if kind == "reasoning":
        return pair.teacher_cot, pair.student_cot
    return pair.teacher_caption + "\n" + pair.teacher_cot, pair.student_caption + "\n" + pair.student_cot


def split_heldout(num_pairs: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded permutation, its last `fraction` held out (at least 1 when > 0)."""
    order = epoch_order(num_pairs, seed + 7, 0).tolist()
    held = math.ceil(num_pairs * fraction) if fraction > 0 else 0
    return sorted(order[: num_pairs - held]), sorted(order[num_pairs - held :])


# ----------------------------------------------------------------------------------------------------
# Scoring pairs
# ----------------------------------------------------------------------------------------------------


class PairEncoder:
    """Encodes each pair's prompt (image processed once) on first use and keeps it."""

    def __init__(self, processor, pairs: list[WarmupPair], uses_images: bool):
        self.processor, self.pairs, self.uses_images = processor, pairs, uses_images
        self.cache: dict[int, object] = {}

    def __call__(self, index: int):
        if index not in self.cache:
            pair = self.pairs[index]
            images = []
            if self.uses_images and pair.image is not None:
                with Image.open(pair.image) as image:
                    images = [image.convert("RGB")]
            self.cache[index] = encode_prompt(self.processor, pair_messages(pair), images, self.uses_images)
        return self.cache[index]


def pair_scores(discriminator: Discriminator, encoder: PairEncoder, indices: list[int], kind: str,
                micro_batch_size: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher scores, student scores, aux loss) for the pairs `indices`, teacher and student rows in one pass."""
    prompts = [encoder(i) for i in indices]
    teacher, student = zip(*(pair_segments(encoder.pairs[i], kind) for i in indices))
    scores, aux = score_segments(discriminator, encoder.processor, prompts + prompts, list(teacher) + list(student),
                                 kind, micro_batch_size * 2, max_length)
    return scores[: len(indices)], scores[len(indices) :], aux


@torch.no_grad()
def heldout_accuracy(discriminator: Discriminator, encoder: PairEncoder, indices: list[int],
                     micro_batch_size: int, max_length: int, autocast_dtype: str | None = None) -> dict[str, float]:
    was_training = discriminator.training
    discriminator.eval()
    out: dict[str, float] = {"heldout_pairs": len(indices)}
    for kind in discriminator.spec.segment_kinds:
        with autocast(discriminator.device, autocast_dtype):
            teacher, student, _ = pair_scores(discriminator, encoder, indices, kind, micro_batch_size, max_length)
        out[f"heldout_accuracy_{kind}"] = float((teacher > student).float().mean())
        out[f"heldout_gap_{kind}"] = float((teacher - student).mean())
    discriminator.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


def run(cfg: DiscWarmupConfig) -> Path:
    accelerator = make_accelerator(cfg.model)
    run_dir, finished, local = start_stage("disc_warmup", cfg)  # local: Hub ids and folders made local
    if finished:
        print(f"disc_warmup: already finished in {run_dir}", flush=True)
        return run_dir
    world, rank = accelerator.num_processes, accelerator.process_index

    # ---- 1. pairs (generated once, on the main process) ----
    if cfg.data_files:
        pair_files = [Path(name) for name in local.data_files]
    else:
        pair_files = [run_dir / PAIRS_FILE]
        if accelerator.is_main_process and not pair_files[0].is_file():
            # the generated pairs belong to this config: it is recorded before they are written
            generate_pairs(local, pair_files[0], before_writing=lambda: write_stage_config(run_dir, cfg))
        accelerator.wait_for_everyone()
    pairs = [pair for path in pair_files for pair in read_warmup_pairs(path)]
    train_idx, heldout_idx = split_heldout(len(pairs), cfg.heldout_fraction, cfg.seed)
    global_batch = cfg.effective_batch_size
    per_device = cfg.micro_batch_size
    if global_batch % (per_device * world):
        raise DataError(f"effective_batch_size={global_batch} must split into micro_batch_size={per_device} x "
                        f"{world} processes x accumulation steps")
    accumulation = global_batch // (per_device * world)
    steps_per_epoch = len(train_idx) // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_idx)} training pairs are fewer than one step's effective_batch_size={global_batch}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # ---- 2. discriminator ----
    seed_everything(cfg.seed)
    dense, processor = load_policy(local.model, cfg.seed)
    spec = DiscriminatorSpec(variant=cfg.variant, head_dropout=cfg.head_dropout)
    discriminator = build_discriminator(
        dense, spec, num_experts=cfg.num_experts, top_k=cfg.top_k, expert_noise_std=cfg.expert_noise_std,
        router_init_std=cfg.router_init_std, aux_loss_coef=cfg.aux_loss_coef, seed=cfg.seed).train()
    del dense
    encoder = PairEncoder(processor, pairs, spec.uses_images)
    optimizer = build_optimizer(discriminator, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    # No DDP wrapper (several forwards per backward): gradients are averaged by hand (average_gradients). Under
    # FSDP the discriminator is sharded as one FSDP2 unit, whose backward reduce-scatters them instead.
    sharded = is_fsdp(accelerator)
    discriminator, optimizer, restored = prepare_and_resume(
        run_dir, accelerator, discriminator, optimizer, scheduler,
        prepare=(lambda m, o: shard_whole(accelerator, m, o, DISCRIMINATOR_FORWARDS)) if sharded
        else (lambda m, o: (m.to(accelerator.device), o)))
    start = restored["step"] if restored else 0
    heldout_before = restored["extra"].get("heldout_before") if restored else None
    # held-out scoring: the main process alone, or every process when sharded (each forward is a collective)
    if heldout_before is None and heldout_idx and (accelerator.is_main_process or sharded):
        heldout_before = heldout_accuracy(discriminator, encoder, heldout_idx, cfg.micro_batch_size, cfg.max_length,
                                          cfg.model.autocast_dtype)
    kinds = spec.segment_kinds

    # ---- 3. train ----
    # The run's first write, but for generated pairs: data, models and checkpoint have all loaded.
    record_config(run_dir, cfg, accelerator)
    logger = MetricsLogger(run_dir, cfg.tracking, project="prism", resume_step=start) if accelerator.is_main_process else None
    progress = Progress(total_steps, desc="disc_warmup", initial=start) if accelerator.is_main_process else None
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    for step in range(start, total_steps):
        started = time.perf_counter()
        micro = step_records(step, steps_per_epoch, global_batch, len(train_idx), cfg.seed, rank, world,
                             per_device, accumulation)
        scores: dict[str, list[torch.Tensor]] = {f"{side}_{kind}": [] for kind in kinds for side in ("t", "s")}
        bt_total, aux_total = 0.0, 0.0
        for i, positions in enumerate(micro):
            indices = [train_idx[p] for p in positions]
            teacher, student, aux = [], [], []
            for kind in kinds:
                with autocast(accelerator.device, cfg.model.autocast_dtype):  # scores come out in float32
                    t, s, a = pair_scores(discriminator, encoder, indices, kind, per_device, cfg.max_length)
                teacher.append(t)
                student.append(s)
                aux.append(a)
                scores[f"t_{kind}"].append(t.detach())
                scores[f"s_{kind}"].append(s.detach())
            bt, _ = bradley_terry_loss(torch.cat(teacher), torch.cat(student))
            aux_mean = torch.stack(aux).mean()
            ((bt + cfg.aux_loss_coef * aux_mean) / accumulation).backward()
            bt_total += float(bt.detach()) / accumulation
            aux_total += float(aux_mean.detach()) / accumulation
        average_gradients(discriminator, accelerator)
        if world > 1:  # log the global step, not this process's share
            bt_total, aux_total = accelerator.reduce(torch.tensor([bt_total, aux_total], device=accelerator.device),
                                                     reduction="mean").tolist()
            scores = {key: [accelerator.gather(torch.cat(values))] for key, values in scores.items()}
        check_finite(bt_total + aux_total, discriminator, step=step + 1)
        grad_norm = plain_norm(torch.nn.utils.clip_grad_norm_(discriminator.parameters(), clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        record = {"loss": bt_total + cfg.aux_loss_coef * aux_total, "bt_loss": bt_total, "aux_loss": aux_total,
                  "grad_norm": grad_norm, "lr": lr, "epoch": done / steps_per_epoch}
        for kind in kinds:
            t, s = torch.cat(scores[f"t_{kind}"]), torch.cat(scores[f"s_{kind}"])
            record.update({f"accuracy_{kind}": (t > s).float().mean(), f"teacher_score_{kind}": t.mean(),
                           f"student_score_{kind}": s.mean(), f"reward_gap_{kind}": (t - s).mean()})
        record["seconds"] = time.perf_counter() - started
        if accelerator.is_main_process:
            if done % cfg.log_every_steps == 0 or done == total_steps:
                logger.log(done, record)
            progress.update(1, loss=round(bt_total, 4),
                            **{f"acc_{k[:4]}": round(float(record[f"accuracy_{k}"]), 3) for k in kinds})
        stop = done < total_steps and preempted(accelerator)  # a preemption signal: save this step and stop
        if (cfg.save_every_steps and done % cfg.save_every_steps == 0) or done == total_steps or stop:
            save_progress(run_dir, done, cfg, accelerator, discriminator, optimizer, scheduler,
                          data_position={"pairs_seen": done * global_batch},
                          extra={"heldout_before": heldout_before})
        if stop:
            stop_preempted("disc_warmup", run_dir, done, accelerator, progress, logger)

    heldout = {}
    if accelerator.is_main_process:
        progress.close()
        logger.close()
    if heldout_idx and (accelerator.is_main_process or sharded):
        heldout = {"before": heldout_before,
                   "after": heldout_accuracy(discriminator, encoder, heldout_idx, cfg.micro_batch_size,
                                             cfg.max_length, cfg.model.autocast_dtype)}
        if accelerator.is_main_process:
            atomic_write_text(run_dir / "heldout.json", json.dumps(heldout, indent=2) + "\n")
    final = finish_stage(run_dir, cfg, accelerator, discriminator, processor, save=save_discriminator, local=local, extra={
        "steps": total_steps, "pairs": len(pairs), "train_pairs": len(train_idx), "heldout_pairs": len(heldout_idx),
        "pair_files": [str(p) for p in pair_files], "processes": world, "heldout": heldout})
    if accelerator.is_main_process:
        print(f"disc_warmup: finished, discriminator at {final}", flush=True)
        if heldout:
            print("disc_warmup: held-out accuracy " + ", ".join(
                f"{k}: {heldout['before'][f'heldout_accuracy_{k}']:.3f} -> {heldout['after'][f'heldout_accuracy_{k}']:.3f}"
                for k in kinds), flush=True)
    return run_dir
