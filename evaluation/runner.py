"""`run_eval`: evaluate one checkpoint on a suite through lmms-eval, keep everything, skip what is done.

Layout under `out_root` (default outputs/evals):

    results.csv                              the row store, all checkpoints (evaluation.results)
    .hash-cache.json                         file digests by (path, size, mtime), so hashing is paid once
    <checkpoint-hash>/                       sha256 over the checkpoint's files (names and contents)
      <entry>-<key>/                         one lmms-eval task or group, e.g. prism_embedded-1f0c2a9b3e4d; what
                                             lmms-eval's CLI writes under its --output_path for the same run:
        <model_name_sanitized>/              the checkpoint folder's last two path parts, e.g. rlvr-dapo__model
          <date>_results.json                lmms-eval's results JSON (date: YYYYMMDD_HHMMSS, UTC), model name
                                             and model_args filled as `--model_args` would give them
          <date>_samples_<task>.jsonl        lmms-eval's samples, one file per task
        rows.csv                             this evaluation's tidy rows
        eval.json                            manifest: checkpoint, suite, resolved config (no secrets), limit,
                                             world, versions, seconds, files
        DONE                                 written last; the folder appears whole (built under a temp name)

An entry's key hashes what decides its numbers: the entry, the suite's decoding and seed, backend and
dtype, `--limit`, the world's benchmark files (embedded) or the dataset path (paper), the judge's model
(judged metrics). An entry whose folder holds DONE is skipped: nothing is loaded, nothing appended.

Suites: `embedded` is one entry, the `prism_embedded` group (a task per family of the world, reading
`<world>/bench/<family>.parquet`: the task YAMLs' `dataset_path` is set to `<world>/bench` at run time).
`paper` is one entry per published benchmark (evaluation/published.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from evaluation.config import (
    EMBEDDED_GROUP,
    FAMILIES,
    JUDGE_METRICS,
    PUBLISHED_TASKS,
    EvalConfig,
    EvalError,
)
from evaluation.dataset_sources import require_published_datasets
from evaluation.judge import export_judge_env, require_judge, resolve_judge
from evaluation.results import STORE_COLUMNS, append_to_store, parse_results, read_rows, results_files, write_rows
from evaluation.tracking import log_to_stage_trackers
from prism.atomic_io import atomic_write_text, check_output_folder
from prism.hub import resolve_model_path

SUITES = ("embedded", "paper")
SUITE_VERSION = 1  # bump when scoring or prompting changes, so stored evaluations are not reused
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
EMBEDDED_TASKS_DIR = TASKS_DIR / "embedded"
PUBLISHED_TASKS_DIR = TASKS_DIR / "published"
DEFAULT_OUT_ROOT = Path("outputs/evals")
DEFAULT_WORLD = Path("outputs/world")
STORE_NAME = "results.csv"
DONE = "DONE"


@dataclass
class Entry:
    """One lmms-eval task or group to evaluate, with the config overrides lmms-eval applies to it."""

    name: str
    benchmark: str
    overrides: dict[str, Any]
    key_data: dict[str, Any]
    judge_metrics: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        canonical = json.dumps({"entry": self.name, "suite_version": SUITE_VERSION, **self.key_data}, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]

    def lmms_task(self) -> dict[str, Any]:
        """The task config lmms-eval loads: the registered task or group plus our overrides (a fresh copy:
        lmms-eval mutates what it is given)."""
        return {"task": self.name, **copy.deepcopy(self.overrides)}


@dataclass
class EntryOutcome:
    entry: str
    status: str  # "evaluated" or "skipped"
    directory: Path
    seconds: float
    samples: int | None
    rows: list[dict] = field(default_factory=list)


@dataclass
class EvalReport:
    checkpoint: Path
    checkpoint_hash: str
    suite: str
    out_dir: Path
    store: Path
    outcomes: list[EntryOutcome]

    @property
    def evaluated(self) -> list[str]:
        return [o.entry for o in self.outcomes if o.status == "evaluated"]

    @property
    def skipped(self) -> list[str]:
        return [o.entry for o in self.outcomes if o.status == "skipped"]

    @property
    def rows(self) -> list[dict]:
        return [row for o in self.outcomes for row in o.rows]


# ---------------------------------------------------------------------------------------------
# Checkpoint identity
# ---------------------------------------------------------------------------------------------


def _file_digest(path: Path, cache: dict[str, Any]) -> str:
    stat = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit["size"] == stat.st_size and hit["mtime_ns"] == stat.st_mtime_ns:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return cache[key]["sha256"]


def checkpoint_digests(checkpoint: Path | str, cache_file: Path | None = None) -> tuple[str, dict[str, Any]]:
    """(16 hex chars of sha256 over the checkpoint's files: relative names and contents, hidden files left out;
    the per-file digest cache, read from `cache_file` and updated in memory, not written)."""
    checkpoint = Path(checkpoint)
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(checkpoint).parts))
    total = hashlib.sha256()
    for path in files:
        total.update(f"{path.relative_to(checkpoint).as_posix()}\0{_file_digest(path, cache)}\n".encode("utf-8"))
    return total.hexdigest()[:16], cache


def write_digest_cache(cache_file: Path, cache: dict[str, Any]) -> None:
    atomic_write_text(cache_file, json.dumps(cache, indent=0, sort_keys=True))


def checkpoint_hash(checkpoint: Path | str, cache_file: Path | None = None) -> str:
    """The checkpoint's 16-hex-char digest (checkpoint_digests); `cache_file` is updated when given."""
    digest, cache = checkpoint_digests(checkpoint, cache_file)
    if cache_file is not None:
        write_digest_cache(cache_file, cache)
    return digest


