"""The `prism` command.

  prism world export --out DIR [--config F] [key=value ...]
  prism world stats [--config F] [--per-family N] [key=value ...]
  prism world show --out PNG [--config F] [--per-family N] [--split S] [key=value ...]
  prism eval --checkpoint DIR --suite embedded|paper [--limit N] [--world DIR] [--out DIR] [--config F] [key=value ...]
  prism data check FILE [--kind sharegpt|rl|warmup]
  prism reward score --jsonl FILE
  prism train STAGE --config F [key=value ...]     (base, sft, disc_warmup, align, rlvr)
  prism matrix plan|run NAME [--preset embedded|smoke|full] [--launcher local|slurm] [--jobs N] [--isolate]
  prism report NAME [--preset P]
  prism reproduce NAME [--preset P] [--jobs N] [--seeds N]   (run the matrix, then its report)
  prism sweep run|report NAME [--workers N] [--storage URL]
  prism submit CHECKPOINT                          (leaderboard bundle; refreshes outputs/leaderboard.md)

User mistakes (bad configs, malformed data, missing or corrupted checkpoints) and output faults (a read-only
folder, a full disk) end with one line on stderr and exit status 2, never a traceback; Ctrl-C ends with one
line and exit status 130. `prism --debug ...` shows the traceback instead.
A `prism train` stopped by a preemption signal (SIGUSR1, SIGUSR2; SIGTERM in a SLURM job) saves a checkpoint
at the end of its current optimizer step and exits with status 75; run again, it resumes there.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path

# The error types that mean a user mistake (one line, exit 2), by module: an error is one of them only if its module
# is already imported (it raised it), so telling needs no import; a refusal stays as fast as the command that made it.
USER_ERRORS = (
    ("evaluation.config", "EvalError"), ("experiments.matrix", "MatrixError"), ("prism.config", "ConfigError"),
    ("prism.data.formats", "DataError"), ("prism.models", "ModelError"), ("prism.rewards", "RewardInputError"),
    ("prism.rollout.base", "RolloutError"), ("prism.runtime", "CheckpointError"), ("prism.runtime", "NonFiniteError"),
    ("prism.runtime", "RuntimeConfigError"), ("reports.submit", "SubmitError"),
)


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, (FileExistsError, NotImplementedError)):
        return True
    for module, name in USER_ERRORS:
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(error, kind):
            return True
    return False


# Where the output goes cannot take it: a read-only or foreign folder, a read-only file system, a full disk or quota.
OUTPUT_FAULTS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def _world_config(args):
    from prism.config import load_config
    from prism.data.world import WorldConfig

    return load_config(WorldConfig, args.config, args.overrides)


def cmd_world_export(args) -> int:
    from prism.data.export import export_world
    from prism.runtime import split_progress

    cfg = _world_config(args)
    manifest = export_world(cfg, Path(args.out), progress=split_progress())
    print(json.dumps({"out": str(args.out), "counts": manifest["counts"], "seconds": manifest["seconds"]}))
    return 0


def cmd_world_stats(args) -> int:
    from prism.data.export import corpus_texts, world_stats
    from prism.models.tokenizer import build_tokenizer

    cfg = _world_config(args)
    tokenizer = build_tokenizer(corpus_texts(cfg))  # the tokenizer an export of this world writes
    table = world_stats(cfg, per_family=args.per_family, tokenizer=tokenizer)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def cmd_world_show(args) -> int:
    from prism.data.export import show_world

    cfg = _world_config(args)
    path = show_world(cfg, Path(args.out), per_family=args.per_family, split=args.split)
    print(path)
    return 0


def cmd_data_check(args) -> int:
    from prism.data import formats

    kind = args.kind or {".json": "sharegpt", ".parquet": "rl", ".jsonl": "warmup"}.get(args.path.suffix)
    if kind is None:
        raise formats.DataError(f"{args.path}: cannot tell the format from the suffix; pass --kind sharegpt|rl|warmup")
    reader = {"sharegpt": formats.read_sharegpt, "rl": formats.read_rl_parquet, "warmup": formats.read_warmup_pairs}[kind]
    records = reader(args.path, verify_images=True)  # every image read whole, not only its header
    print(json.dumps({"path": str(args.path), "format": kind, "records": len(records)}))
    return 0


def cmd_reward_score(args) -> int:
    from prism.rewards import score_jsonl

    for row in score_jsonl(args.jsonl):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_eval(args) -> int:
    from evaluation.command import cmd_eval as evaluate

    return evaluate(args)


def cmd_train(args) -> int:
    """Run the stage. SIGUSR1, SIGUSR2 and, in a SLURM job, SIGTERM make it save a checkpoint at the end of the
    current optimizer step and exit with PREEMPTED_EXIT (75); running it again resumes there."""
    from prism.config import load_config
    from prism.runtime import PREEMPTED_EXIT, StagePreempted, preemption_signals
    from prism.stages import STAGES
    from prism.stages.common import stage_dir

    config_class, recipe = STAGES[args.stage]
    cfg = load_config(config_class, args.config, args.overrides)
    try:
        with preemption_signals():
            run_dir = recipe(cfg)
    except StagePreempted as stopped:
        print(f"prism: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt as stop:
        run_dir = stage_dir(args.stage, cfg)
        if not (run_dir / "config.yaml").is_file():  # stopped before the stage wrote anything
            raise
        raise KeyboardInterrupt(f"run the same command again to resume {args.stage} in {run_dir}") from stop
    print(run_dir)
    return 0


SEEDS_HELP = "run the preset with seeds 0..N-1 instead of its own (seed 0 is shared with a one-seed run)"


def _jobs(args) -> int:
    """--jobs, or by default the cores available (1 on a GPU machine, whose stages would share the device)."""
    if args.jobs is not None:
        return args.jobs
    import torch

    from prism.workers import available_cores

    return 1 if torch.cuda.is_available() else available_cores()


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def cmd_matrix(args) -> int:
    from experiments.matrix import build_plan, describe_plan, load_matrix, run_local, run_slurm, slurm_scripts

    plan = build_plan(load_matrix(args.name, args.preset, args.seeds), args.preset)
    if args.action == "plan":
        print(describe_plan(plan, jobs=1 if args.launcher == "slurm" else _jobs(args)))
        if args.launcher == "slurm":
            scripts = slurm_scripts(plan, plan.root / "slurm-scripts")
            print(f"wrote {len(scripts)} sbatch scripts to {plan.root / 'slurm-scripts'} (nothing submitted)")
        return 0
    if args.launcher == "slurm":
        run_slurm(plan)
        return 0
    jobs = _jobs(args)
    print(describe_plan(plan, jobs=jobs), flush=True)
    run_local(plan, log=lambda message: print(message, flush=True), isolate=args.isolate, jobs=jobs)
    return 0


def cmd_report(args) -> int:
    from reports.build import build_report

    out = build_report(args.name, args.preset, args.seeds)
    print(f"report: {out / 'index.html'}")
    return 0


def cmd_sweep(args) -> int:
    from experiments.sweep import load_sweep, run_sweep
    from reports.sweep_report import build_sweep_report

    cfg = load_sweep(args.name)
    if args.action == "run":
        if args.workers is None:
            from prism.workers import available_cores

            args.workers = available_cores()
        if args.workers < 1:
            from prism.config import ConfigError

            raise ConfigError(f"--workers: expected an int >= 1, got {args.workers}")
        run_sweep(cfg, args.workers, args.storage, source=args.name)
    out = build_sweep_report(cfg, args.storage)
    print(f"sweep report: {out / 'index.html'}")
    return 0


def cmd_submit(args) -> int:
    from reports.submit import submission_bundle, write_leaderboard

    bundle = submission_bundle(args.checkpoint)
    board = write_leaderboard()
    print(f"submission bundle: {bundle}\nleaderboard: {board}")
    return 0


def cmd_reproduce(args) -> int:
    """Run the matrix (resuming what is unfinished), then write its report; the wall time goes to a bench JSON."""
    from experiments.matrix import build_plan, describe_plan, load_matrix, run_local
    from reports.build import build_report, record_reproduce_time

    plan = build_plan(load_matrix(args.name, args.preset, args.seeds), args.preset)
    jobs = _jobs(args)
    print(describe_plan(plan, jobs=jobs), flush=True)  # with its estimate, before anything starts
    started, cpu = time.perf_counter(), _cpu_seconds()
    timings = run_local(plan, log=lambda message: print(message, flush=True), isolate=args.isolate, jobs=jobs)
    out = build_report(args.name, args.preset, args.seeds)
    record_reproduce_time(plan, timings, time.perf_counter() - started, cpu_seconds=_cpu_seconds() - cpu, jobs=jobs)
    from reports.submit import write_leaderboard

    write_leaderboard()
    print((out / "table.md").read_text(encoding="utf-8"))
    print(f"report: {out / 'index.html'}")
    return 0


def _first_sentence(text: str | None) -> str:
    return " ".join((text or "").split()).split(". ")[0].rstrip(".") + "."


def _fields_epilog(config_class: type) -> str:
    """Every field of a stage config, dotted, with its default and help: what `key=value` may set."""
    import textwrap

    from prism.config import describe_fields

    lines = [f"config fields of {config_class.__name__} (YAML keys, or key=value overrides):"]
    for key, default, text in describe_fields(config_class):
        lines.append(f"  {key} = {default}")
        lines += textwrap.wrap(text, width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"prism {version('prism')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "prism (not installed)"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are one line, like every other user mistake (exit status 2); the usage it would
    print first is one `--help` away. Its subcommands' parsers are of this class too (add_subparsers)."""

    def error(self, message: str):
        self.exit(2, f"prism: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """An argparse type: a count that must be at least 1 (`--jobs 0` would otherwise run the matrix anyway)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="prism", description="PRISM experiment harness")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true",
                        help="on an error or Ctrl-C, show the full traceback instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_world_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=None, help="world YAML (default: the embedded default)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    world = commands.add_parser("world", help="the embedded world").add_subparsers(dest="action", required=True)
    export = world.add_parser("export", help="write every split in the published formats")
    export.add_argument("--out", required=True, type=Path)
    with_world_config(export)
    export.set_defaults(func=cmd_world_export)
    stats = world.add_parser("stats", help="teacher vs public demonstrations, per family")
    stats.add_argument("--per-family", type=positive_int, default=200)
    with_world_config(stats)
    stats.set_defaults(func=cmd_world_stats)
    show = world.add_parser("show", help="save a PNG grid of samples with their texts")
    show.add_argument("--out", type=Path, default=Path("outputs/world_show.png"))
    show.add_argument("--per-family", type=positive_int, default=2)
    show.add_argument("--split", default="sft", choices=["base", "sft", "teacher", "rl", "bench"])
    with_world_config(show)
    show.set_defaults(func=cmd_world_show)

    data = commands.add_parser("data", help="data files in the published formats").add_subparsers(dest="action", required=True)
    check = data.add_parser("check", help="validate a sharegpt JSON, RL parquet or warm-up pairs JSONL file")
    check.add_argument("path", type=Path)
    check.add_argument("--kind", choices=["sharegpt", "rl", "warmup"], default=None)
    check.set_defaults(func=cmd_data_check)

    reward = commands.add_parser("reward", help="the RLVR reward").add_subparsers(dest="action", required=True)
    score = reward.add_parser("score", help="score JSONL lines {response, ground_truth, equivalent_answers?, choices?}")
    score.add_argument("--jsonl", required=True, type=Path)
    score.set_defaults(func=cmd_reward_score)

    from evaluation.command import add_eval_arguments

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint through lmms-eval (embedded suite or the published benchmarks)")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    from prism.stages import STAGES

    train = commands.add_parser("train", help="run one stage recipe to the end (resumes a killed run)",
                                description="Run one stage recipe to the end; `prism train STAGE --help` lists its "
                                            "config fields.")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, (config_class, _) in STAGES.items():
        one = stages.add_parser(stage, help=f"{config_class.__name__}: {_first_sentence(config_class.__doc__)}",
                                epilog=_fields_epilog(config_class), formatter_class=argparse.RawDescriptionHelpFormatter)
        one.add_argument("--config", type=Path, default=None, help="stage YAML (default: the published defaults)")
        one.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (fields below)")
        one.set_defaults(func=cmd_train)

    matrix = commands.add_parser("matrix", help="an experiment matrix as a DAG of cached stages")
    matrix.add_argument("action", choices=["plan", "run"], help="plan: print the DAG, what is cached, an estimate")
    matrix.add_argument("name", help="table1, ablations, or a matrix YAML path")
    matrix.add_argument("--preset", default="embedded", help="embedded (default), smoke or full")
    matrix.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: here, --jobs nodes at once; slurm: submitit jobs with dependencies")
    matrix.add_argument("--jobs", type=positive_int, default=None,
                        help="local: nodes run at once, each in its own process with cores // jobs threads (all the cores "
                             "for a node that never runs beside another; default: the cores available; 1 = one after "
                             "another in this process)")
    matrix.add_argument("--isolate", action="store_true", help="local, --jobs 1: run each node in its own process")
    matrix.add_argument("--seeds", type=int, default=None, metavar="N", help=SEEDS_HELP)
    matrix.set_defaults(func=cmd_matrix)
    report = commands.add_parser("report", help="tables, figures and the HTML report of a matrix's recorded runs")
    report.add_argument("name", help="table1, ablations, or a matrix YAML path")
    report.add_argument("--preset", default="embedded")
    report.add_argument("--seeds", type=int, default=None, metavar="N", help="the report of a `--seeds N` run")
    report.set_defaults(func=cmd_report)
    sweep = commands.add_parser("sweep", help="Optuna sweeps over the discriminator and alignment knobs")
    sweep.add_argument("action", choices=["run", "report"])
    sweep.add_argument("name", help="a sweep under experiments/configs/sweeps/ (discriminator) or a YAML path")
    sweep.add_argument("--workers", type=int, default=None,
                       help="worker processes sharing the study (default: the cores available)")
    sweep.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite under outputs/sweeps/)")
    sweep.set_defaults(func=cmd_sweep)
    submit = commands.add_parser("submit", help="bundle an evaluated checkpoint for a leaderboard; rank all evaluated")
    submit.add_argument("checkpoint", type=Path, help="checkpoint folder evaluated with `prism eval`")
    submit.set_defaults(func=cmd_submit)
    reproduce = commands.add_parser("reproduce", help="run a paper table's matrix, then write its report")
    reproduce.add_argument("name", help="table1 or ablations")
    reproduce.add_argument("--preset", default="embedded", help="a preset of the matrix file: embedded (default), "
                           "embedded-short (table1: 700 SFT steps, not 1,600), smoke")
    reproduce.add_argument("--jobs", type=positive_int, default=None,
                           help="nodes run at once (default: the cores available; 1 = one after another)")
    reproduce.add_argument("--isolate", action="store_true", help="with --jobs 1: run each node in its own process")
    reproduce.add_argument("--seeds", type=int, default=None, metavar="N", help=SEEDS_HELP)
    reproduce.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `prism` command itself, not a caller passing arguments (tests, scripts)
        from prism.workers import restart_under_allocator_env

        restart_under_allocator_env()
    try:
        parser = build_parser()  # imports torch and the recipes: a Ctrl-C may well land here
        args, extra = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        print("prism: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    # `prism train sft --config F a=1 b=2`: argparse cannot take positionals on both sides of an option.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt as stop:
        if args.debug:
            raise
        print("prism: interrupted" + (f"; {stop}" if str(stop) else ""), file=sys.stderr)
        return INTERRUPTED_EXIT
    except BrokenPipeError:  # `prism reward score ... | head`
        return 0
    except Exception as error:
        if args.debug:
            raise
        if is_user_error(error):
            print(f"prism: error: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError) and error.errno in OUTPUT_FAULTS:
            where = f"{error.filename}: " if error.filename else ""
            print(f"prism: error: {where}{error.strerror}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
