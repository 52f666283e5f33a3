"""prism.algorithms against values worked out by hand in each test (never by the function under test)."""

import math
import statistics

import pytest
import torch

from prism import algorithms as alg

INF = float("inf")
NAN = float("nan")
EPS = 1e-6


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-9):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().to(torch.float64), expected, atol=tol, rtol=0)


def gn(values):
    """Group normalisation by hand: statistics.stdev is the unbiased (n - 1) std."""
    mean, std = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / (std + EPS) for v in values]


# ---------------------------------------------------------------------------------------------
# Registries


def test_registries_hold_the_published_names():
    assert set(alg.ADVANTAGE_ESTIMATORS) == {"grpo", "prism"}
    assert set(alg.POLICY_LOSSES) == {"ppo_clip", "gspo"}
    assert set(alg.LOSS_AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum"}
    assert alg.get_advantage_estimator("grpo") is alg.compute_grpo_advantage
    assert alg.get_advantage_estimator("prism") is alg.compute_prism_advantage
    assert alg.get_policy_loss("ppo_clip") is alg.ppo_clip
    assert alg.get_policy_loss("gspo") is alg.gspo


@pytest.mark.parametrize(
    "getter, known",
    [
        (alg.get_advantage_estimator, "grpo, prism"),
        (alg.get_policy_loss, "gspo, ppo_clip"),
        (alg.get_loss_aggregation, "seq-mean-token-mean, seq-mean-token-sum, token-mean"),
    ],
)
def test_unknown_names_list_the_known_ones(getter, known):
    with pytest.raises(ValueError, match=f"unknown .*'nope'; known: {known}"):
        getter("nope")


def test_register_adds_and_refuses_a_different_function_under_a_taken_name():
    @alg.register_policy_loss("test-only-loss")
    def my_loss(*args):
        return None

    try:
        assert alg.get_policy_loss("test-only-loss") is my_loss
        with pytest.raises(ValueError, match="already registered"):
            alg.register_policy_loss("test-only-loss")(lambda *a: None)
    finally:
        del alg.POLICY_LOSSES["test-only-loss"]


# ---------------------------------------------------------------------------------------------
# Aggregation

# Row 0: 3 valid tokens (1, 2, 3); row 1: 1 valid token (4); row 2: none. Padding holds junk.
RAGGED_LOSS = [[1.0, 2.0, 3.0, INF], [4.0, NAN, 100.0, -INF], [NAN, 100.0, 100.0, 100.0]]
RAGGED_MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 2.5: every valid token weighs the same
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # 3.0: empty row 2 excluded
        ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),  # 5.0: empty row 2 excluded
    ],
)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
def test_aggregation_modes_on_a_ragged_mask(mode, expected, mask_dtype):
    loss = t(RAGGED_LOSS).requires_grad_()
    mask = torch.tensor(RAGGED_MASK).to(mask_dtype)
    out = alg.aggregate_loss(loss, mask, mode)
    close(out, expected)
    out.backward()
    assert torch.isfinite(loss.grad).all()
    # d out / d l_it: token-mean 1/4; seq-mean-token-mean 1/(2 n_i); seq-mean-token-sum 1/2.
    per_token = {
        "token-mean": [[1 / 4] * 3 + [0], [1 / 4, 0, 0, 0], [0] * 4],
        "seq-mean-token-mean": [[1 / 6] * 3 + [0], [1 / 2, 0, 0, 0], [0] * 4],
        "seq-mean-token-sum": [[1 / 2] * 3 + [0], [1 / 2, 0, 0, 0], [0] * 4],
    }[mode]
    close(loss.grad, per_token)


@pytest.mark.parametrize("mode", sorted(alg.LOSS_AGGREGATIONS))
def test_aggregation_of_all_padding_is_a_connected_zero(mode):
    loss = t([[5.0, NAN], [INF, 1.0]]).requires_grad_()
    out = alg.aggregate_loss(loss, torch.zeros(2, 2), mode)
    close(out, 0.0)
    out.backward()
    close(loss.grad, [[0.0, 0.0], [0.0, 0.0]])


