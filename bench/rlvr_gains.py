"""Does each RL algorithm raise held-out accuracy over its SFT start? RLVR runs per (size, algorithm, seed),
each evaluated like its SFT start through `prism eval` (lmms-eval, the embedded suite).

Needs the embedded world and each size's SFT stage (the commands in README "Training stages"):

    prism world export --out outputs/world
    prism train base --config experiments/configs/embedded/base.yaml output_dir=outputs/stages/s/base
    prism train sft  --config experiments/configs/embedded/sft.yaml model.path=outputs/stages/s/base/model output_dir=outputs/stages/s/sft
    (embedded-m: add model.preset=embedded-m optim.lr=1.2e-3 to both, and use outputs/stages/m)

Then, one run after another (each resumes, or is skipped when finished; evaluations are cached by checkpoint):

    just rlvr-gains --sizes s,m --seeds 0,1          # -> outputs/bench/rlvr-gains.json and a markdown table

Any SFT checkpoint can be the start (`--sft s=DIR/model`: a matrix run's SFT stage, or one of another length), and
the evaluation can read another world than the one RL trains on. Choosing RL or SFT schedules on the table's own
held-out items would tune on its test set; a validation world (another seed) avoids that:

    prism world export --out outputs/worlds/validation seed=1 base_size=64 sft_size=64 teacher_size=16 \
        rl_size=64 bench_size=200
    just rlvr-gains --sizes s --algorithms grpo --sft s=outputs/stages/sft-<hash>/model \
        --eval-world outputs/worlds/validation steps=12

Accuracy per family is lmms-eval's, per item; Avg weighs the six families equally. Every interval is reports.stats'
95% bootstrap over the evaluated items, and every gain is paired: the run and its start on the same items, with a
permutation-test p-value (`*`: the interval excludes 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from prism.data.world import FAMILIES

PRESETS = {"s": "embedded-s", "m": "embedded-m"}


def train_rlvr(size: str, algorithm: str, seed: int, sft: Path, out: Path, world: Path, config: Path,
               extra: list[str]) -> Path:
    command = [sys.executable, "-m", "prism.cli", "train", "rlvr", "--config", str(config), f"algorithm={algorithm}",
               f"seed={seed}", f"model.preset={PRESETS[size]}", f"model.path={sft}",
               f"data_files=[{world / 'rl.parquet'}]", f"output_dir={out}", *extra]
    print("$ " + " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  {out}: {time.perf_counter() - started:.0f} s", flush=True)
    return out / "model"


def evaluate(checkpoint: Path, world: Path, limit: int | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The checkpoint's summary and its per-item scores in % ({family: [1, items]}, items in doc-id order)."""
    from evaluation.runner import DEFAULT_OUT_ROOT, run_eval
    from reports.stats import interval
    from reports.tables import row_scores

    report = run_eval(checkpoint, suite="embedded", limit=limit, world=world, out_root=DEFAULT_OUT_ROOT,
                      log=lambda m: print("  " + m, flush=True))
    per_item = row_scores(report.rows, DEFAULT_OUT_ROOT) or {}
    missing = [f for f in FAMILIES if f not in per_item]
    if missing:
        raise SystemExit(f"{checkpoint}: the evaluation logged no per-item accuracy for {', '.join(missing)}")
    scores = {f: 100 * np.array([[per_item[f][k] for k in sorted(per_item[f])]]) for f in FAMILIES}
    fmt = next((float(row["value"]) for row in report.rows
                if row["metric"] == "format_valid_rate" and row["task"] == "prism_embedded"), math.nan)
    return {"checkpoint": str(checkpoint), "checkpoint_hash": report.checkpoint_hash, "format_valid": fmt,
            "avg": _as_dict(interval(scores)), "per_family": {f: float(a.mean()) for f, a in scores.items()},
            "items_per_family": {f: a.shape[1] for f, a in scores.items()}}, scores


def _as_dict(estimate) -> dict:
    return {"mean": estimate.mean, "low": estimate.low, "high": estimate.high, "seeds": estimate.seeds,
            "items": estimate.items, **({} if math.isnan(estimate.p_value) else {"p_value": estimate.p_value})}


