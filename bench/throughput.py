"""Benchmark: how close each kind of work comes to what these cores can do, per tiny preset.

Per preset, in a fresh process each (strictly one after another), on the embedded world's data:
  - sft_step: one SFT optimizer step, 32 conversations of the world's SFT file (forward, backward, AdamW), as the
    recipe runs it (the rows' shared prefix once); sft_step_whole_rows the same step with every row whole;
    sft_step_compiled the same step with the repeated blocks compiled (`torch_compile: true`), its first call
    (the compilation) timed apart; sft_step_bf16 the recipe's step under bf16 autocast, where the CPU computes bf16
    natively (`mixed_precision: auto`, as embedded-m's SFT runs);
  - rollout: the HF backend's decode loop, 8 prompts x 8 rollouts x exactly 128 new tokens;
  - rlvr_update: the shared policy update on those rollouts (re-scoring forward, PPO-clip, backward, AdamW);
  - disc_pass: the alignment stage's discriminator pass on them (the published loss, forward and backward) and
    disc_update its optimizer step; the discriminator is the preset's model sparse-upcycled (4 experts, top-2);
  - eval: `run_eval` (lmms-eval) on 20 held-out samples per family, samples per second.
Each is timed (median of R repeats after one warm-up), its FLOPs counted once with
torch.utils.flop_counter.FlopCounterMode (matmuls and attention; elementwise work is not counted), and set beside
the fp32 and bf16 GEMM peaks measured in the same process on the model's own shapes (tokens x hidden x
intermediate and back; also with a new row count at every call, where bf16 pays oneDNN's per-shape kernel build:
README, "bf16 where AMX pays"). `--profile` adds the top operators of each kind by self CPU time (torch.profiler).
Writes outputs/bench/throughput.json. Run it on an otherwise idle machine.

    just bench-throughput                                     # embedded-s and embedded-m
    .venv/bin/python bench/throughput.py --presets embedded-s --repeats 2 --profile
"""

from __future__ import annotations

import argparse
import copy
import itertools
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
TRAINED = {"embedded-s": "outputs/stages/s/sft/model", "embedded-m": "outputs/stages/m/sft/model"}
SFT_BATCH, PROMPTS, ROLLOUTS, NEW_TOKENS, EVAL_LIMIT = 32, 8, 8, 128, 20
# the kinds set beside the GEMM peaks (sft_step_bf16 only where the CPU computes bf16 natively)
TIMED_KINDS = ("sft_step_whole_rows", "sft_step", "sft_step_compiled", "sft_step_bf16", "rollout", "rlvr_update",
               "disc_pass")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up: a peak is the best rate the cores reach."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def top_operators(fn, count: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:count]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [{"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
             "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
             "share": round(e.self_cpu_time_total / total, 3)} for e in rows]


UNSEEN_ROWS = itertools.count(1)  # row counts below `tokens` that no matmul of this process has had yet


def gemm_peaks(config, tokens: int, repeats: int) -> dict:
    """GFLOP/s of fp32 and bf16 matmuls of the model's MLP shapes, [tokens, hidden] x [hidden, intermediate] and
    [tokens, intermediate] x [intermediate, hidden]: the fastest call of the faster shape. On a shared machine the
    rate of one shape varies between runs (50-108 GFLOP/s fp32 on embedded-s's, measured here), so the bench
    measures the peaks again after the workloads (`gemm_peaks_after`) and each ratio uses the higher.

    `{fp32,bf16}_gflops_new_shapes`: the same matmuls with a row count not seen before at every call, as the
    recipes' batches come (their rows and widths change every step), over all calls. torch runs a CPU bf16 matmul
    through oneDNN, which builds a kernel for each new shape; float32 goes to MKL, which builds none."""
    import torch

    hidden, intermediate = config.hidden_size, config.intermediate_size
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for k, n in ((hidden, intermediate), (intermediate, hidden)):
            a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            seconds = best_seconds(lambda: torch.mm(a, b), max(repeats, 20))
            best = max(best, 2 * tokens * k * n / seconds / 1e9)
        out[f"{name}_gflops"] = round(best, 1)
        flops = seconds = 0.0
        for _ in range(max(repeats, 20)):
            for k, n in ((hidden, intermediate), (intermediate, hidden)):
                rows = tokens - next(UNSEEN_ROWS)
                a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
                started = time.perf_counter()
                torch.mm(a, b)
                seconds += time.perf_counter() - started
                flops += 2 * rows * k * n
        out[f"{name}_gflops_new_shapes"] = round(flops / seconds / 1e9, 1)
    out["shapes"] = {"tokens": tokens, "hidden": hidden, "intermediate": intermediate}
    return out


