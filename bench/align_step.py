"""Benchmark: seconds per PRISM alignment step, split into rollout / discriminator scoring / discriminator update /
policy update, with peak RSS, for each policy size against the embedded discriminator.

Each configuration runs the real `align` recipe for K steps in a fresh subprocess (its peak RSS is its own),
strictly one after another, from finished stages: an SFT policy (format-valid rollouts, so the discriminator is
really updated) and a warmed-up discriminator. Work per step is the embedded config's: 8 prompts x 8 rollouts,
up to 256 new tokens. Reported numbers are medians over steps 2..K (step 1 is warm-up).
Writes outputs/bench/align-step.json.

    just bench-align                                  # S and M policies (whichever SFT stages exist), K=6
    .venv/bin/python bench/align_step.py --policy s=outputs/stages/s/sft/model --steps 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP ruins shared-core timings

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path("outputs/bench")
PHASES = ("seconds_generate", "seconds_disc_score", "seconds_disc_update", "seconds_policy_update", "seconds_step")
DEFAULT_POLICIES = {"embedded-s": "outputs/stages/s/sft/model", "embedded-m": "outputs/stages/m/sft/model"}


def worker(args) -> dict:
    from prism.config import AlignConfig, load_config
    from prism.stages.align import run

    out = Path(tempfile.mkdtemp(prefix="prism-bench-align-"))
    cfg = load_config(AlignConfig, path="experiments/configs/embedded/align.yaml", overrides=[
        f"model.preset={args.preset}", f"model.path={args.policy}", f"discriminator.path={args.discriminator}",
        f"steps={args.steps}", "proxy_prompts=0", "save_every_steps=0", f"output_dir={out}"])
    run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rollouts = cfg.prompts_per_step * cfg.rollouts_per_prompt
    timed = [r for r in rows if r["step"] >= 2] or rows
    result = {key: round(statistics.median(r[key] for r in timed), 4) for key in PHASES}
    result.update({
        "rollout_tokens_per_s": round(statistics.median(
            r["response_length"] * rollouts / r["seconds_generate"] for r in timed), 1),
        "response_length": round(statistics.median(r["response_length"] for r in timed), 1),
        "format_rate": round(statistics.median(r["format_rate"] for r in timed), 3),
        "disc_updated_steps": sum(int(r["disc_updated"]) for r in rows),
        "work": {"prompts": cfg.prompts_per_step, "rollouts_per_prompt": cfg.rollouts_per_prompt,
                 "max_new_tokens": cfg.max_new_tokens, "steps": cfg.steps},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", action="append", default=[], metavar="PRESET=PATH",
                        help="policy preset and its SFT model folder (repeatable; default: the embedded S and M stages)")
    parser.add_argument("--discriminator", default="outputs/stages/s/disc_warmup/model")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=BENCH / "align-step.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(argparse.Namespace(preset=args.preset, policy=args.policy[0],
                                                   discriminator=args.discriminator, steps=args.steps))))
        return
    policies = dict(p.split("=", 1) for p in args.policy) or {
        preset: path for preset, path in DEFAULT_POLICIES.items() if Path(path).is_dir()}
    if not policies:
        sys.exit("bench/align_step.py: no SFT policy found; run the embedded base and sft stages first (README)")
    if not Path(args.discriminator).is_dir():
        sys.exit(f"bench/align_step.py: discriminator {args.discriminator} not found; run disc_warmup first")
    import torch

    result = {"host": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "torch_threads": torch.get_num_threads()},
              "discriminator": args.discriminator, "runs": {}}
    for preset, path in policies.items():
        command = [sys.executable, __file__, "--worker", "--preset", preset, "--policy", path,
                   "--discriminator", args.discriminator, "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"bench/align_step.py: {preset} failed:\n{done.stderr[-3000:]}")
        result["runs"][preset] = {"policy": path, **json.loads(done.stdout.strip().splitlines()[-1])}
        print(preset, json.dumps(result["runs"][preset]), flush=True)
    from prism.data.formats import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
