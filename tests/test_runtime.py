import io
import json
import pickle
import random
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from prism import runtime
from prism.runtime import (
    CheckpointError,
    MetricsLogger,
    NonFiniteError,
    Progress,
    RuntimeConfigError,
    check_finite,
    is_done,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    mark_done,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    write_manifest,
)

# ---------------------------------------------------------------------------------------------------
# RNG


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_round_trip_restores_python_numpy_torch():
    seed_everything(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    first = _draws()
    seed_everything(99)
    set_rng_state(state)
    assert _draws() == first


def test_seed_everything_is_repeatable():
    seed_everything(7)
    a = _draws()
    seed_everything(7)
    assert _draws() == a


# ---------------------------------------------------------------------------------------------------
# Checkpoints: resume equals an uninterrupted run, bit for bit


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps: int):
    for _ in range(steps):
        x = torch.randn(5, 4)  # batches and dropout masks come from torch's RNG
        y = torch.randn(5, 2) * random.random() + float(np.random.rand())  # ...and python/numpy's
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    seed_everything(0)
    ref_model, ref_opt, ref_sched = _setup(0)
    seed_everything(1)
    _train(ref_model, ref_opt, ref_sched, 6)

    seed_everything(0)
    model, opt, sched = _setup(0)
    seed_everything(1)
    _train(model, opt, sched, 3)
    ckpt = save_checkpoint(tmp_path, 3, model_state=model.state_dict(), optimizer=opt, scheduler=sched,
                           data_position={"epoch": 0, "index": 15}, extra={"tokens": 123})
    _train(model, opt, sched, 2)  # the interrupted run goes on a little, then dies

    seed_everything(42)  # a fresh process: different init and RNG
    model2, opt2, sched2 = _setup(42)
    assert latest_checkpoint(tmp_path) == ckpt
    state = restore_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 3 and state["data_position"] == {"epoch": 0, "index": 15}
    assert state["extra"] == {"tokens": 123}
    assert opt2.state_dict()["state"][0]["exp_avg_sq"].abs().sum() > 0  # AdamW moments came back
    _train(model2, opt2, sched2, 3)

    for (name, a), b in zip(ref_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert sched2.get_last_lr() == ref_sched.get_last_lr()
    for s_ref, s_new in zip(ref_opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(s_ref["exp_avg"], s_new["exp_avg"])
        assert torch.equal(s_ref["exp_avg_sq"], s_new["exp_avg_sq"])


def test_checkpoint_layout_and_checksums(tmp_path):
    lin = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path, 123, model_state=lin.state_dict())
    assert path == tmp_path / "checkpoints" / "step-000123"
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.json", "model.safetensors", "trainer_state.pt"]
    index = json.loads((path / "checkpoint.json").read_text())
    assert index["step"] == 123 and set(index["files"]) == {"model.safetensors", "trainer_state.pt"}
    assert index["files"]["model.safetensors"] == runtime.sha256_file(path / "model.safetensors")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model_state"]["weight"], lin.weight.detach())
    assert loaded["optimizer"] is None and loaded["scheduler"] is None
    # tampering is caught by the checksums
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match="sha256 .*, but .*checkpoint.json records"):
        load_checkpoint(path)


def test_tied_weights_are_saved(tmp_path):
    emb = torch.nn.Embedding(3, 2)
    state = {"embed.weight": emb.weight, "head.weight": emb.weight}  # shared storage, as with tied LM heads
    loaded = load_checkpoint(save_checkpoint(tmp_path, 1, model_state=state))["model_state"]
    assert torch.equal(loaded["embed.weight"], loaded["head.weight"])


def test_keep_last_deletes_older_checkpoints(tmp_path):
    lin = torch.nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model_state=lin.state_dict(), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


