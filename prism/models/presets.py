"""Model presets and the one place policies are built, loaded and saved.

Two kinds of preset, one code path:
- `embedded`: a tiny Qwen3-VL built in code from its sizes (random init, seeded), for the CPU world;
- `local`: a released Qwen3-VL checkpoint loaded from a folder. A Hub id in a config is made a folder (its cached
  snapshot) by prism.hub when the stage starts; loading here never contacts the hub.
Any preset given a path loads that folder instead (a finished stage's checkpoint, say). Checkpoints are plain
Hugging Face folders: config.json + safetensors + tokenizer + processor files.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.fusion_mapping import get_fusion_patch_mapping

import prism.models.attention  # noqa: F401  (registers the CPU grouped-query SDPA path under "sdpa")
from prism.atomic_io import atomic_directory
from prism.models.gemm_grid import use_grid_linears
from prism.models.processor import (
    MERGE_SIZE,
    PATCH_SIZE,
    TEMPORAL_PATCH_SIZE,
    ModelError,
    Qwen3VLImageTextProcessor,
    save_processor,
)
from prism.models.tokenizer import (
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
)

DENSE = "Qwen3VLForConditionalGeneration"
MOE = "Qwen3VLMoeForConditionalGeneration"
ROPE_THETA = 5_000_000.0  # as in the released Qwen3-VL text configs


@dataclass(frozen=True)
class ModelPreset:
    """A named model: sizes for `embedded` presets, a description and expected class for `local` ones."""

    name: str
    kind: Literal["embedded", "local"]
    # text decoder (embedded only)
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    intermediate_size: int = 0
    head_dim: int = 0
    # vision tower (embedded only)
    vision_depth: int = 0
    vision_hidden_size: int = 0
    vision_heads: int = 0
    vision_intermediate_size: int = 0
    vision_position_embeddings: int = 256  # a 16 x 16 learned grid, interpolated to each image's patch grid
    deepstack_indexes: tuple[int, ...] = (0,)  # vision layers whose features feed the first decoder layers
    image_size: int = 0  # px per side; image_size / 32 tokens per side
    # local only
    description: str = ""
    architecture: str = DENSE


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        # Learns the embedded world on 2 CPU cores in minutes (docs/ENVIRONMENT.md, "Learnability").
        ModelPreset(
            name="embedded-s", kind="embedded",
            hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384, head_dim=32,
            vision_depth=1, vision_hidden_size=64, vision_heads=2, vision_intermediate_size=256,
            image_size=96,
        ),
        # Wider and deeper than S at a lower lr (see bench/calibrate_world.py). A 256 x 4 text model at
        # lr 2e-3 never learned colour or shape here (docs/ENVIRONMENT.md): size and lr move together.
        ModelPreset(
            name="embedded-m", kind="embedded",
            hidden_size=192, num_layers=3, num_heads=6, num_kv_heads=2, intermediate_size=576, head_dim=32,
            vision_depth=1, vision_hidden_size=96, vision_heads=2, vision_intermediate_size=384,
            image_size=96,
        ),
        # A step further from S than M (4/3 of M's width, M's depth), at lr 1e-3: table1's larger size in the
        # default (README, "A larger M"). On the size-axis probe's validation world it ended SFT at 73.9 on both
        # seeds, S at 60.4 / 68.9 and M at 74.4 / 66.6 (experiments/configs/size_axis.yaml).
        ModelPreset(
            name="embedded-l", kind="embedded",
            hidden_size=256, num_layers=3, num_heads=8, num_kv_heads=2, intermediate_size=768, head_dim=32,
            vision_depth=1, vision_hidden_size=128, vision_heads=2, vision_intermediate_size=512,
            image_size=96,
        ),
        ModelPreset(name="qwen3-vl-4b", kind="local", description="Qwen3-VL-4B-Instruct policy"),
        ModelPreset(name="qwen3-vl-8b", kind="local", description="Qwen3-VL-8B-Instruct policy"),
        ModelPreset(
            name="qwen3-vl-2b", kind="local",
            description="Qwen3-VL-2B-Instruct, the dense backbone the MoE discriminator is upcycled from",
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ModelError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (time, height, width) as Qwen3-VL does (128 -> [24, 20, 20])."""
    half = head_dim // 2
    spatial = half * 5 // 16
    return [half - 2 * spatial, spatial, spatial]


