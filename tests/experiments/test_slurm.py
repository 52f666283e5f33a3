"""SLURM preemption without a cluster: a matrix node's job checkpoints and requeues itself as the same node (submitit's
local executor plays SLURM's part), and its dependants keep their afterok dependency on its job id."""

import pickle
import subprocess
import sys

import pytest

submitit = pytest.importorskip("submitit")

import experiments.matrix as mx  # noqa: E402
from experiments.matrix import build_plan, load_matrix, run_slurm  # noqa: E402
from experiments.slurm import PREEMPTED_EXIT, NodeJob  # noqa: E402

# A stand-in for `prism train`: each start is counted; a run that finds no checkpoint waits for a preemption
# signal (or, with "self", preempts itself at once), "saves" and exits with PREEMPTED_EXIT; a run that finds the
# checkpoint finishes.
NODE = f"""
import pathlib, signal, sys, time
folder, how = pathlib.Path(sys.argv[1]), sys.argv[2]
with open(folder / "starts", "a") as f:
    f.write("start\\n")
if (folder / "checkpoint").exists():
    sys.exit(0)
def preempted(signum, frame):
    (folder / "checkpoint").write_text(signal.Signals(signum).name)
    sys.exit({PREEMPTED_EXIT})
signal.signal(signal.SIGTERM, preempted)
if how == "self":
    preempted(signal.SIGTERM, None)
(folder / "running").write_text("")
time.sleep(120)
"""


def test_the_wrapper_knows_the_stage_exit_status():
    from prism.runtime import PREEMPTED_EXIT as stage_status

    assert PREEMPTED_EXIT == stage_status


def _node(tmp_path, how: str) -> NodeJob:
    script = tmp_path / "node.py"
    script.write_text(NODE)
    return NodeJob([sys.executable, str(script), str(tmp_path), how], key="outputs/stages/sft-abc", grace_s=30)


def test_checkpoint_returns_a_delayed_submission_of_the_same_node(tmp_path):
    job = _node(tmp_path, "wait")
    delayed = job.checkpoint()  # nothing running: nothing to stop
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}
    delayed.dump(tmp_path / "requeued.pkl")  # what submitit stores for the requeued job
    again = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl").function
    assert isinstance(again, NodeJob)
    assert (again.command, again.key, again.grace_s) == (job.command, job.key, job.grace_s)


@pytest.mark.parametrize("how", ["wait", "self"])
def test_a_signalled_job_checkpoints_and_requeues_the_same_node(tmp_path, how):
    """'wait': submitit's warning signal (USR2, signal_delay_s before the time limit) reaches the job; checkpoint()
    stops the node with SIGTERM, it saves and exits, and the job requeues. 'self': the node stops on its own
    with PREEMPTED_EXIT (SLURM's preemption SIGTERM reached it first); the job requeues the same way. Either way
    the requeued job runs the same node again, which finds its checkpoint and finishes."""
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=1, signal_delay_s=54)  # the warning signal comes after 6 s
    job = executor.submit(_node(tmp_path, how))
    assert job.result() == "outputs/stages/sft-abc"
    assert (tmp_path / "starts").read_text().splitlines() == ["start", "start"]  # run, requeued, resumed
    assert (tmp_path / "checkpoint").read_text() == "SIGTERM"


def test_a_failing_node_fails_its_job(tmp_path):
    job = NodeJob([sys.executable, "-c", "raise SystemExit(3)"], key="k")
    with pytest.raises(subprocess.CalledProcessError):
        job()


def test_dependants_keep_their_afterok_dependency_on_a_requeued_job(tmp_path, monkeypatch):
    """run_slurm submits each node as a NodeJob with afterok on its upstream jobs' ids. A requeue keeps the id:
    submitit runs `scontrol requeue <this job's id>` (the job goes back to PENDING under the same id), so
    `afterok:<id>` holds until the resumed job completes with exit code 0."""
    monkeypatch.chdir(tmp_path)
    submitted = []

    class FakeExecutor:
        def __init__(self, folder):
            self.parameters = {}

        def update_parameters(self, **parameters):
            self.parameters.update(parameters)

        def submit(self, function):
            submitted.append((function, self.parameters))
            return type("Job", (), {"job_id": str(1000 + len(submitted))})()

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    plan = build_plan(load_matrix(mx.CONFIG_DIR / "table1.yaml"), "full")
    spec = plan.matrix.presets["full"].slurm
    job_ids = run_slurm(plan, log=lambda message: None)
    assert len(submitted) == len(plan.nodes)
    by_key = {function.key: (function, parameters) for function, parameters in submitted}
    for key, node in plan.nodes.items():
        function, parameters = by_key[key]
        assert isinstance(function, NodeJob) and function.command == mx._slurm_command(node, spec)
        assert parameters["slurm_signal_delay_s"] == spec.signal_delay_s
        deps = [job_ids[d] for d in node.deps if d in job_ids]
        assert parameters["slurm_additional_parameters"] == ({"dependency": "afterok:" + ":".join(deps)} if deps else {})

    # SFT is preempted: its checkpoint() resubmits the same node, and submitit requeues the job under its own id.
    sft = next(key for key, node in plan.nodes.items() if node.kind == "sft")
    requeued = pickle.loads(pickle.dumps(by_key[sft][0].checkpoint())).function
    assert (requeued.key, requeued.command) == (sft, by_key[sft][0].command)
    from submitit.slurm.slurm import SlurmJobEnvironment

    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda command, **kwargs: calls.append(command))
    monkeypatch.setenv("SLURM_JOB_ID", job_ids[sft])
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    SlurmJobEnvironment()._requeue(countdown=3)
    assert calls == [["scontrol", "requeue", job_ids[sft]]]
    dependants = [key for key, node in plan.nodes.items() if sft in node.deps]
    dependencies = [by_key[key][1]["slurm_additional_parameters"]["dependency"] for key in dependants]
    assert dependencies and all(job_ids[sft] in d.removeprefix("afterok:").split(":") for d in dependencies)
