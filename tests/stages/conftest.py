"""Helpers of the stage tests: model tensors, scripted rollouts, discriminators, interrupted runs (the world and
the random policy are fixtures of tests/conftest.py)."""

from contextlib import contextmanager
from pathlib import Path

import pytest

from prism.models import load_processor


def model_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------
# Scripted rollouts: a random policy never writes the tagged format, so the discriminator stages would see
# no valid rollout. These replace the sampled responses by known texts (real token ids, real prompts/images).
# ----------------------------------------------------------------------------------------------------

SHAPES = ("a red circle", "a blue square", "a green triangle")


def scripted_text(prompt: int, rollout: int, invalid_every: int = 4) -> str:
    """Rollout k of prompt p: 1-3 caption bullets and 1-2 steps; every `invalid_every`-th one format-invalid."""
    from prism.response_format import render_response

    if invalid_every and rollout % invalid_every == invalid_every - 1:
        return "<caption>\n- " + SHAPES[0] + "\n<think>no closing tags"
    return render_response(SHAPES[: 1 + (prompt + rollout) % 3], ["Count the shapes."] * (1 + rollout % 2),
                           str(rollout % 3))


@pytest.fixture
def scripted_rollouts(monkeypatch):
    """Patch HFRolloutBackend.generate to return scripted_text responses; returns a dict whose
    `invalid_every` a test may change (0 = all valid, 1 = all invalid)."""
    import dataclasses

    import torch

    from prism.rollout import HFRolloutBackend

    settings = {"invalid_every": 4}
    real = HFRolloutBackend.generate

    def generate(self, prompts, n, sampling):
        batch = real(self, prompts, n, dataclasses.replace(sampling, max_new_tokens=1, min_new_tokens=0))
        tokenizer = self.tokenizer
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        texts = [scripted_text(p, k, settings["invalid_every"]) for p in range(len(prompts)) for k in range(n)]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]
        width = max(len(row) for row in ids)
        batch.response_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        batch.response_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, row_ids in enumerate(ids):
            batch.response_ids[row, : len(row_ids)] = torch.tensor(row_ids)
            batch.response_mask[row, : len(row_ids)] = 1
        batch.texts, batch.finish_reasons = texts, ["stop"] * len(texts)
        return batch

    monkeypatch.setattr(HFRolloutBackend, "generate", generate)
    return settings


def discriminator_dir(policy_dir: Path, out: Path, variant: str = "moe") -> Path:
    """A fresh (not warmed-up) discriminator upcycled from the random test policy, saved as a folder."""
    from prism.models import load_model
    from prism.models.discriminator import (
        DiscriminatorSpec,
        build_discriminator,
        save_discriminator,
    )

    processor = load_processor(policy_dir)
    disc = build_discriminator(load_model(policy_dir), DiscriminatorSpec(variant), num_experts=4, top_k=2,
                               expert_noise_std=0.002, router_init_std=0.02, aux_loss_coef=0.01, seed=0)
    return save_discriminator(disc, processor, out)


@pytest.fixture(scope="session")
def degraded_pairs(world, tmp_path_factory):
    """Teacher vs a weaker student (first caption bullet and first step only) on the exported prompts."""
    from prism.data.formats import WarmupPair, read_rl_parquet, write_warmup_pairs
    from prism.response_format import split_segments

    out = tmp_path_factory.mktemp("pairs")
    pairs = []
    for name in ("teacher.parquet", "rl.parquet"):
        for record in read_rl_parquet(world / name):
            teacher = split_segments(record.teacher_caption + "\n" + record.teacher_cot)
            if len(teacher.caption.splitlines()) < 2 or len(teacher.think.splitlines()) < 2:
                continue  # nothing to drop: the student would equal the teacher
            image = out / f"{record.id}.png"
            image.write_bytes(record.images[0])
            student = split_segments(teacher.text.replace(teacher.caption, teacher.caption.splitlines()[0])
                                     .replace(teacher.think, teacher.think.splitlines()[0]))
            user = next(m["content"] for m in record.prompt if m["role"] == "user")
            pairs.append(WarmupPair(user, image, teacher.perception, student.perception, teacher.reasoning,
                                    student.reasoning))
    write_warmup_pairs(out / "pairs.jsonl", pairs)
    return out / "pairs.jsonl"


class Interrupt(Exception):
    """A run stopped right after writing a checkpoint (see `interrupted_after`)."""


@contextmanager
def interrupted_after(monkeypatch, recipe_module, step: int):
    """Inside the block, the recipe's `save_progress` raises Interrupt right after writing checkpoint `step`;
    the block must end with that Interrupt. The real `save_progress` is back afterwards."""
    real_save = recipe_module.save_progress

    def save_then_die(run_dir, done, *args, **kwargs):
        real_save(run_dir, done, *args, **kwargs)
        if done == step:
            raise Interrupt

    monkeypatch.setattr(recipe_module, "save_progress", save_then_die)
    try:
        with pytest.raises(Interrupt):
            yield
    finally:
        monkeypatch.setattr(recipe_module, "save_progress", real_save)
