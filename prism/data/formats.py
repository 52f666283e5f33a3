"""Readers and writers for the published data formats, shared by the embedded world and real data.

- SFT demonstrations: LLaMA-Factory's sharegpt multimodal JSON (a list of
  `{"messages": [{"role", "content"}], "images": [path]}`, `<image>` marking each image in the text;
  the older `{"conversations": [{"from", "value"}]}` spelling is read too), with a `dataset_info.json`.
- RL prompts: verl-style parquet (`data_source`, `prompt` messages, `images` [{bytes, path}],
  `ability`, `reward_model` {style, ground_truth, choices}, `extra_info` {id, index, split, choices: the options
  again, for verl's reward functions (prism.verl_reward)}, plus PRISM's
  `teacher_caption` and `teacher_cot`: the teacher's perception and reasoning segments, tags included).
- Discriminator warm-up pairs: JSONL of `prompt`, `image`, `teacher_caption`, `student_caption`,
  `teacher_cot`, `student_cot`; the PRISM authors' spelling is read too (`question` for `prompt`, a pair without
  an image).

Readers validate every record and raise `DataError` naming the file, the record and the field.
Writers write to a temporary name and rename, so a killed export never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from prism.atomic_io import atomic_path, atomic_write_text

IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A malformed data file or record; the message names the file, the record and the field."""


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not a data file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None


def _check_image(path: Path | str, record: str, field: str, image: Path | bytes, verify: bool) -> None:
    """Open an image file (or encoded bytes): a text file or a Git LFS pointer is named here rather than crashing
    the first training step. `verify` also reads the whole image (a truncated PNG): `prism data check` does, a
    stage start reads headers only (about 0.5 ms an image to verify: 10 minutes on a million-image corpus)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Path) and not image.is_file():
        raise _fail(path, record, field, "an existing image file", str(image))
    try:
        with Image.open(image if isinstance(image, Path) else io.BytesIO(image)) as opened:
            if verify:
                opened.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        shown = str(image) if isinstance(image, Path) else f"{len(image)} bytes"
        head = image[:64] if isinstance(image, bytes) else b""
        if isinstance(image, Path):
            with contextlib.suppress(OSError), open(image, "rb") as handle:
                head = handle.read(64)
        if head.startswith(b"version https://git-lfs"):
            raise _fail(path, record, field, "a readable image, not a Git LFS pointer (fetch it with `git lfs pull`)",
                        shown) from None
        # PIL names the file it could not identify, or an object's address for bytes: the field names it already
        reason = "not an image format PIL knows" if isinstance(error, UnidentifiedImageError) else str(error)
        raise _fail(path, record, field, f"a readable image ({type(error).__name__}: {reason})", shown) from None


def _fail(path: Path | str, record: str, field: str, expected: str, got: Any) -> DataError:
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    if isinstance(got, str) and len(got) > 60:
        shown = repr(got[:57] + "...")
    return DataError(f"{path}: {record}: field '{field}': expected {expected}, got {shown}")


# ---------------------------------------------------------------------------------------------
# SFT: LLaMA-Factory sharegpt multimodal JSON
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]  # role in ROLES, content with `<image>` placeholders
    images: list[Path]  # resolved against the JSON file's folder


def write_sharegpt(path: Path, records: Iterable[tuple[list[dict[str, str]], list[str]]]) -> int:
    """Write (messages, image paths relative to the file's folder) records; returns the count."""
    rows = [{"messages": messages, "images": images} for messages, images in records]
    atomic_write_text(Path(path), json.dumps(rows, ensure_ascii=False, indent=1))
    return len(rows)


def sharegpt_dataset_info(names: Sequence[str]) -> dict:
    """LLaMA-Factory's dataset_info.json entries for files written by `write_sharegpt`."""
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
            "assistant_tag": "assistant", "system_tag": "system"}
    return {
        name: {"file_name": f"{name}.json", "formatting": "sharegpt",
               "columns": {"messages": "messages", "images": "images"}, "tags": tags}
        for name in names
    }


