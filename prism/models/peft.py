"""What a policy stage (base, sft, rlvr) trains: every weight, the language model with the vision tower fixed
(`model.freeze_vision`), or LoRA adapters on the language model's projections (`model.lora_r`, through peft).

  adapters = setup_trainable(model, cfg.model, local.model.path)   # right after the model loads
  ...train `model` as usual...
  finish_stage(..., save=final_model_saver(adapters))

LoRA is injected in place: the recipe goes on training the transformers model it loaded (same class, same
submodules, its forward now running through the adapters), and checkpoints hold that model's whole state dict
(base weights under `.base_layer.`, adapters under `.lora_A.default.` / `.lora_B.default.`), so a LoRA run resumes
as any other. The PeftModel wrapping it is kept for the end: model/ holds the merged model, a plain checkpoint that
the next stage and evaluation load unchanged, and model/adapter/ the adapter alone (peft's save_pretrained), whose
adapter_config.json names the checkpoint the stage started from as base_model_name_or_path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from prism.atomic_io import atomic_directory
from prism.config import ConfigError, ModelConfig
from prism.hub import parse_hub_ref
from prism.models.processor import save_processor

LANGUAGE_MODEL = "model.language_model"  # Qwen3-VL's text decoder inside Qwen3VLForConditionalGeneration
VISION_TOWER = "model.visual"  # patch embedding, position embedding, blocks, merger and deepstack mergers
ADAPTER_DIR = "adapter"  # model/adapter/: adapter_config.json + adapter_model.safetensors


def freeze_vision_tower(model: torch.nn.Module) -> None:
    """requires_grad False on every vision parameter: no gradient, and build_optimizer leaves them out."""
    model.get_submodule(VISION_TOWER).requires_grad_(False)


def lora_target_pattern(model: torch.nn.Module, names: Sequence[str]) -> str:
    """peft's `target_modules` as a regex: the language model's linear layers called `names` (a last name such as
    q_proj, or a dotted tail such as self_attn.q_proj), so the vision tower never gets adapters. A name that
    matches no linear layer there is a ConfigError naming the field."""
    linear = [name for name, module in model.get_submodule(LANGUAGE_MODEL).named_modules()
              if isinstance(module, torch.nn.Linear)]
    for index, target in enumerate(names):
        if not any(name == target or name.endswith(f".{target}") for name in linear):
            known = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(f"field 'model.lora_target_modules[{index}]': {target!r} matches no linear layer of "
                              f"the language model ({LANGUAGE_MODEL}); its layers are named {', '.join(known)}")
    return rf"{re.escape(LANGUAGE_MODEL)}\.(?:.*\.)?(?:{'|'.join(re.escape(name) for name in names)})"


def adapter_base(given: str, local: str) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) for adapter_config.json: a Hub model id as the user gave it (its
    @revision apart), which peft fetches from the Hub; a local folder (or a file inside a Hub repository) as the
    absolute path of the folder the stage loaded."""
    ref = parse_hub_ref(given)
    if ref is not None and ref.path is None:
        return ref.repo_id, ref.revision
    return str(Path(local).resolve()), None


def setup_trainable(model: torch.nn.Module, cfg: ModelConfig, local_path: str | None) -> PeftModel | None:
    """Apply `cfg.freeze_vision` and `cfg.lora_*` to `model` in place, right after it loads (before its optimizer
    and any checkpoint restore). Returns the PeftModel wrapping `model` when LoRA is on (for final_model_saver),
    else None. `cfg.path` is the checkpoint as the user named it, `local_path` where it was loaded from."""
    if cfg.freeze_vision:
        freeze_vision_tower(model)
    if cfg.lora_r == 0:
        return None
    base, revision = adapter_base(cfg.path, local_path)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_pattern(model, cfg.lora_target_modules),
        bias="none",
    )
    # Freezes every base weight (requires_grad False) and adds the adapters: B = 0, so the model computes as before.
    adapters = get_peft_model(model, lora, revision=revision)
    lora.base_model_name_or_path = base  # get_peft_model sets the folder transformers loaded, or none when built
    return adapters


def save_final_model(adapters: PeftModel, processor, directory: str | Path) -> Path:
    """The final folder of a LoRA stage, written atomically: the adapter into `<directory>/adapter/`, then the
    merged model (base + scaled B @ A in every adapted layer) with the processor into `<directory>/`. The merge
    unloads the adapters from the live model: call it once training is over."""
    with atomic_directory(directory) as tmp:
        adapters.save_pretrained(str(tmp / ADAPTER_DIR))
        # peft's template card is placeholders with a local path as base_model; the folder's card covers both
        (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
        merged = adapters.merge_and_unload()
        merged.save_pretrained(str(tmp))
        save_processor(processor, tmp)
    return Path(directory)


def final_model_saver(adapters: PeftModel | None) -> Callable[..., Path] | None:
    """finish_stage's `save` for a LoRA stage (None otherwise: the default plain save). The LoRA model is whole on
    every process (LoRA runs are not FSDP-sharded), so the merge reads the live weights, not the state dict."""
    if adapters is None:
        return None

    def save(model, processor, directory, state_dict=None) -> Path:
        return save_final_model(adapters, processor, directory)

    return save
