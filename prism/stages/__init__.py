"""Stage recipes, one file each: `prism train STAGE --config F [key=value ...]`.

STAGES maps a stage name to (config class, recipe). Each recipe reads its config, resumes from its newest
checkpoint, trains, and writes the final model, manifest.json and DONE into its stage directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prism.config import (
    AlignConfig,
    BaseConfig,
    DiscWarmupConfig,
    RLVRConfig,
    SFTConfig,
)


def _base(cfg: BaseConfig) -> Path:
    from prism.stages.sft import run_base

    return run_base(cfg)


def _sft(cfg: SFTConfig) -> Path:
    from prism.stages.sft import run

    return run(cfg)


def _rlvr(cfg: RLVRConfig) -> Path:
    from prism.stages.rlvr import run

    return run(cfg)


def _disc_warmup(cfg: DiscWarmupConfig) -> Path:
    from prism.stages.disc_warmup import run

    return run(cfg)


def _align(cfg: AlignConfig) -> Path:
    from prism.stages.align import run

    return run(cfg)


STAGES: dict[str, tuple[type, Callable[[Any], Path]]] = {
    "base": (BaseConfig, _base),
    "sft": (SFTConfig, _sft),
    "disc_warmup": (DiscWarmupConfig, _disc_warmup),
    "align": (AlignConfig, _align),
    "rlvr": (RLVRConfig, _rlvr),
}
