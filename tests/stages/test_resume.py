"""A run killed at any moment and started again ends bit-identical to an uninterrupted one (on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from prism.runtime import latest_checkpoint, load_checkpoint
from prism.stages import rlvr, sft
from prism.stages.rlvr import run as run_rlvr
from prism.stages.sft import run as run_sft

from .conftest import interrupted_after, model_tensors
from .test_rlvr import rlvr_config, varied_reward  # noqa: F401  (fixture)
from .test_sft import DEFAULT_PRECISION, sft_config

TIMING = {"seconds", "tokens_per_s", "seconds_generate", "seconds_score", "seconds_update", "seconds_step",
          "rollout_tokens_per_s"}


def _metrics_without_timing(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _assert_same_run(a, b):
    ta, tb = model_tensors(a / "model"), model_tensors(b / "model")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _metrics_without_timing(a) == _metrics_without_timing(b)


def test_sft_killed_with_sigkill_resumes_bit_identical(world, policy_dir, tmp_path):
    steps = ["max_steps=24", "per_device_batch_size=2", "gradient_accumulation_steps=1"]
    whole = run_sft(sft_config(world, policy_dir, tmp_path / "whole", *steps))

    killed = tmp_path / "killed"
    args = [f"model.path={policy_dir}", "model.preset=embedded-s", "model.dtype=float32", "model.mixed_precision=no",
            f"data_files=[{world}/sft.json]", "max_length=512", "optim.lr=3e-3", "optim.warmup_steps=1",
            f"output_dir={killed}", "save_every_steps=2", *steps]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen([sys.executable, "-m", "prism.cli", "train", "sft", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while latest_checkpoint(killed) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "DONE").exists(), "the run finished before it could be killed"
    reached = latest_checkpoint(killed)
    assert reached is not None and reached.name < "step-000024"

    resumed = run_sft(sft_config(world, policy_dir, killed, *steps))
    _assert_same_run(whole, resumed)



def test_rlvr_interrupted_after_a_checkpoint_resumes_bit_identical(world, policy_dir, tmp_path, monkeypatch,
                                                                   varied_reward):  # noqa: F811
    steps = ["steps=4", "save_every_steps=2", "algorithm=dapo", "max_num_gen_batches=3",
             "on_underfilled_batch=partial"]
    whole = run_rlvr(rlvr_config(world, policy_dir, tmp_path / "whole", *steps))

    with interrupted_after(monkeypatch, rlvr, step=2):
        run_rlvr(rlvr_config(world, policy_dir, tmp_path / "cut", *steps))
    torch.manual_seed(12345)  # the process's RNG moved on meanwhile: the checkpoint must restore it
    resumed = run_rlvr(rlvr_config(world, policy_dir, tmp_path / "cut", *steps))
    _assert_same_run(whole, resumed)


def test_lost_update_resume_under_mixed_precision_restores_fp32_master_weights_exactly(world, policy_dir, tmp_path,
                                                                                       monkeypatch):
    """Checkpoints keep the float32 master weights and AdamW state (never their bf16 compute copies), so a run
    resumed under the default mixed precision ends bit-identical to an uninterrupted one."""
    steps = [*DEFAULT_PRECISION, "per_device_batch_size=1", "gradient_accumulation_steps=1", "max_steps=4",
             "save_every_steps=2"]
    assert sft_config(world, policy_dir, tmp_path, *steps).model.autocast_dtype == "bfloat16"
    whole = run_sft(sft_config(world, policy_dir, tmp_path / "whole", *steps))

    with interrupted_after(monkeypatch, sft, step=2):
        run_sft(sft_config(world, policy_dir, tmp_path / "cut", *steps))
    state = load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    assert {t.dtype for t in state["model_state"].values()} == {torch.float32}
    adam = [s[k] for s in state["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq")]
    assert adam and {t.dtype for t in adam} == {torch.float32}
    torch.manual_seed(12345)  # the process's RNG moved on meanwhile: the checkpoint must restore it
    resumed = run_sft(sft_config(world, policy_dir, tmp_path / "cut", *steps))
    _assert_same_run(whole, resumed)
