"""Published datasets without the Hub: a dataset that is neither cached nor given as a local copy stops
`prism eval --suite paper` before anything loads, with one line naming the dataset and the setting."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.config import EvalConfig, EvalError, PaperConfig
from evaluation.dataset_sources import in_datasets_cache, require_published_datasets, task_datasets
from evaluation.runner import PUBLISHED_TASKS_DIR, run_eval

MATHVISTA = [("mathvista_testmini", "prism_mathvista_testmini")]


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No Hub and empty caches: what a machine without network that never downloaded anything sees."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    return tmp_path / "datasets"


def _never_load(cfg, path):
    raise AssertionError("the model was loaded: the dataset check must come first")


def test_offline_without_cache_or_local_copy_stops_before_loading_with_one_line(offline, checkpoint, tmp_path):
    cfg = EvalConfig(paper=PaperConfig(tasks=["mathvista_testmini", "mmmu_pro"], judge_metrics=False))
    with pytest.raises(EvalError) as info:
        run_eval(checkpoint, "paper", out_root=tmp_path / "evals", config=cfg, model_factory=_never_load)
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and str(offline) in message
    assert "AI4Math/MathVista (split testmini)" in message
    assert "MMMU/MMMU_Pro (config 'standard (10 options)', split test)" in message  # both members of the group
    assert "MMMU/MMMU_Pro (config 'vision', split test)" in message
    assert "paper.dataset_paths.mathvista_testmini=DIR" in message


def test_the_cli_prints_it_as_one_line(offline, checkpoint, tmp_path, capsys):
    from prism.cli import main

    argv = ["eval", "--checkpoint", str(checkpoint), "--suite", "paper", "--out", str(tmp_path / "evals"),
            "paper.judge_metrics=false", "paper.tasks=[mmmu_val]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lmms-lab-encoder/MMMU" in err and "paper.dataset_paths.mmmu_val" in err


def _cache_mathvista(cache_dir, tmp_path):
    """A real datasets cache entry for AI4Math/MathVista: load a local copy, then file it under the Hub id's
    folder (`<org>___<snake_name>`), where a `load_dataset` from the Hub would have written it."""
    import datasets

    source = tmp_path / "src" / "MathVista" / "data"
    source.mkdir(parents=True)
    pq.write_table(pa.table({"query": ["q1", "q2"], "answer": ["A", "7"]}), source / "testmini-00000-of-00001.parquet")
    datasets.load_dataset(str(source.parent), cache_dir=str(cache_dir))
    (cache_dir / "math_vista").rename(cache_dir / "AI4Math___math_vista")


def test_a_cached_dataset_passes_and_is_what_datasets_loads_offline(offline, tmp_path, monkeypatch):
    import datasets

    _cache_mathvista(offline, tmp_path)
    require_published_datasets(MATHVISTA, {}, offline, PUBLISHED_TASKS_DIR)
    # the same cache is what load_dataset reads without the Hub (datasets reads HF_HUB_OFFLINE at import)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert datasets.load_dataset("AI4Math/MathVista", cache_dir=str(offline))["testmini"]["answer"] == ["A", "7"]
    # a split or config that was never cached is not there
    assert in_datasets_cache("AI4Math/MathVista", None, "testmini", offline)
    assert not in_datasets_cache("AI4Math/MathVista", None, "test", offline)
    assert not in_datasets_cache("AI4Math/MathVista", "vision", "testmini", offline)
    with pytest.raises(EvalError, match="mmmu_val needs lmms-lab-encoder/MMMU") as info:
        require_published_datasets([*MATHVISTA, ("mmmu_val", "prism_mmmu_val")], {}, offline, PUBLISHED_TASKS_DIR)
    assert "MathVista" not in str(info.value)


def test_a_local_copy_needs_no_cache_and_a_missing_one_is_named(offline, tmp_path):
    copy = tmp_path / "MMMU"
    copy.mkdir()
    require_published_datasets([("mmmu_val", "prism_mmmu_val")], {"mmmu_val": str(copy)}, offline, PUBLISHED_TASKS_DIR)
    with pytest.raises(EvalError, match=r"paper.dataset_paths.mmmu_val=\S*nowhere: no such file or folder"):
        require_published_datasets([("mmmu_val", "prism_mmmu_val")], {"mmmu_val": str(tmp_path / "nowhere")},
                                   offline, PUBLISHED_TASKS_DIR)
    # a Hub id given as a mirror must be cached like the default one
    with pytest.raises(EvalError, match=r"mmmu_val needs me/MMMU-mirror \(split validation\)"):
        require_published_datasets([("mmmu_val", "prism_mmmu_val")], {"mmmu_val": "me/MMMU-mirror"},
                                   offline, PUBLISHED_TASKS_DIR)


def test_every_published_task_names_its_datasets():
    from evaluation.config import PUBLISHED_TASKS

    for task in PUBLISHED_TASKS.values():
        assert all(d.path.count("/") == 1 and d.split for d in task_datasets(task, PUBLISHED_TASKS_DIR)), task
    assert [d.name for d in task_datasets("prism_mmmu_pro", PUBLISHED_TASKS_DIR)] == ["standard (10 options)", "vision"]


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    def log_message(self, *args):
        pass


def test_without_the_offline_flag_the_hub_is_asked_once(offline, monkeypatch):
    """Not offline: an unreachable Hub stops the run at once; a Hub that answers leaves the download to lmms-eval."""
    import datasets
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import; the session set it for other tests
    with socket.socket() as probe:  # a loopback port nobody listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(EvalError, match="Hub is unreachable at .* and these published datasets"):
        require_published_datasets(MATHVISTA, {}, offline, PUBLISHED_TASKS_DIR)

    server = HTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        require_published_datasets(MATHVISTA, {}, offline, PUBLISHED_TASKS_DIR)
    finally:
        server.shutdown()
        server.server_close()
