"""Published data formats: round trips, and malformed records named by file, record and field."""

import io
import json

import pytest
from PIL import Image

from prism.data.export import MANIFEST, export_world
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
from prism.data.world import FAMILIES, WorldConfig


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
