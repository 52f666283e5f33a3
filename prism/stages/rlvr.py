"""RL with verifiable rewards (GRPO, DAPO, GSPO): config -> checkpoint.

  prism train rlvr --config experiments/configs/embedded/rlvr.yaml algorithm=dapo model.path=<sft>/model

One step:
  1. generate: take the next prompts, roll out G responses each (seeded by (seed, step, round));
  2. score: rule-based reward 0.8 * accuracy + 0.2 * format (format-gated), DAPO's overlong shaping when on;
     with dynamic sampling, drop groups whose accuracies are all equal and generate more until the batch
     holds prompts_per_step groups (at most max_num_gen_batches rounds; then a partial batch or an error);
  3. advantages: group-normalised (`grpo`, shared by all three algorithms);
  4. update: `mini_batches` optimizer updates, each over a slice of the groups, in micro-batches of whole
     groups; old log-probs are recomputed before the first update when a step makes more than one (with one
     update the policy is its own old policy: ratio 1, the PPO clip only shapes the gradient); optional
     k3 KL to the initial policy; gradient clipping.
The algorithm (`ppo_clip` or `gspo`), its clip ranges and the loss aggregation come from the preset bundle
(prism.config.RLVR_ALGORITHM_PRESETS), and the math from prism.algorithms.
"""

from __future__ import annotations

import copy
import io
import math
import time
from pathlib import Path

import torch
from PIL import Image

from prism.algorithms import (
    aggregate_loss,
    compute_grpo_advantage,
    dynamic_sampling_keep,
    get_policy_loss,
)
from prism.config import RLVRConfig
from prism.data.formats import DataError, RLRecord, read_rl_parquet
from prism.format import segment_counts
from prism.rewards import compute_reward, overlong_penalty
from prism.rollout import (
    HFRolloutBackend,
    RolloutBatch,
    RolloutError,
    RolloutPrompt,
    SamplingParams,
)
from prism.rollout.hf import log_probs_and_entropy
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
from prism.stages.sft import chat_messages

# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------


def load_prompts(cfg: RLVRConfig) -> list[RLRecord]:
    if not cfg.data_files:
        raise DataError("data_files is empty: name at least one RL parquet file")
    records: list[RLRecord] = []
    for name in cfg.data_files:
        records.extend(read_rl_parquet(Path(name)))
    return records


def rollout_prompt(record: RLRecord) -> RolloutPrompt:
    images = []
    for data in record.images:
        with Image.open(io.BytesIO(data)) as image:
            images.append(image.convert("RGB"))
    return RolloutPrompt(messages=chat_messages(record.prompt), images=images)


