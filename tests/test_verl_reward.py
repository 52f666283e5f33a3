"""prism.verl_reward: verl's call of a custom reward function, on rows of our exported RL parquet, gives the reward
our RLVR stage gives the same responses."""

import importlib.util
from pathlib import Path

import pytest
import torch

import prism.verl_reward
from prism.config import RLVRConfig, load_config
from prism.data.formats import read_rl_parquet
from prism.response_format import render_response
from prism.rewards import RewardInputError
from prism.rollout import RolloutBatch, SamplingParams
from prism.stages.rlvr import score_rollouts


def verl_compute_score():
    """compute_score loaded as verl loads `custom_reward_function.path`: the file alone, under a module name of its
    own (verl.utils.import_utils.load_module)."""
    spec = importlib.util.spec_from_file_location("custom_module", prism.verl_reward.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_score


def verl_rows(parquet: Path, cache: Path) -> list[dict]:
    """The rows as verl's RLHFDataset reads them: datasets.load_dataset("parquet", data_files=...)["train"]."""
    from datasets import load_dataset

    return [dict(row) for row in load_dataset("parquet", data_files=str(parquet), cache_dir=str(cache))["train"]]


def verl_call(compute_score, row: dict, response: str) -> float:
    """As verl's naive reward manager calls it: keywords, and extra_info with the keys the manager adds."""
    extra_info = {**row["extra_info"], "num_turns": None, "rollout_reward_scores": {}}
    return compute_score(data_source=row["data_source"], solution_str=response,
                         ground_truth=row["reward_model"]["ground_truth"], extra_info=extra_info)["score"]


def rlvr_reward(record, response: str) -> float:
    """Our RLVR stage's reward of one response to `record` (prism.stages.rlvr.score_rollouts, published config)."""
    batch = RolloutBatch(prompt_ids=torch.ones(1, 2, dtype=torch.long), prompt_mask=torch.ones(1, 2, dtype=torch.long),
                         response_ids=torch.ones(1, 4, dtype=torch.long), response_mask=torch.ones(1, 4, dtype=torch.long),
                         behaviour_log_probs=None, texts=[response], finish_reasons=["stop"],
                         group_ids=torch.zeros(1, dtype=torch.long), n=1, sampling=SamplingParams(max_new_tokens=4),
                         images_per_prompt=[1])
    return float(score_rollouts(batch, [record], load_config(RLVRConfig))["reward"][0])


def respond(answer: str) -> str:
    return render_response(["a red square at row 1, column 2"], ["I look at the image."], answer)


def test_exported_rows_scored_as_verl_calls_the_adapter_equal_our_rlvr_reward(world, tmp_path):
    compute_score = verl_compute_score()
    rows = verl_rows(world / "rl.parquet", tmp_path / "datasets")
    records = read_rl_parquet(world / "rl.parquet")
    assert [row["extra_info"]["id"] for row in rows] == [record.id for record in records]
    plain = next(i for i, record in enumerate(records) if not record.choices)
    choice = next(i for i, record in enumerate(records) if record.choices)
    # the existing columns stay; extra_info carries the options too, since it is all a reward function sees
    assert rows[choice]["extra_info"]["choices"] == rows[choice]["reward_model"]["choices"] is not None
    assert rows[plain]["extra_info"]["choices"] is None

    record = records[plain]
    cases = [(respond(record.ground_truth), 1.0), (respond("a purple elephant"), 0.2),
             (record.ground_truth, 0.0)]  # untagged: the format gate gives 0 whatever the answer
    record = records[choice]
    letter = record.ground_truth
    other = next(key for key in record.choices if key != letter)
    mc_cases = [(respond(f"({letter})"), 1.0), (respond(other), 0.2),
                (respond(record.choices[letter]), 1.0),  # the option's text answers for its letter: needs the choices
                (respond(record.choices[other]), 0.2)]
    for index, found in ((plain, cases), (choice, mc_cases)):
        for response, expected in found:
            assert verl_call(compute_score, rows[index], response) == pytest.approx(expected), response
            assert rlvr_reward(records[index], response) == pytest.approx(expected), response

    # without extra_info.choices the option's text would not be read as its letter
    row = {**rows[choice], "extra_info": {**rows[choice]["extra_info"], "choices": None}}
    assert verl_call(compute_score, row, respond(record.choices[letter])) == pytest.approx(0.2)


def test_the_adapter_returns_what_verl_logs_and_takes_its_reward_kwargs():
    result = prism.verl_reward.compute_score("embedded_counting", respond("4"), "4", extra_info=None)
    assert result == {"score": pytest.approx(1.0), "acc": 1.0, "format": 1.0, "pred": "4"}
    weighted = prism.verl_reward.compute_score("x", respond("5"), "4", {"choices": None}, format_weight=0.5,
                                               reward_router_address=None)
    assert weighted["score"] == pytest.approx(0.5) and weighted["pred"] == "5"
    assert prism.verl_reward.compute_score("x", "4", "4")["pred"] == ""  # no <answer>: nothing extracted


@pytest.mark.parametrize("choices", ['["A", "B"]', "{not json", '{"A": 3}'])
def test_malformed_choices_name_the_field(choices):
    with pytest.raises(RewardInputError, match=r"^extra_info\.choices: expected a JSON object of letter -> option text"):
        prism.verl_reward.compute_score("x", respond("A"), "A", {"choices": choices})


def test_a_misspelt_reward_kwarg_is_refused_not_ignored():
    with pytest.raises(RewardInputError, match="unknown keyword.*format_wieght"):
        prism.verl_reward.compute_score("x", respond("4"), "4", format_wieght=0.3)