def test_aggregation_rejects_unknown_modes_and_bad_masks():
    with pytest.raises(ValueError, match="known: seq-mean-token-mean"):
        alg.aggregate_loss(t([[1.0]]), torch.ones(1, 1), "sum")
    with pytest.raises(ValueError, match="mask shape"):
        alg.aggregate_loss(t([[1.0, 2.0]]), torch.ones(1, 3))


# ---------------------------------------------------------------------------------------------
# GRPO advantage


def test_grpo_advantage_by_hand():
    # Group 7: rewards 1, 0, 0, 1 (not contiguous: ids 7, 3, 7, 3, 7, 7) -> mean 0.5,
    # unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3). Group 3: 0.2, 1.0 -> mean 0.6, std sqrt(0.32).
    rewards = t([1.0, 0.2, 0.0, 1.0, 0.0, 1.0])
    ids = torch.tensor([7, 3, 7, 3, 7, 7])
    a7 = 0.5 / (math.sqrt(1 / 3) + EPS)
    a3 = 0.4 / (math.sqrt(0.32) + EPS)
    close(alg.compute_grpo_advantage(rewards, ids), [a7, -a3, -a7, a3, -a7, a7])
    # The biased std (divisor n) would give 0.5 / 0.5 = 1.0 for group 7: not what we use.
    assert abs(a7 - 1.0) > 0.1


def test_grpo_group_of_one_uses_mean_0_std_1_and_equal_rewards_give_0():
    rewards = t([5.0, 0.8, 0.8, 0.8, 0.0])
    ids = torch.tensor([0, 1, 1, 1, 2])
    close(alg.compute_grpo_advantage(rewards, ids), [5.0 / (1 + EPS), 0.0, 0.0, 0.0, 0.0])


def test_grpo_accepts_integer_rewards_contiguous_ids_and_has_no_grad():
    rewards = torch.tensor([1, 0, 1, 1], dtype=torch.int64)
    ids = alg.group_ids_from_size(4, 2)
    assert ids.tolist() == [0, 0, 1, 1]
    a = 0.5 / (math.sqrt(0.5) + EPS)  # group 0: 1, 0 -> mean 0.5, std sqrt(0.5)
    out = alg.compute_grpo_advantage(rewards, ids)
    assert out.dtype == torch.float32
    close(out, [a, -a, 0.0, 0.0], tol=1e-6)
    r = t([1.0, 0.0]).requires_grad_()
    assert not alg.compute_grpo_advantage(r, torch.tensor([0, 0])).requires_grad
    with pytest.raises(ValueError, match="multiple of group_size"):
        alg.group_ids_from_size(5, 2)


