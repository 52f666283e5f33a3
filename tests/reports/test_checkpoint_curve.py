"""bench/checkpoint_curve.py: a stage run's kept checkpoints turned into model folders, and what it refuses."""

import json
import shutil

import numpy as np
import pytest
import torch

from prism.models import load_model
from prism.runtime import save_checkpoint


@pytest.fixture
def run_with_checkpoints(policy_dir, tmp_path):
    """A run folder as a stage leaves it: model/ (the final weights) and checkpoints of steps 100 and 200, whose
    weights differ from the final ones (the embeddings shifted by the step)."""
    run = tmp_path / "sft-run"
    shutil.copytree(policy_dir, run / "model")
    model = load_model(run / "model")
    for step in (100, 200):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["model.language_model.embed_tokens.weight"] += step
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]  # tied, as in training
        save_checkpoint(run, step, model_state=state)
    return run


def test_a_checkpoint_becomes_the_model_it_held(bench_script, run_with_checkpoints, tmp_path):
    module = bench_script("checkpoint_curve")
    run = run_with_checkpoints
    out = module.checkpoint_model(run, run / "checkpoints" / "step-000100", tmp_path / "step-100")
    final, converted = load_model(run / "model").state_dict(), load_model(out).state_dict()
    embeddings = "model.language_model.embed_tokens.weight"
    assert torch.equal(converted[embeddings], final[embeddings] + 100)
    assert converted["lm_head.weight"].data_ptr() == converted[embeddings].data_ptr()  # still tied
    assert all(torch.equal(converted[k], final[k]) for k in final if k not in (embeddings, "lm_head.weight"))
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()


def test_taken_steps_keep_the_grid_and_the_last(bench_script):
    taken = bench_script("checkpoint_curve").taken_steps
    assert taken([100, 200, 300, 400, 450], 200) == [200, 400, 450]
    assert taken([100, 200, 400], 200) == [200, 400]
    assert taken([100, 200], None) == [100, 200]


def test_a_run_without_a_model_or_checkpoints_and_a_zero_grid_are_named(bench_script, run_with_checkpoints, tmp_path,
                                                                           capsys):
    main = bench_script("checkpoint_curve").main
    with pytest.raises(SystemExit, match=f"{tmp_path}: no model/ folder in it"):
        main([str(tmp_path), "--world", str(tmp_path)])
    with pytest.raises(SystemExit):
        main([str(run_with_checkpoints), "--world", str(tmp_path), "--every", "0"])
    assert "--every: expected a step count >= 1, got 0" in capsys.readouterr().err
    shutil.rmtree(run_with_checkpoints / "checkpoints")
    with pytest.raises(SystemExit, match="no checkpoints/step-N folders"):
        main([str(run_with_checkpoints), "--world", str(tmp_path)])


def test_the_curve_reads_each_steps_evaluation_and_reuses_what_is_there(bench_script, run_with_checkpoints, tmp_path,
                                                                         evaluation_folder):
    """Models and evaluations already in place are reused (no `prism eval` runs); per step, each family's accuracy
    and Avg, their mean, as computed by hand from the per-item scores."""
    main = bench_script("checkpoint_curve").main
    models, evals, out = tmp_path / "models", tmp_path / "evals", tmp_path / "curve.json"
    for step, presence in ((100, [0, 1, 0, 0]), (200, [1, 1, 1, 0])):
        (models / f"step-{step:06d}").mkdir(parents=True)
        (models / f"step-{step:06d}" / "config.json").write_text("{}")
        evaluation_folder(evals / f"step-{step:06d}", f"s{step}", {"chart": np.array([1, 1, 0, 0]),
                                                                 "presence": np.array(presence)})
    main([str(run_with_checkpoints), "--world", str(tmp_path), "--models", str(models), "--evals", str(evals),
          "--out", str(out)])
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == ["100", "200"]
    assert steps["100"]["presence"] == 25.0 and steps["100"]["Avg"] == 37.5  # (50 + 25) / 2
    assert steps["200"]["presence"] == 75.0 and steps["200"]["Avg"] == 62.5
    assert steps["200"]["evaluation"] == str(evals / "step-000200" / "hash-s200")


def test_weights_of_another_model_are_named(bench_script, run_with_checkpoints, tmp_path):
    """An align run's checkpoint holds the policy and the discriminator under their own names: not the model's."""
    state = {f"policy.{k}": v for k, v in load_model(run_with_checkpoints / "model").state_dict().items()}
    checkpoint = save_checkpoint(run_with_checkpoints, 300, model_state=state)
    with pytest.raises(SystemExit, match=r"step-000300: its weights do not fit .*expected a base, sft or rlvr run"):
        bench_script("checkpoint_curve").checkpoint_model(run_with_checkpoints, checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_family_accuracy_reads_one_evaluation_and_names_a_folder_of_two(bench_script, evaluation_folder, tmp_path):
    family_accuracy = bench_script("checkpoint_curve").family_accuracy
    evals = tmp_path / "step-100"
    folder = evaluation_folder(evals, "a", {"presence": np.array([1, 0, 1, 1]), "counting": np.array([0, 0, 1, 0])})
    assert family_accuracy(evals) == {"evaluation": str(folder), "counting": 25.0, "presence": 75.0, "Avg": 50.0}
    evaluation_folder(evals, "b", {"presence": np.array([1])})
    with pytest.raises(SystemExit, match=r"step-100: expected one evaluation folder \(<checkpoint hash>\), found 2"):
        family_accuracy(evals)
