"""Run under torchrun (2 CPU processes, gloo): a prism recipe with its policy sharded by FSDP2, three times in
one launch: uninterrupted into OUT/whole, stopped right after checkpoint STOP into OUT/cut, and OUT/cut again,
which resumes from that sharded checkpoint.

  python -m torch.distributed.run --nproc_per_node 2 fsdp_stage_worker.py sft OUT STOP key=value ...

Sharding: accelerate (1.15) cannot shard on CPU (it keeps distributed_type MULTI_CPU, DDP, and ignores its FSDP
plugin), so `Accelerator.prepare` is replaced by what its FSDP2 plugin does with experiments/accelerate/*.yaml
(fsdp_version 2, TRANSFORMER_BASED_WRAP): `fully_shard` on each Qwen3VLTextDecoderLayer and Qwen3VLVisionBlock,
then on the root, and the optimizer pointed at the sharded parameters. disc_warmup shards its discriminator itself
under FSDP (prism.stages.common.shard_whole): here its `is_fsdp` is made to say so. Parameters stay float32 (no
MixedPrecisionPolicy), so runs can be compared bit for bit. STOP 0: one plain (unsharded) run into OUT/ddp."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

from prism.config import DiscWarmupConfig, RLVRConfig, SFTConfig, load_config
from prism.rewards import RewardResult
from prism.stages import disc_warmup, rlvr, sft

WRAPPED = ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")
RECIPES = {"sft": (SFTConfig, sft), "rlvr": (RLVRConfig, rlvr), "disc_warmup": (DiscWarmupConfig, disc_warmup)}


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


def main(recipe: str, out: str, stop: int, *overrides: str) -> None:
    """STOP 0: one uninterrupted run into OUT/ddp, not sharded (accelerate's DDP), for comparison."""
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("PRISM_TEST_HANG_S", "240")), exit=True)  # a hang prints every thread's stack and exits
    torch.set_num_threads(1)
    rlvr.compute_reward = varied_reward
    config_class, module = RECIPES[recipe]
    run = module.run

    def config(folder: str):
        return load_config(config_class, overrides=[*overrides, f"output_dir={Path(out) / folder}"])

    if stop == 0:
        run(config("ddp"))
        return
    Accelerator.prepare = fsdp2_prepare  # the policy (sft, rlvr)
    disc_warmup.is_fsdp = lambda accelerator: True  # the discriminator: disc_warmup shards it itself (shard_whole)
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