def test_broadcast_to_tokens_zeroes_padding():
    out = alg.broadcast_to_tokens(t([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool))
    close(out, [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        alg.broadcast_to_tokens(t([1.0, 2.0, 3.0]), torch.ones(2, 2))


# ---------------------------------------------------------------------------------------------
# PRISM multi-reward advantage


def test_prism_advantage_mixed_group_clip_and_invalid_replacement():
    # One group of four; rollout 2 is format-invalid (its scores are junk, even NaN).
    valid = torch.tensor([True, True, False, True])
    s_cap = t([1.0, 3.0, NAN, 20.0])  # clip -> [1, 3, _, 10]; invalid -> min valid (1) - 1 = 0
    s_cot = t([-2.0, 0.0, 99.0, -15.0])  # clip -> [-2, 0, _, -10]; invalid -> -10 - 1 = -11
    cap = gn([1.0, 3.0, 0.0, 10.0])
    cot = gn([-2.0, 0.0, -11.0, -10.0])
    penalty = [0.0, 0.0, 1.5, 0.0]
    expected = [0.5 * c + 0.5 * d - p for c, d, p in zip(cap, cot, penalty)]
    out = alg.compute_prism_advantage(s_cap, s_cot, valid, torch.zeros(4, dtype=torch.long))
    close(out, expected)
    # Spot-check one value fully by hand: cap mean 3.5, std sqrt(61/3); cot mean -5.75, std sqrt(92.75/3).
    close(out[0], 0.5 * (-2.5 / (math.sqrt(61 / 3) + EPS)) + 0.5 * (3.75 / (math.sqrt(92.75 / 3) + EPS)))


def test_prism_advantage_all_invalid_group_and_custom_weights():
    # Group 0: all invalid -> every score -1 -> GN 0 -> A = -penalty.
    # Group 1: two valid (cap 2, 4; cot 1, 1) -> GN cap [-x, x], cot [0, 0].
    # Group 2: a single valid rollout -> mean 0, std 1 -> GN = v / (1 + eps).
    valid = torch.tensor([False, False, False, True, True, True])
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    s_cap = t([NAN, 5.0, -3.0, 2.0, 4.0, 0.5])
    s_cot = t([NAN, NAN, 7.0, 1.0, 1.0, -12.0])  # -12 clips to -10
    alpha, pen = 0.25, 2.0
    x = 1.0 / (math.sqrt(2.0) + EPS)  # cap 2, 4: mean 3, unbiased std sqrt(2)
    expected = [-pen, -pen, -pen, alpha * -x, alpha * x, alpha * 0.5 / (1 + EPS) + (1 - alpha) * -10 / (1 + EPS)]
    out = alg.compute_prism_advantage(s_cap, s_cot, valid, ids, alpha=alpha, format_penalty=pen)
    close(out, expected)


def test_prism_advantage_equal_valid_scores_give_0_and_clip_is_configurable():
    valid = torch.ones(3, dtype=torch.bool)
    out = alg.compute_prism_advantage(t([2.0, 2.0, 2.0]), t([9.0, 30.0, 11.0]), valid, torch.zeros(3), score_clip=9.0)
    close(out, [0.0, 0.0, 0.0])  # cot clips to 9, 9, 9


# ---------------------------------------------------------------------------------------------
# PPO-clip

# Row 0: A = +1, ratios 0.5, 1.1, 1.5, padding. Row 1: A = -1, ratios 0.5, 1.1, 1.5, 4.0.
RATIOS = [[0.5, 1.1, 1.5, 1.0], [0.5, 1.1, 1.5, 4.0]]
PPO_MASK = [[1, 1, 1, 0], [1, 1, 1, 1]]


def ppo_inputs():
    old = t([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, -2.0, -3.0]])
    new = old + torch.log(t(RATIOS))
    new[0, 3] = INF  # junk in the padding
    return new.requires_grad_(), old, t([1.0, -1.0]), torch.tensor(PPO_MASK)


def test_ppo_clip_symmetric_both_sides_by_hand():
    log_prob, old, adv, mask = ppo_inputs()
    loss, m = alg.ppo_clip(log_prob, old, adv, mask)
    # A=+1: max(-r, -clip(r, .8, 1.2)): .5 -> max(-.5, -.8) = -.5 (pessimistic, unclipped);
    #       1.1 -> -1.1; 1.5 -> max(-1.5, -1.2) = -1.2 (clipped above).
    # A=-1: max(r, clip(r)): .5 -> max(.5, .8) = .8 (clipped below); 1.1; 1.5 -> 1.5; 4 -> 4.
    close(loss, [[-0.5, -1.1, -1.2, 0.0], [0.8, 1.1, 1.5, 4.0]])
    close(m["clipfrac"], 2 / 7)
    close(m["clipfrac_lower"], 0.0)
    close(m["ppo_kl"], -sum(math.log(r) for r in [0.5, 1.1, 1.5, 0.5, 1.1, 1.5, 4.0]) / 7)
    close(m["ratio_mean"], (0.5 + 1.1 + 1.5 + 0.5 + 1.1 + 1.5 + 4.0) / 7)
    loss.sum().backward()
    # d(-A r)/d log pi = -A r where unclipped; 0 where the clipped term is active; 0 on padding.
    close(log_prob.grad, [[-0.5, -1.1, 0.0, 0.0], [0.0, 1.1, 1.5, 4.0]])


def test_ppo_clip_asymmetric_and_dual_clip_by_hand():
    log_prob, old, adv, mask = ppo_inputs()
    loss, m = alg.ppo_clip(log_prob, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0)
    # Clip-higher: A=+1, r=1.5 -> max(-1.5, -1.28) = -1.28. Dual clip, A=-1, r=4: min(max(4, 1.28), 3) = 3.
    # A=-1, r=1.5: min(1.5, 3) = 1.5 (dual clip inactive below c).
    close(loss, [[-0.5, -1.1, -1.28, 0.0], [0.8, 1.1, 1.5, 3.0]])
    close(m["clipfrac"], 2 / 7)
    close(m["clipfrac_lower"], 1 / 7)
    loss.sum().backward()
    close(log_prob.grad, [[-0.5, -1.1, 0.0, 0.0], [0.0, 1.1, 1.5, 0.0]])


def test_ppo_clip_dual_clip_never_touches_positive_advantages_and_accepts_token_advantages():
    # A=+2 with an exploded ratio 5: max(-10, -2.4) = -2.4; the dual clip (A<0 only) leaves it.
    log_prob = t([[math.log(5.0), 0.0]])
    token_adv = t([[2.0, 2.0]])
    loss, m = alg.ppo_clip(log_prob, t([[0.0, 0.0]]), token_adv, torch.ones(1, 2), dual_clip_c=3.0)
    close(loss, [[-2.4, -2.0]])
    close(m["clipfrac_lower"], 0.0)
    loss_seq, _ = alg.ppo_clip(log_prob, t([[0.0, 0.0]]), t([2.0]), torch.ones(1, 2), dual_clip_c=3.0)
    close(loss_seq, loss)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        alg.ppo_clip(log_prob, log_prob, t([1.0]), torch.ones(1, 2), dual_clip_c=1.0)


# ---------------------------------------------------------------------------------------------
# GSPO


def gspo_inputs():
    # Row 0: log-ratios .1, .2, .3 -> mean .2. Row 1: -.4, 0, padding -> mean -.2 (n = 2).
    # Row 2: 1e-4 each -> s = exp(1e-4) = 1.0001, inside [1 - 3e-4, 1 + 4e-4].
    old = t([[-1.0, -2.0, -3.0], [-0.5, -0.7, 0.0], [-1.5, -0.1, -0.2]])
    delta = t([[0.1, 0.2, 0.3], [-0.4, 0.0, 0.0], [1e-4, 1e-4, 1e-4]])
    log_prob = old + delta
    log_prob[1, 2] = 1e9  # junk in the padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return log_prob.requires_grad_(), old, mask


def test_gspo_values_and_clip_by_hand():
    log_prob, old, mask = gspo_inputs()
    adv = t([2.0, -1.0, 1.0])
    loss, m = alg.gspo(log_prob, old, adv, mask)
    s0, s1, s2 = math.exp(0.2), math.exp(-0.2), math.exp(1e-4)
    # Row 0: A=2, s=1.2214 -> max(-2 s, -2 * 1.0004) = -2.0008 (clipped above).
    # Row 1: A=-1, s=.8187 -> max(s, 1 - 3e-4) = .9997 (clipped below). Row 2: unclipped -> -s2.
    close(loss, [[-2 * 1.0004] * 3, [0.9997, 0.9997, 0.0], [-s2] * 3], tol=1e-12)
    close(m["clipfrac"], 5 / 8)  # rows 0 and 1: 3 + 2 of the 8 valid tokens
    close(m["seq_ratio_mean"], (s0 + s1 + s2) / 3)
    close(m["ppo_kl"], -(0.1 + 0.2 + 0.3 - 0.4 + 0.0 + 3e-4) / 8)


def test_gspo_token_form_value_is_the_sequence_ratio_and_gradient_is_s_over_len():
    log_prob, old, mask = gspo_inputs()
    s = [math.exp(0.2), math.exp(-0.2), math.exp(1e-4)]
    n = [3, 2, 3]
    # A = -1 and a clip band wide enough to never bind: loss_it = s_it exactly.
    loss, _ = alg.gspo(log_prob, old, t([-1.0, -1.0, -1.0]), mask, clip_low=0.9, clip_high=100.0)
    close(loss, [[s[0]] * 3, [s[1], s[1], 0.0], [s[2]] * 3], tol=1e-12)
    # Per-sequence token mean of s_it: its value is s_i and d/d log pi_it = s_i / n_i (= d s_i / d log pi_it).
    row = 1
    seq_value = loss[row, :2].sum() / 2
    close(seq_value, s[row], tol=1e-12)
    (grad,) = torch.autograd.grad(seq_value, log_prob)
    close(grad[row], [s[row] / n[row], s[row] / n[row], 0.0], tol=1e-12)
    close(grad[0], [0.0, 0.0, 0.0])
    # Through the default aggregation with an upstream factor -A_i: token t gets -A_i s_i / n_i / batch.
    adv = t([2.0, -1.0, 0.5])
    loss, _ = alg.gspo(log_prob, old, adv, mask, clip_low=0.9, clip_high=100.0)
    alg.aggregate_loss(loss, mask, "seq-mean-token-mean").backward()
    expected = [[-2.0 * s[0] / 3 / 3] * 3, [1.0 * s[1] / 2 / 3] * 2 + [0.0], [-0.5 * s[2] / 3 / 3] * 3]
    close(log_prob.grad, expected, tol=1e-12)
    assert old.grad is None


def test_gspo_clamps_the_log_ratio_and_then_passes_no_gradient():
    old = t([[0.0, 0.0]])
    log_prob = t([[20.0, 30.0]]).requires_grad_()  # mean log-ratio 25 -> clamped to 10
    loss, m = alg.gspo(log_prob, old, t([-1.0]), torch.ones(1, 2), clip_low=0.9, clip_high=1e6)
    close(loss, [[math.exp(10.0)] * 2], tol=1e-6)
    close(m["seq_ratio_mean"], math.exp(10.0), tol=1e-6)
    loss.sum().backward()
    close(log_prob.grad, [[0.0, 0.0]])
    loss5, _ = alg.gspo(log_prob, old, t([-1.0]), torch.ones(1, 2), clip_high=1e6, max_log_ratio=5.0)
    close(loss5, [[math.exp(5.0)] * 2], tol=1e-9)


# ---------------------------------------------------------------------------------------------
# DAPO helpers


def test_overlong_penalty_by_hand():
    # L = 100, buffer 20: 0 up to 80 tokens, then -(len - 80) / 20, capped at -1.
    lengths = torch.tensor([0, 80, 81, 90, 99, 100, 120])
    expected = [0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0]
    out = alg.overlong_penalty(lengths, max_length=100, buffer=20)
    assert out.dtype == torch.float32
    close(out, expected, tol=1e-7)
    # Published numbers: L = 8192, buffer 4096 -> 6144 tokens is 4096 - 2048 over the free budget.
    close(alg.overlong_penalty(torch.tensor([4096, 6144, 8192]), 8192, 4096), [0.0, -0.5, -1.0])


@pytest.mark.parametrize(
    "length, max_length, buffer, expected",
    [
        (0, 8192, 4096, 0.0),
        (4096, 8192, 4096, 0.0),  # exactly L - buffer: no penalty yet
        (4097, 8192, 4096, -1 / 4096),
        (5120, 8192, 4096, -0.25),  # 1024 tokens into the buffer
        (6144, 8192, 4096, -0.5),
        (8192, 8192, 4096, -1.0),
        (9000, 8192, 4096, -1.0),  # past L: DAPO's hard -1
        (90, 100, 20, -0.5),
        (85, 100, 20, -0.25),
        (80, 100, 20, 0.0),
        (50, 100, 100, -0.5),  # the whole length is buffer
    ],
)
def test_overlong_penalty_cases(length, max_length, buffer, expected):
    assert float(alg.overlong_penalty(torch.tensor([length]), max_length, buffer)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "max_length, buffer, name", [(100, 0, "buffer"), (100, -5, "buffer"), (100, 101, "buffer"), (10, 20, "buffer")]
)
def test_overlong_penalty_validates(max_length, buffer, name):
    with pytest.raises(ValueError, match=name):
        alg.overlong_penalty(torch.tensor([10]), max_length, buffer)
    with pytest.raises(ValueError, match="lengths"):
        alg.overlong_penalty(torch.tensor([-1]), 100, 20)


def test_dynamic_sampling_keeps_groups_whose_values_differ():
    acc = t([1, 1, 1, 0, 1, 0, 0, 0, 0, 0.8, 0.8, 0.8, 0.2, 0.2, 0.2000001])
    keep = alg.dynamic_sampling_keep(acc, group_size=3)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, False, False, True]
    assert keep.repeat_interleave(3).tolist() == [False] * 3 + [True] * 3 + [False] * 6 + [True] * 3
    assert alg.dynamic_sampling_keep(torch.tensor([1, 0, 1, 1]), 1).tolist() == [False] * 4  # a group of one
    with pytest.raises(ValueError, match="divisible"):
        alg.dynamic_sampling_keep(acc, group_size=4)


# ---------------------------------------------------------------------------------------------
# Bradley-Terry


def softplus(x):
    return math.log1p(math.exp(x))  # -log sigmoid(d) = log(1 + exp(-d)) = softplus(-d)


def test_bradley_terry_values_accuracy_and_regulariser():
    s_t = t([2.0, 0.0, 1.0]).requires_grad_()
    s_s = t([0.0, 1.0, 1.0]).requires_grad_()
    # Differences 2, -1, 0; accuracy counts strict wins only (the tie does not count).
    bt = (softplus(-2.0) + softplus(1.0) + softplus(0.0)) / 3
    reg = ((4 + 0) / 2 + (0 + 1) / 2 + (1 + 1) / 2) / 3  # mean of the 6 squared scores = 7/6
    loss, m = alg.bradley_terry_loss(s_t, s_s, score_reg_coef=0.001)
    close(loss, bt + 0.001 * reg)
    close(m["accuracy"], 1 / 3)
    close(m["teacher_score"], 1.0)
    close(m["student_score"], 2 / 3)
    close(m["reward_gap"], 1 / 3)
    close(m["bt_loss"], bt)
    close(m["score_reg"], 7 / 6)
    assert int(m["num_valid"]) == 3
    loss.backward()
    # d/ds_t softplus(-(s_t - s_s)) / n = -sigmoid(-(d)) / n; reg adds 0.001 * s / n.
    sig = lambda x: 1 / (1 + math.exp(-x))
    close(s_t.grad, [(-sig(-d) + 0.001 * s) / 3 for d, s in [(2, 2), (-1, 0), (0, 1)]])
    close(s_s.grad, [(sig(-d) + 0.001 * s) / 3 for d, s in [(2, 0), (-1, 1), (0, 1)]])


def test_bradley_terry_skips_invalid_pairs_even_when_nan():
    s_t = t([3.0, NAN, -1.0]).requires_grad_()
    s_s = t([1.0, 5.0, 0.0]).requires_grad_()
    loss, m = alg.bradley_terry_loss(s_t, s_s, valid_mask=torch.tensor([1, 0, 1]))
    close(loss, (softplus(-2.0) + softplus(1.0)) / 2)
    close(m["accuracy"], 0.5)
    close(m["teacher_score"], 1.0)
    close(m["student_score"], 0.5)
    loss.backward()
    assert torch.isfinite(s_t.grad).all() and torch.isfinite(s_s.grad).all()
    assert s_t.grad[1] == 0 and s_s.grad[1] == 0


def test_bradley_terry_with_no_valid_pair_is_a_connected_zero():
    s_t = t([NAN, 2.0]).requires_grad_()
    s_s = t([1.0, 0.0]).requires_grad_()
    loss, m = alg.bradley_terry_loss(s_t, s_s, valid_mask=torch.zeros(2, dtype=torch.bool), score_reg_coef=0.001)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    close(s_t.grad, [0.0, 0.0])
    close(s_s.grad, [0.0, 0.0])
    assert int(m["num_valid"]) == 0
    assert math.isnan(float(m["accuracy"])) and math.isnan(float(m["teacher_score"]))


def test_bradley_terry_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="score shapes differ"):
        alg.bradley_terry_loss(t([1.0, 2.0]), t([1.0]))
    with pytest.raises(ValueError, match="valid_mask shape"):
        alg.bradley_terry_loss(t([1.0, 2.0]), t([1.0, 0.0]), valid_mask=torch.ones(3))