def build_config(preset: ModelPreset, vocab_size: int) -> Qwen3VLConfig:
    """The Qwen3VLConfig of an embedded preset; token ids are the fixed ones of prism.models.tokenizer."""
    if preset.kind != "embedded":
        raise ModelError(f"model preset {preset.name!r} is a local checkpoint: it has no config to build, give its path")
    bad_deepstack = [i for i in preset.deepstack_indexes if not 0 <= i < preset.vision_depth]
    if bad_deepstack:
        raise ModelError(f"preset {preset.name!r}: deepstack indexes {bad_deepstack} lie outside the vision tower")
    text = dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_THETA,
            "mrope_section": mrope_section(preset.head_dim),
            "mrope_interleaved": True,
        },
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    vision = dict(
        depth=preset.vision_depth,
        hidden_size=preset.vision_hidden_size,
        num_heads=preset.vision_heads,
        intermediate_size=preset.vision_intermediate_size,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=preset.hidden_size,  # the merger projects straight into the decoder's width
        num_position_embeddings=preset.vision_position_embeddings,
        deepstack_visual_indexes=list(preset.deepstack_indexes),
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=True,  # the embedding matrix is a large share of a tiny model
    )


# transformers' module fusions (transformers/fusion_mapping.py), applied to every model prism builds or loads:
# the vision tower's patch embedding, a Conv3d whose kernel equals its stride, runs as the Linear it equals
# (`linear_proj`), and checkpoints keep the Conv3d layout (`proj`), converted on load and save. On these CPUs the
# Conv3d's forward and backward took 15-17 ms for an SFT batch of embedded-s's images, the Linear 2 ms.
FUSION = {"patch_embeddings": True}


def construct_model(model_class: type[PreTrainedModel], config) -> PreTrainedModel:
    """`model_class(config)`, randomly initialised, with the module fusions `load_model` applies (`FUSION`).

    The fused classes replace the originals in the model's own module only, where its layers look them up:
    transformers' `apply_patches` scans every imported transformers module (0.31 s a call here, 30x the build)."""
    config.fusion_config = dict(FUSION)
    module = sys.modules[model_class.__module__]
    with contextlib.ExitStack() as patches:
        for name, fused_class in get_fusion_patch_mapping(model_class, config, FUSION).items():
            patches.enter_context(mock.patch.object(module, name, fused_class))
        return use_grid_linears(model_class(config))


