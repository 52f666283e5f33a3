import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from prism.workers import ALLOCATOR_ENV, available_cores, restart_under_allocator_env, worker_env

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")


def without_allocator_settings() -> dict[str, str]:
    """This process's environment without glibc's MALLOC_* settings, as a shell that never set them has it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


# Six 8 MiB blocks written and freed, ten times: the page faults of the last nine rounds.
FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def round_():
    blocks = [libc.malloc(8 << 20) for _ in range(6)]
    for block in blocks:
        ctypes.memset(block, 1, 8 << 20)
    for block in blocks:
        libc.free(block)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity masks (Linux)")
def test_available_cores_are_the_affinity_mask_not_the_machines_count():
    child = ("import os; from prism.workers import available_cores; "
             "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(available_cores(), os.cpu_count())")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", str(os.cpu_count())]  # as under `taskset -c 0` or a one-CPU SLURM step
    assert available_cores() == len(os.sched_getaffinity(0))


def test_worker_env_sets_threads_and_keeps_the_users_allocator_settings():
    base = {"PATH": "/bin", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "16"}
    env = worker_env(3, shares_cores=True, base=base)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "0"  # the user's own choice wins
    assert env["MALLOC_MMAP_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["PATH"] == "/bin"


def test_idle_threads_sleep_only_in_a_worker_that_shares_the_cores():
    assert worker_env(1, shares_cores=True, base={})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in worker_env(2, shares_cores=False, base={})  # libgomp's default spin
    for shares_cores in (True, False):  # a policy the user set is kept either way
        env = worker_env(2, shares_cores=shares_cores, base={"OMP_WAIT_POLICY": "ACTIVE"})
        assert env["OMP_WAIT_POLICY"] == "ACTIVE"


@glibc_only
def test_the_allocator_settings_stop_freed_blocks_from_being_faulted_in_again():
    plain = without_allocator_settings()

    def faults(env) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
        return int(done.stdout)

    untuned, tuned = faults(plain), faults(worker_env(1, shares_cores=True, base=plain))
    pages = 9 * 6 * (8 << 20) // 4096
    assert untuned > pages // 2  # glibc trims the freed 48 MiB and faults it in again every round
    assert tuned < pages // 50


def test_the_justfile_exports_the_same_allocator_settings_and_no_wait_policy():
    justfile = (Path(__file__).parents[1] / "Justfile").read_text()
    for name, value in ALLOCATOR_ENV.items():
        assert f'export {name} := env_var_or_default("{name}", "{value}")' in justfile
    assert "OMP_WAIT_POLICY" not in justfile  # a recipe runs alone; the harness sets it where processes share


RESTART = """
import os
print(os.getpid(), os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_"), flush=True)
from prism.workers import restart_under_allocator_env
restart_under_allocator_env()
print("ran")
"""


@glibc_only
def test_a_process_started_without_the_allocator_settings_restarts_itself_once_under_them():
    plain = without_allocator_settings()

    def lines(env) -> list[list[str]]:
        done = subprocess.run([sys.executable, "-c", RESTART], env=env, capture_output=True, text=True, check=True)
        return [line.split() for line in done.stdout.splitlines()]

    first, again, ran = lines(plain)
    assert first[0] == again[0]  # the same process, started again
    assert first[1:] == ["None", "None"]
    assert again[1:] == [ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"], ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]]
    assert ran == ["ran"]
    # a value the user set is theirs: no restart, and nothing added
    only, ran = lines({**plain, "MALLOC_TRIM_THRESHOLD_": "0"})
    assert only[1:] == ["None", "0"] and ran == ["ran"]


@glibc_only
def test_a_restart_that_cannot_start_carries_on_without_the_settings(monkeypatch):
    monkeypatch.setattr(os, "environ", without_allocator_settings())
    tried = []

    def refused(path, args):
        tried.append(path)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "execv", refused)
    restart_under_allocator_env()  # returns instead of raising
    assert tried == [sys.executable]
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]  # for the processes it starts