def read_sharegpt(path: Path | str, check_images: bool = True, verify_images: bool = False) -> list[Conversation]:
    path = Path(path)
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: empty file (expected a JSON list of sharegpt records)")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
    if not isinstance(rows, list) or not rows:
        raise _fail(path, "top level", "(root)", "a non-empty JSON list of records", rows)
    conversations = []
    for index, row in enumerate(rows):
        record = f"record [{index}]"
        if not isinstance(row, dict):
            raise _fail(path, record, "(record)", "an object", row)
        key = "messages" if "messages" in row else "conversations"
        unknown = set(row) - {key, "images", "system"}
        if unknown:
            raise _fail(path, record, sorted(unknown)[0], "only 'messages' (or 'conversations'), 'images' and 'system'",
                        sorted(unknown)[0])
        turns = row.get(key)
        if not isinstance(turns, list) or not turns:
            raise _fail(path, record, "messages", "a non-empty list of messages", turns)
        messages = []
        if "system" in row:  # LLaMA-Factory's system column: the system prompt beside the turns
            if not isinstance(row["system"], str):
                raise _fail(path, record, "system", "a string (the system prompt)", row["system"])
            messages.append({"role": "system", "content": row["system"]})
        for t, turn in enumerate(turns):
            where = f"{key}[{t}]"
            if not isinstance(turn, dict):
                raise _fail(path, record, where, "an object with role and content", turn)
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if role not in _SHAREGPT_ROLE:
                raise _fail(path, record, f"{where}.role", f"one of {list(ROLES)}", role)
            if not isinstance(content, str):
                raise _fail(path, record, f"{where}.content", "a string", content)
            messages.append({"role": _SHAREGPT_ROLE[role], "content": content})
        if sum(m["role"] == "system" for m in messages) > 1 or any(m["role"] == "system" for m in messages[1:]):
            raise _fail(path, record, "system", "one system prompt, before the turns (the column or a first turn)",
                        "a second or a later one")
        if messages[-1]["role"] != "assistant":
            raise _fail(path, record, f"{key}[{len(turns) - 1}].role", "'assistant' (the last turn is the demonstration)", messages[-1]["role"])
        images = row.get("images", [])
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise _fail(path, record, "images", "a list of image paths", images)
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if placeholders != len(images):
            raise _fail(path, record, "images", f"{placeholders} image(s), one per '<image>' in the messages", len(images))
        resolved = [(path.parent / image) for image in images]
        if check_images:
            for i, image in enumerate(resolved):
                _check_image(path, record, f"images[{i}]", image, verify_images)
        conversations.append(Conversation(messages, resolved))
    return conversations


# ---------------------------------------------------------------------------------------------
# RL prompts: verl-style parquet
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLRecord:
    id: str
    data_source: str  # the task family or benchmark name
    prompt: list[dict[str, str]]  # chat messages up to (not including) the response
    images: list[bytes]  # encoded image files (PNG/JPEG)
    ground_truth: str
    choices: dict[str, str] | None  # multiple-choice options, letter -> text
    teacher_caption: str | None  # "<caption>...</caption>", when teacher demonstrations exist
    teacher_cot: str | None  # "<think>...</think>\n<answer>...</answer>"


