"""A run killed at any moment and started again ends bit-identical to an uninterrupted one (on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from prism.runtime import latest_checkpoint, load_checkpoint
from prism.stages import rlvr, sft
from prism.stages.rlvr import run as run_rlvr
from prism.stages.sft import run as run_sft
from prism.workers import worker_env

from .conftest import interrupted_after, model_tensors
from .test_align import align_config, disc_dir  # noqa: F401  (fixture)
from .test_disc_warmup import warmup_config
from .test_rlvr import rlvr_config, varied_reward  # noqa: F401  (fixture)
from .test_sft import DEFAULT_PRECISION, sft_config, sft_overrides

TIMING = {"seconds", "tokens_per_s", "seconds_generate", "seconds_score", "seconds_update", "seconds_step",
          "rollout_tokens_per_s"}


def _metrics_without_timing(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _assert_same_run(a, b):
    ta, tb = model_tensors(a / "model"), model_tensors(b / "model")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _metrics_without_timing(a) == _metrics_without_timing(b)


def test_a_stage_in_a_process_that_set_its_thread_count_computes_what_a_fresh_process_does(world, policy_dir,
                                                                                           tmp_path):
    """torch.set_num_threads also turns MKL's per-call choice of threads off for good; every stage turns it off
    at its start, so an earlier setting in the process cannot change a stage's bits (on an Intel host it did)."""
    steps = ["max_steps=4", "per_device_batch_size=4", "gradient_accumulation_steps=1"]
    subprocess.run([sys.executable, "-m", "prism.cli", "train", "sft",
                    *sft_overrides(world, policy_dir, tmp_path / "fresh", *steps)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_num_threads(threads)
    _assert_same_run(tmp_path / "fresh", run_sft(sft_config(world, policy_dir, tmp_path / "here", *steps)))


def test_sft_killed_with_sigkill_resumes_bit_identical(world, policy_dir, tmp_path):
    steps = ["max_steps=24", "per_device_batch_size=2", "gradient_accumulation_steps=1"]
    whole = run_sft(sft_config(world, policy_dir, tmp_path / "whole", *steps))

    killed = tmp_path / "killed"
    args = sft_overrides(world, policy_dir, killed, *steps)  # the same config as `whole`, through the CLI
    process = subprocess.Popen([sys.executable, "-m", "prism.cli", "train", "sft", *args],
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


def _metrics_lines(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sft_preempted_with_sigterm_saves_the_current_step_and_resumes_bit_identical(world, policy_dir, tmp_path):
    """In a SLURM job, SIGTERM (SLURM's preemption signal, and what the matrix's submitit job sends its node) makes
    `prism train` finish the optimizer step it is in, save a checkpoint of that step (none is scheduled:
    save_every_steps=0) and exit with PREEMPTED_EXIT; run again, it resumes there and ends bit-identical to an
    uninterrupted run."""
    from prism.runtime import PREEMPTED_EXIT

    steps = ["max_steps=12", "per_device_batch_size=2", "gradient_accumulation_steps=1", "save_every_steps=0",
             "log_every_steps=1"]
    whole = run_sft(sft_config(world, policy_dir, tmp_path / "whole", *steps))

    cut = tmp_path / "preempted"
    args = sft_overrides(world, policy_dir, cut, *steps)  # the same config as `whole`, through the CLI
    env = {**os.environ, "SLURM_JOB_ID": "1001"}
    process = subprocess.Popen([sys.executable, "-m", "prism.cli", "train", "sft", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _metrics_lines(cut) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    signalled_after = _metrics_lines(cut)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT, stderr
    assert "preempted: saved a checkpoint at step" in stderr
    assert not (cut / "DONE").exists()
    checkpoints = sorted((cut / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1, "only the preemption saved"
    saved = load_checkpoint(checkpoints[0])["step"]
    assert signalled_after <= saved < 12  # the step in progress when the signal came, finished
    assert _metrics_lines(cut) == saved  # stopped right after saving

    resumed = run_sft(sft_config(world, policy_dir, cut, *steps))
    _assert_same_run(whole, resumed)


def test_sft_stopped_with_ctrl_c_says_so_in_one_line_and_resumes_bit_identical(world, policy_dir, tmp_path):
    """Ctrl-C (SIGINT) during `prism train sft` outside SLURM: exit 130 with one line saying how to resume, nothing
    half-written; run again, the stage continues from its last checkpoint and ends as an uninterrupted run."""
    # 30 steps: the signal, sent after the third, must land before the last (steps take ~50 ms here)
    steps = ["max_steps=30", "per_device_batch_size=2", "gradient_accumulation_steps=1", "save_every_steps=2",
             "log_every_steps=1"]
    whole = run_sft(sft_config(world, policy_dir, tmp_path / "whole", *steps))

    cut = tmp_path / "interrupted"
    args = sft_overrides(world, policy_dir, cut, *steps)  # the same config as `whole`, through the CLI
    env = dict(os.environ)
    for name in ("SLURM_JOB_ID", "SUBMITIT_EXECUTOR"):
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "-m", "prism.cli", "train", "sft", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _metrics_lines(cut) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "\r" not in line and "%|" not in line]
    assert lines[-1] == f"prism: interrupted; run the same command again to resume sft in {cut}", stderr
    assert "Traceback" not in stderr and not (cut / "DONE").exists()
    assert not list((cut / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left"
    assert (cut / "checkpoints").is_dir() and list((cut / "checkpoints").glob("step-*"))

    resumed = run_sft(sft_config(world, policy_dir, cut, *steps))
    _assert_same_run(whole, resumed)

@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_saved_step(world, policy_dir, tmp_path):
    """Under torchrun (2 CPU processes, gloo) only rank 1 is signalled: the flag is all-reduced after each step, so
    both processes save the same step and stop; run again, the stage resumes there and finishes."""
    psutil = pytest.importorskip("psutil")
    from prism.runtime import list_checkpoints
    from tests.torchrun import free_port

    out = tmp_path / "ddp"
    args = [f"model.path={policy_dir}", "model.preset=embedded-s", "model.dtype=float32", "model.mixed_precision=no",
            f"data_files=[{world}/sft.json]", "max_length=512", "optim.lr=3e-3", "max_steps=10",
            "per_device_batch_size=1", "gradient_accumulation_steps=1", "save_every_steps=0", "log_every_steps=1",
            f"output_dir={out}"]

    def launch():
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "-m", "prism.cli", "train", "sft", *args]
        env = worker_env(1, shares_cores=True)  # two processes, one core each
        for name in ("SLURM_JOB_ID", "SUBMITIT_EXECUTOR"):
            env.pop(name, None)
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    process = launch()
    deadline = time.monotonic() + 180
    while _metrics_lines(out) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1, "rank 1 not found"
    workers[0].send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode != 0 and stderr.count("preempted: saved a checkpoint at step") == 2, stderr[-3000:]
    assert not (out / "DONE").exists()
    saved = [step for step, _ in list_checkpoints(out)]
    assert len(saved) == 1 and 2 <= saved[0] < 10 and _metrics_lines(out) == saved[0]

    process = launch()
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11)) and (out / "DONE").exists()


def test_sigterm_is_a_preemption_signal_only_in_a_slurm_or_submitit_job(monkeypatch):
    from prism.runtime import preemption_signal_names

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert preemption_signal_names() == ("SIGUSR1", "SIGUSR2")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert preemption_signal_names() == ("SIGUSR1", "SIGUSR2", "SIGTERM")
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert preemption_signal_names() == ("SIGUSR1", "SIGUSR2", "SIGTERM")


def test_preemption_signals_only_set_a_flag_and_restore_the_handlers():
    from prism.runtime import preemption_requested, preemption_signals

    before = signal.getsignal(signal.SIGUSR1)
    with preemption_signals(("SIGUSR1",)):
        assert not preemption_requested()
        signal.raise_signal(signal.SIGUSR1)
        assert preemption_requested()
    assert signal.getsignal(signal.SIGUSR1) is before and not preemption_requested()


def _stops_after_its_first_step(recipe, cfg):
    """The signal arrives while the stage is loading: it trains one step, saves it (no checkpoint is scheduled:
    save_every_steps=0) and raises StagePreempted."""
    from prism.runtime import StagePreempted, list_checkpoints, preemption_signals

    with preemption_signals(("SIGUSR1",)):
        signal.raise_signal(signal.SIGUSR1)
        with pytest.raises(StagePreempted) as stopped:
            recipe(cfg)
    assert stopped.value.step == 1
    assert [step for step, _ in list_checkpoints(cfg.output_dir)] == [1]
    assert not (stopped.value.run_dir / "DONE").exists()
    assert [json.loads(line)["step"] for line in (stopped.value.run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


def test_disc_warmup_saves_and_stops_on_a_preemption_signal(world, policy_dir, tmp_path, scripted_rollouts):
    from prism.stages.disc_warmup import run

    _stops_after_its_first_step(run, warmup_config(world, policy_dir, tmp_path / "w", "save_every_steps=0"))


def test_align_saves_and_stops_on_a_preemption_signal(world, policy_dir, disc_dir, tmp_path,  # noqa: F811
                                                      scripted_rollouts):
    from prism.stages.align import run

    _stops_after_its_first_step(run, align_config(world, policy_dir, disc_dir, tmp_path / "a", "save_every_steps=0",
                                                  "proxy_prompts=0"))


def test_rlvr_saves_and_stops_on_a_preemption_signal(world, policy_dir, tmp_path, varied_reward):  # noqa: F811
    _stops_after_its_first_step(run_rlvr, rlvr_config(world, policy_dir, tmp_path / "r", "save_every_steps=0"))


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


def test_compiled_sft_interrupted_after_a_checkpoint_resumes_bit_identical(world, policy_dir, tmp_path, monkeypatch):
    """torch_compile: the resumed process compiles its blocks afresh and still ends on the uninterrupted run's bits."""
    steps = ["torch_compile=true", "per_device_batch_size=2", "gradient_accumulation_steps=1", "max_steps=4",
             "save_every_steps=2"]
    whole = run_sft(sft_config(world, policy_dir, tmp_path / "whole", *steps))

    with interrupted_after(monkeypatch, sft, step=2):
        run_sft(sft_config(world, policy_dir, tmp_path / "cut", *steps))
    torch._dynamo.reset()  # as a new process would: nothing compiled in memory
    torch.manual_seed(12345)
    resumed = run_sft(sft_config(world, policy_dir, tmp_path / "cut", *steps))
    _assert_same_run(whole, resumed)
