"""Export the embedded world in the published formats; describe it (`stats`) and draw it (`show`).

Layout of an exported world folder:
  base.json, sft.json, teacher.json   LLaMA-Factory sharegpt multimodal (+ dataset_info.json)
  images/<split>/<id>.png             the images those JSON files point to
  rl.parquet, teacher.parquet         verl-style RL prompts (teacher.parquet carries teacher segments; a
                                      multiple-choice row's options in reward_model and extra_info)
  warmup_pairs.jsonl                  discriminator warm-up pairs: teacher vs public demonstration per teacher prompt
  bench/<family>.parquet              held-out benchmark per family, read by the lmms-eval tasks
  tokenizer/                          the world's processor: byte-level BPE tokenizer, image processor, chat template
  world.json                          manifest: resolved config, counts, file checksums (written last)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from prism.atomic_io import atomic_path, atomic_write_text, check_output_folder
from prism.config import config_to_dict
from prism.data.formats import (
    RLRecord,
    WarmupPair,
    atomic_write_parquet,
    sharegpt_dataset_info,
    write_rl_parquet,
    write_sharegpt,
    write_warmup_pairs,
)
from prism.data.world import TOKENIZER_AT_DEFAULT, Sample, WorldConfig, iter_split, make_sample
from prism.response_format import SYSTEM_PROMPT, count_caption_bullets, count_reasoning_steps, split_segments
from prism.workers import available_cores

# 2: tokenizer/ also holds the image processor; 3: warmup_pairs.jsonl; 4: base corpus answers the questions;
# 5: the RL parquet files carry a row's choices in extra_info too (for verl reward functions); 6: multiple-choice
# options keep a fixed order unless shuffle_options
WORLD_FORMAT_VERSION = 6
MANIFEST = "world.json"
TOKENIZER_CORPUS_PER_SPLIT = 3000  # enough text to cover the world's whole vocabulary


def _rl_record(sample: Sample) -> RLRecord:
    segments = split_segments(sample.teacher.text)
    return RLRecord(
        id=sample.id,
        data_source=f"embedded_{sample.family}",
        prompt=sample.messages("teacher")[:2],
        images=[sample.image_png()],
        ground_truth=sample.answer,
        choices=sample.choices,
        teacher_caption=segments.perception,
        teacher_cot=segments.reasoning,
    )


def _warmup_pairs(samples: list[Sample], folder: Path, names: list[str]) -> Iterable[WarmupPair]:
    """Teacher vs public demonstration of each teacher sample: discriminator warm-up pairs that need no policy
    (the published pairs take the student side from the SFT model's rollouts; disc_warmup can generate those)."""
    for sample, name in zip(samples, names):
        teacher, public = split_segments(sample.teacher.text), split_segments(sample.public.text)
        if teacher is None or public is None:
            continue
        user = next(m["content"] for m in sample.messages("teacher") if m["role"] == "user")
        yield WarmupPair(user, folder.parent.parent / name, teacher.perception, public.perception,
                         teacher.reasoning, public.reasoning)


def image_name(sample: Sample) -> str:
    return f"images/{sample.split}/{sample.id}.png"


def _make_and_save(cfg: WorldConfig, split: str, start: int, stop: int, out: Path, keep_images: bool) -> list[Sample]:
    """Samples [start, stop) of a split, each image written under `out` and then, unless `keep_images`, dropped from
    the sample (the records only name the file): a worker's share of a split."""
    samples = []
    for sample in iter_split(cfg, split, start, stop):
        sample.image.save(out / image_name(sample))
        samples.append(sample if keep_images else dataclasses.replace(sample, image=None))
    return samples


def _made_and_saved(cfg: WorldConfig, split: str, out: Path, report: Callable[[str, int, int], None],
                    keep_images: bool = False) -> list[Sample]:
    """A split's samples with their images written: generating and writing a default world's 22,400 images is most
    of its export (13 s on one core), so the split runs in a process per core, in contiguous shares; each
    sample depends only on (world, split, index), so the files are those one process writes."""
    total = cfg.split_size(split)
    workers = max(1, min(available_cores(), total // 1000))  # small worlds: a pool costs more than it saves
    bounds = [total * k // workers for k in range(workers + 1)]
    report(split, 0, total)
    if workers == 1:
        samples = _make_and_save(cfg, split, 0, total, out, keep_images)
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = pool.map(_make_and_save, [cfg] * workers, [split] * workers, bounds[:-1], bounds[1:],
                             [out] * workers, [keep_images] * workers)
            samples = [sample for part in parts for sample in part]
    report(split, total, total)
    return samples


def corpus_texts(cfg: WorldConfig, per_split: int = TOKENIZER_CORPUS_PER_SPLIT,
                 made: dict[str, list[Sample]] | None = None) -> Iterable[str]:
    """The text a tokenizer for this world should know: prompts, both demonstration kinds, base text. `made`:
    samples of a split already generated (its first `per_split` are used rather than generated again). The SFT
    split's text is always the even mix's: repeating a family adds no word, and a tokenizer (hence the base models)
    that moved with the SFT mix would make a mix's SFT start from other bases than the even mix's, so the two could
    not be compared on the same bases. For the same reason every field marked `TOKENIZER_AT_DEFAULT` (the per-family
    skip rates, the presence chain's form, the base split's lookups) is taken at its default in the splits it
    changes."""
    made = made or {}
    defaults = WorldConfig()
    changed = [f for f in dataclasses.fields(cfg)
               if TOKENIZER_AT_DEFAULT in f.metadata and getattr(cfg, f.name) != getattr(defaults, f.name)]
    if changed:
        cfg = dataclasses.replace(cfg, **{f.name: getattr(defaults, f.name) for f in changed})
        remade = {split for f in changed for split in f.metadata[TOKENIZER_AT_DEFAULT]}
        made = {split: samples for split, samples in made.items() if split not in remade}
    yield SYSTEM_PROMPT
    for split in ("base", "sft", "teacher", "rl"):
        samples = made[split][:per_split] if split in made else iter_split(cfg, split, stop=per_split)
        for sample in samples:
            yield sample.question
            yield sample.teacher.text
            yield sample.public.text
            yield sample.base_prompt
            yield sample.base_response


def _bench_table(samples: list[Sample]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "id": s.id,
                "family": s.family,
                "question": s.question,
                "image": {"bytes": s.image_png(), "path": None},
                "answer": s.answer,
                "answer_type": s.answer_type,
                "choices": json.dumps(s.choices) if s.choices else None,
                "pair_id": s.pair_id,
            }
            for s in samples
        ],
        schema=pa.schema([
            ("id", pa.string()), ("family", pa.string()), ("question", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("answer", pa.string()), ("answer_type", pa.string()), ("choices", pa.string()),
            ("pair_id", pa.string()),
        ]),
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_world(cfg: WorldConfig, out: Path, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write the whole world under `out`; returns the manifest. Finished exports are not redone."""
    out = Path(out)
    check_output_folder(out, "--out")
    manifest_path = out / MANIFEST
    resolved = config_to_dict(cfg)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        # a field added since the export was written (`sft_family_repeats`) reads as its default
        recorded = {**config_to_dict(WorldConfig()), **manifest.get("config", {})}
        if recorded == resolved and manifest.get("format_version") == WORLD_FORMAT_VERSION:
            return manifest
        raise FileExistsError(f"{out} holds a different world export ({MANIFEST} differs); choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    counts: dict[str, int] = {}
    report = progress or (lambda split, done, total: None)

    def collect(split: str) -> list[Sample]:
        total = cfg.split_size(split)
        samples = []
        report(split, 0, total)
        for sample in iter_split(cfg, split):
            samples.append(sample)
            if len(samples) % 500 == 0 or len(samples) == total:
                report(split, len(samples), total)
        counts[split] = total
        return samples

    made: dict[str, list[Sample]] = {}
    for split, source in (("base", None), ("sft", "public"), ("teacher", "teacher")):
        shutil.rmtree(out / "images" / split, ignore_errors=True)
        (out / "images" / split).mkdir(parents=True)
        # the teacher's parquet embeds its images, so its samples keep them
        samples = made[split] = _made_and_saved(cfg, split, out, report, keep_images=split == "teacher")
        counts[split] = len(samples)
        names = [image_name(sample) for sample in samples]
        records = [(s.base_messages() if source is None else s.messages(source), [n]) for s, n in zip(samples, names)]
        write_sharegpt(out / f"{split}.json", records)
        if split == "teacher":
            write_rl_parquet(out / "teacher.parquet", (_rl_record(s) for s in samples), split="teacher")
            write_warmup_pairs(out / "warmup_pairs.jsonl", _warmup_pairs(samples, out / "images" / split, names))
    made["rl"] = collect("rl")
    write_rl_parquet(out / "rl.parquet", (_rl_record(s) for s in made["rl"]), split="rl")
    bench = collect("bench")
    by_family: dict[str, list[Sample]] = defaultdict(list)
    for sample in bench:
        by_family[sample.family].append(sample)
    for family, samples in by_family.items():
        atomic_write_parquet(_bench_table(samples), out / "bench" / f"{family}.parquet")
    atomic_write_text(out / "dataset_info.json", json.dumps(sharegpt_dataset_info(["base", "sft", "teacher"]), indent=2))

    from prism.models import build_processor, build_tokenizer, save_processor

    # The whole processor (tokenizer, image processor, chat template): stages building a tiny model load it.
    tokenizer = build_tokenizer(corpus_texts(cfg, made=made))
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    save_processor(build_processor(tokenizer, cfg.image_size), out / "tokenizer")

    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".parquet") and p.name != MANIFEST)
    manifest = {
        "format_version": WORLD_FORMAT_VERSION,
        "config": resolved,
        "counts": counts,
        "bench_families": list(by_family),
        "files": {str(p.relative_to(out)): _sha256(p) for p in files},
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))  # last: marks the export complete
    return manifest


# ---------------------------------------------------------------------------------------------
# stats and show
# ---------------------------------------------------------------------------------------------


def world_stats(cfg: WorldConfig, per_family: int = 200, tokenizer=None):
    """One row per (family, source): how the teacher and public demonstrations differ, in numbers."""
    import pandas as pd

    rows = []
    for family in cfg.families:
        # Training splits cycle families in pairs of indices: take the SFT split's samples of this family.
        index = 2 * cfg.families.index(family)
        samples = []
        while len(samples) < per_family:
            samples.append(make_sample(cfg, "sft", index))
            samples.append(make_sample(cfg, "sft", index + 1))
            index += 2 * len(cfg.families)
        for source in ("teacher", "public"):
            for sample in samples[:per_family]:
                demo = sample.teacher if source == "teacher" else sample.public
                text = demo.text
                rows.append({
                    "family": family,
                    "source": source,
                    "caption_bullets": count_caption_bullets(text),
                    "reasoning_steps": count_reasoning_steps(text),
                    "answer_correct": demo.answer == sample.answer,
                    "answer_type": sample.answer_type,
                    "response_tokens": len(tokenizer(text)["input_ids"]) if tokenizer is not None else len(text.split()),
                })
    frame = pd.DataFrame(rows)
    table = frame.groupby(["family", "source"], sort=False).agg(
        n=("caption_bullets", "size"),
        caption_bullets=("caption_bullets", "mean"),
        reasoning_steps=("reasoning_steps", "mean"),
        answer_correct=("answer_correct", "mean"),
        response_tokens=("response_tokens", "mean"),
        response_tokens_max=("response_tokens", "max"),
        answer_type=("answer_type", lambda s: "/".join(sorted(set(s)))),
    )
    return table.reset_index()


def show_world(cfg: WorldConfig, out: Path, per_family: int = 2, split: str = "sft") -> Path:
    """A PNG grid: one row per sample, the image beside its question, teacher and public responses."""
    check_output_folder(Path(out).parent, f"--out {out}: the folder")
    if Path(out).is_dir():
        raise FileExistsError(f"--out {out} is a folder, not a file: give the PNG file to write")
    font = ImageFont.load_default(size=11)
    scale, text_width, line_height = 2, 640, 13
    rows = []
    for family in cfg.families:
        index = 2 * cfg.families.index(family) if split != "bench" else cfg.families.index(family) * cfg.bench_size
        for k in range(per_family):
            rows.append(make_sample(cfg, split, index + k))
    blocks = []
    for sample in rows:
        text = [f"[{sample.family}] {sample.id}  Q: {sample.question}", f"ground truth: {sample.answer}",
                "teacher:", *sample.teacher.text.splitlines(), "public:", *sample.public.text.splitlines()]
        height = max(cfg.image_size * scale, line_height * len(text)) + 10
        block = Image.new("RGB", (cfg.image_size * scale + text_width, height), "white")
        block.paste(sample.image.resize((cfg.image_size * scale,) * 2, Image.NEAREST), (0, 0))
        draw = ImageDraw.Draw(block)
        for i, line in enumerate(text):
            draw.text((cfg.image_size * scale + 8, 2 + i * line_height), line[:110], fill="black", font=font)
        draw.line((0, height - 1, block.width, height - 1), fill=(200, 200, 200))
        blocks.append(block)
    sheet = Image.new("RGB", (blocks[0].width, sum(b.height for b in blocks)), "white")
    y = 0
    for block in blocks:
        sheet.paste(block, (0, y))
        y += block.height
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp)
    return out
