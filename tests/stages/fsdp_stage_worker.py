"""Run under torchrun (2 CPU processes, gloo): a prism recipe with its policy sharded by FSDP2, three times in
one launch: uninterrupted into OUT/whole, stopped right after checkpoint STOP into OUT/cut, and OUT/cut again,
which resumes from that sharded checkpoint.

  python -m torch.distributed.run --nproc_per_node 2 fsdp_stage_worker.py sft OUT STOP key=value ...

Sharding: accelerate (1.15) cannot shard on CPU (it keeps distributed_type MULTI_CPU, DDP, and ignores its FSDP
plugin), so `Accelerator.prepare` is replaced by what its FSDP2 plugin does with experiments/accelerate/*.yaml
(fsdp_version 2, TRANSFORMER_BASED_WRAP): `fully_shard` on each Qwen3VLTextDecoderLayer and Qwen3VLVisionBlock,
then on the root, and the optimizer pointed at the sharded parameters. disc_warmup and align shard their
discriminator themselves under FSDP (prism.stages.common.shard_whole): here their `is_fsdp` is made to say so.
Parameters stay float32 (no MixedPrecisionPolicy), so runs can be compared bit for bit. align's rollouts are
scripted (`scripted_generate`). STOP 0: one plain (unsharded) run into OUT/ddp."""

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

from prism.config import AlignConfig, DiscWarmupConfig, RLVRConfig, SFTConfig, load_config
from prism.response_format import render_response
from prism.rewards import RewardResult
from prism.rollout import HFRolloutBackend, RolloutPrompt
from prism.stages import align, disc_warmup, rlvr, sft

WRAPPED = ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")
RECIPES = {"sft": (SFTConfig, sft), "rlvr": (RLVRConfig, rlvr), "disc_warmup": (DiscWarmupConfig, disc_warmup),
           "align": (AlignConfig, align)}
SHAPES = ("a red circle", "a blue square", "a green triangle")


class Stop(Exception):
    """The run stopped right after writing checkpoint STOP."""


def fsdp2_prepare(self, model, optimizer):
    names = {id(p): name for name, p in model.named_parameters()}
    for module in model.modules():
        if type(module).__name__ in WRAPPED:
            fully_shard(module)
    fully_shard(model)
    sharded = dict(model.named_parameters())  # fully_shard registers new (DTensor) parameters
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model, optimizer


def varied_reward(text, ground_truth, choices=None, accuracy_weight=0.8, format_weight=0.2):
    """test_rlvr.varied_reward: a random policy never writes the tagged format, so score a property of the text."""
    value = (sum(map(ord, text)) % 7) / 6
    return RewardResult(score=value, accuracy=float(value > 0.5), format=1.0, extracted_answer=None)


def scripted_text(prompt: RolloutPrompt, rollout: int) -> str:
    """conftest.scripted_text keyed by the prompt's content, not its place in the batch: one process and two then
    draw the same rollouts for the same prompt. Every 4th rollout is format-invalid."""
    key = sum(map(ord, str(prompt.to_messages())))
    if rollout % 4 == 3:
        return "<caption>\n- " + SHAPES[0] + "\n<think>no closing tags"
    return render_response(SHAPES[: 1 + (key + rollout) % 3], ["Count the shapes."] * (1 + rollout % 2),
                           str(rollout % 3))


def scripted_generate(real):
    """HFRolloutBackend.generate with the sampled responses replaced by `scripted_text` (a random policy never
    writes the tagged format, so align's discriminator would see no valid rollout). The real generate still runs
    for one token: under FSDP its forwards are collectives."""
    def generate(self, prompts, n, sampling):
        batch = real(self, prompts, n, dataclasses.replace(sampling, max_new_tokens=1, min_new_tokens=0))
        texts = [scripted_text(prompt, k) for prompt in prompts for k in range(n)]
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]
        width = max(len(row) for row in ids)
        batch.response_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        batch.response_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, row_ids in enumerate(ids):
            batch.response_ids[row, : len(row_ids)] = torch.tensor(row_ids)
            batch.response_mask[row, : len(row_ids)] = 1
        batch.texts, batch.finish_reasons, batch.behaviour_log_probs = texts, ["stop"] * len(texts), None
        return batch

    return generate


def main(recipe: str, out: str, stop: int, *overrides: str) -> None:
    """STOP 0: one uninterrupted run into OUT/ddp, not sharded (accelerate's DDP), for comparison."""
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("PRISM_TEST_HANG_S", "240")), exit=True)  # a hang prints every thread's stack and exits
    torch.set_num_threads(1)
    rlvr.compute_reward = varied_reward
    if recipe == "align":
        HFRolloutBackend.generate = scripted_generate(HFRolloutBackend.generate)
    config_class, module = RECIPES[recipe]
    run = module.run

    def config(folder: str):
        return load_config(config_class, overrides=[*overrides, f"output_dir={Path(out) / folder}"])

    if stop == 0:
        run(config("ddp"))
        return
    Accelerator.prepare = fsdp2_prepare  # the policy (sft, rlvr, align)
    disc_warmup.is_fsdp = align.is_fsdp = lambda accelerator: True  # the discriminator: sharded whole by the recipe
    run(config("whole"))
    real_save = module.save_progress

    def save_then_stop(run_dir, done, *args, **kwargs):
        real_save(run_dir, done, *args, **kwargs)
        if done == stop:
            raise Stop

    module.save_progress = save_then_stop
    try:
        run(config("cut"))
        raise AssertionError("the run did not stop")
    except Stop:
        pass
    module.save_progress = real_save
    torch.manual_seed(12345 + dist.get_rank())  # the RNG moved on meanwhile: the checkpoint must restore it
    run(config("cut"))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
