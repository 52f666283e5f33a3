"""Sharded checkpoints (`pytest -k fsdp_resume`): 2 CPU processes (gloo) train the tiny policy sharded with FSDP2
(fsdp_stage_worker.py says how, and why not through accelerate); each checkpoint holds the model and AdamW shards
through torch.distributed.checkpoint. A run stopped after a checkpoint and resumed ends bit-identical to an
uninterrupted one, weights and optimizer state; the sharded step equals one process's on the same global batch.
align checkpoints its policy and its discriminator (sharded whole) together, both AdamW states in one folder."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from prism.config import AlignConfig, SFTConfig, load_config
from prism.models.discriminator import HEAD_FILE, SPEC_FILE
from prism.rollout import HFRolloutBackend
from prism.runtime import SHARDED_DIR, STATE_FILE, latest_checkpoint, list_checkpoints
from prism.stages.align import run as run_align
from prism.stages.sft import run as run_sft
from tests.models.fixtures import checkpoint_layout
from tests.torchrun import torchrun

from .conftest import discriminator_dir, model_tensors
from .fsdp_stage_worker import scripted_generate

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
TIMING = {"seconds", "tokens_per_s"}


def _launch_fsdp(recipe: str, out: Path, stop: int, overrides: list[str], timeout: int = 300) -> None:
    worker = Path(__file__).with_name("fsdp_stage_worker.py")
    result = torchrun([str(worker), recipe, str(out), str(stop), *overrides], timeout=timeout)
    (out / f"stderr-stop{stop}.txt").write_text(result.stdout + result.stderr)  # the whole log
    assert result.returncode == 0, result.stderr[-3000:]


def sharded_state(checkpoint: Path, tmp_path: Path) -> dict:
    """A sharded checkpoint's model and optimizer as one plain dict ({"model": {name: tensor}, "optimizer":
    {"state": {name: {...}}, "param_groups": [...]}}), read in this single process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / SHARDED_DIR), str(target))
    return torch.load(target, weights_only=False)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _sft_overrides(world, policy_dir, per_device: int) -> list[str]:
    return ["model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32", "model.mixed_precision=no",
            f"data_files=[{world}/sft.json]", "max_length=512", f"per_device_batch_size={per_device}",
            "gradient_accumulation_steps=2", "max_steps=4", "optim.lr=3e-3", "optim.warmup_steps=1",
            "save_every_steps=2"]


@pytest.fixture(scope="module")
def fsdp_sft(world, policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-sft")
    _launch_fsdp("sft", out, stop=2, overrides=_sft_overrides(world, policy_dir, per_device=4))
    return out


def test_fsdp_resume_sft_checkpoints_shards_and_resumes_bit_identical(fsdp_sft, tmp_path):
    whole, cut = fsdp_sft / "whole", fsdp_sft / "cut"
    for run_dir in (whole, cut):
        assert (run_dir / "DONE").is_file()
        assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]
        shards = sorted(p.name for p in (latest_checkpoint(run_dir) / SHARDED_DIR).iterdir())
        assert ".metadata" in shards and len([s for s in shards if s.endswith(".distcp")]) == 2  # one per process
        assert torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=True)["optimizer"] is None
    ta, tb = model_tensors(whole / "model"), model_tensors(cut / "model")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _metrics(whole) == _metrics(cut)
    a, b = sharded_state(latest_checkpoint(whole), tmp_path), sharded_state(latest_checkpoint(cut), tmp_path)
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() == {k for k in a["model"] if k in state_a} and len(state_a) > 0
    for name in state_a:
        assert state_a[name].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(state_a[name][k], state_b[name][k]) for k in state_a[name]), name
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    # the final model/ folder holds the checkpoint's weights, gathered
    assert all(torch.equal(ta[k], checkpoint_layout(a["model"])[k]) for k in ta)


