"""Benchmark: one discriminator pass of the alignment stage (`prism.stages.align.discriminator_pass`: forward and
backward of the published loss) with the rows continuing each prefill run as one forward, in at most two forwards
by segment length, or in the default up to four (`prism.data.encoding.length_buckets`), under the discriminator's
experts forward (`prism.models.experts`, its default on CPU), transformers' `grouped_mm` (transformers' default) and
`eager`, and the default under bf16 autocast (float32 weights).

Work per pass: 8 prompts of the world's teacher parquet, 64 rollouts made of other records' teacher segments (so
their lengths are the world's), the preset's model sparse-upcycled (4 experts, top-2, random init). The
variants run interleaved, `--repeats` times after one warm-up each; medians. Writes outputs/bench/disc-split-<preset>-<threads>t.json.

    .venv/bin/python bench/disc_split.py --world outputs/world --presets embedded-s,embedded-m --threads 1
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import prism.models.discriminator as disc_module
from prism.atomic_io import atomic_write_text
from prism.config import AlignConfig, load_config
from prism.data.formats import read_rl_parquet
from prism.models import build_model, load_model, load_processor, save_model
from prism.models.experts import PER_EXPERT
from prism.rollout.prompts import rollout_prompt
from prism.stages.align import discriminator_pass

SPLIT = disc_module.length_buckets


def one_forward(lengths):
    return [list(range(len(lengths)))]


# name -> (experts backend, grouping of the rows by length, the discriminator's mixed_precision)
VARIANTS = {"grouped_mm_one_forward": ("grouped_mm", one_forward, "no"),
            "grouped_mm_two_buckets": ("grouped_mm", functools.partial(SPLIT, max_buckets=2), "no"),
            "grouped_mm_split_by_length": ("grouped_mm", SPLIT, "no"),
            "grouped_mm_split_by_length_bf16": ("grouped_mm", SPLIT, "bf16"),
            "eager_one_forward": ("eager", one_forward, "no"), "eager_split_by_length": ("eager", SPLIT, "no"),
            "per_expert_split_by_length": (PER_EXPERT, SPLIT, "no"),
            "per_expert_split_by_length_bf16": (PER_EXPERT, SPLIT, "bf16")}


def measure(preset: str, world: Path, repeats: int) -> dict:
    processor = load_processor(world / "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(preset, processor.tokenizer, seed=0), processor, Path(tmp) / "dense")
        dense = load_model(Path(tmp) / "dense", dtype=torch.float32)
    discriminator = disc_module.build_discriminator(
        dense, disc_module.DiscriminatorSpec("moe"), num_experts=4, top_k=2, expert_noise_std=0.002,
        router_init_std=0.02, aux_loss_coef=0.01, seed=0).train()
    cfg = load_config(AlignConfig, path="experiments/configs/embedded/align.yaml")
    records = read_rl_parquet(world / "teacher.parquet")
    prompts_records, others = records[:8], records[8:72]
    prompts = [disc_module.encode_prompt(processor, r.prompt, rollout_prompt(r).images, True) for r in prompts_records]
    texts = [o.teacher_caption + "\n" + o.teacher_cot for o in others]

    def run(name: str) -> float:
        backend, buckets, cfg.discriminator.mixed_precision = VARIANTS[name]
        discriminator.backbone.set_experts_implementation(backend)
        disc_module.length_buckets = buckets  # what continue_hidden calls
        discriminator.zero_grad(set_to_none=True)
        started = time.perf_counter()
        discriminator_pass(discriminator, processor, prompts, prompts_records, texts, 8, cfg, batch_has_valid=True)
        return time.perf_counter() - started

    try:
        for name in VARIANTS:
            run(name)
        seconds = {name: [] for name in VARIANTS}
        for _ in range(repeats):
            for name in VARIANTS:
                seconds[name].append(run(name))
    finally:
        disc_module.length_buckets = SPLIT
    medians = {name: round(statistics.median(values), 4) for name, values in seconds.items()}
    base = medians["grouped_mm_one_forward"]
    return {"preset": preset, "threads": torch.get_num_threads(), "prompts": 8, "rollouts": 64,
            "micro_batch": cfg.disc_micro_batch_size, "repeats": repeats, "median_seconds": medians,
            "speed_over_grouped_mm_one_forward": {name: round(base / value, 2) for name, value in medians.items()},
            "seconds": {name: [round(v, 4) for v in values] for name, values in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=Path("outputs/world"))
    parser.add_argument("--presets", default="embedded-s,embedded-m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for preset in args.presets.split(","):
        result = measure(preset, args.world, args.repeats)
        out = Path("outputs/bench") / f"disc-split-{preset}-{result['threads']}t.json"
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["median_seconds"]), out)


if __name__ == "__main__":
    from prism.workers import restart_under_allocator_env

    restart_under_allocator_env()  # glibc's heap settings of matrix nodes, also when run outside `just`
    main()