# ---------------------------------------------------------------------------------------------
# The published discriminator update (alignment)


def _scores():
    """Two kinds, three rollouts, the third format-invalid (its scores are of its fallback split)."""
    teacher = {"perception": t([1.0, 3.0, 0.5]).requires_grad_(), "reasoning": t([0.5, 0.5, 0.5]).requires_grad_()}
    student = {"perception": t([0.0, 1.0, -0.5]).requires_grad_(), "reasoning": t([1.5, -2.5, 0.0]).requires_grad_()}
    return teacher, student, torch.tensor([True, True, False])


def test_discriminator_loss_adds_the_kinds_means_clamps_and_regularises_every_rollout():
    teacher, student, valid = _scores()
    loss, m = alg.discriminator_loss(teacher, student, valid, batch_has_valid=True, score_clip=2.0,
                                     score_reg_coef=0.001)
    # clamped to [-2, 2]: teacher caption 3 -> 2, student reasoning -2.5 -> -2
    bt_cap = (softplus(-(1.0 - 0.0)) + softplus(-(2.0 - 1.0))) / 2  # valid rows only
    bt_cot = (softplus(-(0.5 - 1.5)) + softplus(-(0.5 + 2.0))) / 2
    # every row, the four (side, kind) means of squares averaged: (1.25 + 5.25 + 6.25 + 0.75) / 3 / 4
    reg = 0.001 * (13.5 / 3) / 4
    close(loss, bt_cap + bt_cot + reg)  # a pooled mean over the 4 pairs would be half the BT part
    close(m["bt_perception"], bt_cap)
    close(m["bt_reasoning"], bt_cot)
    close(m["score_reg"], reg)
    close(m["accuracy_perception"], 1.0)
    close(m["accuracy_reasoning"], 0.5)
    assert float(m["fallback"]) == 0.0 and int(m["num_valid"]) == 2
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # the clamped scores get no gradient; the invalid row only the regulariser's 0.001 * 2 s / 3 / 4
    close(teacher["perception"].grad, [-sig(-1.0) / 2 + 0.001 * 2 * 1.0 / 12, 0.0, 0.001 * 2 * 0.5 / 12])
    close(student["reasoning"].grad, [sig(1.0) / 2 + 0.001 * 2 * 1.5 / 12, 0.0, 0.0])


