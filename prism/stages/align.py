"""Stage 2b (PRISM): adversarial on-policy distillation against the MoE discriminator: config -> checkpoint.

  prism train align --config experiments/configs/embedded/align.yaml \
      model.path=<sft>/model discriminator.path=<disc_warmup>/model

One step is METHOD.md's loop, one discriminator update per policy update:
  1. generate: B prompts (with teacher segments), G rollouts each, seeded by (seed, step);
  2. score: every rollout with the discriminator BEFORE its update (eval mode, no grad): s_cap = D(x, caption),
     s_cot = D(x, think+answer), and the prompt's teacher segments the same way;
  3. advantages: the `prism` multi-reward estimator (clip, invalid-format replacement, alpha * GN(s_cap) +
     (1 - alpha) * GN(s_cot) - penalty * F); no accuracy reward;
  4. discriminator update: Bradley-Terry of the teacher segments (scored once per group, shared by its G
     rollouts) against the valid rollouts' segments, both kinds pooled, + score_reg_coef * mean squared score;
     groups are back-propagated one at a time, each weighted by its share of the valid pairs. A step whose
     rollouts are all format-invalid makes no discriminator update (logged as disc_updated = 0);
  5. policy update: PPO-clip, token-mean, one update per step (the policy is its own old policy), optional KL.
Diagnostics every step: discriminator accuracy and reward gap (teacher - policy) per kind, format rate, response
length, and two distribution proxies against the teacher corpus (caption bullets and reasoning steps: means and
Wasserstein-1 distances). `proxies.json` compares the same statistics on a fixed prompt set for the teacher,
the starting (SFT) policy and the aligned policy.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from prism.algorithms import (
    aggregate_loss,
    bradley_terry_loss,
    compute_prism_advantage,
    get_policy_loss,
)
from prism.config import AlignConfig
from prism.data.formats import DataError, RLRecord, atomic_write_text
from prism.format import (
    count_caption_bullets,
    count_reasoning_steps,
    segment_counts,
    split_segments,
)
from prism.models.discriminator import (
    Discriminator,
    encode_prompt,
    load_discriminator,
    save_discriminator,
    score_segments,
)
from prism.rollout import RolloutError, SamplingParams
from prism.rollout.hf import log_probs_and_entropy
from prism.runtime import MetricsLogger, Progress, check_finite, seed_everything
from prism.stages.common import (
    average_gradients,
    build_optimizer,
    build_scheduler,
    finish_stage,
    is_fsdp,
    load_policy,
    make_accelerator,
    no_sync,
    resume,
    save_progress,
    start_stage,
)
from prism.stages.rlvr import (
    _mean,
    load_prompts,
    make_backend,
    rollout_prompt,
    sampling_seed,
    take_prompts,
)

DISCRIMINATOR_DIR = "discriminator"
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
    return {"caption_bullets": _mean(bullets), "reasoning_steps": _mean(steps),
            "caption_bullets_w1": wasserstein_1(bullets, teacher[0]),
            "reasoning_steps_w1": wasserstein_1(steps, teacher[1])}


# ----------------------------------------------------------------------------------------------------
# Discriminator scores of a batch
# ----------------------------------------------------------------------------------------------------


def segments_of(text: str, kind: str) -> str | None:
    """The canonical segment a discriminator scores (None for a format-invalid response)."""
    segments = split_segments(text)
    if segments is None:
        return None
    return {"perception": segments.perception, "reasoning": segments.reasoning, "response": segments.text}[kind]


def teacher_segment(record: RLRecord, kind: str) -> str:
    if kind == "perception":
        return record.teacher_caption
    if kind == "reasoning":
        return record.teacher_cot
    return record.teacher_caption + "\n" + record.teacher_cot


@torch.no_grad()
def score_batch(discriminator: Discriminator, processor, prompts, records: list[RLRecord], texts: list[str],
                n: int, cfg: AlignConfig) -> dict[str, torch.Tensor]:
    """Per kind: `student_<kind>` [rows] (NaN for invalid rows) and `teacher_<kind>` [prompts], in eval mode."""
    was_training = discriminator.training
    discriminator.eval()
    out: dict[str, torch.Tensor] = {}
    for kind in discriminator.spec.segment_kinds:
        segments = [segments_of(text, kind) for text in texts]
        valid = [row for row, segment in enumerate(segments) if segment is not None]
        student = torch.full((len(texts),), float("nan"))
        if valid:
            scores, _ = score_segments(discriminator, processor, [prompts[row // n] for row in valid],
                                       [segments[row] for row in valid], kind, cfg.disc_micro_batch_size,
                                       cfg.disc_max_length)
            student[valid] = scores.cpu()
        teacher, _ = score_segments(discriminator, processor, prompts, [teacher_segment(r, kind) for r in records],
                                    kind, cfg.disc_micro_batch_size, cfg.disc_max_length)
        out[f"student_{kind}"], out[f"teacher_{kind}"] = student, teacher.cpu()
    discriminator.train(was_training)
    return out


def discriminator_loss_groups(discriminator: Discriminator, processor, prompts, records: list[RLRecord],
                              texts: list[str], n: int, cfg: AlignConfig, total_valid: float):
    """Yield each group's loss (its Bradley-Terry mean x its share of all valid pairs) and metrics, ready for
    backward, so only one group's activations are alive at a time."""
    for p, record in enumerate(records):
        teacher, student = [], []
        aux = []
        for kind in discriminator.spec.segment_kinds:
            segments = [segments_of(texts[p * n + k], kind) for k in range(n)]
            valid = [s for s in segments if s is not None]
            if not valid:
                continue
            scores, a = score_segments(discriminator, processor, [prompts[p]] * (1 + len(valid)),
                                       [teacher_segment(record, kind), *valid], kind, cfg.disc_micro_batch_size,
                                       cfg.disc_max_length)
            teacher.append(scores[:1].expand(len(valid)))
            student.append(scores[1:])
            aux.append(a)
        if not teacher:
            continue
        t, s = torch.cat(teacher), torch.cat(student)
        loss, metrics = bradley_terry_loss(t, s, score_reg_coef=cfg.score_reg_coef)
        loss = loss * (len(t) / total_valid) + cfg.disc_aux_loss_coef * torch.stack(aux).mean() / len(records)
        yield loss, metrics


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


