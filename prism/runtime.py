"""Runtime plumbing shared by every stage: seeding, RNG capture, mixed precision, atomic checkpoints, run
manifest, metrics log and trackers (wandb, TensorBoard), progress, DONE marker, a finite-loss guard and preemption
signals.

Read top to bottom. The contract (DESIGN.md "Tracking, reproducibility, resume"): a checkpoint holds
model, optimizer, scheduler, RNG states and data position, so a resumed run equals an uninterrupted
one bit for bit on CPU; everything is written to a temp name and renamed, so a reader never sees half
a file or half a checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from prism.atomic_io import atomic_write_text, full_disk_named
from prism.config import config_hash, config_to_dict
from prism.hardware import CPUINFO, cpuinfo_field, native_bf16


class RuntimeConfigError(ValueError):
    """A runtime option that cannot be honoured (e.g. tracking='wandb' without wandb installed)."""


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf."""


# ----------------------------------------------------------------------------------------------------
# Seeding and RNG state
# ----------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). Only cheap determinism switches are flipped;
    `torch.use_deterministic_algorithms` is left alone because it makes some CUDA ops raise."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy only takes 32-bit seeds
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # A fresh process leaves MKL free to pick a GEMM's threads per call (its dynamic mode); torch.set_num_threads
    # turns that off for good. Turned off here in every stage, a stage computes the same bits whether or not
    # something earlier in its process set the thread count (on an Intel host the two modes differed in the
    # gradients' last bits, and a resumed run in a fresh process then differed from the run it resumed).
    torch.set_num_threads(torch.get_num_threads())


def rng_state() -> dict[str, Any]:
    """Every RNG state as weights_only-loadable values (tensors, ints, floats, str, lists, dicts)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `rng_state`. A CUDA state is restored only when CUDA is present now."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------------


def autocast(device: torch.device | str, dtype: str | None) -> AbstractContextManager:
    """`torch.autocast` to `dtype` (e.g. "bfloat16") on `device`'s type; a no-op for None (compute in the
    parameters' dtype). Wrap the forwards, not the backward (it follows the forward's dtypes) nor the optimizer
    step (it updates the float32 master weights)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------------------------------
