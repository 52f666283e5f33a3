"""The environment of a worker process (a matrix node, a sweep worker) that runs beside others on shared cores.

Kept free of torch, so that the matrix and sweep drivers, which only start processes, do not load it."""

from __future__ import annotations

import os
from collections.abc import Mapping

# glibc hands freed blocks above its (moving) mmap threshold, and any free heap top above its trim threshold, back to
# the kernel, and the next step faults them in again page by page. A tiny model's SFT step frees and reallocates
# tensors of 1-16 MiB dozens of times: 12k-93k page faults a step, 4-12% of the step in system time on these VMs
# (README, "Throughput on this machine"). Blocks up to 32 MiB (glibc's ceiling) stay in the heap, which is trimmed
# only past 1 GiB.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def worker_env(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker process (a matrix node, a sweep worker) that may run beside others: `threads`
    OpenMP/MKL threads that sleep when idle, and the allocator settings above unless `base` (default: this
    process's environment) sets its own. glibc and OpenMP read these at process start, hence the environment."""
    base = os.environ if base is None else base
    return {**ALLOCATOR_ENV, **base, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads)}