def test_fsdp_resume_sft_step_equals_one_process_on_the_same_global_batch(fsdp_sft, world, policy_dir, tmp_path):
    """Each of the 2 processes takes 4 of the 8 records of each micro-step; one process takes all 8."""
    one = run_sft(load_config(SFTConfig, overrides=[*_sft_overrides(world, policy_dir, per_device=8),
                                                    f"output_dir={tmp_path / 'one'}"]))
    two = fsdp_sft / "whole"
    for a, b in zip(_metrics(two), _metrics(one), strict=True):
        assert a["assistant_tokens"] == b["assistant_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    ta, tb = model_tensors(two / "model"), model_tensors(one / "model")
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-4) for k in ta)
    # AdamW state: the plain checkpoint's is keyed by position in the param groups, the sharded one's by name
    sharded = sharded_state(latest_checkpoint(two), tmp_path)["optimizer"]
    plain = torch.load(latest_checkpoint(one) / STATE_FILE, weights_only=True)["optimizer"]
    names = [name for group in sharded["param_groups"] for name in group["params"]]
    ids = [i for group in plain["param_groups"] for i in group["params"]]
    assert len(names) == len(ids) == len(sharded["state"]) == len(plain["state"])
    for name, i in zip(names, ids, strict=True):
        assert int(sharded["state"][name]["step"]) == int(plain["state"][i]["step"]) == 4
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sharded["state"][name][key], plain["state"][i][key], rtol=1e-3, atol=1e-7), (name, key)


def _rlvr_overrides(world, policy_dir) -> list[str]:
    return ["model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32", "model.mixed_precision=no",
            f"data_files=[{world}/rl.parquet]", "rollout.backend=hf", "rollout.prompts_per_step=2",
            "rollout.rollouts_per_prompt=4", "rollout.max_new_tokens=12", "update.micro_batch_size=4", "steps=4",
            "optim.lr=1e-2", "save_every_steps=2"]


def test_fsdp_resume_rlvr_resumes_bit_identical_and_steps_like_ddp(world, policy_dir, tmp_path):
    """RLVR on 2 processes (each process samples its own prompts with its own seed, so the reference is the same
    2-process run data-parallel, not one process): HF rollouts of the sharded policy, the policy update and the
    sharded checkpoints."""
    _launch_fsdp("rlvr", tmp_path, stop=2, overrides=_rlvr_overrides(world, policy_dir))
    _launch_fsdp("rlvr", tmp_path, stop=0, overrides=_rlvr_overrides(world, policy_dir))
    whole, cut, ddp = tmp_path / "whole", tmp_path / "cut", tmp_path / "ddp"
    assert (latest_checkpoint(whole) / SHARDED_DIR).is_dir() and not (latest_checkpoint(ddp) / SHARDED_DIR).exists()
    ta, tb = model_tensors(whole / "model"), model_tensors(cut / "model")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    timing = {"seconds_generate", "seconds_score", "seconds_update", "seconds_step", "rollout_tokens_per_s"}
    rows = {name: [{k: v for k, v in row.items() if k not in timing} for row in _metrics(folder)]
            for name, folder in (("whole", whole), ("cut", cut), ("ddp", ddp))}
    assert rows["whole"] == rows["cut"]
    a, b = sharded_state(latest_checkpoint(whole), tmp_path), sharded_state(latest_checkpoint(cut), tmp_path)
    for name, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][name][k]) for k in state), name
    for x, y in zip(rows["whole"], rows["ddp"], strict=True):
        assert x["reward"] == pytest.approx(y["reward"], rel=1e-6)  # the same rollouts
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    td = model_tensors(ddp / "model")
    assert ta.keys() == td.keys() and all(torch.allclose(ta[k], td[k], atol=1e-4) for k in ta)


