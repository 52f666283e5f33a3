"""The image+text processor for Qwen3-VL models, built and reloaded without torchvision or a hub.

The stock `Qwen3VLProcessor` insists on a video processor, and in transformers 5.24 every video processor
needs torchvision, which these CPU machines cannot have: the only torchvision for torch 2.13 that pip finds
(PyPI's 0.28.0) is a CUDA build whose import fails beside the CPU torch, so `just setup` removes it.
ProcessorMixin reads its sub-processors off the `__init__` signature, so a subclass whose `__init__` takes
only an image processor, a tokenizer and a chat template is a full image+text processor.

A saved folder (`save_processor`, `save_model`) is a plain Qwen3-VL checkpoint folder.
`AutoModelForImageTextToText.from_pretrained(folder)` loads its model anywhere. Its processor files name the
stock `Qwen3VLProcessor`, so `AutoProcessor.from_pretrained(folder)` builds that class where torchvision is
installed (GPU nodes), with a video processor made from the image processor's settings (no video config is
saved). Without torchvision that call raises ImportError: `ProcessorMixin.from_pretrained` loads every
sub-processor the `__init__` names, the video processor too, whatever the inputs will be (transformers issue
#48558). Here `load_processor` is the loader: it rebuilds this class from the saved tokenizer and image
processor files (tests/models/test_processor.py compares its encoding with the stock processor's where
torchvision is installed, and expects the ImportError where it is not).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Qwen3-VL's vision geometry: 16 px patches, 2x2 patches merged into one LLM token, frames paired in time.
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
TOKEN_PIXELS = PATCH_SIZE * MERGE_SIZE  # one image token covers 32 x 32 px
QWEN3_VL_MEAN_STD = [0.5, 0.5, 0.5]  # what the released Qwen3-VL checkpoints use


class ModelError(ValueError):
    """A model, tokenizer or processor cannot be built or loaded as asked (one line, names the path or preset)."""


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_image_processor(image_size: int) -> Qwen2VLImageProcessorPil:
    """An image processor that resizes every square image to `image_size` px: (image_size/32)^2 tokens."""
    if image_size <= 0 or image_size % TOKEN_PIXELS:
        raise ValueError(f"image_size must be a positive multiple of {TOKEN_PIXELS} px, got {image_size}")
    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=pixels,  # min = max pins the token count of a square image, whatever its size
        max_pixels=pixels,
        image_mean=QWEN3_VL_MEAN_STD,
        image_std=QWEN3_VL_MEAN_STD,
    )


def build_processor(tokenizer: PreTrainedTokenizerBase, image_size: int) -> Qwen3VLImageTextProcessor:
    """A processor for the embedded world: the given tokenizer (and its chat template) plus a fixed-size image processor."""
    return Qwen3VLImageTextProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def num_image_tokens(processor: Qwen3VLImageTextProcessor, height: int, width: int) -> int:
    """How many `<|image_pad|>` tokens an image of this size becomes."""
    patches = processor.image_processor.get_number_of_image_patches(height, width)
    return patches // processor.image_processor.merge_size**2


def save_processor(processor: Qwen3VLImageTextProcessor, directory: str | os.PathLike) -> None:
    """Write tokenizer, image processor and chat template files into `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(directory))
    # A plain preprocessor_config.json too, as released checkpoints have: any image-processor loader finds it.
    processor.image_processor.save_pretrained(str(directory))
    # Name the stock class, so AutoProcessor builds a Qwen3VLProcessor where torchvision is installed (GPU
    # nodes); without torchvision that call fails (module docstring). `load_processor` does not read this field.
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = directory / name
        config = json.loads(path.read_text(encoding="utf-8"))
        config["processor_class"] = "Qwen3VLProcessor"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_processor(directory: str | os.PathLike, trust_remote_code: bool = False) -> Qwen3VLImageTextProcessor:
    """Rebuild the processor from a local folder (ours or a released Qwen3-VL checkpoint); never downloads. A
    tokenizer that names code shipped with the checkpoint is refused unless `trust_remote_code` (passed explicitly:
    left unset, transformers would ask on a terminal and a `y` would run the code)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"processor path {directory} does not exist: expected a local checkpoint folder")
    if not (directory / "tokenizer_config.json").is_file():
        raise ModelError(
            f"processor folder {directory} has no tokenizer_config.json: expected a local folder written by "
            "save_processor/save_model or a released Qwen3-VL checkpoint"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ModelError(f"{directory}: its tokenizer asks to run code shipped with the checkpoint, refused "
                         "(model.trust_remote_code=true allows it)") from None
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory), local_files_only=True)
    return Qwen3VLImageTextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template or _read_chat_template(directory),
    )


def _read_chat_template(directory: Path) -> str | None:
    """Released checkpoints may keep the template in chat_template.jinja or chat_template.json only."""
    if (jinja := directory / "chat_template.jinja").is_file():
        return jinja.read_text(encoding="utf-8")
    if (js := directory / "chat_template.json").is_file():
        return json.loads(js.read_text(encoding="utf-8")).get("chat_template")
    return None
