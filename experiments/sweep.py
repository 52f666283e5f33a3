"""Optuna sweeps over the discriminator and alignment knobs: `prism sweep run NAME`, `prism sweep report NAME`.

A sweep file (experiments/configs/sweeps/<name>.yaml) names a matrix preset, the cell to tune (size, seed, SFT ->
PRISM [-> RLVR]), a search space of stage fields (`align.alpha`, `disc_warmup.num_experts`, ...), the objective, the
budget, the TPE sampler and the median pruner. Each trial is a chain of matrix stages with the suggested overrides:
stage directories are content-addressed, so upstream stages (world, base, SFT, and a warm-up whose knobs did not
change) are reused, never recomputed; a file lock keeps two workers from running the same stage at once.

Objective: held-out accuracy (%) of the embedded suite after alignment (`align`, the cheap proxy) or after
alignment and a short RLVR run (`align_rlvr`). Intermediate values, reported after every alignment step so the
pruner can stop weak trials early: minus the summed Wasserstein-1 distances of caption bullets and reasoning steps
to the teacher corpus (closer to the teacher = higher).

The study lives in a real storage (SQLite under outputs/sweeps/ by default; a PostgreSQL URL for many machines).
Workers send heartbeats; a killed worker's trial goes stale, is marked failed and retried with the same
parameters (whose stages resume from their checkpoints) by whichever worker looks next.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from experiments.matrix import (
    MatrixError,
    PlanBuilder,
    add_chain,
    eval_node,
    load_matrix,
    load_named,
    node_lock,
    run_inline,
)
from prism.config import ConfigError, check, check_types, read_yaml
from prism.workers import available_cores, worker_env

SWEEP_DIR = Path(__file__).parent / "configs" / "sweeps"
SWEEP_ROOT = Path("outputs/sweeps")
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30


@dataclass
class ParamSpec:
    """One searched field: a float/int range or a list of choices."""

    type: Literal["float", "int", "categorical"] = field(default="float", metadata={"help": "Kind of parameter."})
    low: float | None = field(default=None, metadata={"help": "Lower bound (float/int)."})
    high: float | None = field(default=None, metadata={"help": "Upper bound (float/int)."})
    log: bool = field(default=False, metadata={"help": "Sample on a log scale (float/int)."})
    choices: list[Any] = field(default_factory=list, metadata={"help": "Values (categorical)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.type == "categorical":
            check(bool(self.choices), "choices", "a non-empty list for type categorical", self.choices)
        else:
            check(self.low is not None and self.high is not None and self.low < self.high, "low",
                  "low < high for a range", (self.low, self.high), related=("high",))
            check(not self.log or self.low > 0, "low", "a value > 0 for a log-scale range (log: true)", self.low)


@dataclass
class SweepConfig:
    """A study: which cell of which matrix preset is tuned, over what space, toward what objective."""

    name: str = field(default="", metadata={"help": "Study name (outputs/sweeps/<name>/)."})
    matrix: str = field(default="table1", metadata={"help": "Matrix whose preset supplies the stage configs."})
    preset: str = field(default="embedded", metadata={"help": "Preset of that matrix."})
    size: str = field(default="s", metadata={"help": "Size of the tuned cell."})
    seed: int = field(default=0, metadata={"help": "Stage seed of every trial (the sampler has its own)."})
    objective: Literal["align", "align_rlvr"] = field(
        default="align", metadata={"help": "Accuracy after alignment (cheap proxy) or after alignment + RLVR."},
    )
    rl_algorithm: Literal["grpo", "dapo", "gspo"] = field(default="grpo", metadata={"help": "RL stage of align_rlvr."})
    stage_overrides: dict[str, list[str]] = field(
        default_factory=dict, metadata={"help": "Stage -> overrides applied to every trial (e.g. shorter runs)."},
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Samples per family of the objective's evaluation."})
    trials: int = field(default=12, metadata={"help": "Finished (complete or pruned) trials to reach."})
    max_consecutive_failures: int = field(
        default=3,
        metadata={"help": "Stop the sweep when this many trials in a row failed (the same error each time, as a rule), "
                          "naming the first one's error."},
    )
    sampler_seed: int = field(default=0, metadata={"help": "TPE seed; worker i uses sampler_seed + i."})
    n_startup_trials: int = field(default=4, metadata={"help": "Random trials before TPE, and before pruning."})
    n_warmup_steps: int = field(default=2, metadata={"help": "Alignment steps a trial runs before it may be pruned."})
    report_top: int = field(
        default=3,
        metadata={"help": "The report re-evaluates this many best trials with the preset's own evaluation (not "
                          "eval_limit) and exports the best of them by that, with intervals and paired deltas."},
    )
    space: dict[str, ParamSpec] = field(
        default_factory=dict, metadata={"help": "`<stage>.<field>` -> its range or choices."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check(bool(self.name), "name", "a non-empty string", self.name)
        check(bool(self.space), "space", "at least one parameter", self.space)
        for key in self.space:
            check(key.split(".", 1)[0] in ("disc_warmup", "align") and "." in key, f"space.{key}",
                  "`disc_warmup.<field>` or `align.<field>`", key)
        check(self.trials >= 1, "trials", "an int >= 1", self.trials)
        check(self.max_consecutive_failures >= 1, "max_consecutive_failures", "an int >= 1", self.max_consecutive_failures)
        check(self.report_top >= 1, "report_top", "an int >= 1", self.report_top)


def load_sweep(name_or_path: str | Path) -> SweepConfig:
    """`discriminator` -> experiments/configs/sweeps/discriminator.yaml; a path is read as is."""
    return load_named(SweepConfig, name_or_path, SWEEP_DIR, "sweep")


def default_storage(cfg: SweepConfig) -> str:
    return f"sqlite:///{(SWEEP_ROOT / cfg.name / 'study.db').as_posix()}"


def _retry_callback(optuna):
    """Optuna >= 4.9 names it RetryHeartbeatStaleTrialCallback; older releases RetryFailedTrialCallback."""
    storages = optuna.storages
    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def open_storage(url: str):
    import optuna

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=_retry_callback(optuna)(max_retry=2),
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)


def create_study(cfg: SweepConfig, storage: str):
    import optuna

    return optuna.create_study(study_name=cfg.name, storage=open_storage(storage), direction="maximize",
                               load_if_exists=True)


# ----------------------------------------------------------------------------------------------------
# One trial
# ----------------------------------------------------------------------------------------------------


def suggest(trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    values = {}
    for key, spec in space.items():
        if spec.type == "float":
            values[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
        elif spec.type == "int":
            values[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            values[key] = trial.suggest_categorical(key, spec.choices)
    return values


def trial_overrides(cfg: SweepConfig, params: dict[str, Any]) -> dict[str, list[str]]:
    overrides = {stage: list(values) for stage, values in cfg.stage_overrides.items()}
    for key, value in params.items():
        stage, name = key.split(".", 1)
        overrides.setdefault(stage, []).append(f"{name}={value}")
    return overrides


def teacher_likeness(record: dict) -> float:
    """The intermediate value: -(W1 caption bullets + W1 reasoning steps) to the teacher corpus."""
    return -(record["caption_bullets_w1"] + record["reasoning_steps_w1"])


def _trial_plan(cfg: SweepConfig, overrides: dict[str, list[str]]):
    """(plan builder, evaluated checkpoint, eval node key) of one trial: its chain of matrix stages."""
    matrix = load_matrix(cfg.matrix)
    preset = matrix.presets.get(cfg.preset)
    if preset is None:
        raise ConfigError(f"sweep {cfg.name}: matrix {cfg.matrix} has no preset {cfg.preset!r} "
                          f"(it has {sorted(matrix.presets)})")
    if cfg.eval_limit is not None:
        preset.eval.limit = cfg.eval_limit
    builder = PlanBuilder(matrix, cfg.preset)
    rl = cfg.rl_algorithm if cfg.objective == "align_rlvr" else "none"
    checkpoint, deps = add_chain(builder, cfg.size, cfg.seed, "sft+prism", rl, overrides)
    return builder, checkpoint, builder.eval(checkpoint, deps)


def sweep_file(name_or_path: str | Path) -> Path:
    """The file `load_sweep` reads for a sweep name or path."""
    path = Path(name_or_path)
    return path if path.suffix else SWEEP_DIR / f"{name_or_path}.yaml"


def check_sweep(cfg: SweepConfig, path: str | Path | None = None) -> None:
    """Resolve the sweep before any trial runs: the matrix, preset and size, then every searched field alone at each
    end of its range and at each of its choices, so an unknown field or a value its stage refuses is one ConfigError
    naming it, not a failed trial repeated for ever. (Combinations stay the trials' business: an impossible one is
    a failed trial.) With the sweep's `path`, an error names its file and the line of the setting."""
    lines = read_yaml(path) if path is not None else None

    def at(key: str) -> str:
        return (lines.location(key) or str(path)) if lines is not None else f"sweep {cfg.name}"

    try:
        matrix = load_matrix(cfg.matrix)
    except ConfigError as error:
        raise ConfigError(f"{at('matrix')}: field 'matrix': {error}") from None
    if cfg.preset not in matrix.presets:
        raise ConfigError(f"{at('preset')}: field 'preset': matrix {cfg.matrix} has no preset {cfg.preset!r} "
                          f"(it has {sorted(matrix.presets)})")
    try:
        _trial_plan(cfg, trial_overrides(cfg, {}))
    except ConfigError as error:
        raise ConfigError(f"{at('')}: {error}") from None
    for key, spec in cfg.space.items():
        values = spec.choices if spec.type == "categorical" else [spec.low, spec.high]
        for value in values:
            value = int(value) if spec.type == "int" else value
            try:
                _trial_plan(cfg, trial_overrides(cfg, {key: value}))
            except ConfigError as error:
                raise ConfigError(f"{at(f'space.{key}')}: space.{key}={value!r}: {error}") from None


