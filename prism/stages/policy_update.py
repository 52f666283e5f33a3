"""The policy update of one RL step, shared by alignment and RLVR (docs/METHOD.md, Stage 2b step 5 and Stage 3).

  policy_update(model, optimizer, scheduler, accelerator, groups, cfg.update, ...)

The step's prompt groups (each prompt's G rollouts with their advantages) are split into `mini_batches` slices,
one optimizer update each, and every slice into micro-batches of whole groups. The loss is looked up by name
(`update.policy_loss` in prism.algorithms.POLICY_LOSSES, `update.loss_agg` in LOSS_AGGREGATIONS), with the clip
bounds under the names the config gives them; the k3 KL to a reference policy is added when `kl_coef` > 0.
With one update per step the policy is its own old policy (ratio 1: the clip only shapes the gradient); with
several, the old log-probs are computed once before the first update, so the later updates are clipped. Either
way they are the trainer's own, recomputed with its model as verl does: a rollout batch's `behaviour_log_probs`
(a vLLM sampler's come from its bfloat16 weights and kernels) are never read here.

Each micro-batch's aggregated loss is re-weighted by its share of the slice's normaliser (valid tokens for
token-mean, sequences otherwise, summed over processes), so accumulation and data parallelism give the gradient
of one large batch. Every process makes the same number of updates (collectives stay aligned): a process
holding fewer groups contributes zero-weighted passes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prism.algorithms import Metrics, aggregate_loss, get_policy_loss, kl_penalty
from prism.config import PolicyUpdateConfig
from prism.rollout import RolloutBatch, log_probs_and_entropy
from prism.runtime import autocast, check_finite, mean_or_nan
from prism.stages.common import no_sync, plain_norm


@dataclass
class Group:
    """One prompt's G rollouts, ready for the update: rows prompt * G .. prompt * G + G - 1 of `batch`."""

    batch: RolloutBatch
    prompt: int
    advantages: torch.Tensor  # [G]


PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Metrics]]


def policy_loss_fn(update: PolicyUpdateConfig) -> PolicyLossFn:
    """`loss(log_prob, old_log_prob, advantages, mask) -> (loss matrix, metrics)`: the registry's
    `update.policy_loss` with the config's clip bounds (and dual clip for ppo_clip)."""
    bounds = {"clip_low": update.clip_low, "clip_high": update.clip_high}
    if update.policy_loss == "ppo_clip":
        bounds["dual_clip_c"] = update.dual_clip_c
    return functools.partial(get_policy_loss(update.policy_loss), **bounds)


def normaliser(batch: RolloutBatch, loss_agg: str) -> float:
    """What `loss_agg` divides by over this batch: valid tokens (token-mean) or sequences with tokens."""
    if loss_agg == "token-mean":
        return float(batch.response_mask.sum())
    return float((batch.response_mask.sum(-1) > 0).sum())


def micro_batches(groups: Sequence[Group], groups_per_micro: int) -> list[tuple[RolloutBatch, torch.Tensor]]:
    """Consecutive groups of one generation batch, at most `groups_per_micro` each, as (batch, advantages [rows])."""
    out, current = [], []
    for group in groups:
        if current and (current[0].batch is not group.batch or len(current) == groups_per_micro):
            out.append(current)
            current = []
        current.append(group)
    if current:
        out.append(current)
    return [(g[0].batch.select_prompts([x.prompt for x in g]), torch.cat([x.advantages for x in g])) for g in out]