# Checkpoints: run_dir/checkpoints/step-000123/{model.safetensors, trainer_state.pt, checkpoint.json}
# ----------------------------------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
INDEX_FILE = "checkpoint.json"  # written last: its presence marks a complete checkpoint


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _safetensors_ready(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # save_file refuses non-contiguous tensors and tensors sharing storage (tied weights): copy those.
    out, seen = {}, set()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def save_checkpoint(run_dir: str | Path, step: int, *, model_state: Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    data_position: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                    keep_last: int | None = None) -> Path:
    """Write checkpoint `step` atomically (temp folder + os.replace) and return its folder. Older
    checkpoints beyond the newest `keep_last` are deleted only after the new one is complete.

    `model_state` is stored in its own dtype, never cast: under mixed precision these are the float32 master
    weights (and the optimizer's float32 state), so a resumed run continues from exactly what was updated."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with full_disk_named(final):  # safetensors reports a full disk in its own type
            save_file(_safetensors_ready(model_state), str(tmp / MODEL_FILE), metadata={"step": str(step)})
        _seal_checkpoint(tmp, final, {
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "data_position": dict(data_position or {}),
            "extra": dict(extra or {}),
        })
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune_checkpoints(run_dir, keep_last)
    return final


def _seal_checkpoint(tmp: Path, final: Path, trainer_state: dict[str, Any], **index_fields: Any) -> None:
    """Finish a checkpoint's temp folder and publish it: trainer_state.pt, then checkpoint.json with the sha256 of
    every file in the folder (and `index_fields`), then the rename into place."""
    with full_disk_named(final):  # torch.save reports a full disk in its own type
        torch.save(trainer_state, tmp / STATE_FILE)
    names = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
    index = {"step": int(trainer_state["step"]), **index_fields,
             "files": {name: sha256_file(tmp / name) for name in names}}
    atomic_write_text(tmp / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    _publish_checkpoint(tmp, final)


def _publish_checkpoint(tmp: Path, final: Path) -> None:
    """Rename a complete temp folder into place; re-saving a step moves the old one aside first (os.replace needs
    an empty target)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def _prune_checkpoints(run_dir: str | Path, keep_last: int | None) -> None:
    """Delete checkpoints beyond the newest `keep_last` (only once the newest is complete)."""
    if keep_last is not None and keep_last > 0:
        for _, old_dir in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old_dir, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with checkpoint.json), oldest first; temp folders are ignored."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / INDEX_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from as it is on disk: a file whose sha256 is not the one its
    checkpoint.json records (one line: the file, both digests, what to do)."""


def checksum_problem(path: Path, index: dict[str, Any]) -> str | None:
    """The first file of checkpoint `path` whose sha256 differs from `index`'s, as one line; None if all match."""
    for name, expected in index["files"].items():
        found = sha256_file(path / name) if (path / name).is_file() else "(no such file)"
        if found != expected:
            return (f"{path / name}: sha256 {found}, but {path / INDEX_FILE} records {expected} (corrupted or "
                    f"modified): delete {path} to resume from the checkpoint before it, or from the start")
    return None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder back: {"step", "model_state", "optimizer", "scheduler", "rng",
    "data_position", "extra"}. `trainer_state.pt` goes through torch.load(weights_only=True), so a file
    holding arbitrary pickled objects is refused rather than executed."""
    from safetensors.torch import load_file

    path = Path(path)
    if is_sharded_checkpoint(path):
        raise RuntimeError(f"checkpoint {path} is sharded (an FSDP run's): it is restored inside a distributed run "
                           "(restore_sharded_checkpoint); torch.distributed.checkpoint.format_utils.dcp_to_torch_save "
                           f"turns {path / SHARDED_DIR} into one file")
    index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
    if verify and (problem := checksum_problem(path, index)):
        raise CheckpointError(problem)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    state["model_state"] = load_file(str(path / MODEL_FILE))
    return state


def restore_checkpoint(path: str | Path, *, model: torch.nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> dict[str, Any]:
    """Load a checkpoint into live objects and restore the RNG states; returns the loaded dict
    (for "step", "data_position", "extra")."""
    state = load_checkpoint(path)
    if model is not None:
        model.load_state_dict(state["model_state"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])  # last: loading must not consume randomness after the restore
    return state


# ----------------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP2): run_dir/checkpoints/step-000123/{sharded/, trainer_state.pt, checkpoint.json}
#
# `sharded/` is a torch.distributed.checkpoint (DCP) folder: every process writes its own shards of the model
# and of the AdamW state (canonical parameter names, from torch.distributed.checkpoint.state_dict.get_state_dict),
# the main process the metadata. It holds {"model", "optimizer"}, or, for several models checkpointed together
# (align's policy and discriminator, `parts`), {name: {"model", "optimizer"}} per model. trainer_state.pt holds
# what the plain format holds besides the model and the optimizer, with one RNG state per process. The folder is filled under a temp name shared by the processes and
# renamed by the main process once complete, as in the plain format; a shared filesystem is assumed.
# ----------------------------------------------------------------------------------------------------

SHARDED_DIR = "sharded"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


def _reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 unit of `model` back to its shards: a forward without backward (no_grad scoring, generation)
    leaves the root unit's parameters gathered, and a state dict must see the sharded DTensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _dist_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _reshard(model)
    # Local shards (DTensors) under canonical names: nothing is gathered. For a fresh optimizer this first
    # initialises its state (one step at lr 0), so that a load has tensors to read into.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


ShardedParts = Mapping[str, tuple[torch.nn.Module, torch.optim.Optimizer]]


def _sharded_pairs(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                   parts: ShardedParts | None) -> dict[str | None, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """The (model, optimizer) pairs of a sharded checkpoint by their key in its DCP folder: None for the one pair
    at the top level, a name for each of `parts`."""
    if (parts is None) == (model is None or optimizer is None):
        raise TypeError("a sharded checkpoint takes model and optimizer, or parts (name -> (model, optimizer))")
    return {None: (model, optimizer)} if parts is None else dict(parts)


def _sharded_state(pairs: Mapping[str | None, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict[str, Any]:
    """The DCP state of `pairs`: the top-level pair's {"model", "optimizer"}, or {name: {...}} per named pair."""
    states = {name: _dist_state(model, optimizer) for name, (model, optimizer) in pairs.items()}
    return states.get(None, states)


