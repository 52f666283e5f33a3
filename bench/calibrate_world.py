"""Calibrate the embedded world by measurement: plain SFT of a tiny preset on the public corpus.

Trains a preset from random init on the world's SFT split (public demonstrations) for a fixed number of
steps, then decodes the held-out benchmark greedily and reports, per family, format-valid rate, answer
accuracy (with `prism.rewards`), the majority-answer baseline and caption recall (fraction of the teacher's
caption bullets the model reproduces). Writes outputs/bench/calibrate-<preset>.json.

This is a measurement of the world's difficulty, not the SFT stage: the stage recipes (resume, manifests;
issue #5) belong in prism/stages, and reported accuracies go through `prism eval` (lmms-eval).

  python bench/calibrate_world.py --preset embedded-s      # or: just calibrate-world embedded-m
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from prism.atomic_io import atomic_write_text
from prism.config import load_config
from prism.data.export import corpus_texts
from prism.data.world import WorldConfig, iter_split, make_sample
from prism.models import build_model, build_processor, build_tokenizer, count_parameters
from prism.response_format import SYSTEM_PROMPT, extract_answer, is_format_valid, split_segments
from prism.rewards import answers_match

# What the calibration runs used; a larger model needs a smaller lr here (docs/ENVIRONMENT.md).
CALIBRATED_LR = {"embedded-s": 2e-3, "embedded-m": 1.2e-3}


def chat_prompt(processor, question: str) -> str:
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]
    return processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def base_batch(processor, samples):
    """The base stage's untagged captioning / QA (under the system prompt where the sample carries it), loss on the
    answer."""
    tokenizer = processor.tokenizer
    responses = [s.base_response + "<|im_end|>" for s in samples]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}] * s.base_system_prompt
            + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.base_prompt}]}],
            tokenize=False, add_generation_prompt=True)
        for s in samples
    ]
    return _response_only_batch(processor, samples, prompts, responses)


def sft_batch(processor, samples):
    responses = [s.public.text + "<|im_end|>" for s in samples]
    prompts = [chat_prompt(processor, s.question) for s in samples]
    return _response_only_batch(processor, samples, prompts, responses)


def _response_only_batch(processor, samples, prompts, responses):
    """Right-padded batch; loss only on the response and its <|im_end|>.

    The byte-level pre-tokenizer splits at the "assistant\n" | response boundary, so the response's own
    token ids are the last tokens of each row: no second processor pass is needed to find them.
    """
    tokenizer = processor.tokenizer
    texts = [p + r for p, r in zip(prompts, responses)]
    tokenizer.padding_side = "right"
    batch = processor(text=texts, images=[[s.image] for s in samples], padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    for row, response in enumerate(responses):
        length = int(batch["attention_mask"][row].sum())
        n = len(tokenizer(response)["input_ids"])
        labels[row, length - n : length] = batch["input_ids"][row, length - n : length]
    batch["labels"] = labels
    return batch


@torch.no_grad()
def evaluate_base_captions(model, processor, samples, max_new_tokens: int = 80) -> dict:
    """After the base stage: does "Describe the image." name each object (and its position)?"""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    model.eval()
    grid = [s for s in samples if s.family in ("counting", "presence", "composite", "multichoice")]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        tokenize=False, add_generation_prompt=True)
    exact = objects = 0.0
    for start in range(0, len(grid), 64):
        chunk = grid[start : start + 64]
        inputs = processor(text=[prompt] * len(chunk), images=[[s.image] for s in chunk], padding=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
        for sample, text in zip(chunk, tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)):
            text = text.lower()
            wanted = sample.teacher.caption_bullets
            exact += sum(b in text for b in wanted) / len(wanted)
            objects += sum(b.split(" at ")[0] in text for b in wanted) / len(wanted)
    model.train()
    return {"n": len(grid), "caption_recall": round(exact / len(grid), 3), "object_recall": round(objects / len(grid), 3)}


@torch.no_grad()
def evaluate(model, processor, samples, max_new_tokens: int, batch_size: int = 64) -> dict:
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    model.eval()
    rows = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = processor(text=[chat_prompt(processor, s.question) for s in chunk],
                           images=[[s.image] for s in chunk], padding=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for sample, text in zip(chunk, texts):
            segments = split_segments(text)
            caption = segments.caption if segments else ""
            wanted = sample.teacher.caption_bullets
            recall = sum(bullet in caption for bullet in wanted) / len(wanted)
            # Position-free recall: the public corpus often drops positions ("red square").
            objects = sum(bullet.split(" at ")[0] in caption for bullet in wanted) / len(wanted)
            answer = extract_answer(text)
            correct = answer is not None and answers_match(answer, sample.answer, choices=sample.choices)
            rows.append({"family": sample.family, "format": is_format_valid(text), "correct": correct,
                         "recall": recall, "object_recall": objects, "answer": sample.answer, "text": text})
    model.train()
    by_family = defaultdict(list)
    for row in rows:
        by_family[row["family"]].append(row)
    report = {}
    for family, group in by_family.items():
        majority = Counter(r["answer"] for r in group).most_common(1)[0][1] / len(group)
        report[family] = {
            "n": len(group),
            "format_valid": round(sum(r["format"] for r in group) / len(group), 3),
            "accuracy": round(sum(r["correct"] for r in group) / len(group), 3),
            "majority_baseline": round(majority, 3),
            "caption_recall": round(sum(r["recall"] for r in group) / len(group), 3),
            "object_recall": round(sum(r["object_recall"] for r in group) / len(group), 3),
        }
    report["all"] = {key: round(sum(v[key] for v in report.values()) / len(by_family), 3)
                     for key in ("format_valid", "accuracy", "majority_baseline", "caption_recall", "object_recall")}
    report["example"] = rows[0]["text"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="embedded-s")
    parser.add_argument("--base-steps", type=int, default=1200, help="untagged captioning/QA steps first")
    parser.add_argument("--steps", type=int, default=1200, help="SFT steps (0: base stage only)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default: the calibrated lr of the preset")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=600)
    parser.add_argument("--eval-per-family", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--config", type=Path, default=None, help="world YAML")
    parser.add_argument("overrides", nargs="*", help="world overrides key=value")
    args = parser.parse_args()
    if args.lr is None:
        args.lr = CALIBRATED_LR.get(args.preset, 1e-3)

    torch.manual_seed(args.seed)
    world = load_config(WorldConfig, args.config, args.overrides)
    tokenizer = build_tokenizer(corpus_texts(world))
    processor = build_processor(tokenizer, world.image_size)
    model = build_model(args.preset, tokenizer, seed=args.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))

    total_steps = args.base_steps + args.steps

    def lr_lambda(step: int) -> float:
        # Base and SFT are separate stages in the pipeline: each gets its own warm-up and cosine decay.
        start, length = (0, args.base_steps) if step < args.base_steps else (args.base_steps, args.steps)
        step -= start
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, length - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    bench_per_family = min(args.eval_per_family, world.bench_size)
    bench = [make_sample(world, "bench", f * world.bench_size + i)
             for f in range(len(world.families)) for i in range(bench_per_family)]
    streams = {"base": iter_split(world, "base"), "sft": iter_split(world, "sft")}
    result = {"preset": args.preset, "parameters": count_parameters(model), "world": {k: v for k, v in vars(world).items()},
              "base_steps": args.base_steps, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "vocab": len(tokenizer), "evals": []}
    started = time.perf_counter()
    tokens = 0
    for step in range(1, total_steps + 1):
        split = "base" if step <= args.base_steps else "sft"
        samples = [next(streams[split], None) for _ in range(args.batch_size)]
        if samples[-1] is None:  # another epoch over the split
            streams[split] = iter_split(world, split)
            samples = [next(streams[split]) for _ in range(args.batch_size)]
        batch = (base_batch if split == "base" else sft_batch)(processor, samples)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        if step % 50 == 0:
            elapsed = time.perf_counter() - started
            print(f"{split} step {step}/{total_steps} loss {loss.item():.3f} {tokens / elapsed:.0f} tok/s "
                  f"eta {(total_steps - step) * elapsed / step:.0f}s", flush=True)
        if step == args.base_steps:
            result["base_captions"] = evaluate_base_captions(model, processor, bench)
            print(json.dumps({"base_captions": result["base_captions"]}), flush=True)
        if split == "sft" and ((step - args.base_steps) % args.eval_every == 0 or step == total_steps):
            train_seconds = time.perf_counter() - started
            report = evaluate(model, processor, bench, args.max_new_tokens)
            report.update(step=step, train_seconds=round(train_seconds, 1))
            print(json.dumps({k: v for k, v in report.items() if k != "example"}), flush=True)
            result["evals"].append(report)
    result["train_tokens_per_s"] = round(tokens / (time.perf_counter() - started), 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = Path("outputs/bench") / f"calibrate-{args.preset}{args.tag}.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    print(out)


if __name__ == "__main__":
    main()