def worker(args) -> dict:
    import torch

    from prism.algorithms import compute_grpo_advantage
    from prism.config import AlignConfig, ModelConfig, OptimConfig, PolicyUpdateConfig, load_config
    from prism.data.encoding import IGNORE, collate, encode_conversation
    from prism.data.formats import read_rl_parquet, read_sharegpt
    from prism.hardware import native_bf16
    from prism.models import build_model, load_model, load_processor, save_model
    from prism.models.discriminator import DiscriminatorSpec, build_discriminator, encode_prompt
    from prism.rollout import SamplingParams
    from prism.rollout.backends import make_backend
    from prism.rollout.prompts import rollout_prompt
    from prism.runtime import autocast
    from prism.stages.align import discriminator_pass
    from prism.stages.common import build_optimizer, compile_repeated_blocks, make_accelerator
    from prism.stages.policy_update import Group, policy_update
    from prism.stages.sft import shared_prefix_length, summed_token_loss

    world, repeats = Path(args.world), args.repeats
    processor = load_processor(world / "tokenizer")
    trained = Path(TRAINED[args.preset]) if args.preset in TRAINED else None
    if trained is not None and trained.is_dir():
        model, source = load_model(trained, dtype=torch.float32).train(), str(trained)
    else:
        model, source = build_model(args.preset, processor.tokenizer, seed=0).train(), "random init"
    text = model.config.text_config
    result: dict = {"model": source, "parameters": sum(p.numel() for p in model.parameters()),
                    "threads": torch.get_num_threads()}
    profiles: dict = {}

    def measure(name: str, fn, work: dict, after=None) -> None:
        seconds = median_seconds(fn, repeats)
        flops = counted_flops(fn)
        entry = {"seconds": round(seconds, 4), "gflop": round(flops / 1e9, 3),
                 "gflops_per_s": round(flops / seconds / 1e9, 1), **work}
        if after is not None:
            entry.update(after(seconds))
        result[name] = entry
        if args.profile:
            profiles[name] = top_operators(fn)
        print(f"  {args.preset} {name}: {json.dumps(entry)}", file=sys.stderr, flush=True)

    # ---- SFT step ----
    conversations = read_sharegpt(world / "sft.json")[:SFT_BATCH]
    encoded = [encode_conversation(processor, c, 1024) for c in conversations]
    batch = collate(encoded, processor.tokenizer.pad_token_id, model.config.image_token_id)
    tokens = int(batch["attention_mask"].sum())
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def sft_step(share_prefix: bool = True, autocast_dtype: str | None = None) -> None:
        with autocast("cpu", autocast_dtype):  # as the recipe wraps its forward
            loss = summed_token_loss(model, batch, share_prefix=share_prefix) / labelled
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result["gemm_peaks"] = gemm_peaks(text, tokens=batch["input_ids"].numel(), repeats=repeats)
    peak = result["gemm_peaks"]["fp32_gflops"]
    work = {"batch": list(batch["input_ids"].shape), "tokens": tokens,
            "shared_prefix": shared_prefix_length(batch, model.config.image_token_id)}
    measure("sft_step_whole_rows", lambda: sft_step(share_prefix=False), work,
            after=lambda s: {"tokens_per_s": round(tokens / s, 1)})
    # The recipe's step: the rows' shared prefix runs once. Its model FLOP/s counts the whole rows' FLOPs (the
    # work a step does for its tokens, as MFU counts it) over its time; gflops_per_s what it executes.
    whole = result["sft_step_whole_rows"]
    measure("sft_step", sft_step, work, after=lambda s: {
        "tokens_per_s": round(tokens / s, 1), "model_gflops_per_s": round(whole["gflop"] / s, 1),
        "speedup_over_whole_rows": round(whole["seconds"] / s, 3)})

    # the same step with the repeated blocks compiled, on a copy (the rollout below must not decode through them)
    compiled = copy.deepcopy(model)
    compiled_optimizer = torch.optim.AdamW(compiled.parameters(), lr=1e-6)
    compiled_blocks = compile_repeated_blocks(compiled)

    def compiled_sft_step() -> None:
        loss = summed_token_loss(compiled, batch) / labelled
        loss.backward()
        compiled_optimizer.step()
        compiled_optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    compiled_sft_step()
    first_call = time.perf_counter() - started
    seconds = median_seconds(compiled_sft_step, repeats)
    flops = result["sft_step"]["gflop"]  # the same work; FlopCounterMode does not see inside compiled graphs
    result["sft_step_compiled"] = {"seconds": round(seconds, 4), "gflop": flops,
                                   "gflops_per_s": round(flops / seconds, 1), "blocks": compiled_blocks,
                                   "first_call_seconds": round(first_call, 2), "tokens_per_s": round(tokens / seconds, 1),
                                   "speedup": round(result["sft_step"]["seconds"] / seconds, 3)}
    print(f"  {args.preset} sft_step_compiled: {json.dumps(result['sft_step_compiled'])}", file=sys.stderr, flush=True)

    # the recipe's step under bf16 autocast, as `mixed_precision: auto` runs it where the CPU computes bf16 natively
    # (embedded-m's SFT): GridLinear's padded rows, attention in float32, denormals flushed (README, "bf16 where
    # AMX pays"). The float32 step's work; its counted FLOPs include the grid's padded rows (about 1% more). The
    # flush is undone after, for the float32 work below.
    if native_bf16():
        torch.set_flush_denormal(True)
        measure("sft_step_bf16", lambda: sft_step(autocast_dtype="bfloat16"), work, after=lambda s: {
            "tokens_per_s": round(tokens / s, 1), "model_gflops_per_s": round(whole["gflop"] / s, 1),
            "speedup_over_fp32": round(result["sft_step"]["seconds"] / s, 3)})
        torch.set_flush_denormal(False)

    # ---- rollout ----
    records = read_rl_parquet(world / "teacher.parquet")[:PROMPTS]
    backend = make_backend("hf", model, processor, model_path=None, compute_dtype="float32")
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=1.0, seed=0)
    prompts = [rollout_prompt(r) for r in records]
    rollouts = {}

    def rollout() -> None:
        model.eval()
        rollouts["batch"] = backend.generate(prompts, ROLLOUTS, sampling)
        model.train()

    new_tokens = PROMPTS * ROLLOUTS * NEW_TOKENS
    measure("rollout", rollout, {"prompts": PROMPTS, "rollouts_per_prompt": ROLLOUTS, "new_tokens": NEW_TOKENS},
            after=lambda s: {"tokens_per_s": round(new_tokens / s, 1)})
    rolled = rollouts["batch"]

    # ---- RLVR update ----
    update = PolicyUpdateConfig(micro_batch_size=64)
    accelerator = make_accelerator(ModelConfig(preset=args.preset, mixed_precision="no"))  # float32, as measured
    policy_optimizer = build_optimizer(model, OptimConfig(lr=1e-6, weight_decay=0.01, lr_scheduler="constant"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(policy_optimizer, lambda step: 1.0)
    rewards = torch.rand(rolled.num_rows, generator=torch.Generator().manual_seed(0))
    advantages = compute_grpo_advantage(rewards, rolled.group_ids).reshape(PROMPTS, ROLLOUTS)
    groups = [Group(rolled, p, advantages[p]) for p in range(PROMPTS)]
    measure("rlvr_update", lambda: policy_update(model, policy_optimizer, scheduler, accelerator, groups, update,
                                                 grad_clip=1.0, filler=groups[0], step=1),
            {"rollouts": rolled.num_rows, "response_tokens": int(rolled.response_mask.sum())})

    # ---- discriminator pass and update ----
    with tempfile.TemporaryDirectory() as tmp:  # the upcycled discriminator of this preset's (dense) model
        save_model(model, processor, Path(tmp) / "dense")
        dense = load_model(Path(tmp) / "dense", dtype=torch.float32)
    discriminator = build_discriminator(dense, DiscriminatorSpec("moe"), num_experts=4, top_k=2,
                                        expert_noise_std=0.002, router_init_std=0.02, aux_loss_coef=0.01,
                                        seed=0).train()
    cfg = load_config(AlignConfig, path="experiments/configs/embedded/align.yaml")
    encoded_prompts = [encode_prompt(processor, r.prompt, rollout_prompt(r).images, True) for r in records]
    disc_optimizer = build_optimizer(discriminator, cfg.disc_optim)

    def disc_pass() -> None:
        discriminator_pass(discriminator, processor, encoded_prompts, records, rolled.texts, ROLLOUTS, cfg,
                           batch_has_valid=True)

    def disc_update() -> None:
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=False)

    measure("disc_pass", disc_pass, {"rollouts": rolled.num_rows, "micro_batch": cfg.disc_micro_batch_size,
                                     "teacher_scoring": cfg.teacher_scoring})
    disc_pass()  # gradients for the optimizer step
    measure("disc_update", disc_update, {"parameters": sum(p.numel() for p in discriminator.parameters())})

    # ---- evaluation ----
    from evaluation.runner import run_eval

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, processor, Path(tmp) / "model")
        started = time.perf_counter()
        report = run_eval(Path(tmp) / "model", suite="embedded", limit=EVAL_LIMIT, world=world,
                          out_root=Path(tmp) / "evals", log=lambda message: None)
        seconds = time.perf_counter() - started
        samples = sum(o.samples or 0 for o in report.outcomes)
    result["eval"] = {"seconds": round(seconds, 2), "samples": samples, "samples_per_s": round(samples / seconds, 2)}

    result["gemm_peaks_after"] = gemm_peaks(text, tokens=batch["input_ids"].numel(), repeats=repeats)
    peak = max(peak, result["gemm_peaks_after"]["fp32_gflops"])
    for name in (kind for kind in TIMED_KINDS if kind in result):
        result[name]["of_fp32_peak"] = round(result[name]["gflops_per_s"] / peak, 3)
        result[name]["of_bf16_peak"] = round(result[name]["gflops_per_s"] / result["gemm_peaks"]["bf16_gflops"], 3)
    for name in ("sft_step", "sft_step_bf16"):
        if name in result:
            result[name]["model_flops_of_fp32_peak"] = round(result[name]["model_gflops_per_s"] / peak, 3)
    if profiles:
        result["profile"] = profiles
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="embedded-s,embedded-m")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each kind after one warm-up")
    parser.add_argument("--world", type=Path, default=Path("outputs/world"))
    parser.add_argument("--profile", action="store_true", help="also record the top operators of each kind")
    parser.add_argument("--out", type=Path, default=BENCH / "throughput.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not (args.world / "world.json").is_file():
        sys.exit(f"bench/throughput.py: no world at {args.world}; run `prism world export --out {args.world}` first")
    import torch

    from prism.runtime import host_info

    result = {"host": {**host_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}, "presets": {}}
    for preset in args.presets.split(","):
        command = [sys.executable, __file__, "--worker", "--preset", preset, "--world", str(args.world),
                   "--repeats", str(args.repeats), *(["--profile"] if args.profile else [])]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"bench/throughput.py: {preset} failed (exit {done.returncode})")
        result["presets"][preset] = json.loads(done.stdout.strip().splitlines()[-1])
    from prism.atomic_io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    for preset, r in result["presets"].items():
        peaks = r["gemm_peaks"]
        after = r["gemm_peaks_after"]
        print(f"{preset}: fp32 GEMM {peaks['fp32_gflops']} / {after['fp32_gflops']} GFLOP/s (before / after the work), "
              f"bf16 {peaks['bf16_gflops']} / {after['bf16_gflops']}")
        for name in (kind for kind in TIMED_KINDS if kind in r):
            print(f"  {name:19s} {r[name]['seconds']:7.3f} s  {r[name]['gflops_per_s']:7.1f} GFLOP/s "
                  f"({100 * r[name]['of_fp32_peak']:.0f}% of fp32 peak)")
        print(f"  sft_step counting the whole rows' FLOPs: {r['sft_step']['model_gflops_per_s']} GFLOP/s "
              f"({100 * r['sft_step']['model_flops_of_fp32_peak']:.0f}% of fp32 peak), "
              f"{r['sft_step']['speedup_over_whole_rows']}x the whole-row step")
        if "sft_step_bf16" in r:
            print(f"  sft_step_bf16 counting the whole rows' FLOPs: {r['sft_step_bf16']['model_gflops_per_s']} GFLOP/s "
                  f"({100 * r['sft_step_bf16']['model_flops_of_fp32_peak']:.0f}% of fp32 peak), "
                  f"{r['sft_step_bf16']['speedup_over_fp32']}x the float32 step")
        print(f"  disc_update       {r['disc_update']['seconds']:7.3f} s;  eval {r['eval']['samples_per_s']} samples/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from prism.workers import restart_under_allocator_env

    restart_under_allocator_env()  # glibc's heap settings of matrix nodes, also when run outside `just`
    main()