def save_sharded_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module | None = None,
                            optimizer: torch.optim.Optimizer | None = None, parts: ShardedParts | None = None,
                            scheduler: Any = None, data_position: Mapping[str, Any] | None = None,
                            extra: Mapping[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Collective (every process calls it): write checkpoint `step` of an FSDP2-sharded `model` and its
    `optimizer` through torch.distributed.checkpoint, each process its own shards, in the parameters' own dtype
    (the float32 master weights). Several models in one checkpoint: `parts` (name -> (model, optimizer)) instead
    of `model` and `optimizer`. Returns the checkpoint folder once it is complete on every process."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    pairs = _sharded_pairs(model, optimizer, parts)
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-sharded"  # one name for every process: they all write into it
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    rngs: list[Any] = [None] * world
    dist.all_gather_object(rngs, rng_state())
    try:  # returns once metadata is written; a failure on any process is raised on every one
        dcp.save(_sharded_state(pairs), checkpoint_id=str(tmp / SHARDED_DIR))
    except BaseException as error:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        fault = _output_fault(error, final)
        if fault is error:
            raise
        raise fault from error
    if rank == 0:
        try:
            _seal_checkpoint(tmp, final, {
                "step": int(step),
                "optimizer": None,  # in sharded/
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rngs[0],
                "rng_per_process": rngs,
                "data_position": dict(data_position or {}),
                "extra": dict(extra or {}),
            }, format="dcp", processes=world)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune_checkpoints(run_dir, keep_last)
    dist.barrier()
    return final


def _output_fault(error: BaseException, target: Path) -> BaseException:
    """DCP gathers every process's failure into one CheckpointException (a BaseException naming no file, which
    `except Exception` cleanups miss): the first OSError among them (a full disk, a read-only folder, a quota) as
    an OSError naming `target`; any other as a RuntimeError naming `target` and the processes. Other errors as
    they are."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(error, CheckpointException):
        return error
    causes = {rank: failure[0] if isinstance(failure, tuple) else failure for rank, failure in error.failures.items()}
    cause = next((c for c in causes.values() if isinstance(c, OSError) and c.errno is not None), None)
    if cause is not None:
        return OSError(cause.errno, cause.strerror, str(target))
    first = next(iter(causes.values()), None)
    return RuntimeError(f"{target}: writing the sharded checkpoint failed on process(es) {sorted(causes)}: {first!r}")


def restore_sharded_checkpoint(path: str | Path, *, model: torch.nn.Module | None = None,
                               optimizer: torch.optim.Optimizer | None = None, parts: ShardedParts | None = None,
                               scheduler: Any = None, verify: bool = True) -> dict[str, Any]:
    """Collective: load a sharded checkpoint into the live FSDP2 `model` and `optimizer`, or into each of `parts`
    as save_sharded_checkpoint wrote them (each process reads its own shards; another process count reshards),
    then the scheduler and each process's RNG state (last). Returns the trainer state (for "step",
    "data_position", "extra")."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    pairs = _sharded_pairs(model, optimizer, parts)
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = [None]
    if verify and rank == 0:
        problem[0] = checksum_problem(path, json.loads((path / INDEX_FILE).read_text(encoding="utf-8")))
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise CheckpointError(problem[0])
    state = _sharded_state(pairs)
    dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
    for name, (part_model, part_optimizer) in pairs.items():
        loaded = state if name is None else state[name]
        set_state_dict(part_model, part_optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])
    trainer_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if scheduler is not None and trainer_state["scheduler"] is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    rngs = trainer_state.get("rng_per_process") or []
    set_rng_state(rngs[rank] if len(rngs) == world else trainer_state["rng"])  # last
    return trainer_state


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole state dict of an FSDP2-sharded `model` on CPU on process 0 (the other processes get an
    empty dict), gathered one tensor at a time (DTensor.full_tensor), every process in the same order. Tied
    parameters (one Parameter under several names, e.g. lm_head and the embedding) share one tensor, as in
    `model.state_dict()`, so save_pretrained drops the tied copy.

    Not get_model_state_dict(full_state_dict=True): after a forward without backward (held-out scoring) it
    returned some entries still as DTensor shards here (torch 2.13, gloo)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    _reshard(model)
    main = dist.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if main:
            state[name] = value.detach().cpu()
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state


