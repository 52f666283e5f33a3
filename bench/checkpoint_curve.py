"""Held-out accuracy over a stage run's kept checkpoints: when a family was learned, if it was.

A stage keeps its resumable checkpoints under RUN/checkpoints/step-N/ (the weights in the training layout; every
one of them with `keep_last_checkpoints=0`), and its final RUN/model/ folder holds the config and the processor.
Each checkpoint taken (every `--every` steps, the last always) becomes a model folder: RUN/model with that
checkpoint's weights, their checksums verified (`checkpoint_model`). Each is evaluated with `prism eval --suite
embedded` into EVALS/step-N/, and per step the evaluation's folder (EVALS/step-N/<checkpoint hash>, what
`bench/presence_chains.py` and `bench/paired_evals.py` read), the accuracy per family and their mean (Avg) go to
JSON. Models and evaluations already there are reused.

    .venv/bin/python bench/checkpoint_curve.py RUN --world W [--every 200] [--models DIR] [--evals DIR] \
        [--out outputs/bench/checkpoint-curve.json] [EvalConfig overrides, e.g. batch_size=200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from prism.atomic_io import atomic_write_text
from prism.models import load_model, load_processor, save_model
from prism.runtime import is_sharded_checkpoint, list_checkpoints, load_checkpoint
from reports.tables import FAMILIES, evaluation_scores


def checkpoint_model(run: Path, checkpoint: Path, out: Path) -> Path:
    """`run`/model with the weights of `checkpoint` (a RUN/checkpoints/step-N folder), saved as a model folder."""
    if is_sharded_checkpoint(checkpoint):
        raise SystemExit(f"checkpoint_curve: {checkpoint}: a sharded (FSDP) checkpoint, not supported here")
    model = load_model(run / "model")
    try:
        model.load_state_dict(load_checkpoint(checkpoint)["model_state"])
    except RuntimeError as error:  # e.g. an align run's, which holds the policy and the discriminator together
        raise SystemExit(f"checkpoint_curve: {checkpoint}: its weights do not fit {run / 'model'} "
                         f"({str(error).splitlines()[0]}): expected a base, sft or rlvr run") from None
    return save_model(model, load_processor(run / "model"), out)


def taken_steps(steps: list[int], every: int | None) -> list[int]:
    """The steps on the `every` grid, and the last one."""
    taken = [s for s in steps if every is None or s % every == 0]
    return taken if steps and steps[-1] in taken else taken + steps[-1:]


def family_accuracy(evals: Path) -> dict[str, float | str]:
    """The one evaluation under `evals` (a `prism eval --out` root): its folder (`<checkpoint hash>`, what
    presence_chains.py and paired_evals.py read) and its accuracy (%) per family and Avg."""
    folders = sorted(p for p in evals.iterdir() if p.is_dir())
    if len(folders) != 1:
        raise SystemExit(f"checkpoint_curve: {evals}: expected one evaluation folder (<checkpoint hash>), "
                         f"found {len(folders)}")
    try:
        scores = evaluation_scores(folders[0])
    except ValueError as error:
        raise SystemExit(f"checkpoint_curve: {error}") from None
    accuracy = {f: 100 * sum(scores[f].values()) / len(scores[f]) for f in FAMILIES if f in scores}
    return {"evaluation": str(folders[0]), **accuracy, "Avg": sum(accuracy.values()) / len(accuracy)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a stage's run folder (model/ and checkpoints/)")
    parser.add_argument("--world", type=Path, required=True, help="the world export whose held-out items to score")
    parser.add_argument("--every", type=int, default=None, help="take the checkpoints whose step it divides")
    parser.add_argument("--models", type=Path, default=None, help="default: outputs/bench/checkpoints/<run>/models")
    parser.add_argument("--evals", type=Path, default=None, help="default: outputs/bench/checkpoints/<run>/evals")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/checkpoint-curve.json"))
    parser.add_argument("overrides", nargs="*", help="EvalConfig overrides for prism eval, e.g. batch_size=200")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if args.every is not None and args.every < 1:
        parser.error(f"--every: expected a step count >= 1, got {args.every}")
    if not (args.run / "model" / "config.json").is_file():
        raise SystemExit(f"checkpoint_curve: {args.run}: no model/ folder in it: "
                         "expected a finished stage's run folder")
    checkpoints = dict(list_checkpoints(args.run))
    if not checkpoints:
        raise SystemExit(f"checkpoint_curve: {args.run}: no checkpoints/step-N folders in it")
    root = Path("outputs/bench/checkpoints") / args.run.name
    models, evals = args.models or root / "models", args.evals or root / "evals"

    curve = {}
    for step in taken_steps(sorted(checkpoints), args.every):
        model, evaluated = models / f"step-{step:06d}", evals / f"step-{step:06d}"
        if not (model / "config.json").is_file():
            checkpoint_model(args.run, checkpoints[step], model)
        if not list(evaluated.glob("*/*/rows.csv")):
            done = subprocess.run([sys.executable, "-m", "prism.cli", "eval", "--checkpoint", str(model), "--suite",
                                   "embedded", "--world", str(args.world), "--out", str(evaluated), *args.overrides])
            if done.returncode:
                raise SystemExit(f"checkpoint_curve: prism eval of {model} failed (exit {done.returncode}; "
                                 "its message above)")
        curve[step] = family_accuracy(evaluated)
        print(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in curve[step].items() if k != "evaluation"),
              flush=True)
    atomic_write_text(args.out, json.dumps({"run": str(args.run), "world": str(args.world), "steps": curve},
                                           indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    from prism.workers import restart_under_allocator_env

    restart_under_allocator_env()  # glibc's heap settings of matrix nodes, also when run outside `just`
    main()