def run_trial(cfg: SweepConfig, overrides: dict[str, list[str]], report=None) -> tuple[float, str]:
    """Run (or reuse) the trial's stages and evaluation; returns (accuracy %, evaluated checkpoint).
    `report(step, value)` receives the intermediate values (and may raise to prune)."""
    from prism.stages.align import run as run_align

    builder, checkpoint, eval_key = _trial_plan(cfg, overrides)
    for node in builder.nodes.values():
        with node_lock(node.key):
            if node.done:
                continue
            if node.kind == "align" and report is not None:
                def on_step(step: int, record: dict) -> None:
                    value = teacher_likeness(record)
                    if not math.isnan(value):
                        report(step, value)

                run_align(node.cfg, on_step=on_step)
            elif node.kind == "eval":
                eval_node(Path(node.key), **node.cfg)
            else:
                run_inline(node)
    record = json.loads(Path(eval_key).read_text(encoding="utf-8"))
    overall = [r for r in record["rows"] if r["task"] == "prism_embedded" and r["metric"] == "accuracy"]
    if not overall:
        raise ConfigError(f"sweep {cfg.name}: the objective needs the embedded suite (preset eval.suite: embedded)")
    return 100.0 * float(overall[0]["value"]), checkpoint


def reevaluate(cfg: SweepConfig, checkpoint: str) -> str:
    """Evaluate a trial's checkpoint with the matrix preset's own evaluation (its full limit, not the sweep's
    `eval_limit`); returns the evaluation record (cached like every matrix evaluation)."""
    matrix = load_matrix(cfg.matrix)
    builder = PlanBuilder(matrix, cfg.preset)
    key = builder.eval(checkpoint, [])
    node = builder.nodes[key]
    with node_lock(node.key):
        if not node.done:
            eval_node(Path(node.key), **node.cfg)
    return key