# ----------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------

REDACTED = "<redacted>"
_SECRET_WORDS = {"key", "apikey", "token", "secret", "secrets", "password", "passwd"}


def _is_secret(name: str) -> bool:
    # Match whole name parts ("hf_token", "apiKey", "WANDB_API_KEY"), not substrings: a plain substring
    # test would redact `max_new_tokens` and `tokenizer`, which the manifest must keep.
    parts = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return any(part in _SECRET_WORDS for part in parts)


def redact(value: Any) -> Any:
    """Copy of a JSON-like tree with every value under a secret-looking key replaced by "<redacted>"."""
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """{"commit", "dirty"} of the git repo containing `path` (default: the prism package); nulls when
    it is not a repo or git is missing."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what platform knows). Two hosts of one VM type can
    differ here, and with them a CPU run's float bits (its kernels) and timings."""
    model = cpuinfo_field("model name", cpuinfo)
    return model if model is not None else platform.processor() or platform.machine()


def host_info() -> dict[str, Any]:
    """Where a run ran: what a manifest, a reproduce record and a benchmark record name as their host. `threads`:
    torch's intra-op threads in the writing process, which set a CPU run's float sums and its speed."""
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "native_bf16": native_bf16()}


def write_manifest(run_dir: str | Path, *, config: Any, seed: int, upstream: Mapping[str, str] | None = None,
                   checkpoint_dir: str | Path | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write run_dir/manifest.json atomically: what ran, from what, with which code and inputs."""
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        index = json.loads((checkpoint_dir / INDEX_FILE).read_text(encoding="utf-8"))
        checkpoint = {"path": str(checkpoint_dir), "step": index["step"], "sha256": index["files"]}
    manifest = {
        "config": redact(config_to_dict(config)),
        "config_hash": config_hash(config),
        "seed": seed,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "accelerate": _version("accelerate"),
                     "prism": _version("prism")},
        "git": git_info(),
        "upstream": dict(upstream or {}),
        "checkpoint": checkpoint,
        "host": host_info(),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "extra": redact(dict(extra or {})),
    }
    path = Path(run_dir) / "manifest.json"
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def _plain_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def mean_or_nan(values) -> float:
    """The mean of a sequence of numbers; NaN for none (a step that trained nothing), so it never reads as 0."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


class MetricsLogger:
    """One JSON line per `log(step, metrics)` in run_dir/metrics.jsonl, flushed each time, and the same
    record sent to the stage's tracker (`tracking`: wandb or tensorboard, see below) when one is on.

    `resume_step=None` starts a fresh log (an old file is emptied); `resume_step=k` keeps lines with
    step <= k and drops the rest (logged after checkpoint k by the interrupted run, and about to be
    logged again), so a resumed run's file equals an uninterrupted one's. Torn last lines are dropped.
    `config` is what the tracker records as the run's config; None = the stage's config.yaml."""

    def __init__(self, run_dir: str | Path, tracking: str = "none", project: str | None = None,
                 resume_step: int | None = None, config: Mapping[str, Any] | None = None) -> None:
        if tracking not in TRACKING_CHOICES:
            raise RuntimeConfigError(f"tracking must be one of {', '.join(TRACKING_CHOICES)}, got {tracking!r}")
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The tracker first: one that cannot open (not installed) leaves metrics.jsonl as it was.
        self.tracker: WandbTracker | TensorBoardTracker | None = None
        self._file = None
        if tracking != "none":
            self.tracker = open_tracker(self.path.parent, tracking, project=project, config=config,
                                        resume_step=resume_step)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("step", math.inf) <= resume_step:
                    kept.append(line + "\n")
        try:
            atomic_write_text(self.path, "".join(kept))
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _plain_number(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        except OSError as error:  # a full disk: name the file (a failed write names none)
            raise OSError(error.errno, error.strerror, str(self.path)) from error
        if self.tracker is not None:
            self.tracker.log(int(step), {k: v for k, v in record.items() if k != "step"})

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def last_logged_step(run_dir: str | Path) -> int:
    """The step of the last complete line of run_dir/metrics.jsonl; 0 when nothing was logged."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return 0


# ----------------------------------------------------------------------------------------------------
# Trackers: wandb or TensorBoard beside metrics.jsonl (`tracking:` of every stage config)
#
# One tracker run per stage directory across resumes: tracking.json in the stage directory keeps, per tracker,
# what reopens it ({"wandb": {"run_id", "project", "name", "group"}, "tensorboard": {"log_dir"}}). A resumed stage
# continues its run; `prism eval` of the stage's model/ adds the results to it (evaluation.tracking). The run's
# config is config.yaml with secrets redacted, as in manifest.json. wandb and TensorBoard are imported only here,
# when a stage turns tracking on.
# ----------------------------------------------------------------------------------------------------

TRACKING_CHOICES = ("none", "wandb", "tensorboard")
TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"  # inside the stage directory
RUN_ID_ALPHABET = string.ascii_lowercase + string.digits  # the shape of wandb's own run ids


def new_run_id() -> str:
    return "".join(secrets.choice(RUN_ID_ALPHABET) for _ in range(8))


def read_tracking(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The stage directory's tracking.json: tracker name -> what reopens its run; {} without one."""
    path = Path(run_dir) / TRACKING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def record_tracking(run_dir: str | Path, tracker: str, entry: Mapping[str, Any]) -> None:
    records = read_tracking(run_dir)
    records[tracker] = dict(entry)
    atomic_write_text(Path(run_dir) / TRACKING_FILE, json.dumps(records, indent=2) + "\n")


def recorded_config(run_dir: str | Path) -> tuple[dict[str, Any], str | None]:
    """(the stage's config as its config.yaml records it, secrets redacted; its config hash, from the file's
    header); ({}, None) when the directory has no config.yaml."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}, None
    text = path.read_text(encoding="utf-8")
    header = re.search(r"config_hash ([0-9a-f]+)", text.partition("\n")[0])
    return redact(yaml.safe_load(text) or {}), header.group(1) if header else None


def tracking_name(run_dir: str | Path, digest: str | None) -> str:
    """The run's name: the stage directory's, `<stage>-<config hash>` by default and in a matrix; a directory
    named by hand gets the hash appended, so two configs never share a name."""
    name = Path(run_dir).name
    return name if not digest or digest in name else f"{name}-{digest}"


def wandb_mode(api_key: str | None) -> str | None:
    """The mode passed to wandb.init: "offline" unless the user chose, by setting WANDB_MODE or giving wandb
    credentials (`api_key`, from WANDB_API_KEY or `wandb login`; or WANDB_IDENTITY_TOKEN_FILE). Then None leaves
    it to wandb: WANDB_MODE, else what `wandb online|offline` wrote, else online. Online without credentials, wandb
    would stop a batch job with "No API key configured", or hold it at a login prompt."""
    if os.environ.get("WANDB_MODE") or api_key or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    return "offline"


def _not_installed(tracking: str) -> RuntimeConfigError:
    return RuntimeConfigError(f"tracking={tracking!r} but {tracking} is not installed: pip install {tracking}, "
                              "or set tracking: none")


def require_tracker(tracking: str) -> None:
    """Refuse a tracker whose package is missing before a stage writes anything (RuntimeConfigError)."""
    import importlib.util

    if tracking in ("wandb", "tensorboard") and importlib.util.find_spec(tracking) is None:
        raise _not_installed(tracking)


class WandbTracker:
    """The stage's wandb run (`entry` from tracking.json): wandb.init(id=..., resume="allow"), files under
    run_dir/wandb/. Offline (see wandb_mode), each session writes its own offline-run-<time>-<id> folder, all
    under the one run id; online, a session resumes the run on the server."""

    kind = "wandb"

    def __init__(self, run_dir: str | Path, entry: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> None:
        try:
            import wandb  # type: ignore[import-not-found]
        except ImportError:
            raise _not_installed("wandb") from None
        record_tracking(run_dir, "wandb", entry)  # before init: a stage killed after a checkpoint resumes this run
        self.run = wandb.init(
            id=entry["run_id"], resume="allow", project=entry["project"], name=entry["name"], group=entry["group"],
            config=dict(config) if config is not None else None, dir=str(run_dir), mode=wandb_mode(wandb.api.api_key),
            allow_val_change=True,  # bookkeeping fields (log_every_steps, ...) may change between resumes
            reinit="create_new",  # several stages (a matrix run inline) or an evaluation in one process
        )

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        self.run.log(dict(record), step=step)

    def summary(self, values: Mapping[str, Any], step: int) -> None:
        self.run.summary.update(dict(values))  # final numbers (an evaluation): the run's summary, not a step

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """Event files in run_dir/tensorboard/ through torch.utils.tensorboard.SummaryWriter (needs the tensorboard
    package). `purge_step` hides the events a crashed session logged at or after it, as MetricsLogger drops
    those lines: 0 on a fresh start, k + 1 when resuming from checkpoint k, None to add to a finished stage."""

    kind = "tensorboard"

    def __init__(self, run_dir: str | Path, purge_step: int | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # torch ships the writer, tensorboard its files
        except ImportError:
            raise _not_installed("tensorboard") from None
        record_tracking(run_dir, "tensorboard", {"log_dir": TENSORBOARD_DIR})
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge_step)
        if config is not None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", global_step=0)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)):  # scalars only: lists and strings stay in metrics.jsonl
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # as metrics.jsonl: what a crash interrupts is on disk

    def summary(self, values: Mapping[str, Any], step: int) -> None:
        self.log(step, values)

    def close(self) -> None:
        self.writer.close()


def open_tracker(run_dir: str | Path, tracking: str, *, project: str | None, config: Mapping[str, Any] | None,
                 resume_step: int | None) -> WandbTracker | TensorBoardTracker:
    """The stage's tracker at its start. A resumed stage (`resume_step` a checkpoint's step) continues the run
    tracking.json names; a fresh start (None or 0: no checkpoint) begins a new one (an online run rejects the steps
    it already holds). The config sent is
    `config`, else the stage's config.yaml, secrets redacted either way; the group its `tracking_group` (a matrix
    sets it), else wandb's own WANDB_RUN_GROUP."""
    recorded, digest = recorded_config(run_dir)
    sent = redact(dict(config)) if config is not None else recorded
    fresh = not resume_step
    if tracking == "tensorboard":
        if fresh:  # a fresh start: hide every event of an earlier attempt, record the config once
            return TensorBoardTracker(run_dir, purge_step=0, config=sent)
        return TensorBoardTracker(run_dir, purge_step=resume_step + 1)
    previous = {} if fresh else read_tracking(run_dir).get("wandb", {})
    # A resumed run stays in the project it started in, whatever WANDB_PROJECT says now.
    entry = {"run_id": previous.get("run_id") or new_run_id(),
             "project": previous.get("project") or os.environ.get("WANDB_PROJECT") or project,
             "name": tracking_name(run_dir, digest), "group": sent.get("tracking_group")}
    return WandbTracker(run_dir, entry, sent)