class _Named:
    """state_dict / load_state_dict over named parts, so one checkpoint holds both optimizers (schedulers)."""

    def __init__(self, **parts):
        self.parts = parts

    def state_dict(self):
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state):
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def _proxy_prompts(records: list[RLRecord], count: int, seed: int) -> list[RLRecord]:
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed + PROXY_SEED_OFFSET))
    return [records[i] for i in order[:count].tolist()]


def _proxy_rollouts(backend, policy, records: list[RLRecord], cfg: AlignConfig) -> list[str]:
    policy.eval()
    batch = backend.generate([rollout_prompt(r) for r in records], 1, SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        seed=cfg.seed + PROXY_SEED_OFFSET))
    policy.train()
    return batch.texts


def run(cfg: AlignConfig, on_step=None) -> Path:
    """`on_step(step, metrics)` is called after every step on the main process (a sweep reports intermediate
    values through it; an exception it raises, such as a pruned trial, stops the run at its last checkpoint)."""
    if cfg.discriminator.path is None:
        raise DataError("discriminator.path is not set: give the disc_warmup stage's model/ folder")
    accelerator = make_accelerator()
    run_dir, finished = start_stage("align", cfg, accelerator)
    if finished:
        print(f"align: already finished in {run_dir}", flush=True)
        return run_dir
    if is_fsdp(accelerator):
        raise NotImplementedError("align under FSDP is not implemented (policy and discriminator are checkpointed "
                                  "together unsharded): run it data-parallel")
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.prompts_per_step % world:
        raise RolloutError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the {world} processes")

    seed_everything(cfg.seed)
    records = load_prompts(cfg)
    missing = [r.id for r in records if not (r.teacher_caption and r.teacher_cot)]
    if missing:
        raise DataError(f"{cfg.data_files}: record {missing[0]} has no teacher_caption/teacher_cot (align needs the "
                        "teacher's segments: use the teacher parquet)")
    teacher = teacher_counts(records)
    policy, processor = load_policy(cfg.model, cfg.seed)
    discriminator = load_discriminator(cfg.discriminator.path, dtype=cfg.discriminator.dtype).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    policy_optimizer = build_optimizer(policy, cfg.policy_optim)
    disc_optimizer = build_optimizer(discriminator, cfg.disc_optim)
    policy_scheduler = build_scheduler(policy_optimizer, cfg.policy_optim, cfg.steps)
    disc_scheduler = build_scheduler(disc_optimizer, cfg.disc_optim, cfg.steps)
    both = nn.ModuleDict({"policy": policy, "discriminator": discriminator})
    optimizers = _Named(policy=policy_optimizer, discriminator=disc_optimizer)
    schedulers = _Named(policy=policy_scheduler, discriminator=disc_scheduler)
    restored = resume(run_dir, both, optimizers, schedulers, accelerator)
    start = restored["step"] if restored else 0
    cursor = restored["data_position"]["prompts_consumed"] if restored else 0
    discriminator.to(accelerator.device)  # no DDP wrapper: several forwards per backward (average_gradients)
    model, policy_optimizer = accelerator.prepare(policy, policy_optimizer)
    if reference is not None:
        reference.to(accelerator.device)
    backend = make_backend(cfg, policy, processor)
    loss_fn = get_policy_loss("ppo_clip")
    kinds = discriminator.spec.segment_kinds
    prompts_per_micro = max(1, cfg.micro_batch_size // cfg.rollouts_per_prompt)
    policy_clip = cfg.policy_optim.grad_clip if cfg.policy_optim.grad_clip is not None else math.inf
    disc_clip = cfg.disc_optim.grad_clip if cfg.disc_optim.grad_clip is not None else math.inf
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}

    proxy_records = _proxy_prompts(records, cfg.proxy_prompts, cfg.seed) if cfg.proxy_prompts else []
    proxies = (restored["extra"].get("proxies") if restored else None) or {}
    if proxy_records and "before" not in proxies and accelerator.is_main_process:
        proxies = {"prompts": len(proxy_records),
                   "teacher": proxy_summary(*teacher_counts(proxy_records), teacher),
                   "before": proxy_summary(*segment_counts(_proxy_rollouts(backend, policy, proxy_records, cfg)), teacher)}

    logger = MetricsLogger(run_dir, cfg.tracking, project="prism", resume_step=start) if accelerator.is_main_process else None
    progress = Progress(cfg.steps, desc="align", initial=start) if accelerator.is_main_process else None
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # ---- 1. generate ----
        indices = take_prompts(cursor, cfg.prompts_per_step, len(records), cfg.seed)[rank::world]
        cursor += cfg.prompts_per_step
        chosen = [records[i] for i in indices]
        started = time.perf_counter()
        policy.eval()
        batch = backend.generate([rollout_prompt(r) for r in chosen], cfg.rollouts_per_prompt,
                                 SamplingParams(**sampling, seed=sampling_seed(cfg.seed, step, 0, rank)))
        policy.train()
        if hasattr(backend, "sleep"):
            backend.sleep()
        seconds_generate = time.perf_counter() - started

        # ---- 2-3. score with the discriminator before its update; advantages ----
        started = time.perf_counter()
        n = cfg.rollouts_per_prompt
        prompts = [encode_prompt(processor, r.prompt, rollout_prompt(r).images, discriminator.spec.uses_images)
                   for r in chosen]
        scores = score_batch(discriminator, processor, prompts, chosen, batch.texts, n, cfg)
        valid = torch.tensor([split_segments(text) is not None for text in batch.texts])
        s_cap = scores[f"student_{kinds[0]}"]
        s_cot = scores[f"student_{kinds[-1]}"]  # whole_response: one score serves both views
        advantages = compute_prism_advantage(s_cap, s_cot, valid, batch.group_ids, alpha=cfg.alpha,
                                             format_penalty=cfg.format_penalty, score_clip=cfg.score_clip)
        seconds_score = time.perf_counter() - started

        # ---- 4. discriminator update ----
        started = time.perf_counter()
        local_valid = torch.tensor(float(valid.sum()) * len(kinds))
        total_valid = accelerator.reduce(local_valid, reduction="sum") if world > 1 else local_valid
        disc_stats = {"loss": 0.0, "bt_loss": 0.0, "score_reg": 0.0}
        disc_grad_norm = disc_lr = float("nan")
        if float(total_valid) > 0:
            for loss, metrics in discriminator_loss_groups(discriminator, processor, prompts, chosen,
                                                           batch.texts, n, cfg, float(total_valid)):
                loss.backward()
                share = float(metrics["num_valid"]) / float(total_valid)
                disc_stats["loss"] += float(loss.detach())
                disc_stats["bt_loss"] += float(metrics["bt_loss"]) * share
                disc_stats["score_reg"] += float(metrics["score_reg"]) * share
            average_gradients(discriminator, accelerator)
            check_finite(disc_stats["loss"], discriminator, step=step + 1)
            disc_grad_norm = float(torch.nn.utils.clip_grad_norm_(discriminator.parameters(), disc_clip))
            disc_lr = disc_scheduler.get_last_lr()[0]
            disc_optimizer.step()
            disc_scheduler.step()  # the discriminator's schedule counts its updates
            disc_optimizer.zero_grad(set_to_none=True)
        seconds_disc_update = time.perf_counter() - started

        # ---- 5. policy update: PPO-clip, one update, micro-batches of whole groups ----
        started = time.perf_counter()
        groups = list(range(len(chosen)))
        micros = [groups[i : i + prompts_per_micro] for i in range(0, len(groups), prompts_per_micro)]
        tokens = torch.tensor(float(batch.response_mask.sum()))
        tokens = (accelerator.reduce(tokens, reduction="sum") if world > 1 else tokens).clamp_min(1.0)
        stats: dict[str, list[float]] = {"clipfrac": [], "ppo_kl": [], "entropy": [], "kl_ref": []}
        policy_loss = 0.0
        for i, group_indices in enumerate(micros):
            micro = batch.select_prompts(group_indices)
            adv = advantages.reshape(-1, n)[group_indices].flatten()
            with no_sync(accelerator, model, last_micro_step=i == len(micros) - 1):
                lp, entropy = log_probs_and_entropy(model, micro)
                mask, adv = micro.response_mask.to(lp.device), adv.to(lp.device)
                loss_mat, metrics = loss_fn(lp, lp.detach(), adv, mask, clip_low=cfg.clip_ratio,
                                            clip_high=cfg.clip_ratio, dual_clip_c=None)
                if reference is not None:
                    with torch.no_grad():
                        ref_lp = log_probs_and_entropy(reference, micro, with_entropy=False)[0]
                    log_ratio = (ref_lp - lp).clamp(-20, 20)
                    kl = (log_ratio.exp() - log_ratio - 1) * mask
                    loss_mat = loss_mat + cfg.kl_coef * kl
                    stats["kl_ref"].append(float((kl.sum() / mask.sum().clamp_min(1)).detach()))
                weight = float(mask.sum()) / float(tokens) if cfg.loss_agg == "token-mean" else len(group_indices) / len(chosen)
                loss = aggregate_loss(loss_mat, mask, cfg.loss_agg) * weight * world
                accelerator.backward(loss)
            policy_loss += float(loss.detach()) / world
            stats["clipfrac"].append(float(metrics["clipfrac"]))
            stats["ppo_kl"].append(float(metrics["ppo_kl"]))
            stats["entropy"].append(float(entropy.sum() / mask.sum().clamp_min(1)))
        check_finite(policy_loss, policy, step=step + 1)
        policy_grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), policy_clip))
        policy_lr = policy_scheduler.get_last_lr()[0]
        policy_optimizer.step()
        policy_scheduler.step()
        policy_optimizer.zero_grad(set_to_none=True)
        backend.update_weights(policy)
        seconds_policy_update = time.perf_counter() - started

        # ---- metrics, checkpoint ----
        done = step + 1
        bullets, steps_count = segment_counts(batch.texts)
        record: dict[str, float] = {
            "format_rate": float(valid.float().mean()),
            "response_length": float(batch.response_mask.sum(-1).float().mean()),
            "truncated_rate": _mean([reason == "length" for reason in batch.finish_reasons]),
            "advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            **proxy_summary(bullets, steps_count, teacher),
            "disc_loss": disc_stats["loss"], "disc_bt_loss": disc_stats["bt_loss"],
            "disc_score_reg": disc_stats["score_reg"], "disc_grad_norm": disc_grad_norm,
            "disc_updated": float(float(total_valid) > 0), "disc_lr": disc_lr,
            "policy_loss": policy_loss, "clipfrac": _mean(stats["clipfrac"]), "ppo_kl": _mean(stats["ppo_kl"]),
            "entropy": _mean(stats["entropy"]), "policy_grad_norm": policy_grad_norm, "policy_lr": policy_lr,
            "seconds_generate": seconds_generate, "seconds_disc_score": seconds_score,
            "seconds_disc_update": seconds_disc_update, "seconds_policy_update": seconds_policy_update,
            "seconds_step": time.perf_counter() - t0,
        }
        for kind in kinds:
            student, teacher_scores = scores[f"student_{kind}"], scores[f"teacher_{kind}"]
            paired = teacher_scores.repeat_interleave(n)
            ok = ~torch.isnan(student)
            record[f"disc_accuracy_{kind}"] = float((paired[ok] > student[ok]).float().mean()) if ok.any() else float("nan")
            record[f"reward_gap_{kind}"] = float((paired[ok] - student[ok]).mean()) if ok.any() else float("nan")
            record[f"teacher_score_{kind}"] = float(teacher_scores.mean())
            record[f"policy_score_{kind}"] = float(student[ok].mean()) if ok.any() else float("nan")
        if reference is not None:
            record["kl_ref"] = _mean(stats["kl_ref"])
        if accelerator.is_main_process:
            if done % cfg.log_every_steps == 0 or done == cfg.steps:
                logger.log(done, record)
            progress.update(1, fmt=round(record["format_rate"], 3),
                            **{f"gap_{k[:4]}": round(record[f"reward_gap_{k}"], 3) for k in kinds})
        if (cfg.save_every_steps and done % cfg.save_every_steps == 0) or done == cfg.steps:
            save_progress(run_dir, done, cfg, accelerator, both, optimizers, schedulers,
                          data_position={"prompts_consumed": cursor}, extra={"proxies": proxies})
        if on_step is not None and accelerator.is_main_process:
            on_step(done, record)

    if accelerator.is_main_process:
        progress.close()
        logger.close()
        if proxy_records:
            proxies["after"] = proxy_summary(*segment_counts(_proxy_rollouts(backend, policy, proxy_records, cfg)),
                                             teacher)
            atomic_write_text(run_dir / "proxies.json", json.dumps(proxies, indent=2) + "\n")
        save_discriminator(discriminator, processor, run_dir / DISCRIMINATOR_DIR)
    final = finish_stage(run_dir, cfg, accelerator, model, processor, extra={
        "steps": cfg.steps, "prompts": len(records), "processes": world, "proxies": proxies,
        "discriminator": str(run_dir / DISCRIMINATOR_DIR)})
    if accelerator.is_main_process:
        print(f"align: finished, policy at {final}, discriminator at {run_dir / DISCRIMINATOR_DIR}", flush=True)
    return run_dir
