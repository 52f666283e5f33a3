"""bench/presence_chains.py: where presence answers go wrong, counted on constructed evaluation samples."""

import json

import pytest


def sample(colour: str, shape: str, target: str, caption: list[str], chain: str, answer: str) -> dict:
    bullets = "".join(f"- {line}\n" for line in caption)
    return {"input": f"Is there a {colour} {shape} in the image? Answer yes or no.", "target": target,
            "filtered_resps": f"<caption>\n{bullets}</caption>\n<think>\n{chain}\n</think>\n<answer>{answer}</answer>",
            "accuracy": float(answer == target)}


SAMPLES = [
    # right throughout: one red square listed, counted 1
    sample("red", "square", "yes", ["red square at top", "blue circle"],
           "Red shapes: square at top, circle at left.\nRed squares: 1.\nSo a red square is present.", "yes"),
    # the caption decides right (no red circle) but the count ignores the list: 1 written, 0 listed
    sample("red", "circle", "no", ["red square at top"],
           "Red shapes: square at top.\nRed circles: 1.\nSo a red circle is present.", "yes"),
    # every listed shape counted: two red shapes, one of them a triangle, 2 written
    sample("red", "triangle", "yes", ["red triangle", "red square"],
           "Red shapes: triangle at left, square at right.\nRed triangles: 2.\nSo a red triangle is present.", "yes"),
    # no chain (the answer alone); its caption misses the green square
    sample("green", "square", "yes", ["blue circle"], "The answer is yes.", "yes"),
]


def test_chain_counts_by_hand(bench_script):
    counts = bench_script("presence_chains").chain_counts(SAMPLES)
    assert counts["items"] == 4
    assert counts["accuracy"] == 75.0  # samples 1, 3, 4
    assert counts["caption_decides_right"] == 75.0  # 1, 2, 3 (4's caption has no green square)
    assert counts["answer_follows_caption"] == 50.0  # 1, 3
    assert counts["chain_names_asked_object"] == 75.0  # 1, 2, 3
    assert counts["chains_with_list_and_count"] == 3
    assert counts["count_follows_list"] == pytest.approx(33.3)  # only sample 1: 1 listed, 1 written
    # matching shapes listed -> count written -> chains
    assert counts["count_by_listed"] == {"0": {"1": 1}, "1": {"1": 1, "2": 1}}
    # present written where the list holds the asked shape: 1 and 3, not 2 (no red circle listed)
    assert counts["chains_with_list_and_conclusion"] == 3 and counts["conclusion_follows_list"] == pytest.approx(66.7)
    assert counts["chains_with_list_and_matches"] == 0 and counts["matches_follow_list"] is None


def test_chains_that_copy_the_matches_instead_of_counting(bench_script):
    """A world with presence_steps=matches: the second line copies the listed items of the asked shape."""
    counts = bench_script("presence_chains").chain_counts([
        # right: the one red square copied
        sample("red", "square", "yes", ["red square at top"],
               "Red shapes: square at top, circle at left.\nRed squares: square at top.\nSo a red square is present.",
               "yes"),
        # none copied where the list holds no circle, and the conclusion follows
        sample("red", "circle", "no", ["red square at top"],
               "Red shapes: square at top.\nRed circles: none.\nSo a red circle is absent.", "no"),
        # the wrong item copied (a square for a triangle); the conclusion still follows the list
        sample("red", "triangle", "yes", ["red triangle", "red square"],
               "Red shapes: triangle at left, square at right.\nRed triangles: square at right.\n"
               "So a red triangle is present.", "yes"),
        # none copied though the list holds the circle; the conclusion follows the copy, not the list
        sample("blue", "circle", "yes", ["blue circle at top"],
               "Blue shapes: circle at top.\nBlue circles: none.\nSo a blue circle is absent.", "no"),
    ])
    assert counts["chains_with_list_and_matches"] == 4
    assert counts["matches_follow_list"] == 50.0  # 1 and 2
    assert counts["conclusion_follows_list"] == 75.0  # 1, 2, 3
    assert counts["chains_with_list_and_count"] == 0 and counts["count_follows_list"] is None


def test_main_reads_an_evaluation_folder(bench_script, tmp_path, monkeypatch, capsys):
    module = bench_script("presence_chains")
    folder = tmp_path / "evals" / "abc123"
    task = folder / "prism_embedded-x" / "model"
    task.mkdir(parents=True)
    (folder / "checkpoint.json").write_text(json.dumps({"paths": ["/ckpt/model"]}))
    (task / "x_samples_prism_embedded_presence.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    out = tmp_path / "chains.json"
    monkeypatch.setattr("sys.argv", ["presence_chains.py", str(folder), "--out", str(out)])
    module.main()
    written = json.loads(out.read_text())[str(folder)]
    assert written["checkpoint"] == "/ckpt/model" and written["count_by_listed"]["1"] == {"1": 1, "2": 1}

    # the folder above an evaluation, and an evaluation of another suite: each named, nothing written
    out.unlink()
    other = tmp_path / "evals" / "def456"
    other.mkdir()
    (other / "checkpoint.json").write_text(json.dumps({"paths": ["/ckpt/other"]}))
    for wrong, expected in ((tmp_path / "evals", "no checkpoint.json in it"),
                            (other, "no samples_prism_embedded_presence.jsonl")):
        monkeypatch.setattr("sys.argv", ["presence_chains.py", str(wrong), "--out", str(out)])
        with pytest.raises(SystemExit, match=f"{wrong}: {expected}"):
            module.main()
        assert not out.exists()
