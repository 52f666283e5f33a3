"""Pure tensor functions of the RL stages (docs/METHOD.md "Stage 2b" and "Stage 3: RLVR").

Written in the style of verl's `core_algos`: plain functions on tensors, kept in registries keyed by
name so that an RL preset (grpo, dapo, gspo, prism alignment) is data, not code:

- `ADVANTAGE_ESTIMATORS`: `grpo`, `prism` -> per-sequence advantages, shape [batch];
  `broadcast_to_tokens` spreads them over the response tokens.
- `POLICY_LOSSES`: `ppo_clip`, `gspo` -> (per-token loss matrix [batch, tokens], metrics).
- `LOSS_AGGREGATIONS`: `token-mean`, `seq-mean-token-mean`, `seq-mean-token-sum` -> scalar loss.
- `kl_penalty`: the k3 estimator of KL(pi || pi_ref) per token.
- DAPO helpers: `overlong_penalty` (reward shaping), `dynamic_sampling_keep`.
- The discriminator's losses: `bradley_terry_loss` (warm-up) and `discriminator_loss` (the published update of
  the alignment stage).

Conventions (all functions):
- Masks are 0/1 float or bool tensors of shape [batch, tokens]; padding positions may hold any
  value (even inf/NaN in log-probs or scores): they are selected away with `torch.where`, never
  multiplied by 0, so they cannot poison the loss or its gradient.
- Groups are given by `group_ids`, a 1-D integer tensor [batch] of arbitrary labels (rollouts of one
  prompt share a label; they need not be contiguous). `group_ids_from_size` builds the usual
  contiguous layout `[0]*G + [1]*G + ...`. Labels rather than a [num_groups, group_size] layout
  because dynamic sampling and filtering leave groups of unequal size.
- Group statistics use the UNBIASED std (divisor n - 1), as `torch.std` in verl's GRPO and the
  published code; a group of one uses mean 0 and std 1 (verl's convention), so its advantage is
  r / (1 + eps) rather than a division by zero.
- Advantages are computed without gradient (they are targets, not functions of the policy).
- Metrics are detached 0-d tensors (no host sync inside the loss); call `float()` to log them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]
_F = TypeVar("_F", bound=Callable)

GROUP_EPS = 1e-6  # METHOD.md: (std_group + 1e-6)

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def _register(registry: dict[str, Callable], kind: str, name: str) -> Callable[[_F], _F]:
    def decorator(fn: _F) -> _F:
        if name in registry and registry[name] is not fn:
            raise ValueError(f"{kind} {name!r} is already registered")
        registry[name] = fn
        return fn

    return decorator


def _lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}") from None


def register_advantage_estimator(name: str) -> Callable[[_F], _F]:
    """Decorator: register an advantage estimator under `name`."""
    return _register(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def register_policy_loss(name: str) -> Callable[[_F], _F]:
    """Decorator: register a policy loss under `name`."""
    return _register(POLICY_LOSSES, "policy loss", name)


def register_loss_aggregation(name: str) -> Callable[[_F], _F]:
    """Decorator: register a loss aggregation mode under `name`."""
    return _register(LOSS_AGGREGATIONS, "loss aggregation", name)


def get_advantage_estimator(name: str) -> Callable[..., torch.Tensor]:
    """The advantage estimator registered as `name`; ValueError listing the known names otherwise."""
    return _lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def get_policy_loss(name: str) -> Callable[..., tuple[torch.Tensor, Metrics]]:
    """The policy loss registered as `name`; ValueError listing the known names otherwise."""
    return _lookup(POLICY_LOSSES, "policy loss", name)


def get_loss_aggregation(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The aggregation registered as `name`; ValueError listing the known names otherwise."""
    return _lookup(LOSS_AGGREGATIONS, "loss aggregation", name)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != tensor shape {tuple(like.shape)}")
    return mask.bool()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is true; 0 when nothing is valid."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1)


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Accept per-sequence [batch] or per-token [batch, tokens] advantages."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    return advantages.to(like.dtype).expand_as(like)


