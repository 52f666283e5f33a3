"""Does each RL algorithm raise held-out accuracy over its SFT start? RLVR runs per (size, algorithm, seed),
each evaluated like its SFT start through `prism eval` (lmms-eval, the embedded suite).

Needs the embedded world and each size's SFT stage (the commands in README "Training stages"):

    prism world export --out outputs/world
    prism train base --config experiments/configs/embedded/base.yaml output_dir=outputs/stages/s/base
    prism train sft  --config experiments/configs/embedded/sft.yaml model.path=outputs/stages/s/base/model output_dir=outputs/stages/s/sft
    (embedded-m: add model.preset=embedded-m optim.lr=1.2e-3 to both, and use outputs/stages/m)

Then, one run after another (each resumes, or is skipped when finished; evaluations are cached by checkpoint):

    just rlvr-gains --sizes s,m --seeds 0,1          # -> outputs/bench/rlvr-gains.json and a markdown table

Accuracy per family is lmms-eval's; the mean is over the six families, its standard error from the per-family
binomial errors, and each gain's error from both runs' errors (the same items, so a conservative bound).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from prism.data.world import FAMILIES

PRESETS = {"s": "embedded-s", "m": "embedded-m"}


def train_rlvr(size: str, algorithm: str, seed: int, stages: Path, world: Path, config: Path, extra: list[str]) -> Path:
    out = stages / size / f"rlvr-{algorithm}-seed{seed}"
    command = [sys.executable, "-m", "prism.cli", "train", "rlvr", "--config", str(config), f"algorithm={algorithm}",
               f"seed={seed}", f"model.preset={PRESETS[size]}", f"model.path={stages / size / 'sft' / 'model'}",
               f"data_files=[{world / 'rl.parquet'}]", f"output_dir={out}", *extra]
    print("$ " + " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  {out}: {time.perf_counter() - started:.0f} s", flush=True)
    return out / "model"


def evaluate(checkpoint: Path, world: Path, limit: int | None) -> dict:
    from evaluation.runner import run_eval

    report = run_eval(checkpoint, suite="embedded", limit=limit, world=world, log=lambda m: print("  " + m, flush=True))
    accuracy, n, fmt = {}, {}, math.nan
    for row in report.rows:
        task = row["task"].removeprefix("prism_embedded_")
        if row["metric"] == "accuracy" and task in FAMILIES:
            accuracy[task], n[task] = float(row["value"]), int(row["n"])
        if row["metric"] == "format_valid_rate" and row["task"] == "prism_embedded":
            fmt = float(row["value"])
    missing = [f for f in FAMILIES if f not in accuracy]
    if missing:
        raise SystemExit(f"{checkpoint}: the evaluation has no accuracy for {', '.join(missing)}")
    mean = sum(accuracy.values()) / len(FAMILIES)
    stderr = math.sqrt(sum(p * (1 - p) / n[f] for f, p in accuracy.items())) / len(FAMILIES)
    return {"checkpoint": str(checkpoint), "checkpoint_hash": report.checkpoint_hash, "format_valid": fmt,
            "mean_accuracy": mean, "stderr": stderr, "per_family": accuracy, "samples_per_family": n}


def table(result: dict) -> str:
    lines = ["| size | run | seed | format | mean acc | gain over SFT | " + " | ".join(FAMILIES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(FAMILIES)]
    for size, runs in result["sizes"].items():
        sft = runs["sft"]
        for name, run in runs.items():
            algorithm, _, seed = name.partition("-seed")
            gain = "" if name == "sft" else (f"{100 * (run['mean_accuracy'] - sft['mean_accuracy']):+.1f} "
                                             f"± {100 * math.hypot(run['stderr'], sft['stderr']):.1f}")
            lines.append(f"| {size} | {algorithm} | {seed} | {run['format_valid']:.3f} | "
                         f"{run['mean_accuracy']:.3f} ± {run['stderr']:.3f} | {gain} | "
                         + " | ".join(f"{run['per_family'][f]:.3f}" for f in FAMILIES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="s")
    parser.add_argument("--algorithms", default="grpo,dapo,gspo")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--limit", type=int, default=None, help="held-out samples per family (default: all)")
    parser.add_argument("--stages", type=Path, default=Path("outputs/stages"))
    parser.add_argument("--world", type=Path, default=Path("outputs/world"))
    parser.add_argument("--config", type=Path, default=Path("experiments/configs/embedded/rlvr.yaml"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/rlvr-gains.json"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every RLVR run")
    args = parser.parse_args()

    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in PRESETS]
    if unknown:
        raise SystemExit(f"--sizes: unknown {', '.join(unknown)} (expected s and/or m)")
    for size in sizes:
        if not (args.stages / size / "sft" / "model").is_dir():
            raise SystemExit(f"no SFT model at {args.stages / size / 'sft' / 'model'}: train base and SFT first "
                             "(see this script's --help)")
    if not (args.world / "rl.parquet").is_file():
        raise SystemExit(f"no world export at {args.world}: run prism world export --out {args.world}")

    from prism.atomic_io import atomic_write_text

    result = {"config": str(args.config), "overrides": args.overrides, "limit": args.limit, "sizes": {}}
    for size in sizes:
        runs = result["sizes"][size] = {"sft": evaluate(args.stages / size / "sft" / "model", args.world, args.limit)}
        for seed in map(int, args.seeds.split(",")):
            for algorithm in args.algorithms.split(","):
                model = train_rlvr(size, algorithm, seed, args.stages, args.world, args.config, args.overrides)
                runs[f"{algorithm}-seed{seed}"] = evaluate(model, args.world, args.limit)
                atomic_write_text(args.out, json.dumps(result, indent=2))  # partial results survive a stop
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
