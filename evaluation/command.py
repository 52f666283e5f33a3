"""`prism eval`: evaluate a checkpoint through lmms-eval.

    prism eval --checkpoint DIR --suite embedded|paper [--limit N] [--world DIR] [--out DIR]
               [--config eval.yaml] [key=value ...]

Prints the metrics table and which entries were evaluated or skipped; results JSON, samples and the row
store are under --out (default outputs/evals; see evaluation/runner.py). User mistakes raise EvalError
(a ValueError) with one line; `main` prints it and returns 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.config import EvalConfig, EvalError

__all__ = ["add_eval_arguments", "cmd_eval", "main"]


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint", required=True,
                        help="Hugging Face checkpoint folder, or a Hub model id (org/name[@revision]; prism.hub)")
    parser.add_argument("--suite", required=True, choices=["embedded", "paper"], help="embedded world or the seven published benchmarks")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples of each task")
    parser.add_argument("--world", type=Path, default=None, help="world export for the embedded suite (default outputs/world)")
    parser.add_argument("--out", type=Path, default=Path("outputs/evals"), help="evaluation root (default outputs/evals)")
    parser.add_argument("--config", type=Path, default=None, help="EvalConfig YAML (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted EvalConfig overrides, e.g. seed=1 embedded.max_new_tokens=128")
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.results import metrics_table
    from evaluation.runner import run_eval
    from prism.config import load_config

    config = load_config(EvalConfig, args.config, args.overrides)
    report = run_eval(
        args.checkpoint, suite=args.suite, limit=args.limit, world=args.world, out_root=args.out, config=config,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(metrics_table(report.rows))
    for outcome in report.outcomes:
        if outcome.status == "evaluated" and outcome.samples:
            print(f"{outcome.entry}: evaluated {outcome.samples} samples in {outcome.seconds:.1f} s "
                  f"({100 * outcome.seconds / outcome.samples:.2f} s per 100 samples)")
        else:
            print(f"{outcome.entry}: {outcome.status}")
    print(f"checkpoint {report.checkpoint_hash}: evaluated {len(report.evaluated)}, skipped {len(report.skipped)}; "
          f"outputs in {report.out_dir}, rows in {report.store}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from prism.config import ConfigError
    from prism.models import ModelError

    parser = add_eval_arguments(argparse.ArgumentParser(prog="prism eval", description="evaluate a checkpoint through lmms-eval"))
    args = parser.parse_args(argv)
    try:
        return cmd_eval(args)
    except (EvalError, ConfigError, ModelError) as error:
        print(f"prism eval: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
