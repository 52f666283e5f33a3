"""The fork server: nodes fork from one process that imported the heavy modules, with its environment, their
output in their logs and their exit codes as Popen gives them."""

import os
import sys
import textwrap
import time

import pytest

from prism.forkserver import ForkServer, forkable

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the matrix forks nodes on Linux only")

SCRIPT = textwrap.dedent("""
    import atexit, json, os, pathlib, sys
    out = pathlib.Path(sys.argv[1])
    atexit.register(lambda: (out.parent / (out.name + ".atexit")).write_text("ran"))
    print("working", flush=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "name": __name__, "pid": os.getpid(),
                               "preloaded": "xml.dom.minidom" in sys.modules, "mark": os.environ.get("FORK_MARK")}))
    mode = sys.argv[2]
    if mode == "exit3":
        sys.exit(3)
    if mode == "raise":
        raise ValueError("a node's own error")
    if mode == "message":
        sys.exit("stopped: bad config")
    if mode == "sleep":
        import time
        time.sleep(60)
""")


@pytest.fixture
def server():
    with ForkServer({**os.environ, "FORK_MARK": "from the server"}, preload=("xml.dom.minidom",)) as forks:
        yield forks


def run(server, tmp_path, mode: str, name: str = "out.json"):
    script = tmp_path / "node.py"
    script.write_text(SCRIPT)
    child = server.start([sys.executable, str(script), str(tmp_path / name), mode], tmp_path / f"{name}.log")
    return child, child.wait()


def test_a_node_runs_as_a_script_would_with_the_servers_modules_and_environment(server, tmp_path):
    import json

    child, code = run(server, tmp_path, "ok")
    assert code == 0
    seen = json.loads((tmp_path / "out.json").read_text())
    assert seen["argv"] == [str(tmp_path / "out.json"), "ok"] and seen["name"] == "__main__"
    assert seen["pid"] == child.pid != os.getpid()
    assert seen["preloaded"] is True  # imported by the server, not by the node
    assert seen["mark"] == "from the server"  # the server's environment, not the driver's
    assert "FORK_MARK" not in os.environ
    assert (tmp_path / "out.json.log").read_text() == "working\n"  # output appended to the node's log
    assert (tmp_path / "out.json.atexit").read_text() == "ran"  # exit handlers run as at interpreter exit


def test_exit_codes_are_popens(server, tmp_path):
    assert run(server, tmp_path, "exit3", "a")[1] == 3
    child, code = run(server, tmp_path, "raise", "b")
    assert code == 1 and "ValueError: a node's own error" in (tmp_path / "b.log").read_text()
    child, code = run(server, tmp_path, "message", "c")
    assert code == 1 and "stopped: bad config" in (tmp_path / "c.log").read_text()


def test_a_terminated_node_reports_the_signal(server, tmp_path):
    script = tmp_path / "node.py"
    script.write_text(SCRIPT)
    child = server.start([sys.executable, str(script), str(tmp_path / "s"), "sleep"], tmp_path / "s.log")
    deadline = time.monotonic() + 30
    while not (tmp_path / "s").exists():
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.02)
    child.terminate()
    assert child.wait() == -15 and child.poll() == -15


def test_modules_run_with_dash_m(server, tmp_path):
    child = server.start([sys.executable, "-m", "json.tool", "--help"], tmp_path / "m.log")
    assert child.wait() == 0 and "usage:" in (tmp_path / "m.log").read_text()


def test_only_this_interpreters_plain_commands_fork():
    assert forkable([sys.executable, "-m", "prism.cli", "train", "sft"])
    assert forkable([sys.executable, "node.py", "x"])
    assert not forkable([sys.executable, "-X", "importtime", "node.py"])  # interpreter flags need a fresh process
    assert not forkable(["accelerate", "launch", "-m", "prism.cli"])
    assert not forkable([sys.executable, "-m"])
    with ForkServer(os.environ) as forks, pytest.raises(ValueError, match="not a command the fork server runs"):
        forks.start(["accelerate", "launch"], "log")


def test_a_gpu_build_of_torch_does_not_fork(tmp_path):
    """A device query at import would leave forked children without the GPU: the server declines."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("class version:\n    cuda = '12.4'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    with ForkServer(env, preload=("torch",)) as forks:
        assert forks.available() is False
        with pytest.raises(RuntimeError, match="start the node afresh"):
            forks.start([sys.executable, "-m", "json.tool", "--help"], tmp_path / "log")