def gain(start: dict[str, np.ndarray], end: dict[str, np.ndarray]) -> dict:
    """The run minus its start, paired over the same items: Avg with interval and p-value, and per family."""
    from reports.stats import paired_difference

    return {"avg": _as_dict(paired_difference(start, end)),
            "per_family": {f: float(end[f].mean() - start[f].mean()) for f in start}}


def _text(estimate: dict, signed: bool = False) -> str:
    from reports.stats import Estimate, format_estimate

    return format_estimate(Estimate(**{"p_value": math.nan, **estimate}), signed=signed)


def table(result: dict) -> str:
    lines = ["| size | run | seed | format | Avg | gain over SFT (paired) | " + " | ".join(FAMILIES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(FAMILIES)]
    for size, runs in result["sizes"].items():
        for name, run in runs.items():
            algorithm, _, seed = name.partition("-seed")
            delta = run.get("gain")
            lines.append(f"| {size} | {algorithm} | {seed} | {run['format_valid']:.3f} | {_text(run['avg'])} | "
                         f"{_text(delta['avg'], signed=True) if delta else ''} | "
                         + " | ".join(f"{run['per_family'][f]:.1f}" + (f" ({delta['per_family'][f]:+.1f})"
                                                                        if delta else "") for f in FAMILIES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="s")
    parser.add_argument("--algorithms", default="grpo,dapo,gspo")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--limit", type=int, default=None, help="held-out samples per family (default: all)")
    parser.add_argument("--stages", type=Path, default=Path("outputs/stages"),
                        help="<stages>/<size>/sft/model is a size's start unless --sft names it; RL runs go here")
    parser.add_argument("--sft", action="append", default=[], metavar="SIZE=DIR",
                        help="a size's SFT checkpoint (repeatable), e.g. s=outputs/stages/sft-3de68bb1d4a5/model")
    parser.add_argument("--world", type=Path, default=Path("outputs/world"), help="the world RL trains on")
    parser.add_argument("--eval-world", type=Path, default=None,
                        help="the world whose held-out suite is evaluated (default: --world)")
    parser.add_argument("--config", type=Path, default=Path("experiments/configs/embedded/rlvr.yaml"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/rlvr-gains.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every RLVR run")
    args = parser.parse_args()

    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in PRESETS]
    if unknown:
        raise SystemExit(f"--sizes: unknown {', '.join(unknown)} (expected s and/or m)")
    starts = {size: args.stages / size / "sft" / "model" for size in sizes}
    for item in args.sft:
        size, sep, folder = item.partition("=")
        if not sep or size not in starts:
            raise SystemExit(f"--sft {item!r}: expected SIZE=DIR with SIZE one of --sizes ({args.sizes})")
        starts[size] = Path(folder)
    for size, start in starts.items():
        if not (start / "config.json").is_file():
            raise SystemExit(f"no SFT model at {start}: train base and SFT first (see this script's --help)")
    eval_world = args.eval_world or args.world
    for world, what in ((args.world, "rl.parquet"), (eval_world, "bench")):
        if not (world / what).exists():
            raise SystemExit(f"no world export at {world} (no {what}): run prism world export --out {world}")

    from prism.atomic_io import atomic_write_text

    result = {"config": str(args.config), "overrides": args.overrides, "limit": args.limit, "world": str(args.world),
              "eval_world": str(eval_world), "sizes": {}}
    for size in sizes:
        summary, start_scores = evaluate(starts[size], eval_world, args.limit)
        runs = result["sizes"][size] = {"sft": summary}
        # one folder per start and settings: a run from another start never resumes this one
        tag = hashlib.sha256(json.dumps([str(starts[size].resolve()), str(args.config), args.overrides,
                                         str(args.world.resolve())]).encode()).hexdigest()[:8]
        for seed in map(int, args.seeds.split(",")):
            for algorithm in args.algorithms.split(","):
                out = args.stages / size / f"rlvr-{algorithm}-seed{seed}-{tag}"
                model = train_rlvr(size, algorithm, seed, starts[size], out, args.world, args.config, args.overrides)
                summary, scores = evaluate(model, eval_world, args.limit)
                runs[f"{algorithm}-seed{seed}"] = {**summary, "gain": gain(start_scores, scores)}
                atomic_write_text(args.out, json.dumps(result, indent=2))  # partial results survive a stop
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    from prism.workers import restart_under_allocator_env

    restart_under_allocator_env()  # glibc's heap settings of matrix nodes, also when run outside `just`
    main()
