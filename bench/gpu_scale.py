"""Memory and throughput of the real Qwen3-VL 4B / 8B architectures (random weights, bf16) on one GPU.

What only a GPU shows, measured with the code paths the stages use:
  - sft:     one SFT micro-step (forward, summed assistant-token cross-entropy, backward, AdamW step) on
             `--sft-batch` sequences of `--seq-len` tokens, each with one image, gradient checkpointing on;
  - rollout: HF `generate` of `--prompts` x `--n` rollouts x `--new-tokens` tokens with `output_logits`
             (the HF rollout backend's call), tokens/s;
  - update:  the RLVR policy-update forward/backward over those rollouts (log-probs, ppo_clip loss) in
             micro-batches of `--micro` rows.
Writes outputs/bench/gpu-<preset>.json (peak memory per phase, seconds, tokens/s). Architectures follow the
released config.json files; weights are random, so no checkpoint is needed. A phase that runs out of
memory is recorded as such (that size needs FSDP across GPUs, see experiments/accelerate/).

  python bench/gpu_scale.py --preset qwen3-vl-4b
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from prism.algorithms import aggregate_loss, ppo_clip
from prism.atomic_io import atomic_write_text
from prism.rollout import SamplingParams
from prism.rollout.hf import sample_responses, token_log_probs

# Released Qwen3-VL-{4B,8B}-Instruct architecture (config.json); vocabulary 151936, mRoPE [24, 20, 20].
ARCHITECTURES = {
    "qwen3-vl-4b": dict(
        text=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, intermediate_size=9728, tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                    deepstack_visual_indexes=[5, 11, 17]),
        tie=True),
    "qwen3-vl-8b": dict(
        text=dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, intermediate_size=12288, tie_word_embeddings=False),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    deepstack_visual_indexes=[8, 16, 24]),
        tie=False),
}
VOCAB = 151936
IMAGE_TOKEN, VISION_START, VISION_END = 151655, 151652, 151653


def build(preset: str) -> Qwen3VLForConditionalGeneration:
    arch = ARCHITECTURES[preset]
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB, rope_theta=5_000_000.0, max_position_embeddings=262144,
                         rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                         **arch["text"]),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           **arch["vision"]),
        image_token_id=IMAGE_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=arch["tie"],
    )
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model


def fake_inputs(batch: int, seq_len: int, image_px: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`batch` rows: <vision_start> image tokens <vision_end> then random text; one image per row."""
    patches_side = image_px // 16
    image_tokens = (patches_side // 2) ** 2
    ids = torch.randint(1000, 150000, (batch, seq_len), generator=generator)
    ids[:, 0] = VISION_START
    ids[:, 1 : 1 + image_tokens] = IMAGE_TOKEN
    ids[:, 1 + image_tokens] = VISION_END
    pixel_values = torch.randn(batch * patches_side * patches_side, 3 * 2 * 16 * 16, generator=generator)
    grid = torch.tensor([[1, patches_side, patches_side]] * batch)
    return {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long().cuda(),
            "pixel_values": pixel_values.to(torch.bfloat16).cuda(), "image_grid_thw": grid.cuda()}


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(ARCHITECTURES), default="qwen3-vl-4b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--sft-batch", type=int, default=2)
    parser.add_argument("--image-px", type=int, default=448)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=384)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of the rollout and the update")
    parser.add_argument("--phases", default="rollout", help="comma list of rollout, update, sft (each resets the peak)")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build(args.preset)
    result = {"preset": args.preset, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "parameters": sum(p.numel() for p in model.parameters()), "args": vars(args),
              "build_seconds": round(time.perf_counter() - started, 1),
              "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2), "build_peak_gib": peak_gib()}
    print(json.dumps(result), flush=True)
    phases = args.phases.split(",")

    if "rollout" in phases:
        torch.cuda.reset_peak_memory_stats()
        model.eval()
        inputs = fake_inputs(args.prompts, args.prompt_len, args.image_px, generator)

        sampling = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, seed=0)

        def generate():  # the HF backend's decode loop, as the RLVR recipe runs it (no behaviour log-probs)
            # min_new_tokens = max_new_tokens: the stop token is masked throughout, every row runs to the end
            return sample_responses(model, inputs, args.n, sampling, stop_ids=[0], pad_id=0, with_log_probs=False)

        try:
            times, _ = timed(generate, args.repeats)
            rows = args.prompts * args.n
            result["rollout"] = {"rows": rows, "new_tokens": args.new_tokens, "seconds": [round(t, 2) for t in times],
                                 "tokens_per_s": round(rows * args.new_tokens / min(times), 1), "peak_gib": peak_gib()}
        except torch.OutOfMemoryError as error:
            result["rollout"] = {"oom": str(error).splitlines()[0]}
        print(json.dumps({"rollout": result["rollout"]}), flush=True)

    if "update" in phases:
        torch.cuda.reset_peak_memory_stats()
        model.train()
        model.gradient_checkpointing_enable()
        rows = args.prompts * args.n
        seq_len = args.prompt_len + args.new_tokens
        batch = fake_inputs(args.micro, seq_len, args.image_px, generator)  # content does not change the cost

        def update():  # the RLVR recipe's policy update: log-probs of every response token, ppo_clip, backward
            for _ in range(0, rows, args.micro):
                out = model(**batch, use_cache=False)
                lp = token_log_probs(out.logits[:, args.prompt_len - 1 : -1], batch["input_ids"][:, args.prompt_len:], 1.0)
                mask = torch.ones_like(lp)
                loss_mat, _ = ppo_clip(lp, lp.detach(), torch.randn(args.micro, device="cuda"), mask, dual_clip_c=3.0)
                aggregate_loss(loss_mat, mask).backward()
            model.zero_grad(set_to_none=True)

        try:
            times, _ = timed(update, args.repeats)
            result["update"] = {"rows": rows, "micro": args.micro, "seq_len": seq_len,
                                "seconds": [round(t, 2) for t in times],
                                "tokens_per_s": round(rows * seq_len / min(times), 1), "peak_gib": peak_gib()}
        except torch.OutOfMemoryError as error:
            result["update"] = {"oom": str(error).splitlines()[0]}
        print(json.dumps({"update": result["update"]}), flush=True)

    if "sft" in phases:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model.train()
        model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
        inputs = fake_inputs(args.sft_batch, args.seq_len, args.image_px, generator)
        labels = inputs["input_ids"].clone()
        labels[:, : args.seq_len // 2] = -100  # loss on the second half (the "assistant" part)

        def sft_step():
            logits = model(**inputs, use_cache=False).logits[:, :-1]
            targets = labels[:, 1:]
            keep = targets != -100
            loss = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum") / keep.sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            times, _ = timed(sft_step, 3)
            tokens = args.sft_batch * args.seq_len
            result["sft"] = {"batch": args.sft_batch, "seq_len": args.seq_len, "seconds": [round(t, 2) for t in times],
                             "tokens_per_s": round(tokens / min(times[1:]), 1), "peak_gib": peak_gib(),
                             "optimizer": "torch AdamW, bf16 states"}
        except torch.OutOfMemoryError as error:
            result["sft"] = {"oom": str(error).splitlines()[0], "peak_gib_before_oom": peak_gib()}
        print(json.dumps({"sft": result["sft"]}), flush=True)

    # One phase per process keeps each phase's peak memory its own: merge into the preset's file.
    out = Path("outputs/bench") / f"gpu-{args.preset}.json"
    if out.is_file():
        result = {**json.loads(out.read_text()), **result}
    atomic_write_text(out, json.dumps(result, indent=2))
    print(out)


if __name__ == "__main__":
    main()
