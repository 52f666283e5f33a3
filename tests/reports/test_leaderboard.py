"""The local leaderboard: standard errors shown, and a `--limit` evaluation never displaces a full one."""

import json

import pandas as pd
import pytest

from reports.submit import write_leaderboard


def _evaluation(root, digest, key, value, n, limit, date, checkpoint):
    entry = root / digest / f"prism_embedded-{key}"
    entry.mkdir(parents=True)
    (entry / "eval.json").write_text(json.dumps({"limit": limit}))
    return {"checkpoint": checkpoint, "checkpoint_hash": digest, "suite": "embedded", "benchmark": "embedded",
            "task": "prism_embedded", "metric": "accuracy", "value": value, "stderr": 0.02, "n": n,
            "eval_key": key, "date": date}


def test_a_limited_evaluation_neither_replaces_a_full_one_nor_outranks_it(tmp_path):
    rows = [
        _evaluation(tmp_path, "aaaa", "k1", 0.40, 300, None, "20261201T100000", "ckpt-a"),
        _evaluation(tmp_path, "aaaa", "k2", 0.90, 12, 2, "20261201T110000", "ckpt-a"),  # newer, lucky, limited
        _evaluation(tmp_path, "bbbb", "k3", 0.35, 300, None, "20261201T100000", "ckpt-b"),
        _evaluation(tmp_path, "cccc", "k4", 0.80, 12, 2, "20261201T100000", "ckpt-c"),  # only a limited one
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    board = write_leaderboard(tmp_path, tmp_path / "leaderboard.md").read_text().splitlines()
    ranked = [line.split("|") for line in board if line.startswith("| ") and line[2].isdigit()]
    assert [r[5].strip() for r in ranked] == ["`ckpt-a`", "`ckpt-b`", "`ckpt-c`"]
    assert ranked[0][3].strip() == "40.00 ± 2.00" and ranked[0][4].strip() == "300"
    assert ranked[2][4].strip() == "12 (--limit)"


def test_submit_refuses_an_unevaluated_checkpoint_and_leaves_nothing(tmp_path):
    from reports.submit import SubmitError, submission_bundle

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    evals, out = tmp_path / "evals", tmp_path / "submissions"
    with pytest.raises(SubmitError, match="no finished evaluation"):
        submission_bundle(checkpoint, out_root=out, eval_root=evals)
    assert not evals.exists() and not out.exists()
