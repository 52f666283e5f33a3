"""Benchmark: one RLVR (GRPO) step of ours vs TRL's GRPOTrainer on the same tiny Qwen3-VL, plus our SFT throughput
(padded and packed batches).

Per preset, both peers start from the same saved random-init model (outputs/bench/rlvr-models/<preset>) and do
the same work per optimizer step: 4 prompts x 16 rollouts x exactly 128 new tokens (min_new_tokens=128), beta 0,
one update per generation, lr 1e-6, float32 on CPU. Each peer runs alone in a fresh subprocess (so its peak RSS
is its own), strictly one after another: two CPU jobs at once distort timings up to 100x. Reported numbers are
medians over steps 2..K (step 1 is warm-up). Both run under the environment's OpenMP wait policy (libgomp's
default spin unless OMP_WAIT_POLICY is set), recorded in the JSON. Writes outputs/bench/rlvr-vs-trl.json.

    just bench-rlvr                                   # embedded-s and embedded-m, K=6
    .venv/bin/python bench/rlvr_vs_trl.py --presets embedded-s --steps 2   # smoke

Needs trl==1.16.0 (`pip install --no-deps "trl==1.16.0"`; the recipe does it). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, ROLLOUTS, NEW_TOKENS = 4, 16, 128
SFT_STEPS = 12
BENCH = Path("outputs/bench")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # ru_maxrss is KiB on Linux


def median_after_warmup(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r["step"] >= 2 and r.get(key) is not None]
    return round(statistics.median(values), 4) if values else None


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own process and writes one JSON piece
# ---------------------------------------------------------------------------------------------


def ours_rlvr(args) -> dict:
    from prism.config import RLVRConfig, load_config
    from prism.stages.rlvr import run

    tmp = Path(tempfile.mkdtemp(prefix="prism-bench-rlvr-"))
    try:
        cfg = load_config(RLVRConfig, overrides=[
            "algorithm=grpo", f"model.preset={args.preset}", f"model.path={args.model_dir}", "model.dtype=float32",
            "model.mixed_precision=no",
            f"data_files=[{args.world}/rl.parquet]", "rollout.backend=hf", f"rollout.prompts_per_step={PROMPTS}",
            f"rollout.rollouts_per_prompt={ROLLOUTS}", f"rollout.max_new_tokens={NEW_TOKENS}",
            f"rollout.min_new_tokens={NEW_TOKENS}", "update.micro_batch_size=64", "update.kl_coef=0.0",
            "update.mini_batches=1", f"steps={args.steps}",
            f"output_dir={tmp / 'run'}", "save_every_steps=0", "log_every_steps=1", "optim.lr=1e-6"])
        run(cfg)
        rows = read_metrics(tmp / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ("seconds_step", "seconds_generate", "seconds_score", "seconds_update", "rollout_tokens_per_s")
    return {**{k: median_after_warmup(rows, k) for k in keys}, "peak_rss_mb": peak_rss_mb()}


def ours_sft(args, packing: bool = False) -> dict:
    from prism.config import SFTConfig, load_config
    from prism.stages.sft import run

    tmp = Path(tempfile.mkdtemp(prefix="prism-bench-sft-"))
    try:
        cfg = load_config(SFTConfig, overrides=[
            f"model.preset={args.preset}", f"model.path={args.model_dir}", "model.dtype=float32",
            "model.mixed_precision=no",
            f"data_files=[{args.world}/sft.json]", "max_length=512", "per_device_batch_size=32",
            "gradient_accumulation_steps=1", f"max_steps={SFT_STEPS}", f"output_dir={tmp / 'run'}",
            "save_every_steps=0", "log_every_steps=1", "optim.lr=1e-4", f"packing={str(packing).lower()}"])
        run(cfg)
        rows = read_metrics(tmp / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"tokens_per_s": median_after_warmup(rows, "tokens_per_s"),
            "seconds_per_step": median_after_warmup(rows, "seconds"), "peak_rss_mb": peak_rss_mb()}


def trl_dataset(world: Path):
    """Our RL parquet as TRL wants it: conversational prompts with content parts, plus an `image` column."""
    import io

    from datasets import Dataset
    from PIL import Image

    from prism.data.formats import read_rl_parquet

    rows = []
    for record in read_rl_parquet(world / "rl.parquet"):
        prompt = []
        for message in record.prompt:
            text = message["content"]
            if text.startswith("<image>"):
                parts = [{"type": "image"}, {"type": "text", "text": text[len("<image>"):]}]
            else:
                parts = [{"type": "text", "text": text}]
            prompt.append({"role": message["role"], "content": parts})
        rows.append({
            "prompt": prompt,
            "image": Image.open(io.BytesIO(record.images[0])).convert("RGB"),
            "ground_truth": record.ground_truth,
            # None and dict columns are awkward in Arrow: carry the choices as JSON text.
            "choices": json.dumps(record.choices),
        })
    return Dataset.from_list(rows)


def trl_rlvr(args) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from prism import rewards
    from prism.models import load_processor

    def reward(prompts, completions, ground_truth, choices, **kwargs) -> list[float]:
        scores = []
        for completion, truth, options in zip(completions, ground_truth, choices, strict=True):
            # Conversational completions: [{"role": "assistant", "content": str or [parts]}].
            content = completion[-1]["content"] if isinstance(completion, list) else completion
            if isinstance(content, list):
                content = "".join(p.get("text") or "" for p in content)
            scores.append(rewards.compute_reward(content, truth, choices=json.loads(options)).score)
        return scores

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: generation, scoring, the loss forward, backward and the update."""

        def __init__(self):
            self.seconds, self.started = [], 0.0

        def on_step_begin(self, args_, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    # the same layers as ours (prism.models.load_model): no Hub kernels
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=torch.float32, use_kernels=False)
    processor = load_processor(args.model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = Path(tempfile.mkdtemp(prefix="prism-bench-trl-"))
    config = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=PROMPTS * ROLLOUTS,  # counts completions in TRL 1.x: 64 = 4 prompts x 16
        gradient_accumulation_steps=1,  # so one generation batch feeds exactly one optimizer step
        num_generations=ROLLOUTS,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},  # every rollout exactly 128 tokens, as ours
        temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, loss_type="grpo", num_iterations=1, learning_rate=1e-6,
        bf16=False, gradient_checkpointing=False, use_cpu=True,  # both default True in 1.16
        max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0, seed=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=trl_dataset(Path(args.world)),
                          processing_class=processor, callbacks=[timer])
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    logs = [row for row in trainer.state.log_history if "loss" in row]
    changed = max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    rows = [{"step": i + 1, "seconds": s} for i, s in enumerate(timer.seconds)]
    return {"seconds_step": median_after_warmup(rows, "seconds"), "peak_rss_mb": peak_rss_mb(),
            "steps_timed": len(timer.seconds), "loss": [row["loss"] for row in logs],
            "reward": [row.get("reward") for row in logs], "grad_norm": [row.get("grad_norm") for row in logs],
            # 0 while every reward is 0 (a random-init policy): zero advantages, zero gradient, still a full backward
            "max_param_change": changed}


