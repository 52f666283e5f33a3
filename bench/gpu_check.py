"""The published-scale check for one GPU (issue #17): a few SFT and RLVR steps of Qwen3-VL-2B's architecture with
random weights (nothing downloaded), in the precision the stages use at scale, within 10 minutes on one H200.

  - precision: float32 master weights and AdamW state; bf16 compute through FSDP2's
    MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32), each decoder layer and vision block its own
    FSDP unit, on one process (the sharded code path, world size 1);
  - sft:     `--sft-steps` optimizer steps of `--sft-batch` sequences of `--seq-len` tokens with one image each,
             gradient checkpointing on, loss on the second half;
  - rollout: the HF backend's decode loop (`prism.rollout.hf.sample_responses`), `--prompts` x `--n` rollouts of
             `--new-tokens` tokens;
  - rlvr:    `--rl-steps` policy updates over those rollouts (log-probs, ppo_clip, backward, AdamW step) in
             micro-batches of `--micro` rows.
Writes outputs/bench/gpu-check.json: seconds, tokens/s, MFU (6 x parameters x tokens per second over
`--peak-tflops`; attention FLOPs are left out, so long sequences read a little low) and peak memory per phase.
vLLM is not exercised here: the file records whether its wheel is present.

  python bench/gpu_check.py            # a GPU node
  python bench/gpu_check.py --tiny     # CPU: the same code on a tiny architecture, to check the script itself
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from prism.algorithms import aggregate_loss, ppo_clip
from prism.atomic_io import atomic_write_text
from prism.rollout import SamplingParams
from prism.rollout.hf import sample_responses, token_log_probs

# Qwen3-VL-2B-Instruct's config.json, as read (the parameter count printed first confirms it: about 2.1e9).
ARCHITECTURES = {
    "qwen3-vl-2b": dict(
        text=dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=6144, tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    deepstack_visual_indexes=[5, 11, 17])),
    "tiny": dict(
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, tie_word_embeddings=True),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    deepstack_visual_indexes=[0])),
}
VOCAB = 151936
IMAGE_TOKEN, VISION_START, VISION_END = 151655, 151652, 151653


def build(arch_name: str, device: torch.device) -> Qwen3VLForConditionalGeneration:
    arch = ARCHITECTURES[arch_name]
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB, rope_theta=5_000_000.0, max_position_embeddings=262144,
                         rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20] if arch_name != "tiny"
                                       else [2, 3, 3], "mrope_interleaved": True}, **arch["text"]),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           **arch["vision"]),
        image_token_id=IMAGE_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=arch["text"]["tie_word_embeddings"],
    )
    with device:
        model = Qwen3VLForConditionalGeneration(config)  # float32: the master weights
    model.config._attn_implementation = "sdpa"
    return model


def shard(model: torch.nn.Module) -> None:
    """FSDP2 as the shipped accelerate configs wrap the model: each decoder layer and vision block, then the root."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def fake_inputs(batch: int, seq_len: int, image_px: int, device: torch.device,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`batch` rows: <vision_start> image tokens <vision_end> then random text; one image per row."""
    side = image_px // 16
    image_tokens = (side // 2) ** 2
    ids = torch.randint(1000, 150000, (batch, seq_len), generator=generator)
    ids[:, 0] = VISION_START
    ids[:, 1 : 1 + image_tokens] = IMAGE_TOKEN
    ids[:, 1 + image_tokens] = VISION_END
    pixels = torch.randn(batch * side * side, 3 * 2 * 16 * 16, generator=generator)
    grid = torch.tensor([[1, side, side]] * batch)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long().to(device), "pixel_values": pixels.to(device),
            "image_grid_thw": grid.to(device)}