def reopen_trackers(run_dir: str | Path) -> list[WandbTracker | TensorBoardTracker]:
    """The trackers a finished stage recorded in tracking.json, reopened to add to its runs; [] without one."""
    opened: list[WandbTracker | TensorBoardTracker] = []
    records = read_tracking(run_dir)
    try:
        if "wandb" in records:
            opened.append(WandbTracker(run_dir, records["wandb"]))
        if "tensorboard" in records:
            opened.append(TensorBoardTracker(run_dir))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened


# ----------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------


class Progress:
    """Progress on stderr with rate and ETA: tqdm on a terminal, a plain line every `interval`
    seconds (and at the end) otherwise, so logs of batch jobs stay readable."""

    def __init__(self, total: int | None, desc: str = "", interval: float = 10.0, initial: int = 0) -> None:
        self.total, self.desc, self.interval, self.n = total, desc, interval, initial
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, initial=initial, mininterval=1.0, file=sys.stderr,
                             dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _plain_number(v) for k, v in postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(postfix)

    def _print(self, postfix: Mapping[str, Any] | None = None) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        line = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total is not None else "")
        line += f" [{elapsed:.0f}s, {rate:.2f}it/s"
        if self.total is not None and rate > 0:
            line += f", eta {max(self.total - self.n, 0) / rate:.0f}s"
        line += "]"
        if postfix:
            line += " " + " ".join(f"{k}={_plain_number(v)}" for k, v in postfix.items())
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.interval >= 0:
            self._print()
            self.interval = -1.0  # print the final line once

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_progress(noun: str = "samples") -> Callable[[str, int, int], None]:
    """A `report(split, done, total)` callback (what `prism.data.export.export_world` takes): one Progress
    per split, each with its rate and ETA."""
    bars: dict[str, Progress] = {}

    def report(split: str, done: int, total: int) -> None:
        bar = bars.get(split)
        if bar is None:
            bar = bars[split] = Progress(total, desc=f"{split} {noun}")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return report