WORKERS = {"ours-rlvr": ours_rlvr, "ours-sft": ours_sft, "ours-sft-packed": lambda args: ours_sft(args, packing=True),
           "trl-rlvr": trl_rlvr}


# ---------------------------------------------------------------------------------------------
# Parent: shared model and world, then the peers one after another
# ---------------------------------------------------------------------------------------------


def ensure_world(world: Path) -> Path:
    if (world / "world.json").is_file():
        return world
    from prism.config import load_config
    from prism.data.export import export_world
    from prism.data.world import WorldConfig

    small = BENCH / "world-small"
    if not (small / "world.json").is_file():
        print(f"no world at {world}: exporting a small one to {small}", flush=True)
        cfg = load_config(WorldConfig, overrides=["base_size=64", "sft_size=2048", "teacher_size=8", "rl_size=256", "bench_size=4"])
        export_world(cfg, small)
    return small


def ensure_model(preset: str, world: Path) -> tuple[Path, int]:
    from prism.models import build_model, count_parameters, load_processor, save_model

    processor = load_processor(world / "tokenizer")
    model = build_model(preset, processor.tokenizer, seed=0)  # deterministic: counting parameters is cheap
    folder = BENCH / "rlvr-models" / preset
    if not folder.is_dir():
        save_model(model, processor, folder)
    return folder, count_parameters(model)


def run_worker(name: str, preset: str, model_dir: Path, world: Path, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="prism-bench-piece-") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", name, "--preset", preset, "--model-dir", str(model_dir),
                   "--world", str(world), "--steps", str(steps), "--result", str(result)]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        piece = json.loads(result.read_text())
    print(f"  {name} {preset}: {time.perf_counter() - started:.0f} s wall, {piece}", flush=True)
    return piece


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="embedded-s,embedded-m")
    parser.add_argument("--steps", type=int, default=6, help="RLVR steps per peer; medians over steps 2..K")
    parser.add_argument("--world", type=Path, default=Path("outputs/world"))
    parser.add_argument("--out", type=Path, default=BENCH / "rlvr-vs-trl.json")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        piece = WORKERS[args.worker](args)
        # The whole process's, setup included: a step that maps and unmaps its large tensors faults them in again.
        piece["minor_page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        args.result.write_text(json.dumps(piece))
        return

    import torch
    import transformers
    import trl

    from prism.runtime import host_info
    from prism.workers import ALLOCATOR_ENV

    world = ensure_world(args.world)
    result: dict = {
        "machine": {**host_info(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                    **{name: os.environ.get(name) for name in ALLOCATOR_ENV},
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "work": {"prompts": PROMPTS, "rollouts_per_prompt": ROLLOUTS, "new_tokens": NEW_TOKENS, "steps": args.steps,
                 "world": str(world)},
    }
    for preset in args.presets.split(","):
        model_dir, parameters = ensure_model(preset, world)
        print(f"{preset}: {parameters:,} parameters, model {model_dir}", flush=True)
        ours = {"rlvr": run_worker("ours-rlvr", preset, model_dir, world, args.steps),
                "sft": run_worker("ours-sft", preset, model_dir, world, args.steps),
                "sft_packed": run_worker("ours-sft-packed", preset, model_dir, world, args.steps)}
        theirs = {"rlvr": run_worker("trl-rlvr", preset, model_dir, world, args.steps)}
        ratio = None
        if ours["rlvr"]["seconds_step"] and theirs["rlvr"]["seconds_step"]:
            ratio = round(theirs["rlvr"]["seconds_step"] / ours["rlvr"]["seconds_step"], 2)
        result[preset] = {"parameters": parameters, "ours": ours, "trl": theirs, "trl_over_ours_step_time": ratio}

    from prism.atomic_io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from prism.workers import restart_under_allocator_env

    restart_under_allocator_env()  # glibc's heap settings of matrix nodes, also when run outside `just`
    main()
