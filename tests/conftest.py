"""A tiny exported world and a random tiny policy, shared by the tests of every package (built once per
session); tests/evaluation has its own world."""

from pathlib import Path

import pytest
import torch

from prism.config import load_config
from prism.data.export import export_world
from prism.data.world import WorldConfig
from prism.models import build_model, load_processor, save_model

WORLD_OVERRIDES = ["base_size=48", "sft_size=48", "teacher_size=12", "rl_size=24", "bench_size=4"]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    export_world(load_config(WorldConfig, overrides=WORLD_OVERRIDES), out)
    return out


@pytest.fixture(scope="session")
def policy_dir(world, tmp_path_factory) -> Path:
    """A randomly initialised embedded-s policy saved as a checkpoint folder (with the world's processor)."""
    processor = load_processor(world / "tokenizer")
    out = tmp_path_factory.mktemp("policy") / "model"
    save_model(build_model("embedded-s", processor.tokenizer, seed=0), processor, out)
    return out


@pytest.fixture(autouse=True)
def ieee_denormals():
    """A bf16 stage on CPU flushes denormals for its process (prism.stages.common.make_accelerator); each test
    starts with IEEE arithmetic whatever ran before it."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)