def group_ids_from_size(batch_size: int, group_size: int) -> torch.Tensor:
    """Contiguous group labels `[0]*G + [1]*G + ...` for a batch laid out prompt by prompt."""
    if group_size <= 0 or batch_size % group_size:
        raise ValueError(f"batch_size {batch_size} is not a positive multiple of group_size {group_size}")
    return torch.arange(batch_size) // group_size


def group_mean_std(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean and unbiased std of the element's group, shapes [batch].

    std_g = sqrt(sum_{i in g} (v_i - mean_g)^2 / (n_g - 1)); a group of one gets mean 0, std 1.
    """
    if values.dim() != 1 or group_ids.shape != values.shape:
        raise ValueError(
            f"values and group_ids must be 1-D of one shape, got {tuple(values.shape)} and {tuple(group_ids.shape)}"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, inverse, torch.ones_like(values))
    mean = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, inverse, values) / counts
    # Two passes (deviations from the mean) rather than E[x^2] - E[x]^2: exact zero for equal values.
    squared = (values - mean[inverse]) ** 2
    sq_sum = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, inverse, squared)
    single = counts == 1
    std = torch.where(single, torch.ones_like(sq_sum), (sq_sum / (counts - 1).clamp_min(1)).sqrt())
    mean = torch.where(single, torch.zeros_like(mean), mean)
    return mean[inverse], std[inverse]


def _group_normalise(values: torch.Tensor, group_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """GN(v) = (v - mean_group) / (std_group + eps) with `group_mean_std`'s conventions."""
    mean, std = group_mean_std(values, group_ids)
    return (values - mean) / (std + eps)


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence advantages [batch] -> per-token [batch, tokens], 0 on padding: A_i * mask_it."""
    if advantages.dim() != 1 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"advantages must be [batch] matching the mask's batch, got {tuple(advantages.shape)} "
            f"and mask {tuple(response_mask.shape)}"
        )
    return advantages.unsqueeze(-1) * response_mask.to(advantages.dtype)


# ---------------------------------------------------------------------------------------------
# Advantage estimators (per-sequence; outcome rewards only, no critic)


@register_advantage_estimator("grpo")
@torch.no_grad()
def compute_grpo_advantage(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = GROUP_EPS
) -> torch.Tensor:
    """GRPO group-normalised advantage, shape [batch] (used by GRPO, DAPO and GSPO).

        A_i = (r_i - mean_group(r)) / (std_group(r) + eps),   std unbiased (n - 1), eps = 1e-6

    A group of one uses mean 0 and std 1 (A = r / (1 + eps)); an all-equal group gives A = 0.
    """
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return _group_normalise(rewards, group_ids, eps)


@register_advantage_estimator("prism")
@torch.no_grad()
def compute_prism_advantage(
    s_cap: torch.Tensor,
    s_cot: torch.Tensor,
    format_valid: torch.Tensor,
    group_ids: torch.Tensor,
    alpha: float = 0.5,
    format_penalty: float = 1.5,
    score_clip: float = 10.0,
    eps: float = GROUP_EPS,
) -> torch.Tensor:
    """PRISM's multi-reward GRPO advantage (METHOD.md Stage 2b, steps 2-3), shape [batch].

        s <- clip(s, -score_clip, score_clip)                   for s in (s_cap, s_cot)
        s_i <- min_{j in group, valid} s_j - 1                   for format-invalid i (each score
                                                                 kind separately); -1 if the group
                                                                 has no valid rollout
        GN(v) = (v - mean_group(v)) / (std_group(v) + eps)       (unbiased std, as `grpo`)
        A = alpha * GN(s_cap) + (1 - alpha) * GN(s_cot) - format_penalty * F,   F = 1 - valid

    Scores of invalid rollouts are never read (they may be NaN: a response with no caption has no
    caption score). The replacement puts an invalid rollout just below the group's worst valid one,
    so the discriminator's scale decides how far below; the -F term adds the fixed penalty.
    """
    valid = format_valid.bool()
    if not (s_cap.shape == s_cot.shape == valid.shape == group_ids.shape) or s_cap.dim() != 1:
        raise ValueError("s_cap, s_cot, format_valid and group_ids must be 1-D tensors of one shape")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    invalid = (~valid).to(s_cap.dtype if s_cap.is_floating_point() else torch.float32)

    def filled(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.detach().to(invalid.dtype).clamp(-score_clip, score_clip)
        inf = torch.full_like(scores, float("inf"))
        group_min = torch.full((num_groups,), float("inf"), dtype=scores.dtype).scatter_reduce(
            0, inverse, torch.where(valid, scores, inf), reduce="amin", include_self=True
        )
        replacement = torch.where(torch.isinf(group_min), torch.full_like(group_min, -1.0), group_min - 1.0)
        return torch.where(valid, scores, replacement[inverse])

    gn_cap = _group_normalise(filled(s_cap), group_ids, eps)
    gn_cot = _group_normalise(filled(s_cot), group_ids, eps)
    return alpha * gn_cap + (1.0 - alpha) * gn_cot - format_penalty * invalid


# ---------------------------------------------------------------------------------------------
# Loss aggregation: loss matrix [batch, tokens] + mask -> scalar


@register_loss_aggregation("token-mean")
def _token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{i,t} m_it l_it / sum_{i,t} m_it (every valid token weighs the same; 0 if none valid)."""
    return _masked_mean(loss_mat, _bool_mask(mask, loss_mat))


def _per_sequence(loss_mat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = _bool_mask(mask, loss_mat)
    sums = torch.where(mask, loss_mat, torch.zeros_like(loss_mat)).sum(-1)
    counts = mask.sum(-1)
    return sums, counts, counts > 0


@register_loss_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_{i: n_i > 0} ( sum_t m_it l_it / n_i ),  n_i = sum_t m_it (every sequence weighs the same).

    Sequences with no valid token are excluded from the outer mean (they have no token mean).
    """
    sums, counts, has_tokens = _per_sequence(loss_mat, mask)
    return _masked_mean(sums / counts.clamp_min(1), has_tokens)


@register_loss_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_{i: n_i > 0} ( sum_t m_it l_it ) (Dr. GRPO style; longer sequences weigh more).

    Sequences with no valid token are excluded, as in `seq-mean-token-mean` (and current verl).
    """
    sums, _, has_tokens = _per_sequence(loss_mat, mask)
    return _masked_mean(sums, has_tokens)


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token loss matrix [batch, tokens] to a scalar with the aggregation `mode`.

    All-padding input gives a 0 that is still connected to `loss_mat`'s graph.
    """
    return get_loss_aggregation(mode)(loss_mat, mask)


# ---------------------------------------------------------------------------------------------
# Policy losses: per-token loss matrix (0 on padding) + metrics


@register_policy_loss("ppo_clip")
def ppo_clip(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO-clip per token (GRPO, DAPO's clip-higher, PRISM alignment), as verl's vanilla loss.

        r_t = exp(log pi_t - log pi_old_t)         (log-ratio clamped to [-20, 20] against overflow)
        l_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
        dual clip (A_t < 0 only): l_t = min(l_t, -A_t c),  c = dual_clip_c > 1

    The dual clip caps the loss of a negative-advantage token whose ratio has exploded (r > c).
    `advantages` is [batch] (per sequence) or [batch, tokens]. Metrics: `clipfrac` (tokens where the
    clipped term is the active one), `clipfrac_lower` (tokens where the dual clip is active),
    `ppo_kl` (masked mean of log pi_old - log pi), `ratio_mean`.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    valid = _bool_mask(mask, log_prob)
    adv = _per_token(advantages, log_prob)
    log_ratio = torch.where(valid, log_prob - old_log_prob, torch.zeros_like(log_prob)).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    metrics: Metrics = {"clipfrac": _masked_mean((loss_clipped > loss_unclipped).to(log_prob.dtype), valid).detach()}
    if dual_clip_c is not None:
        loss_cap = -adv * dual_clip_c
        dual_active = (adv < 0) & (loss > loss_cap)
        loss = torch.where(adv < 0, torch.minimum(loss, loss_cap), loss)
        metrics["clipfrac_lower"] = _masked_mean(dual_active.to(log_prob.dtype), valid).detach()
    else:
        metrics["clipfrac_lower"] = torch.zeros((), dtype=log_prob.dtype)
    metrics["ppo_kl"] = _masked_mean(-log_ratio, valid).detach()
    metrics["ratio_mean"] = _masked_mean(ratio, valid).detach()
    return torch.where(valid, loss, torch.zeros_like(loss)), metrics


@register_policy_loss("gspo")
def gspo(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    max_log_ratio: float = 10.0,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO: one importance ratio per sequence, in verl's token form.

        log s_i = min( sum_t m_it (log pi_it - log pi_old_it) / n_i ,  max_log_ratio )
        s_it    = sg[s_i] * pi_it / sg[pi_it]  = exp(log pi_it - sg[log pi_it] + sg[log s_i])
        l_it    = max(-A_i s_it, -A_i clip(s_it, 1 - clip_low, 1 + clip_high))

    The value of s_it is s_i for every token, and d s_it / d log pi_it = s_i, so after
    `seq-mean-token-mean` aggregation (the GSPO default) token t of sequence i receives
    -A_i s_i / n_i / batch: exactly the gradient of the sequence-level objective, since
    d s_i / d log pi_it = s_i / n_i. When the log-ratio is clamped the gradient is 0.
    `advantages` is [batch] or [batch, tokens]. Metrics: `clipfrac` (valid tokens whose sequence
    ratio is clipped), `seq_ratio_mean` (over sequences with tokens), `ppo_kl`.
    """
    valid = _bool_mask(mask, log_prob)
    adv = _per_token(advantages, log_prob)
    log_ratio = torch.where(valid, log_prob - old_log_prob, torch.zeros_like(log_prob))
    counts = valid.sum(-1)
    seq_log_ratio = log_ratio.sum(-1) / counts.clamp_min(1)
    # Detached sequence value plus a zero-valued term that carries each token's gradient.
    lp = torch.where(valid, log_prob, torch.zeros_like(log_prob))
    log_s_token = (lp - lp.detach() + seq_log_ratio.detach().unsqueeze(-1)).clamp(max=max_log_ratio)
    s_token = torch.exp(log_s_token)
    loss_unclipped = -adv * s_token
    loss_clipped = -adv * s_token.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    seq_ratio = torch.exp(seq_log_ratio.detach().clamp(max=max_log_ratio))
    metrics: Metrics = {
        "clipfrac": _masked_mean((loss_clipped > loss_unclipped).to(log_prob.dtype), valid).detach(),
        "seq_ratio_mean": _masked_mean(seq_ratio, counts > 0),
        "ppo_kl": _masked_mean(-log_ratio, valid).detach(),
    }
    return torch.where(valid, loss, torch.zeros_like(loss)), metrics


# ---------------------------------------------------------------------------------------------
# KL to a reference policy


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) per token, [batch, tokens], 0 on padding (Schulman's unbiased, >= 0):

        d_t = clamp(log pi_ref_t - log pi_t, -20, 20),   kl_t = exp(d_t) - d_t - 1

    The gradient flows through `log_prob` (the policy) only; pass the reference log-probs without a graph.
    """
    valid = _bool_mask(mask, log_prob)
    log_ratio = torch.where(valid, ref_log_prob - log_prob, torch.zeros_like(log_prob)).clamp(-20.0, 20.0)
    kl = log_ratio.exp() - log_ratio - 1.0
    return torch.where(valid, kl, torch.zeros_like(kl))


# ---------------------------------------------------------------------------------------------
# DAPO helpers


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment per response, added to the reward (float tensor).

        p(len) = clamp( -(len - (L - buffer)) / buffer, -1, 0 )

    0 up to L - buffer tokens, then linear down to -1 at L, and -1 beyond L (generation stops at L, so a
    response cannot be longer; DAPO caps it there all the same).
    """
    if buffer <= 0:
        raise ValueError(f"buffer must be > 0, got {buffer}")
    if buffer > max_length:
        raise ValueError(f"buffer must be <= max_length ({max_length}), got {buffer}")
    if (lengths < 0).any():
        raise ValueError(f"response lengths must be >= 0, got {lengths.min().item()}")
    lengths = lengths.to(torch.float32) if not lengths.is_floating_point() else lengths
    expected = max_length - buffer
    return (-(lengths - expected) / buffer).clamp(-1.0, 0.0)


def dynamic_sampling_keep(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: which prompt groups carry a learning signal, bool [num_groups].

    `values` (accuracies or rewards, [num_groups * group_size]) is laid out group by group;
    a group is kept iff its values are NOT all equal (all-equal groups have zero GRPO advantage).
    `keep.repeat_interleave(group_size)` gives the per-rollout mask.
    """
    if values.dim() != 1 or group_size <= 0 or values.numel() % group_size:
        raise ValueError(f"values must be 1-D with a length divisible by group_size {group_size}")
    grouped = values.reshape(-1, group_size)
    return grouped.amax(-1) != grouped.amin(-1)


# ---------------------------------------------------------------------------------------------
# Discriminator loss


def bradley_terry_loss(
    s_teacher: torch.Tensor,
    s_student: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    score_reg_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry loss of the discriminator over (teacher, student) score pairs.

        loss = mean_{valid k} -log sigmoid(s_t,k - s_s,k)
             + score_reg_coef * mean_{valid k} (s_t,k^2 + s_s,k^2) / 2

    The regulariser is the mean of the 2 * n_valid squared scores (teacher and student) of the
    valid pairs only; pass both segment kinds concatenated (caption pairs + think/answer pairs) to
    get METHOD.md's "0.001 * mean of the squared scores (teacher and student, both kinds)".
    Invalid pairs (format-invalid rollouts) are excluded from both terms and may hold NaN.
    With no valid pair the loss is a 0-d zero connected to both inputs' graphs (backward() works
    and gives zero gradients) and the score metrics are NaN. Metrics: `accuracy` (fraction of valid
    pairs with s_t > s_s), `teacher_score`, `student_score`, `reward_gap` (= their difference),
    `bt_loss`, `score_reg`, `num_valid`.
    """
    if s_teacher.shape != s_student.shape:
        raise ValueError(f"score shapes differ: {tuple(s_teacher.shape)} vs {tuple(s_student.shape)}")
    valid = torch.ones_like(s_teacher, dtype=torch.bool) if valid_mask is None else valid_mask.bool()
    if valid.shape != s_teacher.shape:
        raise ValueError(f"valid_mask shape {tuple(valid.shape)} != score shape {tuple(s_teacher.shape)}")
    zero = torch.zeros_like(s_teacher)
    s_t = torch.where(valid, s_teacher, zero)
    s_s = torch.where(valid, s_student, zero)
    n = valid.sum()
    denom = n.clamp_min(1)
    bt = torch.where(valid, -F.logsigmoid(s_t - s_s), zero).sum() / denom
    reg = torch.where(valid, (s_t**2 + s_s**2) / 2, zero).sum() / denom
    loss = bt + score_reg_coef * reg  # all invalid: sums of zeros, still on the graph

    with torch.no_grad():
        nan = torch.full((), float("nan"), dtype=s_t.dtype)
        has = n > 0
        teacher_mean = torch.where(has, s_t.sum() / denom, nan)
        student_mean = torch.where(has, s_s.sum() / denom, nan)
        metrics: Metrics = {
            "accuracy": torch.where(has, ((s_t > s_s) & valid).sum().to(s_t.dtype) / denom, nan),
            "teacher_score": teacher_mean,
            "student_score": student_mean,
            "reward_gap": teacher_mean - student_mean,
            "bt_loss": bt.detach(),
            "score_reg": reg.detach(),
            "num_valid": n,
        }
    return loss, metrics


def discriminator_loss(
    teacher: dict[str, torch.Tensor],
    student: dict[str, torch.Tensor],
    valid: torch.Tensor,
    *,
    batch_has_valid: bool,
    score_clip: float = 10.0,
    score_reg_coef: float = 1e-3,
    fallback_coef: float = 0.01,
) -> tuple[torch.Tensor, Metrics]:
    """The published discriminator loss of the alignment stage on one micro-batch of rollouts (METHOD.md,
    "Published discriminator-update details").

    `teacher[k]` and `student[k]` are [rows] scores of segment kind k (caption and reasoning, or one `response`
    kind): row i pairs rollout i's segment with its prompt's teacher segment, scored for that row (train mode).
    Format-invalid rollouts (`valid` false) are scored on their fallback split: they count in the regulariser
    and, when no rollout of the whole step is valid (`batch_has_valid` false), nowhere else.

        s <- clamp(s, -score_clip, score_clip)                          every teacher and student score
        bt_k = mean_{i valid} -log sigmoid(t_ik - s_ik)                  0 when no row is valid
        reg  = score_reg_coef * mean_{side, k} mean_i s_{side,ik}^2      over every row, teacher and student
        loss = sum_k bt_k + reg                                          if batch_has_valid
             = fallback_coef * sum_k -log sigmoid(mean_i t_ik) + reg     otherwise

    The kinds' means are added, not pooled. Metrics: `bt_<k>` and `accuracy_<k>` (fraction of valid rows with
    t > s; NaN without one), `score_reg`, `fallback` (its value, 0 when not used), `num_valid`.
    """
    kinds = list(teacher)
    if not kinds or set(student) != set(kinds):
        raise ValueError(f"teacher and student must score the same kinds, got {sorted(teacher)} and {sorted(student)}")
    valid = valid.bool()
    for kind in kinds:
        if teacher[kind].shape != valid.shape or student[kind].shape != valid.shape:
            raise ValueError(f"kind {kind!r}: scores must be [rows] like valid {tuple(valid.shape)}")
    t = {k: teacher[k].clamp(-score_clip, score_clip) for k in kinds}
    s = {k: student[k].clamp(-score_clip, score_clip) for k in kinds}
    squares = [x[k].pow(2).mean() for k in kinds for x in (s, t)]
    reg = score_reg_coef * torch.stack(squares).mean()
    metrics: Metrics = {"score_reg": reg.detach(), "num_valid": valid.sum()}
    nan = torch.full((), float("nan"))
    loss = reg
    fallback = torch.zeros(())
    for k in kinds:
        bt = _masked_mean(-F.logsigmoid(t[k] - s[k]), valid)  # 0 (on the graph) with no valid row
        metrics[f"bt_{k}"] = bt.detach()
        metrics[f"accuracy_{k}"] = _masked_mean((t[k] > s[k]).float(), valid).detach() if valid.any() else nan
        if batch_has_valid:
            loss = loss + bt
        else:
            term = fallback_coef * -F.logsigmoid(t[k].mean())
            fallback = fallback + term.detach()
            loss = loss + term
    metrics["fallback"] = fallback
    return loss, metrics