def take_prompts(cursor: int, count: int, num_records: int, seed: int) -> list[int]:
    """Record indices cursor .. cursor+count-1 of the endless stream of seeded epoch permutations."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(cursor, num_records)
        order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        chunk = order[offset : offset + count - len(out)].tolist()
        out.extend(chunk)
        cursor += len(chunk)
    return out


def sampling_seed(seed: int, step: int, round_index: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + round_index * 31 + rank) % (2**31 - 1)


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
        reward = result.score
        if cfg.overlong_buffer is not None:
            reward += overlong_penalty(int(lengths[row]), cfg.max_new_tokens, cfg.overlong_buffer)
        rewards.append(reward)
        accuracy.append(result.accuracy)
        fmt.append(result.format)
    return {"reward": torch.tensor(rewards), "accuracy": torch.tensor(accuracy), "format": torch.tensor(fmt),
            "length": lengths.float()}


def text_statistics(texts: list[str]) -> dict[str, float]:
    """Caption bullets and reasoning steps of format-valid responses (the quantities alignment moves)."""
    bullets, steps = segment_counts(texts)
    return {"caption_bullets": _mean(bullets), "reasoning_steps": _mean(steps)}


def _mean(values: list[float]) -> float:
    """NaN for nothing (a step that trained no group), so a missing value never reads as 0."""
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


def make_backend(cfg: RLVRConfig, model, processor):
    if cfg.rollout_backend == "hf":
        processor.tokenizer.padding_side = "left"
        return HFRolloutBackend(model, processor, behaviour_log_probs=False)  # old log-probs are recomputed
    if cfg.model.path is None:
        raise RolloutError("rollout_backend=vllm needs model.path (vLLM builds its engine from a checkpoint folder)")
    from prism.rollout.vllm import VLLMRolloutBackend

    return VLLMRolloutBackend(cfg.model.path, processor, dtype=cfg.model.dtype)


def policy_loss_fn(cfg: RLVRConfig):
    if cfg.algorithm == "gspo":
        loss = get_policy_loss("gspo")
        return lambda lp, old, adv, mask: loss(lp, old, adv, mask, clip_low=cfg.gspo_clip_low,
                                               clip_high=cfg.gspo_clip_high)
    loss = get_policy_loss("ppo_clip")
    return lambda lp, old, adv, mask: loss(lp, old, adv, mask, clip_low=cfg.clip_ratio_low,
                                           clip_high=cfg.clip_ratio_high, dual_clip_c=cfg.dual_clip_c)


def _normaliser(batch: RolloutBatch, agg: str) -> float:
    """What `agg` divides by over this batch: valid tokens (token-mean) or sequences with tokens."""
    if agg == "token-mean":
        return float(batch.response_mask.sum())
    return float((batch.response_mask.sum(-1) > 0).sum())


def run(cfg: RLVRConfig) -> Path:
    accelerator = make_accelerator()
    run_dir, finished = start_stage("rlvr", cfg, accelerator)
    if finished:
        print(f"rlvr: already finished in {run_dir}", flush=True)
        return run_dir
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.prompts_per_step % world:
        raise RolloutError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the {world} processes")
    local_prompts = cfg.prompts_per_step // world
    if local_prompts % cfg.mini_batches:
        raise RolloutError(f"each process's {local_prompts} prompts must split into mini_batches={cfg.mini_batches}")

    seed_everything(cfg.seed)
    records = load_prompts(cfg)
    model, processor = load_policy(cfg.model, cfg.seed)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    total_updates = cfg.steps * cfg.mini_batches
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_updates)
    restored = resume(run_dir, model, optimizer, scheduler, accelerator)
    start = restored["step"] if restored else 0
    cursor = restored["data_position"]["prompts_consumed"] if restored else 0
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    if reference is not None:
        reference.to(accelerator.device)
    backend = make_backend(cfg, policy, processor)
    loss_fn = policy_loss_fn(cfg)
    sampling = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p}
    prompts_per_micro = max(1, cfg.micro_batch_size // cfg.rollouts_per_prompt)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf

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
            batch = backend.generate([rollout_prompt(r) for r in chosen], cfg.rollouts_per_prompt,
                                     SamplingParams(**sampling, seed=sampling_seed(cfg.seed, step, round_index, rank)))
            policy.train()
            if hasattr(backend, "sleep"):  # vLLM: free its KV cache while the trainer needs the memory
                backend.sleep()
            seconds_generate += time.perf_counter() - started
            started = time.perf_counter()
            scores = score_rollouts(batch, chosen, cfg)
            advantages = compute_grpo_advantage(scores["reward"], batch.group_ids)
            seconds_score += time.perf_counter() - started
            rounds.append((batch, scores, advantages))
            generated_groups += len(chosen)
            keep = (dynamic_sampling_keep(scores["accuracy"], cfg.rollouts_per_prompt) if cfg.dynamic_sampling
                    else torch.ones(len(chosen), dtype=torch.bool))
            kept.extend((round_index, int(p)) for p in keep.nonzero().flatten())
            enough = torch.tensor([float(len(kept) >= local_prompts)])
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

        # ---- 3-4. update: mini-batches of groups, micro-batches of whole groups ----
        started = time.perf_counter()
        per_mini = math.ceil(len(kept) / cfg.mini_batches) if kept else 0
        minis = [kept[i : i + per_mini] for i in range(0, len(kept), per_mini)] if kept else []
        micro_plan = []  # per mini-batch: list of (round, [prompt indices]) of at most prompts_per_micro groups
        for mini in minis:
            micros, current = [], []
            for round_index, prompt in mini:
                if current and (current[0][0] != round_index or len(current) == prompts_per_micro):
                    micros.append((current[0][0], [p for _, p in current]))
                    current = []
                current.append((round_index, prompt))
            if current:
                micros.append((current[0][0], [p for _, p in current]))
            micro_plan.append(micros)
        micro_batches = [[rounds[r][0].select_prompts(ps) for r, ps in micros] for micros in micro_plan]
        micro_advantages = [[rounds[r][2].reshape(-1, cfg.rollouts_per_prompt)[ps].flatten() for r, ps in micros]
                            for micros in micro_plan]
        old_log_probs = None
        if len(minis) > 1:  # the policy moves between updates: freeze the pre-update log-probs now
            with torch.no_grad():
                old_log_probs = [[log_probs_and_entropy(policy, b, with_entropy=False)[0] for b in mbs]
                                 for mbs in micro_batches]
        # Every process must make the same number of updates (collectives); a process with fewer groups
        # than the others contributes zero-gradient micro-steps.
        updates = len(minis)
        if world > 1:
            updates = int(accelerator.gather(torch.tensor([updates])).max())
        stats = {"clipfrac": [], "ppo_kl": [], "entropy": [], "kl_ref": [], "grad_norm": [], "loss": []}
        lr = scheduler.get_last_lr()[0]
        for u in range(updates):
            mbs = micro_batches[u] if u < len(micro_batches) else []
            normaliser = torch.tensor(sum(_normaliser(b, cfg.loss_agg) for b in mbs))
            if world > 1:
                normaliser = accelerator.reduce(normaliser, reduction="sum")
            normaliser = normaliser.clamp_min(1.0)
            if not mbs:  # keep DDP's collectives aligned: a zero-weighted pass over a dummy row
                mbs_iter = [(rounds[0][0].select_prompts([0]), torch.zeros(cfg.rollouts_per_prompt), None, 0.0)]
            else:
                mbs_iter = [(b, a, (old_log_probs[u][i] if old_log_probs else None), 1.0)
                            for i, (b, a) in enumerate(zip(mbs, micro_advantages[u]))]
            update_loss = 0.0
            for i, (b, adv, old, weight) in enumerate(mbs_iter):
                with no_sync(accelerator, model, last_micro_step=i == len(mbs_iter) - 1):
                    lp, entropy = log_probs_and_entropy(model, b)
                    mask, adv = b.response_mask.to(lp.device), adv.to(lp.device)
                    loss_mat, metrics = loss_fn(lp, lp.detach() if old is None else old, adv, mask)
                    if reference is not None:
                        with torch.no_grad():
                            ref_lp = log_probs_and_entropy(reference, b, with_entropy=False)[0]
                        log_ratio = (ref_lp - lp).clamp(-20, 20)
                        kl = (log_ratio.exp() - log_ratio - 1) * mask  # k3, unbiased, >= 0
                        loss_mat = loss_mat + cfg.kl_coef * kl
                        stats["kl_ref"].append(float((kl.sum() / mask.sum().clamp_min(1)).detach()))
                    # aggregate over this micro-batch, re-weighted to the mini-batch's normaliser; x world
                    # because DDP averages the processes' gradients.
                    loss = aggregate_loss(loss_mat, mask, cfg.loss_agg) * (
                        _normaliser(b, cfg.loss_agg) / normaliser) * world * weight
                    accelerator.backward(loss)
                if weight:
                    update_loss += float(loss.detach()) / world
                    stats["loss"].append(float(loss.detach()) / world)
                    stats["clipfrac"].append(float(metrics["clipfrac"]))
                    stats["ppo_kl"].append(float(metrics["ppo_kl"]))
                    stats["entropy"].append(float(entropy.sum() / mask.sum().clamp_min(1)))
            check_finite(update_loss, policy, step=step + 1)
            stats["grad_norm"].append(float(accelerator.clip_grad_norm_(model.parameters(), clip)))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        seconds_update = time.perf_counter() - started
        backend.update_weights(policy)

        # ---- metrics, checkpoint ----
        done = step + 1
        # (batch, scores, row) of every rollout trained on
        rows = [(rounds[r][0], rounds[r][1], p * cfg.rollouts_per_prompt + k)
                for r, p in kept for k in range(cfg.rollouts_per_prompt)]
        record = {
            **{name: _mean([float(scores[key][i]) for _, scores, i in rows])
               for name, key in (("reward", "reward"), ("accuracy", "accuracy"), ("format_rate", "format"),
                                 ("response_length", "length"))},
            "truncated_rate": _mean([b.finish_reasons[i] == "length" for b, _, i in rows]),
            "all_rollouts_accuracy": torch.cat([s["accuracy"] for _, s, _ in rounds]).mean(),
            "groups_trained": len(kept), "groups_generated": generated_groups,
            "groups_filtered": generated_groups - len(kept) if cfg.dynamic_sampling else 0,
            "gen_rounds": len(rounds), "underfilled": underfilled,
            "clipfrac": _mean(stats["clipfrac"]), "ppo_kl": _mean(stats["ppo_kl"]), "entropy": _mean(stats["entropy"]),
            "grad_norm": _mean(stats["grad_norm"]), "loss": sum(stats["loss"]) / max(1, updates), "lr": lr,
            "seconds_generate": seconds_generate, "seconds_score": seconds_score, "seconds_update": seconds_update,
            "seconds_step": time.perf_counter() - t0,
            "rollout_tokens_per_s": float(sum(int(b.response_mask.sum()) for b, _, _ in rounds)) / max(seconds_generate, 1e-9),
            **text_statistics([b.texts[i] for b, _, i in rows]),
        }
        if reference is not None:
            record["kl_ref"] = _mean(stats["kl_ref"])
        if accelerator.is_main_process:
            if done % cfg.log_every_steps == 0 or done == cfg.steps:
                logger.log(done, record)
            progress.update(1, reward=round(float(record["reward"]), 3), acc=round(float(record["accuracy"]), 3))
        if (cfg.save_every_steps and done % cfg.save_every_steps == 0) or done == cfg.steps:
            save_progress(run_dir, done, cfg, accelerator, model, optimizer, scheduler,
                          data_position={"prompts_consumed": cursor})

    if accelerator.is_main_process:
        progress.close()
        logger.close()
    final = finish_stage(run_dir, cfg, accelerator, model, processor,
                         extra={"steps": cfg.steps, "prompts": len(records), "processes": world})
    if accelerator.is_main_process:
        print(f"rlvr-{cfg.algorithm}: finished, model at {final}", flush=True)
    return run_dir
