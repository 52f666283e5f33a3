"""RL with verifiable rewards (GRPO, DAPO, GSPO): config -> checkpoint.

  prism train rlvr --config experiments/configs/embedded/rlvr.yaml algorithm=dapo model.path=<sft>/model

One step:
  1. generate: take the next prompts, roll out G responses each (seeded by (seed, step, round));
  2. score: rule-based reward 0.8 * accuracy + 0.2 * format (format-gated), DAPO's overlong shaping when on;
     with dynamic sampling, drop groups whose accuracies are all equal and generate more until the batch
     holds prompts_per_step groups (at most max_num_gen_batches rounds; then a partial batch or an error);
  3. advantages: the `advantage` estimator (grpo: group-normalised, shared by all three algorithms);
  4. update: prism.stages.policy_update with the `update` section (loss, clip bounds, aggregation, mini-batches).
The algorithm's published bundle (prism.config.RLVR_ALGORITHM_PRESETS) sets the loss, its clip range, dual clip
and aggregation, dynamic sampling, overlong shaping, weight decay and warm-up; the math is in prism.algorithms.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from prism.algorithms import dynamic_sampling_keep, get_advantage_estimator, overlong_penalty
from prism.config import RLVRConfig
from prism.data.formats import RLRecord
from prism.models.peft import final_model_saver
from prism.response_format import segment_counts
from prism.rewards import compute_reward
from prism.rollout import RolloutBatch, RolloutError, SamplingParams
from prism.rollout.backends import make_backend
from prism.rollout.prompts import load_prompts, rollout_prompt, sampling_seed, take_prompts
from prism.runtime import MetricsLogger, Progress, mean_or_nan, seed_everything
from prism.stages.common import (
    build_optimizer,
    build_scheduler,
    finish_stage,
    load_policy,
    make_accelerator,
    preempted,
    prepare_and_resume,
    record_config,
    save_progress,
    setup_policy_training,
    start_stage,
    stop_preempted,
)
from prism.stages.policy_update import Group, policy_update

# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------


def score_rollouts(batch: RolloutBatch, records: list[RLRecord], cfg: RLVRConfig) -> dict[str, torch.Tensor]:
    """Per row: reward (with overlong shaping when on), accuracy, format validity, response length."""
    rewards, accuracy, fmt = [], [], []
    lengths = batch.response_mask.sum(-1)
    for row, text in enumerate(batch.texts):
        record = records[row // batch.n]
        result = compute_reward(text, record.ground_truth, choices=record.choices,
                                accuracy_weight=cfg.accuracy_weight, format_weight=cfg.format_weight)
        rewards.append(result.score)
        accuracy.append(result.accuracy)
        fmt.append(result.format)
    reward = torch.tensor(rewards, dtype=torch.float64)
    if cfg.overlong_buffer is not None:
        reward = reward + overlong_penalty(lengths.double(), cfg.rollout.max_new_tokens, cfg.overlong_buffer)
    return {"reward": reward.float(), "accuracy": torch.tensor(accuracy), "format": torch.tensor(fmt),
            "length": lengths.float()}


def text_statistics(texts: list[str]) -> dict[str, float]:
    """Caption bullets and reasoning steps of format-valid responses (the quantities alignment moves)."""
    bullets, steps = segment_counts(texts)
    return {"caption_bullets": mean_or_nan(bullets), "reasoning_steps": mean_or_nan(steps)}


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


def run(cfg: RLVRConfig) -> Path:
    accelerator = make_accelerator(cfg.model)
    run_dir, finished, local = start_stage("rlvr", cfg)  # local: Hub ids and folders made local
    if finished:
        print(f"rlvr: already finished in {run_dir}", flush=True)
        return run_dir
    world, rank = accelerator.num_processes, accelerator.process_index
    rollout, update = cfg.rollout, cfg.update
    if rollout.prompts_per_step % world:
        raise RolloutError(f"rollout.prompts_per_step={rollout.prompts_per_step} must be divisible by the {world} "
                           "processes")
    local_prompts = rollout.prompts_per_step // world
    if local_prompts % update.mini_batches:
        raise RolloutError(f"each process's {local_prompts} prompts must split into update.mini_batches="
                           f"{update.mini_batches}")

    seed_everything(cfg.seed)
    records = load_prompts(local.data_files)
    model, processor = load_policy(local.model, cfg.seed)
    adapters = setup_policy_training(model, cfg, local, accelerator)  # model.freeze_vision, model.lora_r
    reference = copy.deepcopy(model).eval().requires_grad_(False) if update.kl_coef > 0 else None
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps * update.mini_batches)
    # a plain checkpoint is restored before prepare, an FSDP run's sharded one into the shards after it
    model, optimizer, restored = prepare_and_resume(run_dir, accelerator, model, optimizer, scheduler)
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
    sampling = {"max_new_tokens": rollout.max_new_tokens, "min_new_tokens": rollout.min_new_tokens,
                "temperature": rollout.temperature, "top_p": rollout.top_p}
    group_size = rollout.rollouts_per_prompt

    # The run's first write: data, models, checkpoint and rollout engine have all loaded.
    record_config(run_dir, cfg, accelerator)
    logger = MetricsLogger(run_dir, cfg.tracking, project="prism", resume_step=start) if accelerator.is_main_process else None
    progress = Progress(cfg.steps, desc=f"rlvr-{cfg.algorithm}", initial=start) if accelerator.is_main_process else None
    for step in range(start, cfg.steps):
        # ---- 1-2. generate and score (dynamic sampling: until the batch is full) ----
        t0 = time.perf_counter()
        seconds_generate = seconds_score = 0.0
        rounds: list[tuple[RolloutBatch, dict[str, torch.Tensor], torch.Tensor]] = []
        kept: list[tuple[int, int]] = []  # (round, prompt index in that round)
        generated_groups = 0
        gen_prompts = local_prompts * (cfg.gen_batch_multiplier if cfg.dynamic_sampling else 1)
        max_rounds = cfg.max_num_gen_batches if cfg.dynamic_sampling else 1
        for round_index in range(max_rounds):
            # Each process takes its own slice of the step's global prompt draw.
            indices = take_prompts(cursor, gen_prompts * world, len(records), cfg.seed)[rank::world]
            cursor += gen_prompts * world
            chosen = [records[i] for i in indices]
            started = time.perf_counter()
            policy.eval()
            batch = backend.generate([rollout_prompt(r) for r in chosen], group_size,
                                     SamplingParams(**sampling, seed=sampling_seed(cfg.seed, step, round_index, rank)))
            policy.train()
            if hasattr(backend, "sleep"):  # vLLM: free its KV cache while the trainer needs the memory
                backend.sleep()
            seconds_generate += time.perf_counter() - started
            started = time.perf_counter()
            scores = score_rollouts(batch, chosen, cfg)
            advantages = advantage_fn(scores["reward"], batch.group_ids)
            seconds_score += time.perf_counter() - started
            rounds.append((batch, scores, advantages))
            generated_groups += len(chosen)
            keep = (dynamic_sampling_keep(scores["accuracy"], group_size) if cfg.dynamic_sampling
                    else torch.ones(len(chosen), dtype=torch.bool))
            kept.extend((round_index, int(p)) for p in keep.nonzero().flatten())
            enough = torch.tensor([float(len(kept) >= local_prompts)], device=accelerator.device)  # NCCL: on it
            if world > 1:  # all processes go on generating while any of them is short
                enough = accelerator.reduce(enough, reduction="sum") / world
            if float(enough) == 1.0:
                break
        underfilled = len(kept) < local_prompts
        if underfilled and cfg.on_underfilled_batch == "error":
            raise RolloutError(
                f"step {step + 1}: dynamic sampling kept {len(kept)} of {local_prompts} groups after "
                f"max_num_gen_batches={cfg.max_num_gen_batches} rounds (set on_underfilled_batch: partial to go on)")
        kept = kept[:local_prompts]

        # ---- 3-4. update ----
        started = time.perf_counter()
        groups = [Group(rounds[r][0], p, rounds[r][2].reshape(-1, group_size)[p]) for r, p in kept]
        stats = policy_update(model, optimizer, scheduler, accelerator, groups, update, grad_clip=cfg.optim.grad_clip,
                              reference=reference, filler=Group(rounds[0][0], 0, torch.zeros(group_size)),
                              step=step + 1, autocast_dtype=cfg.model.autocast_dtype)
        seconds_update = time.perf_counter() - started
        backend.update_weights(policy)

        # ---- metrics, checkpoint ----
        done = step + 1
        # (batch, scores, row) of every rollout trained on
        rows = [(rounds[r][0], rounds[r][1], p * group_size + k) for r, p in kept for k in range(group_size)]
        record = {
            **{name: mean_or_nan([float(scores[key][i]) for _, scores, i in rows])
               for name, key in (("reward", "reward"), ("accuracy", "accuracy"), ("format_rate", "format"),
                                 ("response_length", "length"))},
            "truncated_rate": mean_or_nan([b.finish_reasons[i] == "length" for b, _, i in rows]),
            "all_rollouts_accuracy": torch.cat([s["accuracy"] for _, s, _ in rounds]).mean(),
            "groups_trained": len(kept), "groups_generated": generated_groups,
            "groups_filtered": generated_groups - len(kept) if cfg.dynamic_sampling else 0,
            "gen_rounds": len(rounds), "underfilled": underfilled,
            **{name: stats[name] for name in ("clipfrac", "ppo_kl", "entropy", "grad_norm", "loss", "lr")},
            "seconds_generate": seconds_generate, "seconds_score": seconds_score, "seconds_update": seconds_update,
            "seconds_step": time.perf_counter() - t0,
            "rollout_tokens_per_s": float(sum(int(b.response_mask.sum()) for b, _, _ in rounds)) / max(seconds_generate, 1e-9),
            **text_statistics([b.texts[i] for b, _, i in rows]),
        }
        if reference is not None:
            record["kl_ref"] = stats["kl_ref"]
        if accelerator.is_main_process:
            if done % cfg.log_every_steps == 0 or done == cfg.steps:
                logger.log(done, record)
            progress.update(1, reward=round(float(record["reward"]), 3), acc=round(float(record["accuracy"]), 3))
        stop = done < cfg.steps and preempted(accelerator)  # a preemption signal: save this step and stop
        if (cfg.save_every_steps and done % cfg.save_every_steps == 0) or done == cfg.steps or stop:
            save_progress(run_dir, done, cfg, accelerator, model, optimizer, scheduler,
                          data_position={"prompts_consumed": cursor})
        if stop:
            stop_preempted(f"rlvr-{cfg.algorithm}", run_dir, done, accelerator, progress, logger)

    if accelerator.is_main_process:
        progress.close()
        logger.close()
    save = final_model_saver(adapters)  # LoRA: the merged model and model/adapter/; else the plain save
    final = finish_stage(run_dir, cfg, accelerator, model, processor, local=local, save=save,
                         extra={"steps": cfg.steps, "prompts": len(records), "processes": world})
    if accelerator.is_main_process:
        print(f"rlvr-{cfg.algorithm}: finished, model at {final}", flush=True)
    return run_dir
