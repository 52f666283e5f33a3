"""The environment of a worker process (a matrix node, a sweep worker): threads, OpenMP wait policy, allocator.

Kept free of torch, so that the matrix and sweep drivers, which only start processes, do not load it."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# glibc hands freed blocks above its (moving) mmap threshold, and any free heap top above its trim threshold, back to
# the kernel, and the next step faults them in again page by page. A tiny model's SFT step frees and reallocates
# tensors of 1-16 MiB dozens of times: 12k-93k page faults a step, 4-12% of the step in system time on these VMs
# (README, "Throughput on this machine"). Blocks up to 32 MiB (the most glibc's own moving threshold reaches) stay in
# the heap, which is trimmed only past 1 GiB. A higher threshold is accepted but bought nothing measured: with 256 MiB
# our side of `bench-rlvr`'s M step faulted as often (README, "Throughput on this machine").
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def restart_under_allocator_env() -> None:
    """Start this program again in this process (`os.execv`: the same pid, arguments and open files) with the
    allocator settings above, when its environment sets neither: a `prism` command or a benchmark started outside
    `just`, a matrix node or a sweep worker would otherwise run on glibc's defaults, which it reads only at start.
    M's RLVR update, started so, faulted in about 145,000 pages (570 MB) an update, none with the settings (README,
    "Throughput on this machine"). Linux with glibc only; call it before importing torch, so that the restart costs
    only the interpreter's start."""
    if sys.platform != "linux" or not sys.executable or any(name in os.environ for name in ALLOCATOR_ENV):
        return
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # glibc's, absent elsewhere (musl)
    except (ValueError, OSError):
        return
    os.environ.update(ALLOCATOR_ENV)  # the processes this one starts get them either way
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # the settings only make it faster: carry on without them
        return


def available_cores() -> int:
    """The cores this process may run on: its affinity mask (a SLURM allocation, a container's or `taskset`'s CPU
    limit), which can be fewer than the machine's `os.cpu_count()`. Workers' threads are shares of this."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_env(threads: int, *, shares_cores: bool, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker process (a matrix node, a sweep worker): `threads` OpenMP/MKL threads and the
    allocator settings above unless `base` (default: this process's environment) sets its own. glibc and OpenMP
    read these at process start, hence the environment.

    OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE) only in a worker that `shares_cores` with others: there a
    spinning thread takes a core from its neighbour (two 2-thread processes at once ran 1.9x slower with libgomp's
    default spin than with PASSIVE here). A worker alone on the cores keeps the default, short spin: waking a
    sleeping thread costs about 200 us on these VMs, so a tiny model's 64 x 128 x 256 matmul took 252 us at 2
    threads under PASSIVE against 42 us spinning, and an RLVR step of embedded-s 1.74-2.11 s against 1.17-1.40 s
    (README, "Throughput on this machine"). A policy `base` names is kept either way."""
    base = os.environ if base is None else base
    env = {**ALLOCATOR_ENV, **base, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if shares_cores:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env
