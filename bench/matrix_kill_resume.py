"""Kill-and-resume check of a whole matrix: `prism reproduce` killed (SIGKILL) twice at random moments and started
again must give the same table as an uninterrupted run.

Runs NAME/PRESET (default table1/smoke) three ways in separate working folders under outputs/kill-resume/:
uninterrupted; then killed at two seeded random moments within the uninterrupted wall time and finally run to the
end, every run with --jobs N nodes at once. Compares the results tables cell by cell and every final model's weights,
and writes outputs/bench/matrix-kill-resume[-jobsN].json. Runs with different N are not bit-identical to each other
on CPU: a node's thread count (cores // N) changes the order of float sums.

    .venv/bin/python bench/matrix_kill_resume.py [--name table1] [--preset smoke] [--seed 0] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("outputs/kill-resume")


def reproduce(cwd: Path, name: str, preset: str, kill_after: float | None = None, jobs: int = 1) -> tuple[float, int | None]:
    """(seconds, exit code or None when killed)."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "reproduce.log", "a") as log:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "prism.cli", "reproduce", name, "--preset", preset,
                                    "--jobs", str(jobs)],
                                   cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=kill_after)
            return time.perf_counter() - started, process.returncode
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return time.perf_counter() - started, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="table1")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="nodes at once, in every run")
    args = parser.parse_args()
    shutil.rmtree(ROOT, ignore_errors=True)
    whole, cut = ROOT / "whole", ROOT / "killed"
    wall, code = reproduce(whole, args.name, args.preset, jobs=args.jobs)
    if code != 0:
        sys.exit(f"uninterrupted run failed (exit {code}); see {whole / 'reproduce.log'}")
    rng = random.Random(args.seed)
    kills = sorted(rng.uniform(0.1 * wall, 0.9 * wall) for _ in range(2))
    moments = [kills[0], kills[1] - kills[0]]  # the second kill counts from the restart
    killed_at = []
    for moment in moments:
        seconds, code = reproduce(cut, args.name, args.preset, kill_after=moment, jobs=args.jobs)
        killed_at.append({"after_seconds": round(seconds, 1), "killed": code is None})
    _, code = reproduce(cut, args.name, args.preset, jobs=args.jobs)
    if code != 0:
        sys.exit(f"resumed run failed (exit {code}); see {cut / 'reproduce.log'}")
    report = Path("outputs/reports") / f"{args.name}-{args.preset}"
    same = all((whole / report / name).read_text(encoding="utf-8") == (cut / report / name).read_text(encoding="utf-8")
               for name in ("table.csv", "results.csv", "deltas.csv"))  # results.csv: every accuracy, unrounded
    from prism.runtime import sha256_file

    weights = {label: {p.relative_to(folder).as_posix(): sha256_file(p)
                       for p in sorted((folder / "outputs/stages").glob("*/model/model.safetensors"))}
               for label, folder in (("whole", whole), ("killed", cut))}
    same_weights = weights["whole"] == weights["killed"] and bool(weights["whole"])
    results = {"matrix": args.name, "preset": args.preset, "seed": args.seed, "uninterrupted_seconds": round(wall, 1),
               "jobs": args.jobs,
               "kills": killed_at, "tables_identical": same, "final_models_compared": len(weights["whole"]),
               "final_models_bit_identical": same_weights}
    from prism.atomic_io import atomic_write_text

    suffix = f"-jobs{args.jobs}" if args.jobs > 1 else ""
    atomic_write_text(Path(f"outputs/bench/matrix-kill-resume{suffix}.json"), json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if not (same and same_weights):
        sys.exit("runs differ: see outputs/kill-resume/*/outputs")


if __name__ == "__main__":
    main()
