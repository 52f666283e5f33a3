"""Published data formats: round trips, and malformed records named by file, record and field."""

import dataclasses
import io
import json

import pytest
from PIL import Image

from prism.data.export import MANIFEST, corpus_texts, export_world
from prism.data.formats import (
    DataError,
    RLRecord,
    WarmupPair,
    read_rl_parquet,
    read_sharegpt,
    read_warmup_pairs,
    write_rl_parquet,
    write_sharegpt,
    write_warmup_pairs,
)
from prism.data.world import FAMILIES, WorldConfig, iter_split


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()  # readers open and verify every image


def _messages(answer="<caption>\n- a\n</caption>\n<think>\nx\n</think>\n<answer>1</answer>"):
    return [{"role": "system", "content": "s"}, {"role": "user", "content": "<image>q"},
            {"role": "assistant", "content": answer}]


def test_sharegpt_round_trip_resolves_image_paths(tmp_path):
    (tmp_path / "img.png").write_bytes(PNG)
    write_sharegpt(tmp_path / "sft.json", [(_messages(), ["img.png"])])
    [conversation] = read_sharegpt(tmp_path / "sft.json")
    assert conversation.messages == _messages()
    assert conversation.images == [tmp_path / "img.png"]


def test_sharegpt_reads_the_from_value_spelling(tmp_path):
    (tmp_path / "img.png").write_bytes(PNG)
    rows = [{"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}], "images": ["img.png"]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    [conversation] = read_sharegpt(tmp_path / "d.json")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"images": []}, "field 'messages'"),
        ({"messages": [{"role": "bot", "content": "x"}], "images": []}, "field 'messages[0].role'"),
        ({"messages": [{"role": "user", "content": 3}], "images": []}, "field 'messages[0].content'"),
        ({"messages": _messages(), "images": []}, "field 'images': expected 1 image(s)"),
        ({"messages": _messages(), "images": ["missing.png"]}, "field 'images[0]': expected an existing image file"),
        ({"messages": _messages()[:2], "images": ["img.png"]}, "expected 'assistant'"),
        ({"messages": _messages(), "images": ["img.png"], "label": 1}, "field 'label'"),
        ({"messages": _messages(), "images": ["lfs.png"]}, "field 'images[0]': expected a readable image"),
        ({"messages": _messages(), "images": ["img.png"], "system": 3}, "field 'system': expected a string"),
        ({"messages": _messages(), "images": ["img.png"], "system": "s"}, "field 'system': expected one system prompt"),
    ],
)
def test_malformed_sharegpt_records_are_named(tmp_path, record, expected):
    (tmp_path / "img.png").write_bytes(PNG)
    (tmp_path / "lfs.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    good = {"messages": _messages(), "images": ["img.png"]}
    (tmp_path / "d.json").write_text(json.dumps([good, record]))
    with pytest.raises(DataError) as error:
        read_sharegpt(tmp_path / "d.json")
    message = str(error.value)
    assert "d.json: record [1]" in message and expected in message


def test_verify_images_reads_the_whole_image(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buffer, format="PNG")
    (tmp_path / "img.png").write_bytes(buffer.getvalue()[:-200])  # truncated pixels: the header still opens
    write_sharegpt(tmp_path / "d.json", [(_messages(), ["img.png"])])
    assert len(read_sharegpt(tmp_path / "d.json")) == 1  # a stage start reads headers only
    with pytest.raises(DataError, match=r"field 'images\[0\]': expected a readable image"):
        read_sharegpt(tmp_path / "d.json", verify_images=True)


def test_sharegpt_reads_llama_factory_system_column(tmp_path):
    (tmp_path / "img.png").write_bytes(PNG)
    turns = [m for m in _messages() if m["role"] != "system"]
    (tmp_path / "d.json").write_text(json.dumps([{"messages": turns, "images": ["img.png"], "system": "Be brief."}]))
    [conversation] = read_sharegpt(tmp_path / "d.json")
    assert conversation.messages[0] == {"role": "system", "content": "Be brief."}
    assert conversation.messages[1:] == turns


def test_non_utf8_and_empty_files_are_named(tmp_path):
    (tmp_path / "latin1.json").write_bytes('[{"messages": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.json: not UTF-8 text \(byte 18"):
        read_sharegpt(tmp_path / "latin1.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json: .*expected a non-empty JSON list"):
        read_sharegpt(tmp_path / "empty.json")
    (tmp_path / "pairs.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="pairs.jsonl: no pairs"):
        read_warmup_pairs(tmp_path / "pairs.jsonl")


def test_invalid_json_names_the_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n{"messages": [}\n]')
    with pytest.raises(DataError, match=r"d.json:2: invalid JSON"):
        read_sharegpt(tmp_path / "d.json")


def test_rl_parquet_round_trip_keeps_choices_and_teacher_segments(tmp_path):
    records = [
        RLRecord("a", "embedded_chart", _messages()[:2], [PNG], "7", None, "<caption>\n- a\n</caption>", "<think>\nx\n</think>\n<answer>7</answer>"),
        RLRecord("b", "embedded_multichoice", _messages()[:2], [PNG], "B", {"A": "red", "B": "blue"}, None, None),
    ]
    write_rl_parquet(tmp_path / "rl.parquet", records, split="rl")
    assert read_rl_parquet(tmp_path / "rl.parquet") == records


def test_rl_parquet_errors_name_row_and_field(tmp_path):
    bad = RLRecord("a", "x", [{"role": "user", "content": "<image><image>q"}], [PNG], "1", None, None, None)
    write_rl_parquet(tmp_path / "rl.parquet", [bad], split="rl")
    with pytest.raises(DataError, match=r"rl.parquet: row 0: field 'images': expected 2 image"):
        read_rl_parquet(tmp_path / "rl.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_rl_parquet(tmp_path / "junk.parquet")


def test_warmup_pairs_round_trip_and_errors(tmp_path):
    (tmp_path / "img.png").write_bytes(PNG)
    pair = WarmupPair("q", tmp_path / "img.png", "<caption>t</caption>", "<caption>s</caption>", "<think>t</think>", "<think>s</think>")
    write_warmup_pairs(tmp_path / "pairs.jsonl", [pair, pair])
    assert read_warmup_pairs(tmp_path / "pairs.jsonl") == [pair, pair]
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["student_cot"]
    (tmp_path / "pairs.jsonl").write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl: line 2: field 'student_cot': expected a non-empty string"):
        read_warmup_pairs(tmp_path / "pairs.jsonl")


def _authors_pairs(tmp_path):
    """A pair file in the PRISM authors' layout: the fields of their PairwiseVLDataset (github.com/XIAO4579/PRISM,
    moe/train_moe_vl_warmup.py:93-101 documents them, moe/train_moe_vl_warmup_fast.py:107-155 reads them): `question`
    read where `prompt` is absent, `image` a path (absolute, or relative) or absent/null for a text-only pair, the
    teacher's segments the preferred ones (fast.py:465-466: -logsigmoid(teacher - student))."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(PNG)
    segments = {"teacher_caption": "<caption>\n- a red circle\n</caption>", "student_caption": "<caption>\n- a circle\n</caption>",
                "teacher_cot": "<think>\none\n</think>\n<answer>1</answer>", "student_cot": "<think>\ntwo\n</think>\n<answer>2</answer>"}
    rows = [{"image": str(tmp_path / "images" / "a.png"), "prompt": "How many red circles?", **segments},
            {"question": "How many circles?", "image": "images/a.png", **segments},
            {"prompt": "What is 1 + 1?", **segments},
            {"prompt": "What is 2 + 2?", "image": None, **segments}]
    path = tmp_path / "qwen3_vl_moe_warmup_pairwise_120k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, segments


def test_the_authors_warmup_layout_is_read(tmp_path, capsys):
    from prism.cli import main

    path, segments = _authors_pairs(tmp_path)
    pairs = read_warmup_pairs(path)
    image = tmp_path / "images" / "a.png"
    assert pairs == [WarmupPair("How many red circles?", image, *segments.values()),
                     WarmupPair("How many circles?", image, *segments.values()),
                     WarmupPair("What is 1 + 1?", None, *segments.values()),
                     WarmupPair("What is 2 + 2?", None, *segments.values())]
    write_warmup_pairs(tmp_path / "ours.jsonl", pairs)  # written back in our spelling: the same pairs
    assert read_warmup_pairs(tmp_path / "ours.jsonl") == pairs
    assert main(["data", "check", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(path), "format": "warmup", "records": 4}


DROP = object()


@pytest.mark.parametrize(("change", "error"), [
    ({"image": "https://example.com/a.png"}, r"field 'image': expected a local image path \(URLs are not downloaded"),
    ({"image": "images/missing.png"}, "field 'image': expected an existing image file"),
    ({"image": 3}, "field 'image': expected an image path relative to the file's folder, or null"),
    ({"image": None, "prompt": "<image>How many?"}, "field 'image': expected an image path"),
    ({"question": DROP}, "field 'prompt': expected a non-empty string"),
    ({"prompt": None}, "field 'prompt': expected a non-empty string"),
    ({"question": "<image><image>two?"}, "field 'question': expected at most one '<image>'"),
    ({"teacher_cot": ""}, "field 'teacher_cot': expected a non-empty string"),
    ({"source": "mmr1"}, "field 'source': expected only"),
    ({"teacher_response": "t", "student_response": "s"}, "field 'teacher_response': expected teacher_/student_caption"),
])
def test_an_authors_layout_record_that_cannot_be_read_is_named(tmp_path, change, error):
    path, _ = _authors_pairs(tmp_path)
    first, second = path.read_text().splitlines()[:2]
    row = {key: value for key, value in {**json.loads(second), **change}.items() if value is not DROP}
    path.write_text(first + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"{path.name}: line 2: {error}"):
        read_warmup_pairs(path)


def test_export_writes_every_format_that_the_readers_load_back(tmp_path):
    cfg = WorldConfig(base_size=12, sft_size=24, teacher_size=12, rl_size=12, bench_size=4)
    manifest = export_world(cfg, tmp_path / "world")
    root = tmp_path / "world"
    assert manifest["counts"] == {"base": 12, "sft": 24, "teacher": 12, "rl": 12, "bench": 4 * len(FAMILIES)}
    sft = read_sharegpt(root / "sft.json")
    assert len(sft) == 24 and sft[0].messages[0]["role"] == "system"
    base = read_sharegpt(root / "base.json")
    # untagged answers, under the system prompt in some samples only
    assert {record.messages[0]["role"] for record in base} == {"system", "user"}
    assert not any("<answer>" in record.messages[-1]["content"] for record in base)
    teacher = read_rl_parquet(root / "teacher.parquet")
    assert all(r.teacher_caption.startswith("<caption>") and r.teacher_cot.startswith("<think>") for r in teacher)
    assert len(read_rl_parquet(root / "rl.parquet")) == 12
    assert sorted(p.stem for p in (root / "bench").glob("*.parquet")) == sorted(FAMILIES)
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    assert set(json.loads((root / "dataset_info.json").read_text())) == {"base", "sft", "teacher"}
    pairs = read_warmup_pairs(root / "warmup_pairs.jsonl")  # teacher vs public demonstration, same prompt/image
    assert len(pairs) == 12 and pairs[0].teacher_caption == teacher[0].teacher_caption
    assert pairs[0].image.is_file() and "<image>" in pairs[0].prompt
    assert any(p.student_caption != p.teacher_caption or p.student_cot != p.teacher_cot for p in pairs)
    # A finished export is never redone; a different world into the same folder is refused.
    stamp = (root / "sft.json").stat().st_mtime_ns
    assert export_world(cfg, root) == manifest and (root / "sft.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match=MANIFEST):
        export_world(WorldConfig(base_size=12, sft_size=25, teacher_size=12, rl_size=12, bench_size=4), root)
    # an export written before a field existed (its manifest lacks it) is the same world while the field is default
    written = json.loads((root / MANIFEST).read_text())
    del written["config"]["sft_family_repeats"]
    (root / MANIFEST).write_text(json.dumps(written))
    assert export_world(cfg, root) == written
    with pytest.raises(FileExistsError, match=MANIFEST):
        export_world(dataclasses.replace(cfg, sft_family_repeats={"presence": 2}), root)


def test_the_tokenizer_corpus_is_the_even_mix_whatever_the_sft_family_repeats():
    """An SFT split that repeats a family holds other samples, but the tokenizer's text (hence the bases) is the even
    mix's."""
    even, repeated = WorldConfig(), WorldConfig(sft_family_repeats={"presence": 4})
    made = {"sft": list(iter_split(repeated, "sft", stop=24))}
    assert [s.family for s in made["sft"]] != [s.family for s in iter_split(even, "sft", stop=24)]
    expected = list(corpus_texts(even, per_split=24))
    assert list(corpus_texts(repeated, per_split=24)) == expected
    assert list(corpus_texts(repeated, per_split=24, made=made)) == expected


def test_the_tokenizer_corpus_is_the_defaults_whatever_a_familys_skip_steps_rate():
    default, steps_kept = WorldConfig(), WorldConfig(skip_steps_by_family={"presence": 0.0})
    made = {split: list(iter_split(steps_kept, split, stop=24)) for split in ("base", "sft", "teacher", "rl")}
    expected = list(corpus_texts(default, per_split=24))
    assert [s.public.text for s in made["sft"]] != [s.public.text for s in iter_split(default, "sft", stop=24)]
    assert list(corpus_texts(steps_kept, per_split=24, made=made)) == expected


def test_the_tokenizer_corpus_is_the_defaults_whatever_the_presence_steps():
    default, copied = WorldConfig(), WorldConfig(presence_steps="matches")
    made = {split: list(iter_split(copied, split, stop=24)) for split in ("base", "sft", "teacher", "rl")}
    assert [s.teacher.text for s in made["sft"]] != [s.teacher.text for s in iter_split(default, "sft", stop=24)]
    assert list(corpus_texts(copied, per_split=24, made=made)) == list(corpus_texts(default, per_split=24))


def test_the_tokenizer_corpus_is_the_defaults_whatever_the_base_lookup_rate():
    """Every sample carries a base pair (only base.json writes them), so every split's text is made again."""
    default, lookups = WorldConfig(), WorldConfig(base_lookup_rate=0.5)
    made = {split: list(iter_split(lookups, split, stop=24)) for split in ("base", "sft", "teacher", "rl")}
    assert [s.base_response for s in made["base"]] != [s.base_response for s in iter_split(default, "base", stop=24)]
    assert list(corpus_texts(lookups, per_split=24, made=made)) == list(corpus_texts(default, per_split=24))


def test_a_split_made_across_processes_writes_the_files_one_process_writes(tmp_path, monkeypatch):
    """2,000 base samples in two processes' shares: the same records, images and tokenizer as one process."""
    from prism.data import export

    cfg = WorldConfig(base_size=2000, sft_size=12, teacher_size=12, rl_size=12, bench_size=2)
    trees = {}
    for cores in (1, 2):
        monkeypatch.setattr(export, "available_cores", lambda: cores)
        root = tmp_path / f"cores{cores}"
        export_world(cfg, root)
        trees[cores] = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                        if p.is_file() and p.name != MANIFEST}
    assert len(trees[2]) > 2000 and trees[1] == trees[2]
