"""Stage 2b (PRISM): adversarial on-policy distillation against the MoE discriminator: config -> checkpoint.

  prism train align --config experiments/configs/embedded/align.yaml \
      model.path=<sft>/model discriminator.path=<disc_warmup>/model

One step is METHOD.md's loop, one discriminator update per policy update:
  1. generate: B prompts (with teacher segments), G rollouts each, seeded by (seed, step);
  2. score and 4. discriminator loss, from one pass of the discriminator (train mode) over micro-batches of
     `disc_micro_batch_size` rollouts: each rollout's caption and think+answer segments (a format-invalid one on
     its fallback split at half its length), and its prompt's teacher segments. The backbone runs each prompt
     (with its image) once per micro-batch and every segment on that prompt's key/value cache; the head is
     applied twice to each last hidden state: without dropout for the scores the advantage and the diagnostics
     read (the discriminator before its update), and with the head's dropout for the loss,
     the teacher's once per rollout it is paired with (`teacher_scoring: per_rollout`, published) or once per
     prompt (`shared`). The loss is the published one (prism.algorithms.discriminator_loss): per micro-batch the
     kinds' Bradley-Terry means over valid rollouts added, scores clamped to +-score_clip, the regulariser over
     every rollout, and the fallback on the teacher scores when no rollout of the step is valid; each micro-batch
     is back-propagated as soon as it is scored and the step's gradient is their mean;
  3. advantages: the `advantage` estimator (prism: clip, invalid-format replacement, alpha * GN(s_cap) +
     (1 - alpha) * GN(s_cot) - penalty * F); no accuracy reward;
  5. policy update: prism.stages.policy_update with the `update` section (PPO-clip, dual clip, token-mean,
     `mini_batches` updates), then the discriminator's optimizer step.
Diagnostics every step: discriminator accuracy and reward gap (teacher - policy) per kind, format rate, response
length, and two distribution proxies against the teacher corpus (caption bullets and reasoning steps: means and
Wasserstein-1 distances). `proxies.json` compares the same statistics on a fixed prompt set for the teacher,
the starting (SFT) policy and the aligned policy. Policy and discriminator each compute in their own config's
compute dtype (`model.mixed_precision`, `discriminator.mixed_precision`) over float32 master weights.

Under FSDP the policy is sharded as accelerate's FSDP2 plugin shards it (as in sft and rlvr) and the discriminator
as one FSDP2 unit (prism.stages.common.shard_whole, as in disc_warmup); each checkpoint is one
torch.distributed.checkpoint folder holding both models and both AdamW states, and the final model/ and
discriminator/ folders are gathered whole. Every forward of a sharded model is a collective: every process holds
prompts_per_step / processes prompts, so the rollouts, the discriminator's micro-batches and the policy's
micro-batches line up across processes, and the proxy rollouts run on every process.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prism.algorithms import discriminator_loss, get_advantage_estimator
from prism.atomic_io import atomic_write_text
from prism.config import AlignConfig
from prism.data.formats import DataError, RLRecord
from prism.models.discriminator import (
    Discriminator,
    EncodedPrompt,
    encode_prompt,
    load_discriminator,
    prompt_prefix,
    save_discriminator,
    segment_rows,
)
from prism.response_format import count_caption_bullets, count_reasoning_steps, scored_segments, segment_counts
from prism.rollout import RolloutError, SamplingParams
from prism.rollout.backends import make_backend
from prism.rollout.prompts import load_prompts, rollout_prompt, sampling_seed, take_prompts
from prism.runtime import (
    MetricsLogger,
    Progress,
    autocast,
    check_finite,
    full_model_state,
    mean_or_nan,
    seed_everything,
)
from prism.stages.common import (
    NamedParts,
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
)
from prism.stages.policy_update import Group, policy_update

DISCRIMINATOR_DIR = "discriminator"
DISCRIMINATOR_FORWARDS = ("prefill", "continue_hidden", "head_scores")  # called instead of forward (FSDP2 hooks)
PROXY_SEED_OFFSET = 4_242

# ----------------------------------------------------------------------------------------------------
# Distribution proxies
# ----------------------------------------------------------------------------------------------------


def wasserstein_1(a: Sequence[float], b: Sequence[float]) -> float:
    """W1 between two empirical 1-D distributions: the integral of |CDF_a - CDF_b| (NaN if either is empty)."""
    if not a or not b:
        return float("nan")
    points = sorted(set(a) | set(b))
    ca, cb = Counter(a), Counter(b)
    cdf_a = cdf_b = 0.0
    total = 0.0
    for left, right in itertools.pairwise(points):
        cdf_a += ca[left] / len(a)
        cdf_b += cb[left] / len(b)
        total += abs(cdf_a - cdf_b) * (right - left)
    return total


def teacher_counts(records: Sequence[RLRecord]) -> tuple[list[int], list[int]]:
    return ([count_caption_bullets(r.teacher_caption) for r in records],
            [count_reasoning_steps(r.teacher_cot) for r in records])


def proxy_summary(bullets: list[int], steps: list[int], teacher: tuple[list[int], list[int]]) -> dict[str, float]:
    return {"caption_bullets": mean_or_nan(bullets), "reasoning_steps": mean_or_nan(steps),
            "caption_bullets_w1": wasserstein_1(bullets, teacher[0]),
            "reasoning_steps_w1": wasserstein_1(steps, teacher[1])}


# ----------------------------------------------------------------------------------------------------
# The discriminator's pass over a step: its scores before the update, and the published loss's gradient
# ----------------------------------------------------------------------------------------------------


def teacher_segment(record: RLRecord, kind: str) -> str:
    if kind == "perception":
        return record.teacher_caption
    if kind == "reasoning":
        return record.teacher_cot
    return record.teacher_caption + "\n" + record.teacher_cot


@dataclass
class DiscriminatorPass:
    """What one pass of the discriminator over a step's rollouts gives (`discriminator_pass`)."""

    student: dict[str, torch.Tensor]  # kind -> [rows]: each rollout's score before the update (no dropout)
    teacher: dict[str, torch.Tensor]  # kind -> [prompts]: each teacher segment's score before the update
    valid: torch.Tensor  # [rows] bool: format-valid (an invalid row's scores are of its fallback split)
    loss: float  # the mean of the micro-batches' losses, aux term included
    bt_loss: float  # its Bradley-Terry part (the kinds' means added)
    score_reg: float
    fallback: float  # its fallback part (0 unless no rollout of the step is valid)
    seconds_forward: float
    seconds_backward: float


