"""A fork server for worker processes: one process imports torch, transformers and the stages once, and every node
forks from it instead of starting a fresh interpreter.

A fresh Python process spends about 4.5 s of CPU importing torch, transformers and lmms-eval before a node does any
work; a table of 39 nodes paid that 39 times, ~7% of its CPU time on the 2-core machine. A forked child has the
modules already and starts in ~0.1 s.

Linux only (the matrix starts nodes afresh elsewhere: macOS's system libraries are not fork-safe once loaded).
The server is started with the workers' environment (`prism.workers.worker_env`), because glibc and OpenMP read
theirs when the process starts and the library loads: every child inherits exactly what a fresh worker would
have read. It only imports; it never runs a torch operation, so no OpenMP or CUDA state exists to be forked (torch
resets its thread pools in a forked child, as DataLoader workers rely on).

Protocol, one JSON object a line: the server says {"ready"} once its imports are done (false with a CUDA or ROCm
build of torch: it then exits, and nodes start afresh); the driver writes {"id", "argv", "log"} to the server's
stdin; the server answers {"id", "pid"} once it has forked and {"pid", "exit"} once the child is reaped (`exit` as
Popen's returncode: the code, or minus the signal). The driver signals children itself (same user). Each child
runs `argv` as `python -m module ...` or `python script.py ...` would (runpy, as __main__), its stdout and stderr
appended to `log`. A killed driver takes the server with it (PR_SET_PDEATHSIG), and the server its children.

    server = ForkServer(env, preload=("torch", "prism.stages.sft"))
    child = server.start([sys.executable, "-m", "prism.cli", "train", "sft", "--config", path], log_path)
    child.poll(); child.terminate(); child.wait()
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def die_with_parent() -> None:
    """Linux's PR_SET_PDEATHSIG: this process is killed when its parent dies (a preexec_fn, or a forked child)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (AttributeError, OSError):  # not Linux: the child outlives a killed parent
        pass


def forkable(argv: Sequence[str]) -> bool:
    """A command the server can run in a fork: this interpreter with `-m module` or a script, and no other flags."""
    return (len(argv) >= 2 and argv[0] == sys.executable
            and ((argv[1] == "-m" and len(argv) >= 3) or (not argv[1].startswith("-") and argv[1].endswith(".py"))))


class ForkServer:
    """The driver's side: starts the server and forks nodes through it."""

    def __init__(self, env: Mapping[str, str], preload: Sequence[str] = ()):
        self._process = subprocess.Popen(
            [sys.executable, "-m", "prism.forkserver", *preload], env=dict(env), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, preexec_fn=die_with_parent if sys.platform == "linux" else None)
        self._ids = 0
        self._ready: bool | None = None  # whether it forks: told once its imports are done
        self._pids: dict[int, int] = {}  # request id -> pid
        self._exits: dict[int, int] = {}  # pid -> returncode
        self._buffer = b""

    def available(self) -> bool:
        """Whether the server forks nodes (waits for its imports): not with a CUDA or ROCm build of torch, where a
        device query at import would leave the children unable to use the GPU. Then nodes start afresh."""
        while self._ready is None:
            self._read(timeout=None)
        return self._ready

    def start(self, argv: Sequence[str], log: Path) -> ForkedProcess:
        if not forkable(argv):
            raise ValueError(f"not a command the fork server runs: {argv}")
        if not self.available():
            raise RuntimeError("this fork server does not fork (a GPU build of torch); start the node afresh")
        self._ids += 1
        request = {"id": self._ids, "argv": list(argv), "log": str(log)}
        self._process.stdin.write((json.dumps(request) + "\n").encode())
        self._process.stdin.flush()
        while self._ids not in self._pids:  # the first waits for the imports, as a fresh process would
            self._read(timeout=None)
        return ForkedProcess(self, self._pids.pop(self._ids))

    def returncode(self, pid: int, timeout: float | None = 0.0) -> int | None:
        while pid not in self._exits:
            if not self._read(timeout):
                return None
        return self._exits[pid]

    def _read(self, timeout: float | None) -> bool:
        """Read what the server wrote; False when nothing came within `timeout`."""
        stream = self._process.stdout
        if not select.select([stream], [], [], timeout)[0]:
            return False
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            raise RuntimeError(f"the fork server exited ({self._process.wait()}); its nodes are gone with it")
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "ready" in message:
                self._ready = message["ready"]
            elif "exit" in message:
                self._exits[message["pid"]] = message["exit"]
            else:
                self._pids[message["id"]] = message["pid"]
        return True

    def close(self) -> None:
        """Stop the server (its running children, if any, die with it)."""
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ForkedProcess:
    """A node forked by the server, with the parts of subprocess.Popen the launchers use."""

    def __init__(self, server: ForkServer, pid: int):
        self._server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.returncode(self.pid)
        return self.returncode

    def wait(self) -> int:
        while self.poll() is None:
            self.returncode = self._server.returncode(self.pid, timeout=None)
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # exited; the server reports it
                pass


# ----------------------------------------------------------------------------------------------------
# The server (python -m prism.forkserver MODULE...)
# ----------------------------------------------------------------------------------------------------


def serve(preload: Sequence[str]) -> None:
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the nodes and the driver, which stops them
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional backend: the node that needs it raises the error itself
            pass
    server_pid = os.getpid()
    requests, reply, pending = sys.stdin.fileno(), sys.stdout.buffer, b""

    def send(message: dict) -> None:
        reply.write((json.dumps(message) + "\n").encode())
        reply.flush()

    torch = sys.modules.get("torch")
    ready = torch is None or (torch.version.cuda is None and getattr(torch.version, "hip", None) is None)
    send({"ready": ready})
    if not ready:
        return

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            send({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})

    while True:
        readable = select.select([requests], [], [], 0.05)[0]
        reap()
        if not readable:
            continue
        chunk = os.read(requests, 65536)
        if not chunk:  # the driver closed us or is gone
            return
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request["argv"], request["log"], server_pid)  # never returns
            send({"id": request["id"], "pid": pid})


def _child(argv: list[str], log: str, server_pid: int) -> None:
    code = 1
    try:
        if sys.platform == "linux":
            die_with_parent()
            if os.getppid() != server_pid:  # the server died before the line above
                os._exit(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        import runpy

        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]  # runpy puts the module's file in argv[0]
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            runpy.run_path(argv[1], run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()  # what the interpreter's exit would run (logging's flush, trackers' finish)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


if __name__ == "__main__":
    serve(sys.argv[1:])
