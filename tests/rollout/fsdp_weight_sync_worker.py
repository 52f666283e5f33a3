"""Run under torchrun (2 CPU processes, gloo): one update of the tiny policy sharded with FSDP2, then
VLLMRolloutBackend.update_weights into a fake engine on every process; the reference is the same update of an
unsharded copy in this process. Each process writes what its engine received to OUT.rank<r>.json.

Sharding: `fully_shard` on each Qwen3VLTextDecoderLayer and Qwen3VLVisionBlock, then on the root, which is what
accelerate's FSDP2 plugin does with experiments/accelerate/*.yaml (fsdp_version 2, TRANSFORMER_BASED_WRAP of
those two classes). accelerate itself cannot be used here: on CPU (1.15) it keeps distributed_type MULTI_CPU
(DDP) and ignores the FSDP plugin. Parameters stay float32 (no MixedPrecisionPolicy) so that the sharded and the
unsharded updates can be compared bit for bit; the bfloat16 cast is the backend's."""

import copy
import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from fake_vllm import fake_vllm
from PIL import Image
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers.core_model_loading import revert_weight_conversion

from prism.models import PRESETS, build_model, build_processor, build_tokenizer
from prism.rollout import HFRolloutBackend, RolloutPrompt, SamplingParams, sequence_log_probs

WRAPPED = ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock")


def one_update(model, batch) -> None:
    """One AdamW step on the rollouts' log-likelihood (foreach=False: the same kernels for shards and tensors)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    (-sequence_log_probs(model, batch).sum()).backward()
    optimizer.step()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    sys.modules["vllm"] = fake_vllm()  # what prism.rollout.vllm imports
    from prism.rollout.vllm import VLLMRolloutBackend

    size = PRESETS["embedded-s"].image_size
    processor = build_processor(build_tokenizer([f"There are {i % 5 + 1} red circles." for i in range(200)]),
                                image_size=size)
    processor.tokenizer.padding_side = "left"
    model = build_model("embedded-s", processor.tokenizer, seed=0)
    reference = copy.deepcopy(model)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8))
    prompt = RolloutPrompt(question="How many circles?", images=[image])
    # the same batch on every process (same seed), so the averaged gradient is each process's own
    batch = HFRolloutBackend(reference, processor, behaviour_log_probs=False).generate(
        [prompt], n=2, sampling=SamplingParams(max_new_tokens=4, seed=0))

    one_update(reference, batch)
    for module in model.modules():
        if type(module).__name__ in WRAPPED:
            fully_shard(module)
    fully_shard(model)
    one_update(model, batch)
    sharded = {name: isinstance(p, DTensor) and p.to_local().numel() < p.numel()
               for name, p in model.named_parameters()}

    backend = VLLMRolloutBackend("unused/checkpoint", processor, dtype="bfloat16")
    backend.update_weights(model)  # a collective: both processes
    engine = backend.llm.model

    def checkpoint_layout(model):  # the fused patch embedding's Linear as the checkpoint's Conv3d
        return revert_weight_conversion(model, {name: p.detach().to(torch.bfloat16)
                                                for name, p in model.named_parameters()})

    expected = checkpoint_layout(reference)
    before = checkpoint_layout(build_model("embedded-s", processor.tokenizer, seed=0))
    result = {
        "names": [name for name, _ in engine.received],
        "reference_names": list(expected),
        "sharded": sharded,
        "dtypes": sorted({str(t.dtype) for _, t in engine.received}),
        "full_shapes": all(t.shape == expected[name].shape for name, t in engine.received),
        "equal": {name: bool(torch.equal(t, expected[name])) for name, t in engine.received},
        "worst": max(float((t.float() - expected[name].float()).abs().max()) for name, t in engine.received),
        "moved": sum(not torch.equal(t, before[name]) for name, t in engine.received),
        "chunks": engine.chunks,
        "previous_alive": engine.previous_alive,
        "log": [event[0] for event in backend.llm.log],
    }
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