def write_rl_parquet(path: Path, records: Iterable[RLRecord], split: str) -> int:
    rows = []
    for index, record in enumerate(records):
        rows.append({
            "data_source": record.data_source,
            "prompt": record.prompt,
            "images": [{"bytes": image, "path": None} for image in record.images],
            "ability": "visual_reasoning",
            "reward_model": {
                "style": "rule",
                "ground_truth": record.ground_truth,
                # JSON keeps the schema fixed whether or not a record has options.
                "choices": json.dumps(record.choices) if record.choices else None,
            },
            # verl hands a reward function data_source, ground_truth and extra_info only: the options go there too.
            "extra_info": {"id": record.id, "index": index, "split": split,
                           "choices": json.dumps(record.choices) if record.choices else None},
            "teacher_caption": record.teacher_caption,
            "teacher_cot": record.teacher_cot,
        })
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string()), ("choices", pa.string())])),
        ("extra_info", pa.struct([("id", pa.string()), ("index", pa.int64()), ("split", pa.string()),
                                  ("choices", pa.string())])),
        ("teacher_caption", pa.string()),
        ("teacher_cot", pa.string()),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write_parquet(table, Path(path))
    return len(rows)


def atomic_write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def parse_choices(raw: Any) -> dict[str, str] | None:
    """A multiple-choice row's options (a JSON string or a mapping of letter -> option text); None for none.
    ValueError when it is neither."""
    if raw is None or raw == "":
        return None
    try:
        choices = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        raise ValueError(f"expected a JSON object of letter -> option text, got {raw!r}") from None
    if not isinstance(choices, Mapping) or not all(isinstance(text, str) for text in choices.values()):
        raise ValueError(f"expected a JSON object of letter -> option text, got {raw!r}")
    return dict(choices)


def read_rl_parquet(path: Path | str, verify_images: bool = False) -> list[RLRecord]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    for column in ("prompt", "images", "reward_model"):
        if column not in table.column_names:
            raise DataError(f"{path}: missing column '{column}' (expected verl-style RL parquet: prompt, images, reward_model, ...)")
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows (expected at least one RL prompt)")
    records = []
    for index, row in enumerate(table.to_pylist()):
        record = f"row {index}"
        prompt = row["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise _fail(path, record, "prompt", "a non-empty list of messages", prompt)
        for t, message in enumerate(prompt):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise _fail(path, record, f"prompt[{t}]", "a message {role, content} with role in system/user/assistant", message)
        images = row["images"] or []
        image_bytes = []
        for i, image in enumerate(images):
            data = image.get("bytes") if isinstance(image, dict) else image
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise _fail(path, record, f"images[{i}].bytes", "encoded image bytes", data)
            image_bytes.append(bytes(data))
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in prompt)
        if placeholders != len(image_bytes):
            raise _fail(path, record, "images", f"{placeholders} image(s), one per '<image>' in the prompt", len(image_bytes))
        for i, data in enumerate(image_bytes):
            _check_image(path, record, f"images[{i}].bytes", data, verify_images)
        reward = row["reward_model"]
        if not isinstance(reward, dict) or not isinstance(reward.get("ground_truth"), str):
            raise _fail(path, record, "reward_model.ground_truth", "a string", (reward or {}).get("ground_truth"))
        try:
            choices = parse_choices(reward.get("choices"))
        except ValueError:
            raise _fail(path, record, "reward_model.choices", "a JSON object of letter -> option",
                        reward.get("choices")) from None
        extra = row.get("extra_info") or {}
        records.append(RLRecord(
            id=str(extra.get("id", f"{path.stem}-{index}")),
            data_source=str(row.get("data_source") or path.stem),
            prompt=prompt,
            images=image_bytes,
            ground_truth=reward["ground_truth"],
            choices=choices or None,
            teacher_caption=row.get("teacher_caption"),
            teacher_cot=row.get("teacher_cot"),
        ))
    return records


# ---------------------------------------------------------------------------------------------
# Discriminator warm-up pairs: JSONL
# ---------------------------------------------------------------------------------------------

WARMUP_FIELDS = ("prompt", "image", "teacher_caption", "student_caption", "teacher_cot", "student_cot")
SEGMENT_FIELDS = WARMUP_FIELDS[2:]
# The PRISM authors' pair files (github.com/XIAO4579/PRISM, moe/train_moe_vl_warmup.py:93-101 documents the layout,
# moe/train_moe_vl_warmup_fast.py:107-155 reads it) use the same fields, and also: `question` where `prompt` is
# absent, no `image` (or null) for a text-only pair, and an older whole-response layout (`teacher_response`,
# `student_response`) with no segments to score. The teacher's response is the preferred one of each pair.
PROMPT_ALIAS = "question"
WHOLE_RESPONSE_FIELDS = ("teacher_response", "student_response")