def test_fsdp_resume_refuses_a_checkpoint_of_the_other_format(tmp_path):
    """A sharded checkpoint resumes only into a sharded model, a plain one only into a plain model."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from prism.runtime import RuntimeConfigError, save_checkpoint
    from prism.stages.common import prepare_and_resume

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    plain = SimpleNamespace(distributed_type=DistributedType.NO, prepare=lambda m, o: (m, o))
    fake = tmp_path / "sharded-run" / "checkpoints" / "step-000002"
    (fake / SHARDED_DIR).mkdir(parents=True)
    (fake / "checkpoint.json").write_text('{"step": 2, "format": "dcp", "files": {}}')
    with pytest.raises(RuntimeConfigError, match="written by an FSDP run"):
        prepare_and_resume(tmp_path / "sharded-run", plain, model, optimizer, None)

    save_checkpoint(tmp_path / "plain-run", 2, model_state=model.state_dict(), optimizer=optimizer)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, prepare=lambda m, o: (m, o))
    with pytest.raises(RuntimeConfigError, match="written by a non-FSDP run"):
        prepare_and_resume(tmp_path / "plain-run", fsdp, model, optimizer, None)
    model_again, _, restored = prepare_and_resume(tmp_path / "plain-run", plain, model, optimizer, None)
    assert model_again is model and restored["step"] == 2


def test_fsdp_resume_disc_warmup_shards_the_discriminator_whole_and_resumes_bit_identical(policy_dir, degraded_pairs,
                                                                                         tmp_path):
    """The discriminator as one FSDP2 unit (shard_whole): several forwards per backward (prompt prefill, teacher and
    student rows, both segment kinds) and the MoE router logits all reach it; its step equals the hand-averaged
    2-process step, and a run stopped after a checkpoint resumes bit-identical."""
    overrides = ["model.path=" + str(policy_dir), "model.preset=embedded-s", "model.dtype=float32",
                 "model.mixed_precision=no", f"data_files=[{degraded_pairs}]", "max_length=512", "max_steps=4",
                 "save_every_steps=2", "optim.lr=3e-3", "head_dropout=0.0", "expert_noise_std=0.002",
                 "heldout_fraction=0.2", "effective_batch_size=8", "micro_batch_size=4"]
    _launch_fsdp("disc_warmup", tmp_path, stop=2, overrides=overrides)
    _launch_fsdp("disc_warmup", tmp_path, stop=0, overrides=overrides)
    whole, cut, ddp = tmp_path / "whole", tmp_path / "cut", tmp_path / "ddp"
    assert (latest_checkpoint(whole) / SHARDED_DIR).is_dir() and not (latest_checkpoint(ddp) / SHARDED_DIR).exists()
    ta, tb, td = (model_tensors(folder / "model") for folder in (whole, cut, ddp))
    assert ta.keys() == tb.keys() == td.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _metrics(whole) == _metrics(cut)
    a, b = sharded_state(latest_checkpoint(whole), tmp_path), sharded_state(latest_checkpoint(cut), tmp_path)
    assert len(a["optimizer"]["state"]) > 0
    for name, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][name][k]) for k in state), name
    heads = [folder / "model" / HEAD_FILE for folder in (whole, cut, ddp)]
    assert all(h.is_file() for h in heads)
    for x, y in zip(_metrics(whole), _metrics(ddp), strict=True):
        assert x["bt_loss"] == pytest.approx(y["bt_loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
    assert all(torch.allclose(ta[k], td[k], atol=1e-4) for k in ta)
    held = [json.loads((folder / "heldout.json").read_text()) for folder in (whole, ddp)]
    assert held[0]["before"] == held[1]["before"]
    assert held[0]["after"]["heldout_pairs"] == held[1]["after"]["heldout_pairs"] > 0


def _align_overrides(world, policy_dir, disc_dir) -> list[str]:
    """4 prompts a step (2 a process), one prompt per discriminator and per policy micro-batch."""
    return ["model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32", "model.mixed_precision=no",
            "discriminator.preset=embedded-s", f"discriminator.path={disc_dir}", "discriminator.dtype=float32",
            "discriminator.mixed_precision=no", f"data_files=[{world}/teacher.parquet]", "rollout.backend=hf",
            "rollout.prompts_per_step=4", "rollout.rollouts_per_prompt=4", "update.micro_batch_size=4",
            "disc_micro_batch_size=4", "disc_max_length=512", "policy_optim.lr=1e-2", "disc_optim.lr=1e-3",
            "steps=2", "save_every_steps=1", "proxy_prompts=2"]


@pytest.fixture(scope="module")
def fsdp_align(world, policy_dir, tmp_path_factory):
    """(the launch's folder, the discriminator it started from): align under 2-process FSDP, rollouts scripted."""
    disc = discriminator_dir(policy_dir, tmp_path_factory.mktemp("disc") / "moe")
    spec = disc / SPEC_FILE  # no head dropout: one process and two draw other masks
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "head_dropout": 0.0}))
    out = tmp_path_factory.mktemp("fsdp-align")
    _launch_fsdp("align", out, stop=1, overrides=_align_overrides(world, policy_dir, disc))
    return out, disc


def _align_metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("seconds")} for row in _metrics(out)]


