"""Benchmark: seconds per PRISM alignment step, split into rollout / discriminator scoring / discriminator update /
policy update, with peak RSS, for each policy size and teacher-scoring mode against the embedded discriminator;
and what the published per-rollout teacher scoring costs laid out row by row.

Each configuration runs the real `align` recipe for K steps in a fresh subprocess (its peak RSS is its own),
strictly one after another, from finished stages: an SFT policy (format-valid rollouts, so the discriminator is
really updated) and a warmed-up discriminator. Work per step is the embedded config's: 8 prompts x 8 rollouts,
up to 256 new tokens. Reported numbers are medians over steps 2..K (step 1 is warm-up).

`teacher_layouts` times one discriminator pass (forward and backward of the published loss, no optimizer step) over
one step's real rollouts in two layouts: the recipe's (each prompt and its image through the backbone once per
micro-batch, every segment once on that prompt's key/value cache, each teacher segment's hidden state read by its G
pairs) and the published code's layout (every row whole: prompt, image and segment, the teacher segment repeated for
each of the G rollouts), median of R repeats. Writes outputs/bench/align-step.json.

    just bench-align                                  # S and M policies (whichever SFT stages exist), K=6
    .venv/bin/python bench/align_step.py --policy embedded-s=outputs/stages/s/sft/model --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path("outputs/bench")
CONFIG = "experiments/configs/embedded/align.yaml"
PHASES = ("seconds_generate", "seconds_disc_score", "seconds_disc_update", "seconds_policy_update", "seconds_step")
DEFAULT_POLICIES = {"embedded-s": "outputs/stages/s/sft/model", "embedded-m": "outputs/stages/m/sft/model"}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def align_config(args, out: Path | None = None):
    from prism.config import AlignConfig, load_config

    return load_config(AlignConfig, path=CONFIG, overrides=[
        f"model.preset={args.preset}", f"model.path={args.policy}", f"discriminator.path={args.discriminator}",
        f"steps={args.steps}", "proxy_prompts=0", "save_every_steps=0", f"teacher_scoring={args.teacher_scoring}",
        f"output_dir={out or tempfile.mkdtemp(prefix='prism-bench-align-')}"])


def steps_worker(args) -> dict:
    """K steps of the recipe: medians of its per-phase seconds."""
    from prism.stages.align import run

    out = Path(tempfile.mkdtemp(prefix="prism-bench-align-"))
    cfg = align_config(args, out)
    run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rollouts = cfg.rollout.prompts_per_step * cfg.rollout.rollouts_per_prompt
    timed = [r for r in rows if r["step"] >= 2] or rows
    result = {key: round(statistics.median(r[key] for r in timed), 4) for key in PHASES}
    disc = result["seconds_disc_score"] + result["seconds_disc_update"]
    result.update({
        "disc_share_of_step": round(disc / result["seconds_step"], 3),
        "rollout_tokens_per_s": round(statistics.median(
            r["response_length"] * rollouts / r["seconds_generate"] for r in timed), 1),
        "response_length": round(statistics.median(r["response_length"] for r in timed), 1),
        "format_rate": round(statistics.median(r["format_rate"] for r in timed), 3),
        "work": {"prompts": cfg.rollout.prompts_per_step, "rollouts_per_prompt": cfg.rollout.rollouts_per_prompt,
                 "max_new_tokens": cfg.rollout.max_new_tokens, "steps": cfg.steps,
                 "disc_micro_batch_size": cfg.disc_micro_batch_size, "teacher_scoring": cfg.teacher_scoring},
        "peak_rss_mb": peak_rss_mb(),
    })
    return result


def teacher_layouts_worker(args) -> dict:
    """One pass of the discriminator over one step's rollouts, the recipe's layout vs the published row layout."""
    import torch

    from prism.algorithms import discriminator_loss
    from prism.models.discriminator import encode_prompt, load_discriminator, segment_batch
    from prism.response_format import scored_segments
    from prism.rollout import SamplingParams
    from prism.rollout.backends import make_backend
    from prism.rollout.prompts import load_prompts, rollout_prompt
    from prism.stages.align import discriminator_pass, teacher_segment
    from prism.stages.common import load_policy

    cfg = align_config(args)
    rollout, n = cfg.rollout, cfg.rollout.rollouts_per_prompt
    records = load_prompts(cfg.data_files)[: rollout.prompts_per_step]
    policy, processor = load_policy(cfg.model, cfg.seed)
    backend = make_backend("hf", policy.eval(), processor, model_path=cfg.model.path,
                           compute_dtype=cfg.model.compute_dtype)
    texts = backend.generate([rollout_prompt(r) for r in records], n, SamplingParams(
        max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature, seed=cfg.seed)).texts
    discriminator = load_discriminator(cfg.discriminator.path, dtype=cfg.discriminator.dtype).train()
    prompts = [encode_prompt(processor, r.prompt, rollout_prompt(r).images, True) for r in records]
    kinds = discriminator.spec.segment_kinds

    def ours() -> None:
        discriminator_pass(discriminator, processor, prompts, records, texts, n, cfg, batch_has_valid=True)

    def whole_rows(row_prompts, segments, kind):
        batch = segment_batch(processor, row_prompts, segments, cfg.disc_max_length)
        return discriminator(**{k: v.to(discriminator.device) for k, v in batch.items()}, kind=kind)[0]

    def row_by_row() -> None:  # the published layout: every row whole, the teacher's repeated for its G rollouts
        size = cfg.disc_micro_batch_size
        micro = [list(range(s, min(s + size, len(texts)))) for s in range(0, len(texts), size)]
        for rows in micro:
            teacher, student = {}, {}
            for kind in kinds:
                row_prompts = [prompts[row // n] for row in rows]
                teacher[kind] = whole_rows(row_prompts, [teacher_segment(records[row // n], kind) for row in rows], kind)
                student[kind] = whole_rows(row_prompts, [scored_segments(texts[row])[0][kind] for row in rows], kind)
            valid = torch.tensor([scored_segments(texts[row])[1] for row in rows])
            loss, _ = discriminator_loss(teacher, student, valid, batch_has_valid=True, score_clip=cfg.score_clip,
                                         score_reg_coef=cfg.score_reg_coef, fallback_coef=cfg.fallback_loss_coef)
            (loss / len(micro)).backward()

    def seconds(fn) -> float:
        times = []
        for _ in range(args.repeats + 1):  # the first is warm-up
            discriminator.zero_grad(set_to_none=True)
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return round(statistics.median(times[1:]), 4)

    size = cfg.disc_micro_batch_size
    result = {"recipe_layout_s": seconds(ours), "row_by_row_layout_s": seconds(row_by_row)}
    result.update({
        "row_by_row_over_recipe": round(result["row_by_row_layout_s"] / result["recipe_layout_s"], 2),
        # prompt (and image) forwards: once per micro-batch and prompt in the recipe, twice per row and kind whole
        "prompt_forwards_per_step": {"recipe": sum(len({row // n for row in range(s, min(s + size, len(texts)))})
                                                   for s in range(0, len(texts), size)),
                                     "row_by_row": 2 * len(texts) * len(kinds)},
        "format_rate": round(sum(scored_segments(t)[1] for t in texts) / len(texts), 3),
        "repeats": args.repeats, "peak_rss_mb": peak_rss_mb(),
    })
    return result


def run_worker(kind: str, preset: str, policy: str, args, **extra) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--preset", preset, "--policy", policy,
               "--discriminator", args.discriminator, "--steps", str(args.steps), "--repeats", str(args.repeats),
               *(f"--{k.replace('_', '-')}={v}" for k, v in extra.items())]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"bench/align_step.py: {kind} {preset} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", action="append", default=[], metavar="PRESET=PATH",
                        help="policy preset and its SFT model folder (repeatable; default: the embedded S and M stages)")
    parser.add_argument("--discriminator", default="outputs/stages/s/disc_warmup/model")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each layout in teacher_layouts")
    parser.add_argument("--teacher-scoring", default="per_rollout,shared", help="modes to time, comma-separated")
    parser.add_argument("--out", type=Path, default=BENCH / "align-step.json")
    parser.add_argument("--worker", choices=["steps", "teacher_layouts"], help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.policy = args.policy[0]
        worker = steps_worker if args.worker == "steps" else teacher_layouts_worker
        print(json.dumps(worker(args)))
        return
    policies = dict(p.split("=", 1) for p in args.policy) or {
        preset: path for preset, path in DEFAULT_POLICIES.items() if Path(path).is_dir()}
    if not policies:
        sys.exit("bench/align_step.py: no SFT policy found; run the embedded base and sft stages first (README)")
    if not Path(args.discriminator).is_dir():
        sys.exit(f"bench/align_step.py: discriminator {args.discriminator} not found; run disc_warmup first")
    import torch

    from prism.runtime import host_info

    result = {"host": {**host_info(), "torch_threads": torch.get_num_threads(),
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")},
              "discriminator": args.discriminator, "runs": {}, "teacher_layouts": {}}
    for preset, path in policies.items():
        for scoring in args.teacher_scoring.split(","):
            run = run_worker("steps", preset, path, args, teacher_scoring=scoring)
            result["runs"][f"{preset}/{scoring}"] = {"policy": path, **run}
            print(f"{preset} teacher_scoring={scoring}", json.dumps(run), flush=True)
        layouts = run_worker("teacher_layouts", preset, path, args, teacher_scoring="per_rollout")
        result["teacher_layouts"][preset] = layouts
        print(f"{preset} teacher layouts", json.dumps(layouts), flush=True)
    from prism.atomic_io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from prism.workers import restart_under_allocator_env

    restart_under_allocator_env()  # glibc's heap settings of matrix nodes, also when run outside `just`
    main()