def policy_update(model, optimizer, scheduler, accelerator, groups: Sequence[Group], update: PolicyUpdateConfig,
                  *, grad_clip: float | None, reference=None, filler: Group, step: int,
                  autocast_dtype: str | None = None) -> dict[str, float]:
    """Train `model` on `groups` (this process's share of the step) with `update.mini_batches` optimizer updates.

    `reference` (a frozen copy of the initial policy) is needed when `update.kl_coef` > 0. `filler` is any group
    of this process's rollouts, used for zero-weighted passes when it has fewer groups than another process.
    `autocast_dtype` (the model config's, e.g. "bfloat16") is what the forwards compute in; None = the weights' dtype.
    Returns the means over micro-batches (loss per update) of: loss, clipfrac, ppo_kl, entropy, kl_ref,
    grad_norm, and the lr of the last update."""
    world = accelerator.num_processes
    loss_fn = policy_loss_fn(update)
    clip = grad_clip if grad_clip is not None else math.inf
    size = filler.batch.n
    per_micro = max(1, update.micro_batch_size // size)
    per_mini = math.ceil(len(groups) / update.mini_batches) if groups else 0
    minis = [micro_batches(groups[i : i + per_mini], per_micro) for i in range(0, len(groups), per_mini)] if groups else []
    device = accelerator.device
    old_log_probs = None
    if len(minis) > 1:  # the policy moves between updates: freeze the pre-update log-probs now
        with torch.no_grad(), autocast(device, autocast_dtype):
            policy = accelerator.unwrap_model(model)
            old_log_probs = [[log_probs_and_entropy(policy, b, with_entropy=False)[0] for b, _ in mini] for mini in minis]
    updates = len(minis)
    if world > 1:
        updates = int(accelerator.gather(torch.tensor([updates])).max())

    stats: dict[str, list[float]] = {"clipfrac": [], "ppo_kl": [], "entropy": [], "kl_ref": [], "grad_norm": []}
    total_loss = 0.0
    lr = scheduler.get_last_lr()[0]
    for u in range(updates):
        mini = minis[u] if u < len(minis) else []
        total = torch.tensor(sum(normaliser(b, update.loss_agg) for b, _ in mini))
        if world > 1:
            total = accelerator.reduce(total, reduction="sum")
        total = float(total.clamp_min(1.0))
        passes = [(b, adv, old_log_probs[u][i] if old_log_probs else None, 1.0) for i, (b, adv) in enumerate(mini)]
        if not passes:  # keep the processes' collectives aligned: a zero-weighted pass
            passes = [(filler.batch.select_prompts([filler.prompt]), torch.zeros(size), None, 0.0)]
        update_loss = 0.0
        for i, (batch, advantages, old, weight) in enumerate(passes):
            with no_sync(accelerator, model, last_micro_step=i == len(passes) - 1):
                with autocast(device, autocast_dtype):  # the forward only: log-probs come out in float32
                    log_prob, entropy = log_probs_and_entropy(model, batch)
                mask, advantages = batch.response_mask.to(log_prob.device), advantages.to(log_prob.device)
                loss_mat, metrics = loss_fn(log_prob, log_prob.detach() if old is None else old, advantages, mask)
                if reference is not None:
                    with torch.no_grad(), autocast(device, autocast_dtype):
                        ref_log_prob = log_probs_and_entropy(reference, batch, with_entropy=False)[0]
                    kl = kl_penalty(log_prob, ref_log_prob, mask)
                    loss_mat = loss_mat + update.kl_coef * kl
                    stats["kl_ref"].append(float(aggregate_loss(kl.detach(), mask, "token-mean")))
                # this micro-batch's share of the slice's loss; x world because DDP averages the gradients
                loss = aggregate_loss(loss_mat, mask, update.loss_agg) * (
                    normaliser(batch, update.loss_agg) / total) * world * weight
                accelerator.backward(loss)
            if weight:
                update_loss += float(loss.detach()) / world
                stats["clipfrac"].append(float(metrics["clipfrac"]))
                stats["ppo_kl"].append(float(metrics["ppo_kl"]))
                stats["entropy"].append(float(entropy.sum() / mask.sum().clamp_min(1)))
        check_finite(update_loss, accelerator.unwrap_model(model), step=step)
        stats["grad_norm"].append(float(plain_norm(accelerator.clip_grad_norm_(model.parameters(), clip))))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss += update_loss
    out = {name: mean_or_nan(values) for name, values in stats.items()}
    out.update(loss=total_loss / max(1, updates), lr=lr, updates=updates)
    return out