class Meter:
    """Seconds of a phase (synchronised on GPU) and its peak memory."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds, self.t0 = now - self.t0, now
        return seconds

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny architecture on CPU (checks the script)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--sft-batch", type=int, default=4)
    parser.add_argument("--sft-steps", type=int, default=4)
    parser.add_argument("--image-px", type=int, default=448)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--rl-steps", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--out", default="outputs/bench/gpu-check.json")
    args = parser.parse_args()
    if args.tiny:
        args.seq_len, args.sft_batch, args.sft_steps, args.image_px = 96, 2, 2, 64
        args.prompts, args.n, args.prompt_len, args.new_tokens, args.micro, args.rl_steps = 2, 2, 32, 8, 2, 1

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    meter = Meter(device)

    meter.start()
    model = build("tiny" if args.tiny else "qwen3-vl-2b", device)
    parameters = sum(p.numel() for p in model.parameters())
    shard(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)  # float32 state
    result = {"architecture": "tiny" if args.tiny else "qwen3-vl-2b", "parameters": parameters,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args),
              "precision": "float32 master weights and AdamW state, FSDP2 param_dtype bf16, reduce_dtype fp32",
              "vllm": importlib.util.find_spec("vllm") is not None,
              "build_seconds": round(meter.lap(), 1), "weights_and_shards_gib": meter.peak_gib()}
    print(json.dumps(result), flush=True)
    flops_per_s = args.peak_tflops * 1e12

    def mfu(tokens: int, seconds: float) -> float:
        return round(6 * parameters * tokens / seconds / flops_per_s, 4)

    # --- SFT steps ---
    model.train()
    inputs = fake_inputs(args.sft_batch, args.seq_len, args.image_px, device, generator)
    labels = inputs["input_ids"].clone()
    labels[:, : args.seq_len // 2] = -100
    meter.start()
    times, losses = [], []
    for _ in range(args.sft_steps):
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        loss = F.cross_entropy(logits[keep].float(), targets[keep])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        times.append(meter.lap())
    steady = min(times[1:] or times)
    tokens = args.sft_batch * args.seq_len
    result["sft"] = {"seconds": [round(t, 3) for t in times], "tokens_per_s": round(tokens / steady, 1),
                     "mfu": mfu(tokens, steady), "peak_gib": meter.peak_gib(), "loss": losses}
    print(json.dumps({"sft": result["sft"]}), flush=True)

    # --- rollouts: the HF backend's decode loop ---
    model.eval()
    prompts = fake_inputs(args.prompts, args.prompt_len, args.image_px, device, generator)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, seed=0)
    meter.start()
    with torch.no_grad():
        responses, _ = sample_responses(model, prompts, args.n, sampling, stop_ids=[0], pad_id=0, with_log_probs=False)
    seconds = meter.lap()
    rows = args.prompts * args.n
    result["rollout"] = {"rows": rows, "new_tokens": args.new_tokens, "seconds": round(seconds, 3),
                         "tokens_per_s": round(rows * args.new_tokens / seconds, 1), "peak_gib": meter.peak_gib()}
    print(json.dumps({"rollout": result["rollout"]}), flush=True)

    # --- RLVR updates over those rollouts ---
    model.train()
    sequences = torch.cat([prompts["input_ids"].repeat_interleave(args.n, 0), responses], dim=1)
    repeat = {k: v.repeat_interleave(args.n, 0) for k, v in prompts.items() if k in ("image_grid_thw",)}
    pixels_per_row = prompts["pixel_values"].shape[0] // args.prompts
    meter.start()
    times = []
    for _ in range(args.rl_steps):
        for start in range(0, rows, args.micro):
            chunk = slice(start, start + args.micro)
            owners = torch.arange(rows)[chunk] // args.n
            pixel_rows = torch.cat([torch.arange(o * pixels_per_row, (o + 1) * pixels_per_row) for o in owners.tolist()])
            batch = {"input_ids": sequences[chunk], "attention_mask": torch.ones_like(sequences[chunk]),
                     "mm_token_type_ids": (sequences[chunk] == IMAGE_TOKEN).long(),
                     "pixel_values": prompts["pixel_values"][pixel_rows.to(device)],
                     "image_grid_thw": repeat["image_grid_thw"][chunk]}
            out = model(**batch, use_cache=False)
            lp = token_log_probs(out.logits[:, args.prompt_len - 1 : -1], batch["input_ids"][:, args.prompt_len:], 1.0)
            mask = torch.ones_like(lp)
            advantages = torch.randn(lp.shape[0], device=device)
            loss_mat, _ = ppo_clip(lp, lp.detach(), advantages, mask, dual_clip_c=3.0)
            (aggregate_loss(loss_mat, mask) * lp.shape[0] / rows).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(meter.lap())
    steady = min(times)
    tokens = rows * sequences.shape[1]
    result["rlvr_update"] = {"rows": rows, "micro": args.micro, "seq_len": sequences.shape[1],
                             "seconds": [round(t, 3) for t in times], "tokens_per_s": round(tokens / steady, 1),
                             "mfu": mfu(tokens, steady), "peak_gib": meter.peak_gib()}
    print(json.dumps({"rlvr_update": result["rlvr_update"]}), flush=True)

    master = {p.dtype for p in model.parameters()}
    state = {v.dtype for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim}
    result["dtypes"] = {"parameters": sorted(map(str, master)), "optimizer_state": sorted(map(str, state))}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(args.out, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