def test_discriminator_loss_falls_back_on_the_teacher_scores_when_the_step_has_no_valid_rollout():
    teacher, student, _ = _scores()
    none = torch.tensor([False, False, False])
    loss, m = alg.discriminator_loss(teacher, student, none, batch_has_valid=False, score_clip=2.0,
                                     score_reg_coef=0.001, fallback_coef=0.01)
    fallback = 0.01 * (softplus(-(1.0 + 2.0 + 0.5) / 3) + softplus(-0.5))  # -log sigmoid(mean teacher score)
    reg = 0.001 * (13.5 / 3) / 4
    close(loss, fallback + reg)
    close(m["fallback"], fallback)
    assert float(m["bt_perception"]) == 0.0 and math.isnan(float(m["accuracy_perception"]))
    loss.backward()
    assert float(teacher["reasoning"].grad.abs().sum()) > 0  # the fallback pushes the teacher scores up
    # a micro-batch without a valid rollout in a step that has some: the regulariser alone
    loss, _ = alg.discriminator_loss(*_scores()[:2], none, batch_has_valid=True, score_clip=2.0,
                                     score_reg_coef=0.001)
    close(loss, reg)


def test_discriminator_loss_rejects_mismatched_kinds():
    teacher, student, valid = _scores()
    with pytest.raises(ValueError, match="same kinds"):
        alg.discriminator_loss(teacher, {"perception": student["perception"]}, valid, batch_has_valid=True)


# ---------------------------------------------------------------------------------------------
# KL to the reference policy


def test_kl_penalty_is_k3_by_hand_and_zero_on_padding():
    log_prob = t([[-1.0, -2.0, NAN]]).requires_grad_()
    ref = t([[-1.5, -1.0, 0.0]])
    kl = alg.kl_penalty(log_prob, ref, torch.tensor([[1, 1, 0]]))
    # d = ref - log_prob = -0.5, 1.0; kl = exp(d) - d - 1
    close(kl, [[math.exp(-0.5) + 0.5 - 1, math.e - 2, 0.0]])
    kl.sum().backward()
    close(log_prob.grad, [[-(math.exp(-0.5) - 1), -(math.e - 1), 0.0]])  # d kl / d log_prob = 1 - exp(d)
