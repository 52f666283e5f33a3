"""The local launcher with --jobs N: independent ready nodes at once, threads split, logs per node, failures
stop the run, and a killed launcher leaves no node behind and resumes (nodes stand in for stages: tiny scripts)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from experiments.matrix import (
    MatrixError,
    Node,
    Plan,
    critical_path_seconds,
    exclusive_nodes,
    nodes_to_start,
    run_parallel,
    seconds_left,
)

# A node: records its start, sleeps, fails when asked, writes its done marker (the key) last.
NODE = textwrap.dedent("""
    import json, os, pathlib, sys, time
    key, seconds, code = pathlib.Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    with open(key.parent / "events.jsonl", "a") as f:
        f.write(json.dumps({"node": key.name, "start": time.time(), "pid": os.getpid(), "parent": os.getppid(),
                            "threads": os.environ["OMP_NUM_THREADS"]}) + "\\n")
    print("working on", key.name, flush=True)
    time.sleep(seconds)
    if code:
        sys.exit(code)
    key.write_text(json.dumps({"end": time.time()}))
""")


def fake_plan(root: Path, edges: dict[str, list[str]], seconds: float = 0.6, fail: str | None = None,
              alone: tuple[str, ...] = ()) -> Plan:
    script = root / "node.py"
    script.write_text(NODE)
    nodes = {}
    for name, deps in edges.items():  # insertion order is topological
        key = str(root / name)
        command = [sys.executable, str(script), key, str(seconds), "3" if name == fail else "0"]
        nodes[key] = Node("eval", key, command, [str(root / d) for d in deps], done_marker=Path(key),
                          run_alone=name in alone)
    return Plan(matrix=None, preset_name="test", nodes=nodes, cells=[])


def events(root: Path) -> list[dict]:
    path = root / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def alive(pid: int) -> bool:
    """Running or sleeping; a killed process whose parent is gone may stay a zombie (state Z) here."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_independent_nodes_run_at_once_with_the_cores_split(tmp_path):
    lines = []
    timings = run_parallel(fake_plan(tmp_path, DIAMOND), jobs=2, log=lines.append, cores=4, preload=())
    assert set(Path(k).name for k in timings) == {"a", "b", "c", "d"}
    seen = {e["node"]: e for e in events(tmp_path)}
    ends = {name: json.loads((tmp_path / name).read_text())["end"] for name in DIAMOND}
    assert seen["b"]["start"] >= ends["a"] and seen["c"]["start"] >= ends["a"]  # after their dependency
    assert abs(seen["b"]["start"] - seen["c"]["start"]) < 0.5  # side by side
    assert seen["d"]["start"] >= max(ends["b"], ends["c"])
    assert {name: e["threads"] for name, e in seen.items()} == {"a": "4", "b": "2", "c": "2", "d": "4"}  # alone: all
    assert "working on b" in (tmp_path / "b.log").read_text()  # each node's output in its own log
    assert sum(line.split()[1] == "start" for line in lines) == 4 and sum(" done " in line for line in lines) == 4
    assert all("left)" in line for line in lines)  # every line carries the running estimate


def test_a_node_that_never_runs_beside_another_gets_every_core(tmp_path):
    """A -> {b, c} -> d: a and d run alone whatever the timing, so they get the 4 cores; b and c split them. The
    counts follow from the plan, so a resumed run (a finished) gives d the same."""
    plan = fake_plan(tmp_path, DIAMOND)
    assert exclusive_nodes(plan.nodes) == {str(tmp_path / "a"), str(tmp_path / "d")}
    assert exclusive_nodes(fake_plan(tmp_path, {"a": [], "b": []}).nodes) == set()  # independent: neither
    run_parallel(plan, jobs=2, log=lambda _: None, cores=4, preload=())
    seen = {e["node"]: e for e in events(tmp_path)}
    assert {name: e["threads"] for name, e in seen.items()} == {"a": "4", "b": "2", "c": "2", "d": "4"}
    # the nodes alone start afresh (their own environment); on Linux the others fork from the server (the shared one)
    assert seen["a"]["parent"] == seen["d"]["parent"] == os.getpid()
    assert (seen["b"]["parent"] == seen["c"]["parent"] != os.getpid()) == (sys.platform == "linux")