def recording_errors(objective):
    """The objective, recording a failed trial's error as its user attribute `error` (optuna keeps none)."""

    def recorded(trial) -> float:
        import optuna

        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}".splitlines()[0])
            raise

    return recorded


def objective_fn(cfg: SweepConfig):
    import optuna

    @recording_errors
    def objective(trial) -> float:
        params = suggest(trial, cfg.space)

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at alignment step {step}")

        accuracy, checkpoint = run_trial(cfg, trial_overrides(cfg, params), report)
        trial.set_user_attr("checkpoint", checkpoint)
        return accuracy

    return objective


def worker(cfg: SweepConfig, storage: str, index: int) -> None:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study = optuna.load_study(
        study_name=cfg.name, storage=open_storage(storage),
        sampler=optuna.samplers.TPESampler(seed=cfg.sampler_seed + index, n_startup_trials=cfg.n_startup_trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps))
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    if len(study.get_trials(deepcopy=False, states=finished)) >= cfg.trials:
        return
    # An impossible combination (hard routing with top_k > experts / 2) is a recorded FAILED trial, not a crash;
    # too many in a row stop the sweep (consecutive_failures), and this worker exits with the first one's error.
    study.optimize(objective_fn(cfg), callbacks=[MaxTrialsCallback(cfg.trials, states=finished),
                                                 _stop_after_failures(cfg.max_consecutive_failures)],
                   catch=(ConfigError,), gc_after_trial=True)
    failed = consecutive_failures(study, cfg.max_consecutive_failures)
    if failed:
        print(f"sweep {cfg.name}: {len(failed)} trials in a row failed; the first: {failed[0]}", file=sys.stderr)
        sys.exit(3)


