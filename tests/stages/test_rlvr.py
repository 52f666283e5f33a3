"""The RLVR recipe: prompt order, scoring, each algorithm's update, dynamic sampling, mini-batches, KL."""

import json

import pytest
import torch

from prism.config import RLVRConfig, load_config
from prism.data.formats import RLRecord
from prism.rewards import RewardResult
from prism.rollout import RolloutBatch, RolloutError, SamplingParams
from prism.stages import rlvr
from prism.stages.rlvr import run, score_rollouts

from .conftest import model_tensors


def _batch(texts, n, lengths):
    rows = len(texts)
    width = max(lengths)
    mask = torch.tensor([[1] * k + [0] * (width - k) for k in lengths])
    return RolloutBatch(prompt_ids=torch.ones(rows, 2, dtype=torch.long), prompt_mask=torch.ones(rows, 2, dtype=torch.long),
                        response_ids=torch.ones(rows, width, dtype=torch.long), response_mask=mask,
                        behaviour_log_probs=None, texts=texts, finish_reasons=["stop"] * rows,
                        group_ids=torch.arange(rows // n).repeat_interleave(n), n=n,
                        sampling=SamplingParams(max_new_tokens=width), images_per_prompt=[0] * (rows // n))


def test_scores_by_hand_with_overlong_shaping():
    good = "<caption>\n- a red bar\n</caption>\n<think>\n2 + 3 = 5.\n</think>\n<answer>5</answer>"
    record = RLRecord(id="a", data_source="x", prompt=[], images=[], ground_truth="5", choices=None,
                      teacher_caption=None, teacher_cot=None)
    texts = [good, good.replace(">5<", ">6<"), "5"]
    cfg = load_config(RLVRConfig, overrides=["algorithm=grpo", "rollout.rollouts_per_prompt=3", "rollout.max_new_tokens=10",
                                            "overlong_buffer=4"])
    scores = score_rollouts(_batch(texts, 3, [4, 8, 10]), [record], cfg)
    # reward = 0.8 acc + 0.2 format (format-gated), + min(0, -(len - (10 - 4)) / 4)
    assert scores["reward"].tolist() == pytest.approx([1.0, 0.2 - 0.5, 0.0 - 1.0])
    assert scores["accuracy"].tolist() == [1.0, 0.0, 0.0] and scores["format"].tolist() == [1.0, 1.0, 0.0]
    assert scores["length"].tolist() == [4.0, 8.0, 10.0]


def rlvr_config(world, policy_dir, out, *extra):
    return load_config(RLVRConfig, overrides=[
        "model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32", "model.mixed_precision=no",
        f"data_files=[{world}/rl.parquet]", "rollout.backend=hf", "rollout.prompts_per_step=2",
        "rollout.rollouts_per_prompt=4", "rollout.max_new_tokens=12", "update.micro_batch_size=4", "steps=2", "optim.lr=1e-2", f"output_dir={out}",
        "save_every_steps=1", *extra])


@pytest.fixture
def varied_reward(monkeypatch):
    """A random policy never writes the tagged format, so every real reward is 0 and every advantage too.
    Score by a property of the text instead, to exercise the update path (the reward has its own tests)."""
    def reward(text, ground_truth, choices=None, accuracy_weight=0.8, format_weight=0.2):
        value = (sum(map(ord, text)) % 7) / 6
        return RewardResult(score=value, accuracy=float(value > 0.5), format=1.0, extracted_answer=None)

    monkeypatch.setattr(rlvr, "compute_reward", reward)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "gspo"])
def test_each_algorithm_updates_the_policy(world, policy_dir, tmp_path, varied_reward, algorithm):
    extra = ["max_num_gen_batches=4", "on_underfilled_batch=partial"] if algorithm == "dapo" else []
    out = run(rlvr_config(world, policy_dir, tmp_path / algorithm, f"algorithm={algorithm}", *extra))
    before, after = model_tensors(policy_dir), model_tensors(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward", "accuracy", "format_rate", "response_length", "clipfrac", "entropy", "ppo_kl",
                "grad_norm", "groups_filtered", "seconds_generate", "seconds_score", "seconds_update"):
        assert key in metrics[-1], key
    assert metrics[-1]["grad_norm"] > 0 and metrics[-1]["entropy"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["algorithm"] == algorithm
    assert manifest["config"]["update"]["loss_agg"] == ("seq-mean-token-mean" if algorithm == "gspo" else "token-mean")


def test_dynamic_sampling_fills_or_stops_as_configured(world, policy_dir, tmp_path):
    # The real reward: a random policy scores 0 everywhere, so every group is filtered.
    cfg = rlvr_config(world, policy_dir, tmp_path / "e", "algorithm=dapo", "max_num_gen_batches=2",
                      "gen_batch_multiplier=1", "on_underfilled_batch=error")
    with pytest.raises(RolloutError, match="kept 0 of 2 groups after max_num_gen_batches=2"):
        run(cfg)
    out = run(rlvr_config(world, policy_dir, tmp_path / "p", "algorithm=dapo", "max_num_gen_batches=2",
                          "gen_batch_multiplier=1", "on_underfilled_batch=partial", "steps=1"))
    m = _metrics(out)[0]
    assert m["underfilled"] is True and m["groups_trained"] == 0 and m["groups_filtered"] == 4 and m["gen_rounds"] == 2
    before, after = model_tensors(policy_dir), model_tensors(out / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing to learn from: no update


def test_mini_batches_and_kl_to_the_initial_policy(world, policy_dir, tmp_path, varied_reward):
    out = run(rlvr_config(world, policy_dir, tmp_path / "m", "update.mini_batches=2", "update.kl_coef=0.1", "steps=2"))
    metrics = _metrics(out)
    # two updates per step: the second mini-batch sees a moved policy (ratio != 1) and a KL > 0
    assert metrics[-1]["kl_ref"] > 0 and metrics[-1]["ppo_kl"] != 0.0


def test_prompts_must_split_over_processes_and_mini_batches(world, policy_dir, tmp_path):
    with pytest.raises(Exception, match="mini_batches"):
        load_config(RLVRConfig, overrides=["rollout.prompts_per_step=3", "update.mini_batches=2"])