def test_a_node_named_to_run_alone_gets_every_core_and_nothing_runs_beside_it(tmp_path):
    """a (named alone, the longest chain) and b are ready at once: a runs by itself on the 4 cores, then b and c
    (which waits on a) share them."""
    plan = fake_plan(tmp_path, {"a": [], "b": [], "c": ["a"]}, alone=("a",))
    assert exclusive_nodes(plan.nodes) == set()  # b could run beside a: only the name makes it alone
    lines = []
    run_parallel(plan, jobs=2, log=lines.append, cores=4, preload=())
    assert "start eval a, 4 threads alone, log" in lines[0] and "2 threads, log" in lines[2]  # the log says why
    seen = {e["node"]: e for e in events(tmp_path)}
    end_a = json.loads((tmp_path / "a").read_text())["end"]
    assert seen["b"]["start"] >= end_a and seen["c"]["start"] >= end_a
    assert {name: e["threads"] for name, e in seen.items()} == {"a": "4", "b": "2", "c": "2"}
    assert seen["a"]["parent"] == os.getpid()  # alone: started afresh with its own environment


def test_a_node_to_run_alone_waits_for_the_cores_and_nothing_overtakes_it():
    deps = {"c": ["a"]}
    chain = {"a": 150.0, "b": 120.0, "c": 100.0, "x": 10.0}
    ready = ["a", "b", "x"]
    assert nodes_to_start(ready, deps, set(), set(), chain, [], 2, alone={"a"}) == ["a"]  # the head: by itself
    assert nodes_to_start(ready, deps, set(), set(), chain, ["y"], 2, alone={"a"}) == []  # waits; x does not overtake
    assert nodes_to_start(["b", "x"], deps, set(), set(), chain, ["a"], 2, alone={"a"}) == []  # a runs: nothing beside
    assert nodes_to_start(["a", "b", "x"], deps, set(), set(), {**chain, "b": 200.0}, [], 2, alone={"a"}) == ["b"]
    assert nodes_to_start(ready, deps, set(), set(), chain, [], 2) == ["a", "b"]  # without the name: two at once


def test_the_estimate_replays_a_node_alone():
    # a (alone, 50 s) -> c (100 s); b (60 s) -> d (60 s); two jobs. a alone to 50 s, then b and c: b ends at 110,
    # d runs to 170, c to 150. Without the name a and b start together: c 50-150, d 60-120, so 150.
    estimates = {"a": 50.0, "b": 60.0, "c": 100.0, "d": 60.0}
    chain = {"a": 150.0, "b": 120.0, "c": 100.0, "d": 60.0}
    deps = {"c": ["a"], "d": ["b"]}
    assert seconds_left(estimates, chain, {}, 2, deps, alone={"a"}) == 170.0
    assert seconds_left(estimates, chain, {}, 2, deps) == 150.0
    # a ran 20 s: its 30 s left, then b and c, then d after b: 30 + 60 + 60
    assert seconds_left(estimates, chain, {"a": 20.0}, 2, deps, alone={"a"}) == 150.0