def consecutive_failures(study, limit: int) -> list[str]:
    """The errors of the last `limit` finished trials when every one of them failed; [] otherwise."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    recent = sorted(done, key=lambda t: t.number)[-limit:]
    if len(recent) < limit or any(t.state != TrialState.FAIL for t in recent):
        return []
    return [str(t.user_attrs.get("error", "no error recorded")) for t in recent]


def _stop_after_failures(limit: int):
    def callback(study, trial) -> None:
        if consecutive_failures(study, limit):
            study.stop()

    return callback


def run_sweep(cfg: SweepConfig, workers: int, storage: str | None, log=print, source: str | Path | None = None) -> str:
    """Create (or reopen) the study and run `workers` worker processes on it until `trials` have finished.
    `source` is the sweep's name or file, which each worker loads again (default: cfg.name)."""
    check_sweep(cfg, sweep_file(source) if source is not None else None)
    storage = storage or default_storage(cfg)
    create_study(cfg, storage)
    threads = max(1, available_cores() // workers)  # the affinity mask, as the matrix counts
    env = worker_env(threads, shares_cores=workers > 1)
    log_dir = SWEEP_ROOT / cfg.name
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    processes = []
    for index in range(workers):
        with open(log_dir / f"worker-{index}.log", "a") as handle:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "experiments.sweep", "worker", str(source or cfg.name), "--storage", storage,
                 "--index", str(index)], env=env, stdout=handle, stderr=subprocess.STDOUT))
    log(f"sweep {cfg.name}: {workers} workers on {storage} (logs in {log_dir})")
    codes = [p.wait() for p in processes]
    log(f"sweep {cfg.name}: workers exited {codes} after {time.perf_counter() - started:.0f} s")
    failed = consecutive_failures(create_study(cfg, storage), cfg.max_consecutive_failures)
    if failed:
        raise MatrixError(f"sweep {cfg.name}: stopped after {len(failed)} failed trials in a row; the first: "
                          f"{failed[0]} (see {log_dir}/worker-*.log)")
    if any(codes):
        raise MatrixError(f"sweep {cfg.name}: a worker failed (exit codes {codes}); see {log_dir}/worker-*.log, "
                          "then run again: finished trials are kept")
    return storage


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.sweep")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("worker")
    one.add_argument("name")
    one.add_argument("--storage", required=True)
    one.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    worker(load_sweep(args.name), args.storage, args.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
