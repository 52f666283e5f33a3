"""Small inputs shared by the model tests: a synthetic corpus, noise images, a chat prompt, a discriminator folder in
the PRISM authors' layout."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file


def shape_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circles", "squares", "triangles"]
    return [
        f"There are {rng.randint(1, 5)} {rng.choice(colours)} {rng.choice(shapes)} in the image."
        for _ in range(n)
    ]


def noise_image(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def authors_discriminator_folder(ours: Path, out: Path, shards: int = 1) -> Path:
    """Our saved discriminator folder rewritten as the PRISM authors' code saves one (github.com/XIAO4579/PRISM),
    the way `prism-vlm/Qwen3-VL-2B-4X-Moe-warmup-120k` was made; the weights are ours rounded to bfloat16:
    - Qwen3VLMoeValueHead.save_pretrained (moe/value_head.py:430-471): the backbone's state dict with the value head
      nn.Sequential(Dropout, Linear(hidden, 1, bias=False)) merged in as `v_head.1.weight`, saved by the backbone's
      save_pretrained, then `value_head.pt` = torch.save({"v_head.summary.weight": [1, hidden]}), bf16 as trained;
    - transformers 4.57, which the authors vendor (transformers-4.57.0/): fused experts `gate_up_proj` [E, H, 2I] and
      `down_proj` [E, I, H] (models/qwen3_vl_moe/modeling_qwen3_vl_moe.py:74-75; ours are [E, 2I, H], [E, H, I]);
      config.json with `num_experts`, `rope_theta` and `rope_scaling` in text_config, no rope settings in
      vision_config (configuration_qwen3_vl_moe.py:160-186 and 228-243), `dtype` (configuration_utils.py:1058);
    - `shards` > 1: save_pretrained's sharded files and model.safetensors.index.json, whose weight_map names the shard
      holding `v_head.1.weight` (the authors' loader finds it so: value_head.py:545-595)."""
    out.mkdir(parents=True)
    for file in ours.iterdir():  # tokenizer and processor files, as the authors' processor.save_pretrained writes
        if file.is_file() and file.suffix != ".safetensors" and file.name not in (
                "config.json", "discriminator.json", "README.md", "model.safetensors.index.json"):
            shutil.copy(file, out / file.name)
    state = {}
    for file in sorted(ours.glob("model*.safetensors")):
        state.update(load_file(file))
    for name in state:
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            state[name] = state[name].transpose(1, 2)
        state[name] = state[name].to(torch.bfloat16).contiguous()
    head = load_file(ours / "value_head.safetensors")["weight"].to(torch.bfloat16)
    state["v_head.1.weight"] = head.clone()
    names = list(state)
    size = -(-len(names) // shards)
    groups = [names[i : i + size] for i in range(0, len(names), size)]
    if len(groups) == 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, group in enumerate(groups, start=1):
            file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file({name: state[name] for name in group}, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    torch.save({"v_head.summary.weight": head.clone()}, out / "value_head.pt")
    config = json.loads((ours / "config.json").read_text())
    text = dict(config["text_config"])
    rope = dict(text.pop("rope_parameters"))
    text.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, num_experts=text.pop("num_local_experts"),
                norm_topk_prob=True)
    vision = {key: value for key, value in config["vision_config"].items() if key != "rope_parameters"}
    config.update(text_config=text, vision_config=vision, dtype="bfloat16", transformers_version="4.57.0")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def checkpoint_layout(state: dict) -> dict:
    """A model's state dict under a checkpoint folder's names and shapes: the patch embedding runs as a Linear
    (prism.models.presets.FUSION), the folder holds it as the Conv3d it equals."""
    from prism.models.processor import PATCH_SIZE, TEMPORAL_PATCH_SIZE

    out = {}
    for name, tensor in state.items():
        if ".patch_embed.linear_proj." in name:
            name = name.replace(".linear_proj.", ".proj.")
            if name.endswith(".weight"):
                tensor = tensor.view(tensor.shape[0], -1, TEMPORAL_PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)
        out[name] = tensor
    return out