def test_without_a_forking_server_every_node_starts_afresh(tmp_path, monkeypatch):
    fake = tmp_path / "fake" / "torch"  # a GPU build of torch: the server declines to fork
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("class version:\n    cuda = '12.4'\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    run_parallel(fake_plan(tmp_path, DIAMOND), jobs=2, log=lambda _: None, cores=4, preload=("torch",))
    seen = {e["node"]: e for e in events(tmp_path)}
    assert {name: e["parent"] for name, e in seen.items()} == dict.fromkeys("abcd", os.getpid())
    assert {name: e["threads"] for name, e in seen.items()} == {"a": "4", "b": "2", "c": "2", "d": "4"}


def test_the_longest_chain_starts_first(tmp_path):
    # a -> b -> c is longer than d or e alone: with one slot, the chain goes first
    plan = fake_plan(tmp_path, {"d": [], "e": [], "a": [], "b": ["a"], "c": ["b"]}, seconds=0.3)
    chain = critical_path_seconds(plan.nodes, {})
    assert chain[str(tmp_path / "a")] == 3.0 and chain[str(tmp_path / "d")] == 1.0  # 1 s per node without estimates
    run_parallel(plan, jobs=1, log=lambda _: None, cores=1, preload=())
    assert [e["node"] for e in events(tmp_path)][:2] == ["a", "b"]


def test_the_estimate_left_falls_while_a_long_node_runs():
    # a (100 s) -> c (30 s), and b (50 s) beside them, two jobs: a and b start, c after a, at 100 s
    estimates, chain, deps = {"a": 100.0, "b": 50.0, "c": 30.0}, {"a": 130.0, "b": 50.0, "c": 30.0}, {"c": ["a"]}
    assert seconds_left(estimates, chain, {}, 2, deps) == 130.0
    assert seconds_left(estimates, chain, {"a": 40.0, "b": 40.0}, 2, deps) == 90.0  # a's 60 s left, then c's 30
    # a ran past its estimate: it counts 0, c starts now beside b, whose 50 s (not started) end last
    assert seconds_left(estimates, chain, {"a": 150.0}, 2, deps) == 50.0
    assert seconds_left({}, {}, {}, 2) == 0.0


def test_the_estimate_queues_the_side_work_that_waits_on_a_long_node():
    # a (100 s), then four 30 s nodes that wait on it, two jobs: the chain is 130 s and the work 220 / 2 = 110 s,
    # but the four queue for the two slots after a: 100 + 2 x 30 = 160 s, as run_parallel runs them
    estimates = {"a": 100.0, **{key: 30.0 for key in "bcde"}}
    chain = {"a": 130.0, **{key: 30.0 for key in "bcde"}}
    assert seconds_left(estimates, chain, {}, 2, {key: ["a"] for key in "bcde"}) == 160.0
    assert seconds_left(estimates, chain, {}, 2) == 120.0  # without the dependencies: one beside a after another
    assert seconds_left(estimates, chain, {}, 1, {key: ["a"] for key in "bcde"}) == 220.0  # one job: all the work


def test_a_failed_node_stops_the_run_and_names_its_log(tmp_path):
    plan = fake_plan(tmp_path, DIAMOND, fail="c")
    with pytest.raises(MatrixError, match=r"eval .*c failed \(exit 3\); see .*c\.log"):
        run_parallel(plan, jobs=2, log=lambda _: None, cores=2, preload=())
    assert "d" not in {e["node"] for e in events(tmp_path)}  # nothing downstream of the failure started
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_node_that_runs_alone_resumes_on_every_core(tmp_path):
    """Killed while its node named alone runs, a resumed launcher gives that node every core again (its thread
    count is the plan's, so its float sums are the first run's) and does not rerun what finished."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_parallel import fake_plan
        from experiments.matrix import run_parallel
        from pathlib import Path
        plan = fake_plan(Path({str(tmp_path)!r}), {{"w": [], "a": ["w"], "b": ["w"], "c": ["a"]}},
                         seconds=float(sys.argv[1]), alone=("a",))
        run_parallel(plan, jobs=2, cores=2, preload=())
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, str(launcher), "3"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while "a" not in {e["node"] for e in events(tmp_path)}:  # w done, a running alone
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(0.5)
    assert not any(alive(event["pid"]) for event in events(tmp_path))
    assert (tmp_path / "w").exists() and not (tmp_path / "a").exists()
    assert "b" not in {e["node"] for e in events(tmp_path)}  # nothing started beside a
    subprocess.run([sys.executable, str(launcher), "0.2"], env=env, check=True, stdout=subprocess.DEVNULL)
    runs = [(e["node"], e["threads"]) for e in events(tmp_path)]
    assert runs == [("w", "2"), ("a", "2"), ("a", "2"), ("b", "1"), ("c", "1")] or \
        runs == [("w", "2"), ("a", "2"), ("a", "2"), ("c", "1"), ("b", "1")]


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_launcher_takes_its_nodes_with_it_and_resumes(tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_parallel import DIAMOND, fake_plan
        from experiments.matrix import run_parallel
        from pathlib import Path
        run_parallel(fake_plan(Path({str(tmp_path)!r}), DIAMOND, seconds=float(sys.argv[1])), jobs=2, cores=2,
                     preload=())
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, str(launcher), "3"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not {"b", "c"} <= {e["node"] for e in events(tmp_path)}:  # a done, b and c running
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(0.5)
    assert not any(alive(event["pid"]) for event in events(tmp_path))  # no node outlives its launcher
    assert (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    subprocess.run([sys.executable, str(launcher), "0.2"], env=env, check=True, stdout=subprocess.DEVNULL)
    runs = [e["node"] for e in events(tmp_path)]
    assert runs.count("a") == 1 and runs.count("b") == runs.count("c") == 2 and runs.count("d") == 1
    assert all((tmp_path / name).exists() for name in DIAMOND)