def test_resaving_a_step_replaces_it(tmp_path):
    lin = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 5, model_state=lin.state_dict())
    with torch.no_grad():
        lin.weight.fill_(7.0)
    path = save_checkpoint(tmp_path, 5, model_state=lin.state_dict())
    assert torch.all(load_checkpoint(path)["model_state"]["weight"] == 7.0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000005"]


def test_half_written_checkpoints_are_ignored(tmp_path):
    lin = torch.nn.Linear(2, 2)
    good = save_checkpoint(tmp_path, 2, model_state=lin.state_dict())
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000009-123").mkdir()  # a crash mid-save leaves the temp folder
    (root / ".tmp-step-000009-123" / "model.safetensors").write_bytes(b"partial")
    (root / "step-000008").mkdir()  # a folder without checkpoint.json is not complete either
    assert latest_checkpoint(tmp_path) == good
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_failed_save_leaves_no_temp_folder(tmp_path):
    class DiskFull:
        def state_dict(self):
            raise OSError("disk full")  # fails after model.safetensors is already in the temp folder

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 1, model_state=torch.nn.Linear(2, 2).state_dict(), optimizer=DiskFull())
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert latest_checkpoint(tmp_path) is None


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_trainer_state_is_loaded_with_weights_only(tmp_path, capsys):
    path = save_checkpoint(tmp_path, 1, model_state=torch.nn.Linear(2, 2).state_dict())
    torch.save({"step": 1, "payload": _Evil()}, path / "trainer_state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path, verify=False)
    assert "pwned" not in capsys.readouterr().out  # the payload never ran


# ---------------------------------------------------------------------------------------------------
# Manifest


@dataclass
class _Inner:
    hf_token: str = "hf_abc"
    apiKey: str = "k-123"
    tokenizer: str = "Qwen/Qwen3-VL"
    max_new_tokens: int = 64


@dataclass
class _Cfg:
    lr: float = 1e-5
    wandb_api_key: str = "xyz"
    inner: _Inner = field(default_factory=_Inner)
    servers: list = field(default_factory=lambda: [{"url": "http://x", "password": "p"}])
    monkey: str = "kept"


def test_manifest_contents_and_redaction(tmp_path):
    lin = torch.nn.Linear(2, 2)
    ckpt = save_checkpoint(tmp_path, 4, model_state=lin.state_dict())
    path = write_manifest(tmp_path, config=_Cfg(), seed=17, upstream={"sft": "abc123"}, checkpoint_dir=ckpt,
                          extra={"note": "x", "secret": "s"})
    m = json.loads(path.read_text())
    cfg = m["config"]
    assert cfg["lr"] == 1e-5 and cfg["monkey"] == "kept"
    assert cfg["wandb_api_key"] == "<redacted>"
    assert cfg["inner"]["hf_token"] == "<redacted>" and cfg["inner"]["apiKey"] == "<redacted>"
    assert cfg["inner"]["tokenizer"] == "Qwen/Qwen3-VL" and cfg["inner"]["max_new_tokens"] == 64
    assert cfg["servers"][0] == {"url": "http://x", "password": "<redacted>"}
    assert "xyz" not in path.read_text() and "hf_abc" not in path.read_text()
    assert m["extra"] == {"note": "x", "secret": "<redacted>"}
    assert re.fullmatch(r"[0-9a-f]{12}", m["config_hash"])
    assert m["seed"] == 17 and m["upstream"] == {"sft": "abc123"}
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["python"]
    assert set(m["versions"]) == {"python", "torch", "transformers", "accelerate", "prism"}
    assert m["checkpoint"]["step"] == 4
    assert m["checkpoint"]["sha256"]["model.safetensors"] == runtime.sha256_file(ckpt / "model.safetensors")
    assert m["host"]["cpu_count"] >= 1 and m["host"]["platform"]
    assert m["host"]["threads"] == torch.get_num_threads()  # a CPU run's float sums depend on it
    assert m["host"]["cpu_model"] == runtime.cpu_model() and m["host"]["cpu_capability"]
    assert m["created_utc"].endswith("+00:00")
    commit = m["git"]["commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert (m["git"]["dirty"] is None) == (commit is None)


def test_git_info_outside_a_repo_is_null(tmp_path):
    assert runtime.git_info(tmp_path) == {"commit": None, "dirty": None}


def test_git_info_reads_the_commit(monkeypatch, tmp_path):
    calls = []

    class Done:
        def __init__(self, out):
            self.returncode, self.stdout = 0, out

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return Done("0123456789abcdef0123456789abcdef01234567\n" if "rev-parse" in cmd else " M prism/x.py\n")

    monkeypatch.setattr(runtime.subprocess, "run", fake_run)
    info = runtime.git_info(tmp_path)
    assert info == {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True}
    assert calls[0][:3] == ["git", "-C", str(tmp_path)]


# ---------------------------------------------------------------------------------------------------
# Metrics


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_metrics_resume_equals_uninterrupted(tmp_path):
    def run(logger, steps):
        for s in steps:
            logger.log(s, {"loss": torch.tensor(1.0 / (s + 1)), "lr": np.float32(0.5), "n": s})

    with MetricsLogger(tmp_path / "ref") as ref:
        run(ref, range(1, 7))

    with MetricsLogger(tmp_path / "run") as first:
        run(first, range(1, 6))  # checkpoint at step 3, then crashed after logging step 5
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn line from the crash
    with MetricsLogger(tmp_path / "run", resume_step=3) as resumed:
        assert [r["step"] for r in _lines(resumed.path)] == [1, 2, 3]
        run(resumed, range(4, 7))

    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    rec = _lines(tmp_path / "ref" / "metrics.jsonl")[0]
    assert rec == {"step": 1, "loss": 0.5, "lr": 0.5, "n": 1} and isinstance(rec["loss"], float)


def test_metrics_are_flushed_per_line(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(0, {"loss": 1.0})
    assert _lines(logger.path) == [{"step": 0, "loss": 1.0}]  # readable before close
    logger.close()


def test_fresh_logger_starts_empty(tmp_path):
    with MetricsLogger(tmp_path) as a:
        a.log(1, {"x": 1})
    with MetricsLogger(tmp_path) as b:
        b.log(1, {"x": 2})
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 2}]


def _without_module(monkeypatch, missing: str):
    import builtins

    real_import = builtins.__import__

    def importer(name, *a, **kw):
        if name == missing or name.startswith(missing + "."):
            raise ImportError(f"No module named {missing!r}")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", importer)


@pytest.mark.parametrize(("tracking", "module"), [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_tracker_is_a_one_line_error_naming_the_pip_command(tmp_path, monkeypatch, tracking, module):
    _without_module(monkeypatch, module)
    with pytest.raises(RuntimeConfigError, match=f"tracking='{tracking}' but {tracking} is not installed: "
                                                 f"pip install {tracking}, or set tracking: none") as err:
        MetricsLogger(tmp_path, tracking=tracking, project="p")
    assert "\n" not in str(err.value)
    assert not (tmp_path / runtime.TRACKING_FILE).exists()  # nothing for an evaluation to reopen


def test_tensorboard_without_its_package_names_the_pip_command(tmp_path):
    try:  # not installed in this project's environment: torch's writer imports it
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(RuntimeConfigError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tracking="tensorboard")


def test_an_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(RuntimeConfigError, match="tracking must be one of none, wandb, tensorboard, got 'mlflow'"):
        MetricsLogger(tmp_path, tracking="mlflow")


def test_wandb_is_offline_unless_the_user_chose(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.wandb_mode(api_key=None) == "offline"
    assert runtime.wandb_mode(api_key="k" * 40) is None  # `wandb login` or WANDB_API_KEY: wandb's default, online
    monkeypatch.setenv("WANDB_MODE", "online")
    assert runtime.wandb_mode(api_key=None) is None
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", "/tmp/token")
    assert runtime.wandb_mode(api_key=None) is None


def _session_folders(stage, run_id):
    return [p.name for p in sorted((stage / "wandb").glob("offline-run-*"))], \
        re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?")


def test_wandb_keeps_one_offline_run_per_stage_across_resumes(tmp_path, monkeypatch):
    from prism.config import SFTConfig, config_hash, write_config_yaml
    from tests.tracking_fixtures import isolate_wandb, offline_runs

    isolate_wandb(monkeypatch, tmp_path)  # no WANDB_MODE, no key: the default must be offline
    stage = tmp_path / "stages" / "s" / "sft"
    cfg = SFTConfig(output_dir=str(stage), tracking="wandb", tracking_group="table1-embedded")
    write_config_yaml(cfg, stage / "config.yaml")
    with MetricsLogger(stage, "wandb", project="prism") as first:
        for step in (1, 2, 3):
            first.log(step, {"loss": torch.tensor(1.0 / step)})
    run_id = json.loads((stage / "tracking.json").read_text())["wandb"]["run_id"]
    with MetricsLogger(stage, "wandb", project="prism", resume_step=2) as resumed:  # checkpoint 2, crashed at 3
        for step in (3, 4):
            resumed.log(step, {"loss": 1.0 / step})

    assert json.loads((stage / "tracking.json").read_text())["wandb"]["run_id"] == run_id
    folders, pattern = _session_folders(stage, run_id)
    assert len(folders) == 2 and all(pattern.fullmatch(name) for name in folders)
    runs = offline_runs(stage)
    assert [r["id"] for r in runs] == [run_id, run_id]
    for run in runs:
        assert run["name"] == f"sft-{config_hash(cfg)}" and run["group"] == "table1-embedded"
        assert run["project"] == "prism"
        assert run["config"]["optim"]["lr"] == cfg.optim.lr and run["config"]["tracking"] == "wandb"
    assert [[row["_step"] for row in r["history"]] for r in runs] == [[1, 2, 3], [3, 4]]
    assert runs[1]["history"][-1]["loss"] == 0.25

    # No checkpoint: a fresh start and a new run, whether the stage says so with None or with step 0 (as recipes do)
    ids = {run_id}
    for fresh in (None, 0):
        with MetricsLogger(stage, "wandb", project="prism", resume_step=fresh) as restarted:
            restarted.log(1, {"loss": 1.0})
        ids.add(json.loads((stage / "tracking.json").read_text())["wandb"]["run_id"])
    assert len(ids) == 3


def test_no_secret_reaches_the_wandb_run(tmp_path, monkeypatch):
    from tests.tracking_fixtures import isolate_wandb, offline_runs

    isolate_wandb(monkeypatch, tmp_path)
    stage = tmp_path / "by-hand"
    stage.mkdir()
    (stage / "config.yaml").write_text("# SFTConfig (config_hash 0123456789ab)\nseed: 3\nhub_token: s3cret-token\n"
                                       "judge: {api_key: s3cret-key, model: judge-7b, max_new_tokens: 8}\n")
    with MetricsLogger(stage, "wandb", project="prism") as logger:
        logger.log(1, {"loss": 1.0})
    (run,) = offline_runs(stage)
    assert run["name"] == "by-hand-0123456789ab"  # a directory named by hand: the config hash is appended
    assert run["config"] == {"seed": 3, "hub_token": "<redacted>",
                             "judge": {"api_key": "<redacted>", "model": "judge-7b", "max_new_tokens": 8}}
    assert not [p for p in (stage / "wandb").rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()]


def test_tensorboard_events_follow_the_resume(tmp_path, monkeypatch):
    import sys
    import types

    writers = []

    class FakeWriter:  # torch.utils.tensorboard.SummaryWriter's interface, recorded
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.events = log_dir, purge_step, []
            writers.append(self)

        def add_scalar(self, tag, value, global_step=None):
            self.events.append((tag, value, global_step))

        def add_text(self, tag, text, global_step=None):
            self.events.append((tag, text, global_step))

        def flush(self):
            pass

        def close(self):
            self.events.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    (tmp_path / "config.yaml").write_text("# SFTConfig (config_hash 0123456789ab)\nseed: 3\nhf_token: s3cret\n")
    with MetricsLogger(tmp_path, "tensorboard") as first:
        first.log(1, {"loss": 0.5, "note": "text", "per_kind": [1, 2]})
    with MetricsLogger(tmp_path, "tensorboard", resume_step=4) as resumed:
        resumed.log(5, {"loss": 0.25})
    assert [w.purge_step for w in writers] == [0, 5]  # a fresh start hides old events, a resume those after step 4
    assert {w.log_dir for w in writers} == {str(tmp_path / "tensorboard")}
    (config_text,) = [e for e in writers[0].events if e[0] == "config"]
    assert '"hf_token": "<redacted>"' in config_text[1] and "s3cret" not in config_text[1]
    assert [e for e in writers[0].events if e[0] != "config"] == [("loss", 0.5, 1), "closed"]  # scalars only
    assert writers[1].events == [("loss", 0.25, 5), "closed"]  # the config is written once, at step 0
    assert json.loads((tmp_path / "tracking.json").read_text()) == {"tensorboard": {"log_dir": "tensorboard"}}


# ---------------------------------------------------------------------------------------------------
# Progress, DONE, finite checks


def test_progress_plain_output_when_not_a_tty(monkeypatch):
    buf = io.StringIO()  # StringIO.isatty() is False: plain lines, not tqdm
    monkeypatch.setattr(runtime.sys, "stderr", buf)
    with Progress(10, "train", interval=0.0) as bar:
        for _ in range(10):
            bar.update(1, loss=torch.tensor(0.25))
    out = buf.getvalue().splitlines()
    assert out[0].startswith("train: 1/10 [") and "it/s" in out[0] and "eta" in out[0] and "loss=0.25" in out[0]
    assert out[-1].startswith("train: 10/10")
    assert len(out) == 11  # ten updates and one final line, printed once


def test_progress_uses_tqdm_on_a_tty(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    monkeypatch.setattr(runtime.sys, "stderr", buf)
    with Progress(4, "gen") as bar:
        bar.update(4)
    assert "gen" in buf.getvalue() and "4/4" in buf.getvalue()


def test_done_marker(tmp_path):
    assert not is_done(tmp_path)
    mark_done(tmp_path / "run")
    assert is_done(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["DONE"]  # no temp file left behind


def test_check_finite_names_loss_and_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    check_finite(torch.tensor(1.0), model, step=3)  # all finite: no error
    check_finite(0.5)
    with pytest.raises(NonFiniteError, match="loss at step 7"):
        check_finite(torch.tensor(float("nan")), model, step=7)
    with pytest.raises(NonFiniteError, match="loss"):
        check_finite(float("inf"))
    model[1].bias.grad[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 9 in parameter '1\.bias'"):
        check_finite(torch.tensor(1.0), model, step=9)
    model[1].bias.grad[0] = 0.0
    model[0].weight.grad[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameter '0\.weight'"):
        check_finite(torch.tensor(1.0), model, step=10)
    # finite gradients whose norms overflow float32 when summed (the one check for all): still no error
    for param in model.parameters():
        param.grad.fill_(0.0)
    model[0].bias.grad[0], model[1].bias.grad[0] = 3e38, 3e38
    check_finite(torch.tensor(1.0), model, step=11)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one: what save_sharded_checkpoint's collectives need, without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_full_disk_during_a_sharded_save_names_the_checkpoint_and_keeps_the_previous_one(
        tmp_path, monkeypatch, one_process_group):
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    run = tmp_path / "run"
    first = runtime.save_sharded_checkpoint(run, 1, model=model, optimizer=optimizer)
    saved = {name: value.clone() for name, value in model.state_dict().items()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_filesystem, "_write_item", disk_full)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError) as caught:
        runtime.save_sharded_checkpoint(run, 2, model=model, optimizer=optimizer)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(run / "checkpoints" / "step-000002")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no half-written folder
    monkeypatch.undo()
    runtime.restore_sharded_checkpoint(first, model=model, optimizer=optimizer)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in saved.items())


def test_a_sharded_checkpoint_holds_several_named_models_with_their_optimizers(tmp_path, one_process_group):
    """`parts`: one DCP folder with {name: {"model", "optimizer"}} per model (align's policy and discriminator),
    restored into each; the single-model layout stays {"model", "optimizer"}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def trained(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        return model, optimizer

    parts = {"policy": trained(0), "discriminator": trained(1)}
    saved = runtime.save_sharded_checkpoint(tmp_path / "run", 1, parts=parts)
    dcp_to_torch_save(str(saved / runtime.SHARDED_DIR), str(tmp_path / "whole.pt"))
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert whole.keys() == {"policy", "discriminator"}
    for name, (model, optimizer) in parts.items():
        assert whole[name].keys() == {"model", "optimizer"}
        assert all(torch.equal(whole[name]["model"][k], v) for k, v in model.state_dict().items())
        assert int(whole[name]["optimizer"]["state"]["weight"]["step"]) == 1

    fresh = {}
    for name in parts:
        model = torch.nn.Linear(4, 3)
        fresh[name] = (model, torch.optim.AdamW(model.parameters(), lr=0.1))
    runtime.restore_sharded_checkpoint(saved, parts=fresh)
    for name, (model, optimizer) in parts.items():
        restored_model, restored_optimizer = fresh[name]
        assert all(torch.equal(restored_model.state_dict()[k], v) for k, v in model.state_dict().items()), name
        assert torch.equal(restored_optimizer.state[restored_model.weight]["exp_avg"],
                           optimizer.state[model.weight]["exp_avg"]), name
    with pytest.raises(TypeError, match="model and optimizer, or parts"):
        runtime.save_sharded_checkpoint(tmp_path / "run", 2, model=parts["policy"][0], optimizer=parts["policy"][1],
                                        parts=parts)


def test_cpu_model_reads_the_model_name_from_cpuinfo_and_falls_back_without_it(tmp_path):
    """A CPU run's float bits and timings follow its kernels, and they follow the CPU (this VM has come up on Intel
    Xeon and AMD EPYC hosts): the CPU model goes into every manifest and reproduce record."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu\n")
    assert runtime.cpu_model(cpuinfo) == "AMD EPYC 9B14"
    assert runtime.cpu_model(tmp_path / "absent")  # platform's name for it, never empty