# ----------------------------------------------------------------------------------------------------
# DONE marker and finite-loss guard
# ----------------------------------------------------------------------------------------------------


def mark_done(run_dir: str | Path) -> Path:
    """Write the DONE marker; call it after every other output of the stage is in place."""
    path = Path(run_dir) / "DONE"
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    atomic_write_text(path, stamp + "\n")
    return path


def is_done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "DONE").is_file()


def check_finite(loss: torch.Tensor | float, model: torch.nn.Module | None = None, *, step: int | None = None) -> None:
    """Raise NonFiniteError naming the step and the culprit (the loss, or the first parameter whose
    gradient holds NaN/inf). Call it once per optimizer step."""
    where = f" at step {step}" if step is not None else ""
    value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(f"non-finite loss{where}: {value.flatten()[:4].tolist()}")
    if model is None:
        return
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    # One sync for all: a NaN or inf anywhere makes the sum of the gradients' norms non-finite (0.2 against 2.0 ms
    # a step for embedded-s's 51 tensors checked one by one). Only then, or with sharded (DTensor) gradients, is
    # each gradient checked, to name the first culprit; a sum that overflowed finds none and passes.
    if grads and all(type(grad) is torch.Tensor for grad in grads) and bool(
            torch.isfinite(torch.stack([torch.linalg.vector_norm(grad) for grad in grads]).sum())):
        return
    for name, param in model.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            raise NonFiniteError(f"non-finite gradient{where} in parameter {name!r} (shape {tuple(param.shape)})")


