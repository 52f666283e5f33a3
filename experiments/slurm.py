"""One matrix node as a SLURM job that survives preemption: submitit's checkpoint-and-requeue around the node's command.

submitit (1.5) starts every job with a handler for its warning signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says
otherwise; sbatch `--signal=USR2@<slurm_signal_delay_s>`, so SLURM sends it that long before the time limit) and
ignores SIGTERM. On the warning signal it calls the job's `checkpoint()`, stores the DelayedSubmission that returns
as the job's new pickle, runs `scontrol requeue <job id>` and exits (submitit/core/job_environment.py,
SignalHandler.checkpoint_and_try_requeue; submitit/slurm/slurm.py, SlurmJobEnvironment._requeue). A requeued job
keeps its job id and goes back to PENDING, so the matrix's dependants, submitted with `afterok:<that id>`, keep
waiting until it ends with exit code 0.

`NodeJob.checkpoint()` asks the node's process to stop (SIGTERM; `prism train` then saves a checkpoint at the end of
its current optimizer step and exits with PREEMPTED_EXIT, see prism.runtime.preemption_signals), waits for it, and
resubmits the same node: the requeued job runs the same command, which resumes from that checkpoint (the stage
directory is content-addressed and a finished stage, DONE, is never run again, so rerunning a node is safe).
A node that stops with PREEMPTED_EXIT on its own (SLURM's preemption SIGTERM reached it first) is requeued the same
way: the job raises submitit's warning signal on itself.

Preemption: SLURM sends the warning signal on preemption only where the cluster sets
`SlurmctldParameters=preempt_send_user_signal` (submitit's docs/checkpointing.md); elsewhere a preempted job gets
SIGTERM, which a single-process node answers with PREEMPTED_EXIT as above (under `accelerate launch` the launcher
exits with its own status, so such a job fails instead; it resumes from its checkpoint when submitted again).
submitit requeues a job any number of times after preemption, and at most `slurm_max_num_timeout` times (default
3) after reaching its time limit.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from typing import Any

import submitit

# prism.runtime.PREEMPTED_EXIT, `prism train`'s exit status when preempted (tests/experiments/test_slurm.py checks
# they agree); not imported, since prism.runtime loads torch and this wrapper process should start light and fast.
PREEMPTED_EXIT = 75


class NodePreempted(RuntimeError):
    """The node's process stopped on a preemption signal and no submitit handler was there to requeue the job."""


class NodeJob(submitit.helpers.Checkpointable):
    """Run one node's command (stdout and stderr into the job's log); checkpointable: see the module docstring.
    `grace_s`: how long checkpoint() waits for the process to save and exit before killing it (the requeued job
    then resumes from the newest complete checkpoint, which is never a half-written one)."""

    def __init__(self, command: list[str], key: str, grace_s: float = 60.0) -> None:
        self.command, self.key, self.grace_s = list(command), key, grace_s
        self._process: subprocess.Popen | None = None
        self._exited = threading.Event()

    def __getstate__(self) -> dict[str, Any]:  # pickled by submitit: the node, not the running process
        return {"command": self.command, "key": self.key, "grace_s": self.grace_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self) -> str:
        self._exited.clear()
        self._process = process = subprocess.Popen(self.command)
        # Wait in a thread: submitit's signal handler runs checkpoint() in this (main) thread, which must be free
        # to wait for the process too (Popen.wait cannot be re-entered from a signal handler).
        threading.Thread(target=lambda: (process.wait(), self._exited.set()), daemon=True).start()
        while not self._exited.wait(1.0):
            pass
        if process.returncode == PREEMPTED_EXIT:
            warning = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
            if callable(signal.getsignal(warning)):  # submitit's handler: checkpoint(), requeue, exit
                signal.raise_signal(warning)
            raise NodePreempted(f"{self.key}: stopped on a preemption signal (exit {PREEMPTED_EXIT}); its checkpoint "
                                "is saved, run it again to resume")
        if process.returncode != 0:
            raise subprocess.CalledProcessError(process.returncode, self.command)
        return self.key

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Stop the running command at a checkpoint (SIGTERM, then SIGKILL after grace_s), then requeue this node."""
        process = self._process
        if process is not None and not self._exited.is_set():
            process.send_signal(signal.SIGTERM)
            if not self._exited.wait(self.grace_s):
                process.kill()
                self._exited.wait(10.0)
        return super().checkpoint(*args, **kwargs)