def test_fsdp_resume_align_checkpoints_both_models_in_one_and_resumes_bit_identical(fsdp_align, policy_dir,
                                                                                    tmp_path):
    """Policy (per decoder layer) and discriminator (one unit) sharded, one DCP folder holding both models and both
    AdamW states; the final model/ and discriminator/ folders gathered whole, as a plain run writes them."""
    out, disc = fsdp_align
    whole, cut = out / "whole", out / "cut"
    for run_dir in (whole, cut):
        assert (run_dir / "DONE").is_file()
        assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2]
        shards = sorted(p.name for p in (latest_checkpoint(run_dir) / SHARDED_DIR).iterdir())
        assert ".metadata" in shards and len([s for s in shards if s.endswith(".distcp")]) == 2  # one per process
        assert torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=True)["optimizer"] is None
    metadata = FileSystemReader(str(latest_checkpoint(whole) / SHARDED_DIR)).read_metadata().state_dict_metadata
    stored = {name: len(item.chunks) for name, item in metadata.items() if name.split(".")[1] == "model"}
    assert {name.split(".")[0] for name in stored} == {"policy", "discriminator"}
    assert set(stored.values()) == {2}  # every weight of both models in 2 shards, one per process
    a, b = sharded_state(latest_checkpoint(whole), tmp_path), sharded_state(latest_checkpoint(cut), tmp_path)
    assert a.keys() == b.keys() == {"policy", "discriminator"}
    for part in ("policy", "discriminator"):
        models = a[part]["model"], b[part]["model"]
        assert models[0].keys() == models[1].keys() and all(torch.equal(models[0][k], models[1][k]) for k in models[0])
        states = a[part]["optimizer"]["state"], b[part]["optimizer"]["state"]
        assert states[0].keys() == states[1].keys() and len(states[0]) > 0, part
        for name, state in states[0].items():
            assert state.keys() == {"step", "exp_avg", "exp_avg_sq"} and int(state["step"]) == 2, (part, name)
            assert all(torch.equal(state[k], states[1][name][k]) for k in state), (part, name)
    for folder in ("model", "discriminator"):
        ta, tb = model_tensors(whole / folder), model_tensors(cut / folder)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), folder
    heads = [load_file(str(run / "discriminator" / HEAD_FILE))["weight"] for run in (whole, cut)]
    assert torch.equal(*heads)
    assert _align_metrics(whole) == _align_metrics(cut) and len(_align_metrics(whole)) == 2
    proxies = [json.loads((run / "proxies.json").read_text()) for run in (whole, cut)]
    assert proxies[0] == proxies[1] and set(proxies[0]) == {"prompts", "teacher", "before", "after"}
    # the final folders hold the checkpoint's weights, gathered, in the layout of a plain run
    policy, discriminator = model_tensors(whole / "model"), model_tensors(whole / "discriminator")
    trained_policy, trained_discriminator = (checkpoint_layout(a[part]["model"]) for part in ("policy", "discriminator"))
    assert all(torch.equal(policy[k], trained_policy[k]) for k in policy)
    assert all(torch.equal(discriminator[k], trained_discriminator["backbone." + k]) for k in discriminator)
    assert torch.equal(heads[0], a["discriminator"]["model"]["head.weight"])
    assert discriminator.keys() == model_tensors(disc).keys()
    assert json.loads((whole / "discriminator" / SPEC_FILE).read_text()) == json.loads((disc / SPEC_FILE).read_text())
    for trained, started in ((policy, model_tensors(policy_dir)), (discriminator, model_tensors(disc))):
        assert any(not torch.equal(trained[k], started[k]) for k in trained)  # both models trained


def test_fsdp_resume_align_step_equals_one_process_on_the_same_global_batch(fsdp_align, world, policy_dir, tmp_path,
                                                                           monkeypatch):
    """Each of the 2 processes takes 2 of the step's 4 prompts (the same scripted rollouts for the same prompt); one
    process takes all 4. The discriminator's gradient is the mean over one-prompt micro-batches either way, the
    policy's the token-mean over the step's rollouts."""
    out, disc = fsdp_align
    monkeypatch.setattr(HFRolloutBackend, "generate", scripted_generate(HFRolloutBackend.generate))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): AdamW amplifies other float sums' noise
    try:
        one = run_align(load_config(AlignConfig, overrides=[*_align_overrides(world, policy_dir, disc),
                                                            f"output_dir={tmp_path / 'one'}"]))
    finally:
        torch.set_num_threads(threads)
    two = out / "whole"
    for a, b in zip(_align_metrics(two), _align_metrics(one), strict=True):
        assert a["disc_grad_norm"] == pytest.approx(b["disc_grad_norm"], rel=1e-4)
        assert a["policy_grad_norm"] == pytest.approx(b["policy_grad_norm"], rel=1e-4)
        assert a["disc_lr"] == b["disc_lr"] and a["policy_lr"] == b["policy_lr"]
    for folder in ("model", "discriminator"):
        ta, tb = model_tensors(two / folder), model_tensors(one / folder)
        assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-4) for k in ta), folder
    heads = [load_file(str(run / "discriminator" / HEAD_FILE))["weight"] for run in (two, one)]
    assert torch.allclose(*heads, atol=1e-4)
    assert json.loads((two / "proxies.json").read_text()) == json.loads((one / "proxies.json").read_text())