# ----------------------------------------------------------------------------------------------------
# Preemption: a signal asks the stage to save at the end of its current optimizer step and stop
# ----------------------------------------------------------------------------------------------------

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: `prism train`'s exit status when it stopped on a preemption signal
_preempt_received: list[int] = []  # the signals received while preemption_signals() is active


class StagePreempted(RuntimeError):
    """A stage saved a checkpoint at `step` on a preemption signal and stopped; running it again resumes there."""

    def __init__(self, stage: str, run_dir: str | Path, step: int) -> None:
        super().__init__(f"{stage} preempted: saved a checkpoint at step {step} in {run_dir}; run it again to resume")
        self.stage, self.run_dir, self.step = stage, Path(run_dir), step


def preemption_signal_names() -> tuple[str, ...]:
    """SIGUSR1 and SIGUSR2 (submitit's default warning signal, which SLURM may deliver to every process of the job)
    always; SIGTERM (what SLURM sends on preemption and at the time limit, and what the matrix's submitit job sends
    its node to stop it at a checkpoint) only in a SLURM or submitit job (SLURM_JOB_ID or SUBMITIT_EXECUTOR set),
    so that elsewhere (e.g. the local launcher stopping its other nodes) SIGTERM keeps its immediate effect."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_EXECUTOR")
    return ("SIGUSR1", "SIGUSR2", *(("SIGTERM",) if job else ()))


@contextmanager
def preemption_signals(names: tuple[str, ...] | None = None):
    """While active, each of `names` (default `preemption_signal_names()`) only records that it arrived; training
    loops ask `preemption_requested()` after each optimizer step, save a checkpoint and raise StagePreempted.
    Installed by the stage command (`prism train`), in the main thread; the previous handlers come back on exit."""
    def record(signum, frame) -> None:
        _preempt_received.append(signum)

    previous = {}
    _preempt_received.clear()
    try:
        for name in names if names is not None else preemption_signal_names():
            number = getattr(signal, name)
            previous[number] = signal.signal(number, record)
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _preempt_received.clear()


def preemption_requested() -> bool:
    """Whether a preemption signal arrived in this process (see preemption_signals)."""
    return bool(_preempt_received)