def discriminator_pass(discriminator: Discriminator, processor, prompts: Sequence[EncodedPrompt],
                       records: Sequence[RLRecord], texts: Sequence[str], n: int, cfg: AlignConfig,
                       batch_has_valid: bool, backward: bool = True) -> DiscriminatorPass:
    """Score the rollouts `texts` (row i answers prompt i // n) and back-propagate the published loss.

    Micro-batches of `cfg.disc_micro_batch_size` rollouts, in row order, each taking its loss's means over its own
    rows; `cfg.disc_forward_batch_size` rollouts (default: one micro-batch) run through the backbone together. Per
    forward, the prompts it holds run through the backbone once (once per kind for the hard-routed variant), then
    every kind's rollout segments and each micro-batch's teacher segments run once, in one `continue_hidden` call
    (one per kind for the hard-routed variant; forwards grouped by length), on their prompts' key/value cache.
    From each last hidden state the head gives a score without dropout (returned: what the advantage and
    diagnostics read) and, for the loss, with the head's dropout, the teacher's drawn once per rollout it is paired
    with (`teacher_scoring: per_rollout`) or once per prompt (`shared`), micro-batch by micro-batch. The
    micro-batches' losses over their number are back-propagated once per forward (`backward`), so one forward's
    activations are alive at a time and the gradient is the mean of the micro-batches'. `batch_has_valid`: whether
    any rollout of the whole step (every process) is format-valid; without one, the loss is the fallback. With
    `backward=False` (under torch.no_grad) the pass only scores."""
    kinds = discriminator.spec.segment_kinds
    split = [scored_segments(text) for text in texts]
    valid = torch.tensor([ok for _, ok in split], dtype=torch.bool)
    size = cfg.disc_micro_batch_size
    micro = [list(range(start, min(start + size, len(texts)))) for start in range(0, len(texts), size)]
    per_forward = (cfg.disc_forward_batch_size or size) // size
    student = {kind: torch.empty(len(texts)) for kind in kinds}
    teacher = {kind: torch.empty(len(records)) for kind in kinds}
    totals = dict.fromkeys(("loss", "bt_loss", "score_reg", "fallback", "seconds_forward", "seconds_backward"), 0.0)
    device = discriminator.device
    for first in range(0, len(micro), per_forward):
        started = time.perf_counter()
        batches = micro[first:first + per_forward]
        batch_owners = [sorted({row // n for row in rows}) for rows in batches]  # each micro-batch's prompts
        owners = sorted({p for mine in batch_owners for p in mine})  # the prompts this forward holds
        slot = {p: i for i, p in enumerate(owners)}
        # per micro-batch, the prompt (in this forward) of each of its segment rows: its teachers', then its rollouts'
        row_prompts = [[slot[p] for p in mine] + [slot[row // n] for row in rows]
                       for mine, rows in zip(batch_owners, batches)]
        owner_prompts = [prompts[p] for p in owners]
        prefix = prompt_prefix(processor, owner_prompts).to(device)
        hidden, aux = {}, [[] for _ in batches]  # hidden[(micro-batch, kind)] = (teacher rows, student rows)
        # The forwards in the discriminator's compute dtype; the scores come out of the head in float32.
        with autocast(device, cfg.discriminator.autocast_dtype):
            prefill = None if discriminator.routes_by_kind else discriminator.prefill(prefix)
            # every kind's teacher and student segments in one continue_hidden call, each group (kind, micro-batch,
            # teacher or student) keeping its own aux loss as separate forwards would; the hard-routed variant
            # routes by kind, so one call per kind
            for call_kinds in ([[kind] for kind in kinds] if discriminator.routes_by_kind else [list(kinds)]):
                route = call_kinds[0] if discriminator.routes_by_kind else None
                owner_index, segments, sizes = [], [], []
                for kind in call_kinds:
                    for mine, rows, of_rows in zip(batch_owners, batches, row_prompts):
                        owner_index += of_rows
                        segments += [teacher_segment(records[p], kind) for p in mine]
                        segments += [split[row][0][kind] for row in rows]
                        sizes += [len(mine), len(rows)]
                both = segment_rows(processor, owner_prompts, owner_index, segments, cfg.disc_max_length)
                states, call_aux = discriminator.continue_hidden(prefill or discriminator.prefill(prefix, kind=route),
                                                                 both.to(device), route, parts=sizes)
                states, call_aux = iter(states.split(sizes)), iter(call_aux.unbind())
                for kind in call_kinds:
                    for index in range(len(batches)):
                        hidden[index, kind] = next(states), next(states)
                        aux[index] += [next(call_aux), next(call_aux)]
            # the head, micro-batch by micro-batch (its dropout draws in the order one micro-batch a forward takes them)
            heads = []  # per micro-batch: (teacher, student) kind -> scores with the head's dropout, for the loss
            for index, (mine, rows) in enumerate(zip(batch_owners, batches)):
                train_teacher, train_student = {}, {}
                place = {p: i for i, p in enumerate(mine)}  # each of its prompts' teacher row
                of_row = torch.tensor([place[row // n] for row in rows], device=device)
                for kind in kinds:
                    hidden_t, hidden_s = hidden[index, kind]
                    with torch.no_grad():
                        teacher[kind][mine] = discriminator.head_scores(hidden_t, dropout=False).cpu()
                        student[kind][rows] = discriminator.head_scores(hidden_s, dropout=False).cpu()
                    # index_select, not [of_row]: a backward that sums duplicates in a fixed order
                    if cfg.teacher_scoring == "per_rollout":
                        train_teacher[kind] = discriminator.head_scores(hidden_t.index_select(0, of_row), dropout=True)
                    else:
                        train_teacher[kind] = discriminator.head_scores(hidden_t, dropout=True).index_select(0, of_row)
                    train_student[kind] = discriminator.head_scores(hidden_s, dropout=True)
                heads.append((train_teacher, train_student))
        loss = torch.zeros((), device=device)
        for index, (rows, (train_teacher, train_student)) in enumerate(zip(batches, heads)):
            batch_loss, metrics = discriminator_loss(
                train_teacher, train_student, valid[rows].to(device), batch_has_valid=batch_has_valid,
                score_clip=cfg.score_clip, score_reg_coef=cfg.score_reg_coef, fallback_coef=cfg.fallback_loss_coef)
            batch_loss = (batch_loss + cfg.disc_aux_loss_coef * torch.stack(aux[index]).mean()) / len(micro)
            loss = loss + batch_loss
            totals["loss"] += float(batch_loss.detach())
            totals["bt_loss"] += sum(float(metrics[f"bt_{kind}"]) for kind in kinds) / len(micro)
            totals["score_reg"] += float(metrics["score_reg"]) / len(micro)
            totals["fallback"] += float(metrics["fallback"]) / len(micro)
        totals["seconds_forward"] += time.perf_counter() - started
        started = time.perf_counter()
        if backward:
            loss.backward()
        totals["seconds_backward"] += time.perf_counter() - started
    return DiscriminatorPass(student=student, teacher=teacher, valid=valid, **totals)


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


def proxy_prompts(records: list[RLRecord], count: int, seed: int) -> list[RLRecord]:
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed + PROXY_SEED_OFFSET))
    return [records[i] for i in order[:count].tolist()]


def proxy_rollouts(backend, policy, records: list[RLRecord], cfg: AlignConfig) -> list[str]:
    policy.eval()
    batch = backend.generate([rollout_prompt(r) for r in records], 1, SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        seed=cfg.seed + PROXY_SEED_OFFSET))
    policy.train()
    return batch.texts


def run(cfg: AlignConfig, on_step=None) -> Path:
    """`on_step(step, metrics)` is called after every step on the main process (a sweep reports intermediate
    values through it; an exception it raises, such as a pruned trial, stops the run at its last checkpoint)."""
    if cfg.discriminator.path is None:
        raise DataError("discriminator.path is not set: give the disc_warmup stage's model/ folder")
    accelerator = make_accelerator(cfg.model)
    run_dir, finished, local = start_stage("align", cfg)  # local: Hub ids and folders made local
    if finished:
        print(f"align: already finished in {run_dir}", flush=True)
        return run_dir
    world, rank = accelerator.num_processes, accelerator.process_index
    rollout, update = cfg.rollout, cfg.update
    if rollout.prompts_per_step % world:
        raise RolloutError(f"rollout.prompts_per_step={rollout.prompts_per_step} must be divisible by the {world} "
                           "processes")
    if (rollout.prompts_per_step // world) % update.mini_batches:
        raise RolloutError(f"each process's {rollout.prompts_per_step // world} prompts must split into "
                           f"update.mini_batches={update.mini_batches}")

    seed_everything(cfg.seed)
    records = load_prompts(local.data_files)
    missing = [r.id for r in records if not (r.teacher_caption and r.teacher_cot)]
    if missing:
        raise DataError(f"{cfg.data_files}: record {missing[0]} has no teacher_caption/teacher_cot (align needs the "
                        "teacher's segments: use the teacher parquet)")
    teacher = teacher_counts(records)
    policy, processor = load_policy(local.model, cfg.seed)
    discriminator = load_discriminator(local.discriminator.path, dtype=cfg.discriminator.dtype).train()
    if discriminator.backbone.config.text_config.attention_dropout:
        raise NotImplementedError(
            f"{cfg.discriminator.path}: attention_dropout > 0. align takes the scores and the loss from one pass of "
            "the backbone, which must then be deterministic (Qwen3-VL's attention_dropout is 0)")
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if update.kl_coef > 0 else None
    policy_optimizer = build_optimizer(policy, cfg.policy_optim)
    disc_optimizer = build_optimizer(discriminator, cfg.disc_optim)
    policy_scheduler = build_scheduler(policy_optimizer, cfg.policy_optim, cfg.steps * update.mini_batches)
    disc_scheduler = build_scheduler(disc_optimizer, cfg.disc_optim, cfg.steps)
    both = nn.ModuleDict({"policy": policy, "discriminator": discriminator})
    optimizers = NamedParts(policy=policy_optimizer, discriminator=disc_optimizer)
    schedulers = NamedParts(policy=policy_scheduler, discriminator=disc_scheduler)
    sharded = is_fsdp(accelerator)
    model = None  # the policy as accelerate prepares it (DDP-wrapped, or sharded in place)

    def prepare(both, optimizers):
        """The policy through accelerate; the discriminator without a DDP wrapper (several forwards per backward:
        average_gradients), or under FSDP as one FSDP2 unit, whose backward reduce-scatters its gradients. Both
        optimizers are pointed at the sharded parameters in place."""
        nonlocal model, policy_optimizer
        model, policy_optimizer = accelerator.prepare(both["policy"], optimizers.parts["policy"])
        if sharded:
            shard_whole(accelerator, both["discriminator"], optimizers.parts["discriminator"], DISCRIMINATOR_FORWARDS,
                        model_config=cfg.discriminator)
        else:
            both["discriminator"].to(accelerator.device)
        return both, optimizers

    # a plain checkpoint is restored before prepare, an FSDP run's (both models in one) into the shards after it
    _, _, restored = prepare_and_resume(run_dir, accelerator, both, optimizers, schedulers, prepare=prepare)
    start = restored["step"] if restored else 0
    cursor = restored["data_position"]["prompts_consumed"] if restored else 0
    policy = accelerator.unwrap_model(model)
    if reference is not None:
        reference.to(accelerator.device)
    backend = make_backend(rollout.backend, policy, processor, model_path=local.model.path,
                           compute_dtype=cfg.model.compute_dtype)
    if restored:  # a vLLM engine is built from model.path; the policy is the resumed checkpoint's
        backend.update_weights(policy)
    advantage_fn = get_advantage_estimator(cfg.advantage)
    kinds = discriminator.spec.segment_kinds
    disc_clip = cfg.disc_optim.grad_clip if cfg.disc_optim.grad_clip is not None else math.inf
    sampling = {"max_new_tokens": rollout.max_new_tokens, "min_new_tokens": rollout.min_new_tokens,
                "temperature": rollout.temperature, "top_p": rollout.top_p}
    n = rollout.rollouts_per_prompt

    proxy_records = proxy_prompts(records, cfg.proxy_prompts, cfg.seed) if cfg.proxy_prompts else []
    proxies = (restored["extra"].get("proxies") if restored else None) or {}
    # proxy rollouts: the main process alone, or every process when sharded (each forward is a collective)
    if proxy_records and "before" not in proxies and (accelerator.is_main_process or sharded):
        proxies = {"prompts": len(proxy_records),
                   "teacher": proxy_summary(*teacher_counts(proxy_records), teacher),
                   "before": proxy_summary(*segment_counts(proxy_rollouts(backend, policy, proxy_records, cfg)), teacher)}

    # The run's first write: data, models, checkpoint and rollout engine have all loaded.
    record_config(run_dir, cfg, accelerator)
    logger = MetricsLogger(run_dir, cfg.tracking, project="prism", resume_step=start) if accelerator.is_main_process else None
    progress = Progress(cfg.steps, desc="align", initial=start) if accelerator.is_main_process else None
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # ---- 1. generate ----
        indices = take_prompts(cursor, rollout.prompts_per_step, len(records), cfg.seed)[rank::world]
        cursor += rollout.prompts_per_step
        chosen = [records[i] for i in indices]
        started = time.perf_counter()
        policy.eval()
        batch = backend.generate([rollout_prompt(r) for r in chosen], n,
                                 SamplingParams(**sampling, seed=sampling_seed(cfg.seed, step, 0, rank)))
        policy.train()
        if hasattr(backend, "sleep"):
            backend.sleep()
        seconds_generate = time.perf_counter() - started

        # ---- 2-4. discriminator: scores before its update, its loss, its update; advantages ----
        started = time.perf_counter()
        prompts = [encode_prompt(processor, r.prompt, rollout_prompt(r).images, discriminator.spec.uses_images)
                   for r in chosen]
        has_valid = torch.tensor([float(any(scored_segments(text)[1] for text in batch.texts))],
                                 device=accelerator.device)  # NCCL reduces device tensors only
        if world > 1:
            has_valid = accelerator.reduce(has_valid, reduction="sum")
        seconds_encode = time.perf_counter() - started
        scored = discriminator_pass(discriminator, processor, prompts, chosen, batch.texts, n, cfg,
                                    batch_has_valid=float(has_valid) > 0)
        started = time.perf_counter()
        average_gradients(discriminator, accelerator)
        check_finite(scored.loss, discriminator, step=step + 1)
        disc_grad_norm = float(plain_norm(torch.nn.utils.clip_grad_norm_(discriminator.parameters(), disc_clip)))
        disc_lr = disc_scheduler.get_last_lr()[0]
        disc_optimizer.step()
        disc_scheduler.step()  # the discriminator's schedule counts its updates
        disc_optimizer.zero_grad(set_to_none=True)
        seconds_disc_step = time.perf_counter() - started
        advantages = advantage_fn(scored.student[kinds[0]], scored.student[kinds[-1]], scored.valid, batch.group_ids,
                                  alpha=cfg.alpha, format_penalty=cfg.format_penalty, score_clip=cfg.score_clip)

        # ---- 5. policy update ----
        started = time.perf_counter()
        groups = [Group(batch, p, advantages.reshape(-1, n)[p]) for p in range(len(chosen))]
        stats = policy_update(model, policy_optimizer, policy_scheduler, accelerator, groups, update,
                              grad_clip=cfg.policy_optim.grad_clip, reference=reference, filler=groups[0],
                              step=step + 1, autocast_dtype=cfg.model.autocast_dtype)
        backend.update_weights(policy)
        seconds_policy_update = time.perf_counter() - started

        # ---- metrics, checkpoint ----
        done = step + 1
        bullets, steps_count = segment_counts(batch.texts)
        record: dict[str, float] = {
            "format_rate": float(scored.valid.float().mean()),
            "response_length": float(batch.response_mask.sum(-1).float().mean()),
            "truncated_rate": mean_or_nan([reason == "length" for reason in batch.finish_reasons]),
            "advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            **proxy_summary(bullets, steps_count, teacher),
            "disc_loss": scored.loss, "disc_bt_loss": scored.bt_loss, "disc_score_reg": scored.score_reg,
            "disc_fallback_loss": scored.fallback, "disc_fallback": float(float(has_valid) == 0),
            "disc_grad_norm": disc_grad_norm, "disc_lr": disc_lr,
            "policy_loss": stats["loss"], "clipfrac": stats["clipfrac"], "ppo_kl": stats["ppo_kl"],
            "entropy": stats["entropy"], "policy_grad_norm": stats["grad_norm"], "policy_lr": stats["lr"],
            "seconds_generate": seconds_generate,
            "seconds_disc_score": seconds_encode + scored.seconds_forward,
            "seconds_disc_update": scored.seconds_backward + seconds_disc_step,
            "seconds_policy_update": seconds_policy_update, "seconds_step": time.perf_counter() - t0,
        }
        ok = scored.valid
        for kind in kinds:
            student, teacher_scores = scored.student[kind], scored.teacher[kind]
            paired = teacher_scores.repeat_interleave(n)
            record[f"disc_accuracy_{kind}"] = float((paired[ok] > student[ok]).float().mean()) if ok.any() else float("nan")
            record[f"reward_gap_{kind}"] = float((paired[ok] - student[ok]).mean()) if ok.any() else float("nan")
            record[f"teacher_score_{kind}"] = float(teacher_scores.mean())
            record[f"policy_score_{kind}"] = float(student[ok].mean()) if ok.any() else float("nan")
        if reference is not None:
            record["kl_ref"] = stats["kl_ref"]
        if world > 1:  # each process saw its own prompts (as many rows each): the step's figures are their mean,
            # weighted by the valid rows for the figures taken over those alone
            keys = list(record)  # the same keys, in the same order, on every process
            over_valid = ("disc_accuracy_", "reward_gap_", "policy_score_")
            weights = [float(ok.sum()) if key.startswith(over_valid) else 1.0 for key in keys]
            own = torch.tensor([[record[key] for key in keys], weights], dtype=torch.float64, device=accelerator.device)
            values, counts = accelerator.gather(own).reshape(world, 2, len(keys)).unbind(1)
            counts = counts * ~values.isnan()
            mean = (values.nan_to_num() * counts).sum(0) / counts.sum(0)  # NaN where no process had a value
            record = dict(zip(keys, mean.tolist()))
        if accelerator.is_main_process:
            if done % cfg.log_every_steps == 0 or done == cfg.steps:
                logger.log(done, record)
            progress.update(1, fmt=round(record["format_rate"], 3),
                            **{f"gap_{k[:4]}": round(record[f"reward_gap_{k}"], 3) for k in kinds})
        stop = done < cfg.steps and preempted(accelerator)  # a preemption signal: save this step and stop
        if (cfg.save_every_steps and done % cfg.save_every_steps == 0) or done == cfg.steps or stop:
            save_progress(run_dir, done, cfg, accelerator, both, optimizers, schedulers,
                          data_position={"prompts_consumed": cursor}, extra={"proxies": proxies})
        if on_step is not None and accelerator.is_main_process:
            on_step(done, record)
        if stop:
            stop_preempted("align", run_dir, done, accelerator, progress, logger)

    if accelerator.is_main_process:
        progress.close()
        logger.close()
    if proxy_records and (accelerator.is_main_process or sharded):
        proxies["after"] = proxy_summary(*segment_counts(proxy_rollouts(backend, policy, proxy_records, cfg)), teacher)
        if accelerator.is_main_process:
            atomic_write_text(run_dir / "proxies.json", json.dumps(proxies, indent=2) + "\n")
    # collective when sharded: the whole state, gathered on the main process
    disc_state = full_model_state(discriminator) if sharded else None
    if accelerator.is_main_process:
        save_discriminator(discriminator, processor, run_dir / DISCRIMINATOR_DIR, state_dict=disc_state)
    final = finish_stage(run_dir, cfg, accelerator, model, processor, local=local, extra={
        "steps": cfg.steps, "prompts": len(records), "processes": world, "proxies": proxies,
        "discriminator": str(run_dir / DISCRIMINATOR_DIR)})
    if accelerator.is_main_process:
        print(f"align: finished, policy at {final}, discriminator at {run_dir / DISCRIMINATOR_DIR}", flush=True)
    return run_dir
