"""Launch a script or module under torchrun with N CPU processes (gloo), as the multi-process tests do."""

import socket
import subprocess
import sys

from prism.workers import worker_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], processes: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node N ARGS` on a free port, one thread per process
    (two processes share the two cores), output captured. `args` start with a script path or `-m module`."""
    env = worker_env(1, shares_cores=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), *args]
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)
