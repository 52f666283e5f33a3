"""Models: the offline tokenizer and processor, presets, and building/loading/saving Qwen3-VL policies."""

from prism.models.presets import (
    PRESETS,
    ModelPreset,
    build_config,
    build_model,
    check_checkpoint_folder,
    count_parameters,
    get_preset,
    load_model,
    resolve_model,
    save_model,
)
from prism.models.processor import (
    ModelError,
    Qwen3VLImageTextProcessor,
    build_image_processor,
    build_processor,
    load_processor,
    num_image_tokens,
    save_processor,
)
from prism.models.tokenizer import SPECIAL_TOKEN_IDS, SPECIAL_TOKENS, assistant_token_mask, build_tokenizer

__all__ = [
    "PRESETS",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKEN_IDS",
    "ModelError",
    "ModelPreset",
    "Qwen3VLImageTextProcessor",
    "assistant_token_mask",
    "build_config",
    "build_image_processor",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "check_checkpoint_folder",
    "count_parameters",
    "get_preset",
    "load_model",
    "load_processor",
    "num_image_tokens",
    "resolve_model",
    "save_model",
    "save_processor",
]
