"""The data-parallel path: 2 CPU processes (gloo, via torchrun) train like 1 process on the same global batch."""

import json
import subprocess
import sys

import pytest
import torch

from prism.workers import worker_env
from tests.torchrun import torchrun

from .conftest import model_tensors


def _launch(stage, args, out, processes, timeout):
    """`prism train STAGE` under torchrun (gloo) with `processes` processes, or plainly for 1; its metrics."""
    command = ["-m", "prism.cli", "train", stage, *args]
    if processes > 1:
        result = torchrun(command, processes=processes, timeout=timeout)
    else:
        env = worker_env(1, shares_cores=False)
        result = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(world, policy_dir, out, processes, per_device):
    args = [f"model.path={policy_dir}", "model.preset=embedded-s", "model.dtype=float32", "model.mixed_precision=no",
            f"data_files=[{world}/sft.json]", "max_length=512", "max_steps=3", "optim.lr=3e-3",
            f"per_device_batch_size={per_device}", "gradient_accumulation_steps=2", f"output_dir={out}"]
    return _launch("sft", args, out, processes, timeout=120)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_two_processes_equal_one_on_the_same_global_batch(world, policy_dir, tmp_path):
    two = _train(world, policy_dir, tmp_path / "two", processes=2, per_device=4)
    one = _train(world, policy_dir, tmp_path / "one", processes=1, per_device=8)
    for a, b in zip(two, one):
        assert a["assistant_tokens"] == b["assistant_tokens"]  # the same records, split over the processes
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["extra"]["processes"] == 2
    ta, tb = model_tensors(tmp_path / "two" / "model"), model_tensors(tmp_path / "one" / "model")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-4) for k in ta)


def _warmup(policy_dir, pairs, out, processes, micro):
    args = [f"model.path={policy_dir}", "model.preset=embedded-s", "model.dtype=float32", "model.mixed_precision=no",
            f"data_files=[{pairs}]", "max_length=512", "max_steps=3", "optim.lr=1e-3", "head_dropout=0.0",
            "expert_noise_std=0.002", "heldout_fraction=0.0", "effective_batch_size=8",
            f"micro_batch_size={micro}", f"output_dir={out}"]
    return _launch("disc_warmup", args, out, processes, timeout=180)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_discriminator_warmup_on_two_processes_equals_one(policy_dir, degraded_pairs, tmp_path):
    """The discriminator has no DDP wrapper (several forwards per backward, unused experts): its gradients are
    averaged by hand, which must give one process's step on the same global batch."""
    two = _warmup(policy_dir, degraded_pairs, tmp_path / "two", processes=2, micro=4)
    one = _warmup(policy_dir, degraded_pairs, tmp_path / "one", processes=1, micro=4)
    assert two[0]["bt_loss"] == pytest.approx(one[0]["bt_loss"], rel=1e-6)  # the same pairs, split in two
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-5)  # the averaged gradient
    # Later steps: float32 sums in another order, amplified by Adam on near-zero expert gradients (a flipped sign
    # moves a weight by 2 x lr: at lr 3e-3 the third step's loss differed by 4.5%), nothing more.
    for a, b in zip(two, one, strict=True):
        assert a["bt_loss"] == pytest.approx(b["bt_loss"], rel=1e-3)
        assert a["accuracy_reasoning"] == b["accuracy_reasoning"]