def _check_checkpoint(checkpoint: Path) -> None:
    if not checkpoint.is_dir():
        raise EvalError(f"checkpoint {checkpoint} does not exist: expected a local Hugging Face checkpoint folder")
    if not (checkpoint / "config.json").is_file() or not any(checkpoint.glob("*.safetensors")):
        raise EvalError(f"checkpoint {checkpoint} is not a checkpoint folder: expected config.json and *.safetensors")
    from prism.models import check_checkpoint_folder

    check_checkpoint_folder(checkpoint)  # config class, no code shipped with it, whole weights: before any write


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------


def _world_fingerprint(world: Path) -> dict[str, Any]:
    manifest_path = world / "world.json"
    if not manifest_path.is_file():
        raise EvalError(
            f"world {world} is not a world export (no world.json): run `prism world export --out {world}` or pass --world DIR"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    missing = [f for f in FAMILIES if not (world / "bench" / f"{f}.parquet").is_file()]
    if missing:
        raise EvalError(f"world {world} has no benchmark file for {', '.join(missing)}: the embedded suite needs all six families")
    checksums = manifest.get("files", {})
    bench = {f"bench/{f}.parquet": checksums.get(f"bench/{f}.parquet") for f in FAMILIES}
    if any(v is None for v in bench.values()):  # an export without checksums: hash the files ourselves
        bench = {name: hashlib.sha256((world / name).read_bytes()).hexdigest() for name in bench}
    return bench


def _generation_kwargs(temperature: float, top_p: float, max_new_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "do_sample": temperature > 0, "until": []}


def _common_key(cfg: EvalConfig, limit: int | None) -> dict[str, Any]:
    return {"seed": cfg.seed, "backend": cfg.backend, "dtype": cfg.dtype, "limit": limit}


def plan_suite(suite: str, cfg: EvalConfig, world: Path | None, limit: int | None) -> list[Entry]:
    """The entries of a suite with their lmms-eval overrides and keys (no model, no dataset touched)."""
    if suite == "embedded":
        world = (world or DEFAULT_WORLD).resolve()
        decoding = cfg.embedded
        gen = _generation_kwargs(decoding.temperature, decoding.top_p, decoding.max_new_tokens)
        return [Entry(
            name=EMBEDDED_GROUP,
            benchmark="embedded",
            overrides={"dataset_path": str(world / "bench"), "generation_kwargs": gen},
            key_data={**_common_key(cfg, limit), "generation": gen, "world": _world_fingerprint(world)},
        )]
    if suite == "paper":
        entries = []
        for benchmark in cfg.paper.tasks:
            gen = _generation_kwargs(cfg.paper.temperature, cfg.paper.top_p, cfg.paper.max_new_tokens[benchmark])
            overrides: dict[str, Any] = {"generation_kwargs": gen}
            if benchmark in cfg.paper.dataset_paths:
                overrides["dataset_path"] = cfg.paper.dataset_paths[benchmark]
            judged = JUDGE_METRICS.get(benchmark, ()) if cfg.paper.judge_metrics else ()
            if benchmark in JUDGE_METRICS and not judged:  # rule-based only: swap the hook, drop the metric
                overrides.update(_rule_based_overrides(benchmark))
            judge = resolve_judge(cfg.judge) if judged else None
            key = {**_common_key(cfg, limit), "generation": gen, "dataset_path": overrides.get("dataset_path"),
                   "judge": {"metrics": list(judged), "model": judge.model if judge else None}}
            entries.append(Entry(PUBLISHED_TASKS[benchmark], benchmark, overrides, key, tuple(judged)))
        return entries
    raise EvalError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")


def _rule_based_overrides(benchmark: str) -> dict[str, Any]:
    from evaluation import published
    from evaluation.tasks.published import utils as hooks  # the tasks' own hook, submission record included

    def process_results(doc, results, _benchmark=benchmark):
        return hooks.process_results(_benchmark, doc, results, judged=False)

    process_results.__name__ = f"{benchmark}_process_results"
    metric_list = [
        {"metric": "accuracy", "aggregation": "mean", "higher_is_better": True},
        {"metric": "format_valid_rate", "aggregation": "mean", "higher_is_better": True},
        {"metric": "mean_response_tokens", "aggregation": "mean", "higher_is_better": False},
    ]
    if benchmark == "hallusion_bench_image":
        metric_list += [
            {"metric": "question_pair_acc", "aggregation": published.hallusion_question_pair_acc, "higher_is_better": True},
            {"metric": "figure_acc", "aggregation": published.hallusion_figure_acc, "higher_is_better": True},
        ]
    return {"process_results": process_results, "metric_list": metric_list}


def task_manager(suite: str | None = None, task_type: str = "chat"):
    """An lmms-eval TaskManager over PRISM's tasks only (lmms-eval's ~2 s of built-ins are not indexed).

    lmms-eval's `TaskManager.load_config` builds a task given as a config dict (our run-time overrides)
    as a simple-interface task whatever the model; ours are chat-interface models, so this manager
    loads such dicts with `task_type` ("chat": `doc_to_messages` requests).
    """
    from lmms_eval.tasks import TaskManager

    class _PrismTaskManager(TaskManager):
        def load_config(self, config):
            return self._load_individual_task_or_group(config, task_type=task_type)

    paths = {"embedded": [str(EMBEDDED_TASKS_DIR)], "paper": [str(PUBLISHED_TASKS_DIR)]}.get(
        suite, [str(EMBEDDED_TASKS_DIR), str(PUBLISHED_TASKS_DIR)]
    )
    return _PrismTaskManager(verbosity="WARNING", include_path=paths, include_defaults=False)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lmms_model_name(cfg: EvalConfig) -> str:
    """The lmms-eval model (`--model`) of the backend: our entry points in evaluation/plugin.py."""
    return "prism_vllm" if cfg.backend == "vllm" else "prism_hf"


def model_arguments(cfg: EvalConfig, checkpoint: Path) -> dict[str, Any]:
    """The model's arguments as lmms-eval's `--model_args` gives them; batch size and device are the CLI's own
    `--batch_size` and `--device`, which lmms-eval passes beside them (in model_args too they clash)."""
    args: dict[str, Any] = {"pretrained": str(checkpoint), "seed": cfg.seed, "dtype": cfg.dtype}
    if cfg.backend == "vllm":
        v = cfg.vllm
        args.update(tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
                    max_model_len=v.max_model_len, max_images_per_prompt=v.max_images_per_prompt,
                    chat_template=v.chat_template)
    return {name: value for name, value in args.items() if value is not None}  # unset: the model's default


def model_args_string(args: dict[str, Any]) -> str:
    """`key=value,...`, the `--model_args` string lmms-eval parses (lmms_eval.utils.simple_parse_args_string)."""
    return ",".join(f"{name}={value}" for name, value in args.items())


def _build_model(cfg: EvalConfig, checkpoint: Path):
    args = model_arguments(cfg, checkpoint)
    if cfg.backend == "vllm":
        from evaluation.vllm_model import PrismVLLM

        return PrismVLLM(**args, batch_size=cfg.batch_size)
    from evaluation.model import PrismHF

    return PrismHF(**args, batch_size=cfg.batch_size, device=cfg.device)


def _public_config(cfg: EvalConfig) -> dict[str, Any]:
    from evaluation.config import redact_url
    from prism.config import config_to_dict

    data = config_to_dict(cfg)
    data["judge"]["base_url"] = redact_url(data["judge"]["base_url"])
    return data


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("lmms_eval", "transformers", "torch", "datasets", "vllm", "prism"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def _user_error_inside(error: BaseException) -> EvalError | None:
    """The EvalError behind `error` (through tenacity's RetryError and exception chains), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, EvalError):
            return error
        last_attempt = getattr(error, "last_attempt", None)
        if last_attempt is not None and hasattr(last_attempt, "exception"):
            error = last_attempt.exception()
            continue
        error = error.__cause__ or error.__context__
    return None


def _evaluate_entry(
    entry: Entry, model, cfg: EvalConfig, checkpoint: Path, limit: int | None, directory: Path, columns: dict[str, Any]
) -> EntryOutcome:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        # lmms-eval's CLI date (`--timezone UTC`): a fresh one every call, as the CLI takes one per run (the
        # default of simple_evaluate is fixed at import, and its sample files are appended to).
        date = get_datetime_str(timezone="UTC")
        # The folder is the CLI's --output_path: the tracker adds <model_name_sanitized>/ from model_args.
        tracker = EvaluationTracker(output_path=str(tmp))
        manager = task_manager("embedded" if entry.benchmark == "embedded" else "paper")
        hf = cfg.backend == "hf"
        try:
            results = simple_evaluate(
                model=model,
                model_args=model_args_string(model_arguments(cfg, checkpoint)),
                batch_size=cfg.batch_size,
                device=cfg.device if hf else None,
                tasks=[entry.lmms_task()],
                task_manager=manager,
                limit=limit,
                log_samples=True,
                evaluation_tracker=tracker,
                bootstrap_iters=cfg.bootstrap_iters,
                random_seed=cfg.seed,
                numpy_random_seed=cfg.seed,
                torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed,
                datetime_str=date,
                verbosity="WARNING",
            )
        except Exception as error:  # lmms-eval retries hooks (tenacity) and wraps what they raised
            cause = _user_error_inside(error)
            if cause is not None:
                raise cause from None
            raise
        if results is None:
            raise EvalError(f"{entry.name}: lmms-eval returned no results")
        samples = results.pop("samples", {})
        # Given the loaded model rather than its name, simple_evaluate records the *object* as the model source
        # (the tracker's asdict of it fails, swallowed) and its class name as config.model: name it as the CLI.
        tracker.general_config_tracker.model_source = lmms_model_name(cfg)
        results["config"]["model"] = lmms_model_name(cfg)
        tracker.save_results_aggregated(results=results, samples=samples, datetime_str=date)
        for task_name in results.get("configs", {}):
            if task_name in samples:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        written = results_files(tmp)
        if not written:  # the tracker logs and swallows write errors
            raise EvalError(f"{entry.name}: lmms-eval wrote no results JSON under {tmp}")
        seconds = time.perf_counter() - started
        rows = parse_results(written[-1], **columns)
        write_rows(tmp / "rows.csv", rows)
        n = sum(int(v.get("effective", 0)) for v in results.get("n-samples", {}).values())
        manifest = {
            **{k: columns[k] for k in ("checkpoint", "checkpoint_hash", "suite", "benchmark")},
            "entry": entry.name,
            "eval_key": entry.key,
            "key_data": entry.key_data,
            "config": _public_config(cfg),
            "limit": limit,
            "judge": (resolve_judge(cfg.judge).describe() if entry.judge_metrics else None),
            "lmms_eval_version": results.get("lmms_eval_version"),
            "versions": _versions(),
            "date": date,
            "seconds": round(seconds, 3),
            "samples": n,
            "seconds_per_100_samples": round(100 * seconds / n, 3) if n else None,
            "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
        }
        (tmp / "eval.json").write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        (tmp / DONE).write_text(date + "\n", encoding="utf-8")
        if directory.exists():  # an unfinished folder from an interrupted run
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return EntryOutcome(entry.name, "evaluated", directory, seconds, n, rows)


def run_eval(
    checkpoint: Path | str,
    suite: str = "embedded",
    limit: int | None = None,
    world: Path | str | None = None,
    out_root: Path | str = DEFAULT_OUT_ROOT,
    config: EvalConfig | None = None,
    model_factory: Callable[[EvalConfig, Path], Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate `checkpoint` on `suite` ("embedded" or "paper"); entries already evaluated are skipped.

    `checkpoint` is a folder or a Hub model id (prism.hub: cached, else downloaded; offline and not cached is a
    one-line HubError). Raises EvalError (one line) for user mistakes: no checkpoint, no world export, no judge for a
    judge-dependent metric, no vLLM for backend vllm, a bad limit, a published dataset that is neither
    cached nor given as a local copy while the Hub cannot be used (evaluation.dataset_sources).
    """
    cfg = config or EvalConfig()
    log = log or (lambda message: None)
    out_root = Path(out_root).resolve()
    if suite not in SUITES:
        raise EvalError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalError(f"--limit must be a positive integer, got {limit!r}")
    # A Hub model id (the instruct row of a full-world matrix) is its cached or downloaded snapshot (prism.hub).
    checkpoint = Path(resolve_model_path(str(checkpoint), "--checkpoint")).resolve()
    _check_checkpoint(checkpoint)
    check_output_folder(out_root, "--out")  # a file there would fail the first write, after the model loaded
    entries = plan_suite(suite, cfg, Path(world) if world is not None else None, limit)
    for entry in entries:  # before anything is loaded: a missing judge is a config error, not a zero
        for metric in entry.judge_metrics:
            require_judge(metric, entry.name, cfg.judge)
    if cfg.backend == "vllm" and model_factory is None:
        from evaluation.model import require_vllm

        require_vllm()

    # Nothing is written until the model has loaded: a failed evaluation leaves the output folder as it was.
    digest, digest_cache = checkpoint_digests(checkpoint, out_root / ".hash-cache.json")
    out_dir = out_root / digest
    store = out_root / STORE_NAME
    columns = {"checkpoint": str(checkpoint), "checkpoint_hash": digest, "suite": suite}

    outcomes: list[EntryOutcome] = []
    model = None
    judge_env = export_judge_env(resolve_judge(cfg.judge)) if any(e.judge_metrics for e in entries) else {}
    # Datasets' caches stay under outputs/, out of the home folder (unless the user chose a place).
    cache_env = {
        "LMMS_EVAL_DATASETS_CACHE": os.environ.get("LMMS_EVAL_DATASETS_CACHE") or str(out_root / ".cache" / "datasets"),
        "HF_HOME": os.environ.get("HF_HOME") or str(out_root / ".cache" / "huggingface"),
    }
    with _environment({**cache_env, **judge_env}):
        if suite == "paper":
            # Before the model loads and lmms-eval runs: a dataset that cannot be had (no Hub, not cached, no
            # local copy) is one line here, not a minute of lmms-eval's retries ending in tenacity.RetryError.
            pending = [(e.benchmark, e.name) for e in entries if not (_entry_dir(out_dir, e) / DONE).is_file()]
            # expanded as lmms-eval expands it
            datasets_cache = Path(os.path.expandvars(cache_env["LMMS_EVAL_DATASETS_CACHE"])).expanduser()
            require_published_datasets(pending, cfg.paper.dataset_paths, datasets_cache, PUBLISHED_TASKS_DIR)
        for entry in entries:
            directory = _entry_dir(out_dir, entry)
            if (directory / DONE).is_file():
                manifest = json.loads((directory / "eval.json").read_text(encoding="utf-8"))
                rows = read_rows(directory / "rows.csv") if (directory / "rows.csv").is_file() else []
                log(f"{entry.name}: already evaluated ({directory}), skipped")
                outcomes.append(EntryOutcome(entry.name, "skipped", directory, 0.0, manifest.get("samples"), rows))
                continue
            if model is None:
                log(f"loading {checkpoint} ({cfg.backend})")
                model = (model_factory or _build_model)(cfg, checkpoint)
                write_digest_cache(out_root / ".hash-cache.json", digest_cache)
                out_dir.mkdir(parents=True, exist_ok=True)
                _note_checkpoint(out_dir, checkpoint)
            log(f"{entry.name}: evaluating" + (f" (limit {limit})" if limit else ""))
            outcome = _evaluate_entry(entry, model, cfg, checkpoint, limit, directory,
                                      {**columns, "benchmark": entry.benchmark, "eval_key": entry.key})
            append_to_store(store, outcome.rows)
            log(f"{entry.name}: {outcome.samples} samples in {outcome.seconds:.1f} s -> {directory}")
            outcomes.append(outcome)
    # A tracked stage's model/: its new results join the stage's wandb or TensorBoard run (evaluation.tracking).
    # The evaluation has succeeded and is stored whatever happens here: a tracker that fails is a warning.
    evaluated = [row for outcome in outcomes if outcome.status == "evaluated" for row in outcome.rows]
    try:
        for tracker in log_to_stage_trackers(checkpoint, suite, evaluated, limit):
            log(f"results added to the {tracker} run of stage {checkpoint.parent}")
    except Exception as error:  # noqa: BLE001 - wandb and TensorBoard raise their own types
        log(f"warning: results not added to the tracker run of stage {checkpoint.parent}: {error}")
    return EvalReport(checkpoint, digest, suite, out_dir, store, outcomes)


def _entry_dir(out_dir: Path, entry: Entry) -> Path:
    return out_dir / f"{entry.name}-{entry.key}"


def _note_checkpoint(out_dir: Path, checkpoint: Path) -> None:
    """Remember which paths held this checkpoint (the hash names the folder; people think in paths)."""
    path = out_dir / "checkpoint.json"
    seen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"paths": []}
    if str(checkpoint) not in seen["paths"]:
        seen["paths"].append(str(checkpoint))
        atomic_write_text(path, json.dumps(seen, indent=2))


__all__ = [
    "DEFAULT_OUT_ROOT", "DEFAULT_WORLD", "Entry", "EntryOutcome", "EvalReport", "STORE_COLUMNS", "SUITES",
    "checkpoint_hash", "lmms_model_name", "model_args_string", "model_arguments", "plan_suite", "run_eval",
    "task_manager",
]