def build_model(preset_name: str, tokenizer: PreTrainedTokenizerBase, seed: int) -> Qwen3VLForConditionalGeneration:
    """A randomly initialised embedded model; the same (preset, tokenizer, seed) gives the same weights."""
    config = build_config(get_preset(preset_name), vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG stream
        torch.manual_seed(seed)
        model = construct_model(Qwen3VLForConditionalGeneration, config)
    # Stop at <|im_end|> (or <|endoftext|>) and pad with <|endoftext|>, as the released generation configs do.
    model.generation_config.eos_token_id = [EOS_TOKEN_ID, PAD_TOKEN_ID]
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    return model.eval()


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ModelError(f"unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16' or 'auto'")
    return getattr(torch, dtype)


def check_checkpoint_folder(path: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """Everything about a checkpoint folder that can be told without loading it, as one-line ModelErrors: it
    exists with config.json and *.safetensors, holds a vision-language model of a class transformers knows (one
    whose code ships with the checkpoint is refused unless `trust_remote_code`, without a prompt), and every
    weights file is whole. `load_model` starts with it; `prism eval` calls it before it writes or loads anything."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model path {path} does not exist: expected a local Hugging Face checkpoint folder")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelError(f"model path {path} is not a checkpoint folder: expected config.json and *.safetensors")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path / 'config.json'}: not a readable JSON config ({error})") from None
    if not isinstance(config, dict) or "vision_config" not in config:
        architectures = config.get("architectures") if isinstance(config, dict) else None
        raise ModelError(f"{path}: holds no vision-language model (config.json has no vision_config; architectures "
                         f"{architectures}): expected a Qwen3-VL checkpoint")
    try:
        AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as error:
        if "trust_remote_code" in str(error):
            raise ModelError(f"{path}: the checkpoint asks to run code shipped with it, refused "
                             "(model.trust_remote_code=true allows it)") from None
        raise ModelError(f"{path / 'config.json'}: {str(error).splitlines()[0]}: expected a Qwen3-VL checkpoint") from None
    for file in sorted(path.glob("*.safetensors")):
        _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    """A safetensors file whole: its header parses and the file holds every byte the header promises. A Git LFS
    pointer (a few lines of text) or a copy cut short is named here instead of failing deep inside the loader."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if head.startswith(b"version "):
            raise ModelError(f"{file}: a Git LFS pointer, not the weights (fetch them with `git lfs pull`)")
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        try:
            header = json.loads(handle.read(length)) if 0 < length <= size - 8 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: not a readable safetensors file (its header does not parse)")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ModelError(f"{file}: truncated ({size} bytes of {8 + length + end}); copy or save it again")


def load_model(
    path: str | os.PathLike, *, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a Qwen3-VL (dense or MoE) checkpoint from a local folder: safetensors only, no downloads."""
    path = Path(path)
    check_checkpoint_folder(path, trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path),
            dtype=_torch_dtype(dtype),
            local_files_only=True,
            use_safetensors=True,  # never unpickle a .bin
            trust_remote_code=trust_remote_code,
            # transformers >= 5.2x kernelizes by default: on CUDA, `.eval()` then fetches `kernels-community/*` code
            # from the Hub (remote code; offline it raised inside the RLVR recipe on an H200). Torch's layers only.
            use_kernels=False,
            fusion_config=dict(FUSION),
        )
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelError(f"{path}: the checkpoint asks to run code shipped with it, refused "
                             "(model.trust_remote_code=true allows it)") from None
        if "Unrecognized configuration class" in str(error):
            raise ModelError(f"{path}: {str(error).splitlines()[0]}: expected a Qwen3-VL checkpoint") from None
        raise
    return use_grid_linears(model).eval()


def save_model(model: PreTrainedModel, processor: Qwen3VLImageTextProcessor, directory: str | os.PathLike,
               state_dict: dict | None = None) -> Path:
    """Write a plain HF checkpoint folder (config, safetensors, tokenizer, processor) atomically.

    Everything goes to `<dir>.tmp-<id>` first and is renamed into place, so a reader never sees half a
    checkpoint; an existing folder is swapped out and then deleted. `state_dict` (e.g. gathered from FSDP
    shards) replaces the model's own.
    """
    with atomic_directory(directory) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        save_processor(processor, tmp)
    return Path(directory)


def _preset_and_path(model_cfg: Any) -> tuple[str, str | None]:
    """Accept a preset name, a mapping, or a config object with `preset` (or `name`) and `path`."""
    if isinstance(model_cfg, str):
        return model_cfg, None
    get = model_cfg.get if isinstance(model_cfg, Mapping) else lambda key: getattr(model_cfg, key, None)
    name, path = get("preset") or get("name"), get("path")
    if not isinstance(name, str):
        raise ModelError(f"model config {model_cfg!r} names no preset")
    return name, (str(path) if path else None)


def resolve_model(
    model_cfg: Any,
    path: str | os.PathLike | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
) -> PreTrainedModel:
    """The policy a config asks for: a path loads it; an embedded preset without one is built; else ModelError."""
    name, cfg_path = _preset_and_path(model_cfg)
    preset = get_preset(name)
    path = path if path is not None else cfg_path
    if path is not None:
        model = load_model(path, dtype=dtype)
        if type(model).__name__ != preset.architecture:
            raise ModelError(
                f"model path {path} holds a {type(model).__name__}, but preset {name!r} expects {preset.architecture}"
            )
        return model
    if preset.kind == "local":
        raise ModelError(
            f"model preset {name!r} ({preset.description}) loads only from a local checkpoint: set its path"
        )
    if tokenizer is None:
        raise ModelError(f"model preset {name!r} is built from scratch and needs the tokenizer to size its vocabulary")
    model = build_model(name, tokenizer, seed)
    return model.to(_torch_dtype(dtype)) if dtype != "auto" else model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embedding and LM head counted once)."""
    return sum(p.numel() for p in model.parameters())
