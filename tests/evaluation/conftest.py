"""Shared fixtures: a tiny world export, an untrained embedded-s checkpoint of it, evaluation roots.

lmms-eval is imported lazily by the tests that need it; without it installed they are skipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `evaluation` is a top-level folder of the repository
    sys.path.insert(0, str(ROOT))

TINY_WORLD = dict(base_size=8, sft_size=8, teacher_size=4, rl_size=4, bench_size=10)


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """Keep datasets' caches in the session's temp folder (lmms-eval resolves its cache once per process)."""
    cache = tmp_path_factory.mktemp("hf")
    saved = {k: os.environ.get(k) for k in ("LMMS_EVAL_DATASETS_CACHE", "HF_HOME", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ["LMMS_EVAL_DATASETS_CACHE"] = str(cache / "datasets")
    os.environ.setdefault("HF_HOME", str(cache / "home"))
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in these tests may download
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def lmms_eval():
    return pytest.importorskip("lmms_eval")


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from prism.data.export import export_world
    from prism.data.world import WorldConfig

    out = tmp_path_factory.mktemp("world")
    export_world(WorldConfig(**TINY_WORLD), out)
    return out


@pytest.fixture(scope="session")
def checkpoint(world, tmp_path_factory) -> Path:
    """An untrained embedded-s policy with the world's tokenizer, saved as a checkpoint folder."""
    from transformers import PreTrainedTokenizerFast

    from prism.models import build_model, build_processor, save_model

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(world / "tokenizer"))
    model = build_model("embedded-s", tokenizer, seed=0)
    processor = build_processor(tokenizer, image_size=96)
    return save_model(model, processor, tmp_path_factory.mktemp("ckpt") / "policy")
