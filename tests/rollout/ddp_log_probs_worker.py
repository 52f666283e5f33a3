"""Run under torchrun (2 processes, gloo): each process rolls out its own batch, then compares the gradient
of its policy-gradient-like loss taken through DDP (the prompt-once forward runs the inner module, the
response forwards the wrapper, one per response length: every forward is free here) with the average of both
processes' gradients taken without DDP."""

import functools
import json
import sys

import torch
import torch.distributed as dist

import prism.rollout.hf as hf_module
from prism.models import PRESETS, build_model, build_processor, build_tokenizer
from prism.rollout import (
    HFRolloutBackend,
    RolloutPrompt,
    SamplingParams,
    sequence_log_probs,
)
from prism.rollout.hf import shares_prompts


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    corpus = [f"There are {i % 5 + 1} red circles." for i in range(200)]
    size = PRESETS["embedded-s"].image_size
    processor = build_processor(build_tokenizer(corpus), image_size=size)
    model = build_model("embedded-s", processor.tokenizer, seed=0)
    image = torch.Generator().manual_seed(rank)
    pixels = (torch.rand(size, size, 3, generator=image) * 255).to(torch.uint8).numpy()
    from PIL import Image

    prompt = RolloutPrompt(question="How many circles?" + " Count." * rank, images=[Image.fromarray(pixels)])
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[processor.tokenizer.eos_token_id] = 2.0  # responses of several lengths
    hook = model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    batch = HFRolloutBackend(model, processor).generate([prompt], n=4, sampling=SamplingParams(max_new_tokens=6, seed=rank))
    hook.remove()
    free, forwards = functools.partial(hf_module.length_buckets, forward_tokens=0), []

    def counted_buckets(lengths):  # every forward free: each response length its own forward
        buckets = free(lengths)
        forwards.append(len(buckets))
        return buckets

    hf_module.length_buckets = counted_buckets

    def grads(module) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        sequence_log_probs(module, batch).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    local = grads(model)
    for g in local.values():  # what DDP should produce: the mean over processes
        dist.all_reduce(g)
        g /= world
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert shares_prompts(ddp, batch)
    synced = grads(ddp)
    worst = max((synced[n] - local[n]).abs().max().item() for n in local)
    scale = max(g.abs().max().item() for g in local.values())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"worst": worst, "scale": scale, "same_keys": sorted(synced) == sorted(local),
                       "response_forwards": forwards}, f)
    del ddp  # a live DDP reducer at teardown hangs gloo's shutdown
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
