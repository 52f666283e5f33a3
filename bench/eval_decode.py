"""Benchmark: `prism_hf` evaluation with transformers' `generate` (what it uses) against the rollout decode loop
(prism.rollout.hf.sample_responses, what the training stages sample with), same checkpoints, same held-out items,
runs interleaved.

For each checkpoint: greedy responses of both on `--greedy-limit` items per family (identical when the loop
computes what `generate` does), then evaluations of the whole embedded suite with each for `--seeds` evaluation
seeds, sampled as the suite samples (temperature 1, top_p 0.7), timed end to end (lmms-eval included), with
their accuracy and the difference paired by seed with its 95% interval. The loop is
faster; over six seeds its accuracy came out 1.0 point lower than `generate`'s, 95% interval [-2.7, +0.7], so no
bias was found (the README gives the figures). Evaluation keeps `generate`, the reference decoder.
Writes outputs/bench/eval-decode.json. Run it on an otherwise idle machine.

    .venv/bin/python bench/eval_decode.py CHECKPOINT [CHECKPOINT ...] [--world outputs/world] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import scipy.stats
import torch

import evaluation.model as adapter
from evaluation.config import EvalConfig
from evaluation.runner import run_eval
from prism.atomic_io import atomic_write_text
from prism.config import load_config
from prism.rollout import SamplingParams
from prism.rollout.hf import sample_responses
from prism.runtime import host_info

BENCH = Path("outputs/bench")


def decode_loop_batch(self, items):
    """One batch through the rollout decode loop, with the adapter's batching, seed and stop tokens."""
    gen_kwargs, _, task, _ = items[0]
    texts, images = [], []
    for _, messages, _, _ in items:
        rendered, message_images = adapter.split_messages(messages)
        texts.append(self.processor.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False))
        images.extend(message_images)
    batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    sampling = SamplingParams(max_new_tokens=int(gen_kwargs.get("max_new_tokens", 256)), temperature=temperature,
                              top_p=float(gen_kwargs.get("top_p", 1.0)) if temperature > 0 else 1.0,
                              seed=adapter.derive_seed(self.seed, task, [doc_id for *_, doc_id in items]))
    with torch.inference_mode():
        sequences, _ = sample_responses(self.model, dict(batch), 1, sampling, sorted(self.stop_ids),
                                        self.tokenizer.pad_token_id, with_log_probs=False)
    results = []
    for ids in sequences.tolist():
        length = next((k for k, token in enumerate(ids) if token in self.stop_ids), len(ids))
        text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
        adapter.note_response_tokens(text, length)
        results.append(adapter.GenerationResult(text=text, token_counts=adapter.TokenCounts(output_tokens=length))
                       if adapter.GenerationResult is not None else text)
    return results


IMPLEMENTATIONS = {"generate": adapter.PrismHF._generate, "decode_loop": decode_loop_batch}


def evaluate(checkpoint: Path, world: Path, implementation: str, config: EvalConfig, limit: int | None):
    """(seconds, accuracy over the suite, every response in order) of one evaluation with `implementation`."""
    adapter.PrismHF._generate = IMPLEMENTATIONS[implementation]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            report = run_eval(checkpoint, suite="embedded", limit=limit, world=world, out_root=Path(tmp),
                              config=config, log=lambda message: None)
            seconds = time.perf_counter() - started
            responses = [json.loads(line)["filtered_resps"] for path in sorted(Path(tmp).rglob("*_samples_*.jsonl"))
                         for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    finally:
        adapter.PrismHF._generate = IMPLEMENTATIONS["generate"]
    accuracy = next(row["value"] for outcome in report.outcomes for row in outcome.rows
                    if row["task"] == "prism_embedded" and row["metric"] == "accuracy")
    return seconds, accuracy, responses


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def paired_difference(runs: list[dict]) -> dict:
    """Accuracy of the loop minus `generate`, paired by seed: the mean over seeds (points) and its 95% t interval."""
    by_seed = {(run["seed"], run["implementation"]): run["accuracy"] for run in runs}
    seeds = sorted({seed for seed, _ in by_seed})
    diffs = [100 * (by_seed[seed, "decode_loop"] - by_seed[seed, "generate"]) for seed in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": round(mean, 2), "seeds": len(diffs)}
    half = scipy.stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"mean": round(mean, 2), "interval_95": [round(float(mean - half), 2), round(float(mean + half), 2)], "seeds": len(diffs),
            "per_seed": [round(d, 2) for d in diffs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--world", type=Path, default=Path("outputs/world"))
    parser.add_argument("--seeds", type=positive_int, default=2, help="evaluation seeds per decoder (a seed fixes the draws)")
    parser.add_argument("--greedy-limit", type=int, default=40, help="items per family for the greedy comparison")
    args = parser.parse_args()
    greedy = load_config(EvalConfig, overrides=["embedded.temperature=0"])
    result = {"host": {**host_info(), "torch_threads": torch.get_num_threads(),
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}, "checkpoints": {}}
    for checkpoint in args.checkpoints:
        _, _, ours = evaluate(checkpoint, args.world, "decode_loop", greedy, args.greedy_limit)
        _, _, peer = evaluate(checkpoint, args.world, "generate", greedy, args.greedy_limit)
        entry = {"greedy_identical": sum(a == b for a, b in zip(ours, peer)), "greedy_compared": len(ours), "runs": []}
        for seed in range(args.seeds):
            sampled = load_config(EvalConfig, overrides=[f"seed={seed}"])
            for implementation in ("generate", "decode_loop"):
                seconds, accuracy, responses = evaluate(checkpoint, args.world, implementation, sampled, None)
                entry["runs"].append({"implementation": implementation, "seed": seed, "seconds": round(seconds, 2),
                                      "accuracy": round(accuracy, 4), "items": len(responses)})
                print(f"{checkpoint}: seed {seed} {implementation} {seconds:.1f} s, accuracy {accuracy:.3f}", flush=True)
        entry["loop_minus_generate"] = paired_difference(entry["runs"])
        result["checkpoints"][str(checkpoint)] = entry
        print(f"{checkpoint}: greedy responses identical {entry['greedy_identical']} of {entry['greedy_compared']}; "
              f"loop - generate {entry['loop_minus_generate']}")
    BENCH.mkdir(parents=True, exist_ok=True)
    atomic_write_text(BENCH / "eval-decode.json", json.dumps(result, indent=2) + "\n")
    print(f"wrote {BENCH / 'eval-decode.json'}")


if __name__ == "__main__":
    from prism.workers import restart_under_allocator_env

    restart_under_allocator_env()  # glibc's heap settings of matrix nodes, also when run outside `just`
    main()
