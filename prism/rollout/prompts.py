"""Where rollouts start: RL prompt records, the endless seeded stream of prompts a run draws from, and the
sampling seed of each generation call. All pure functions of (seed, position), so a resumed run draws exactly
the prompts and samples exactly the responses an uninterrupted one would."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from prism.data.encoding import chat_messages
from prism.data.formats import DataError, RLRecord, read_rl_parquet
from prism.data.order import epoch_order
from prism.rollout.base import RolloutPrompt


def load_prompts(data_files: Sequence[str]) -> list[RLRecord]:
    """Every record of the RL parquet files, in file order."""
    if not data_files:
        raise DataError("data_files is empty: name at least one RL parquet file")
    records: list[RLRecord] = []
    for name in data_files:
        records.extend(read_rl_parquet(Path(name)))
    return records


def rollout_prompt(record: RLRecord) -> RolloutPrompt:
    """An RL record as a rollout prompt: its chat messages and decoded images."""
    images = []
    for data in record.images:
        with Image.open(io.BytesIO(data)) as image:
            images.append(image.convert("RGB"))
    return RolloutPrompt(messages=chat_messages(record.prompt), images=images)


def take_prompts(cursor: int, count: int, num_records: int, seed: int) -> list[int]:
    """Record indices cursor .. cursor+count-1 of the endless stream of seeded epoch permutations."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(cursor, num_records)
        chunk = epoch_order(num_records, seed, epoch)[offset : offset + count - len(out)].tolist()
        out.extend(chunk)
        cursor += len(chunk)
    return out


def sampling_seed(seed: int, step: int, round_index: int, rank: int) -> int:
    """The seed of one generation call: step `step`, generation round `round_index`, process `rank`."""
    return (seed * 1_000_003 + step * 1_009 + round_index * 31 + rank) % (2**31 - 1)