@dataclass(frozen=True)
class WarmupPair:
    prompt: str
    image: Path | None  # resolved against the JSONL file's folder; None: a text-only pair
    teacher_caption: str
    student_caption: str
    teacher_cot: str
    student_cot: str


def write_warmup_pairs(path: Path, pairs: Iterable[WarmupPair]) -> int:
    path = Path(path)
    lines = []
    for pair in pairs:
        row = {name: getattr(pair, name) for name in WARMUP_FIELDS}
        row["image"] = None if pair.image is None else os.path.relpath(pair.image, path.parent)
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _warmup_prompt(path: Path, where: str, row: dict) -> str:
    """`prompt`, or the authors' `question` when there is no `prompt` (their reader's precedence)."""
    name = "prompt" if "prompt" in row or PROMPT_ALIAS not in row else PROMPT_ALIAS
    prompt = row.get(name)
    if not isinstance(prompt, str) or not prompt:
        raise _fail(path, where, name, "a non-empty string (the question; 'question' is read when there is no "
                    "'prompt')", prompt)
    if prompt.count(IMAGE_TOKEN) > 1:
        raise _fail(path, where, name, f"at most one '{IMAGE_TOKEN}' (a pair has one image)", prompt)
    return prompt


def _warmup_image(path: Path, where: str, row: dict, prompt: str) -> Path | None:
    """The image path resolved against the file's folder (an absolute path stays as it is); None: text only."""
    image = row.get("image")
    if image is None:
        if IMAGE_TOKEN in prompt:
            raise _fail(path, where, "image", f"an image path (the prompt holds '{IMAGE_TOKEN}')", image)
        return None
    if not isinstance(image, str) or not image:
        raise _fail(path, where, "image", "an image path relative to the file's folder, or null for a text-only pair",
                    image)
    if image.startswith(("http://", "https://")):
        raise _fail(path, where, "image", "a local image path (URLs are not downloaded: fetch the image and give "
                    "its path)", image)
    return path.parent / image


def read_warmup_pairs(path: Path | str, check_images: bool = True, verify_images: bool = False) -> list[WarmupPair]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    known = set(WARMUP_FIELDS) | {PROMPT_ALIAS}
    pairs = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: invalid JSON: {error.msg}") from None
        if not isinstance(row, dict):
            raise _fail(path, where, "(record)", "a JSON object", row)
        whole = [name for name in WHOLE_RESPONSE_FIELDS if name in row]
        if whole:
            raise _fail(path, where, whole[0], "teacher_/student_caption and teacher_/student_cot (the whole-response "
                        "layout has no perception and reasoning segments to warm up on)", whole[0])
        unknown = set(row) - known
        if unknown:
            raise _fail(path, where, sorted(unknown)[0], f"only {list(WARMUP_FIELDS)} ('{PROMPT_ALIAS}' for 'prompt')",
                        sorted(unknown)[0])
        prompt = _warmup_prompt(path, where, row)
        for name in SEGMENT_FIELDS:
            if not isinstance(row.get(name), str) or not row[name]:
                raise _fail(path, where, name, "a non-empty string", row.get(name))
        image = _warmup_image(path, where, row, prompt)
        if check_images and image is not None:
            _check_image(path, where, "image", image, verify_images)
        pairs.append(WarmupPair(prompt, image, *(row[name] for name in SEGMENT_FIELDS)))
    if not pairs:
        raise DataError(f"{path}: no pairs (expected JSONL lines of {', '.join(WARMUP_FIELDS)})")
    return pairs
