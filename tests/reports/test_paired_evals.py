"""bench/paired_evals.py: evaluations run by hand, each label paired with the first on the same items and seeds."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.tables import FAMILIES


def _evaluation(root: Path, name: str, scores_by_family: dict[str, np.ndarray], key: str = "key0") -> Path:
    """An evaluation folder as `prism eval --out root` leaves it: root/<hash>/prism_embedded-<key>/rows.csv and the
    samples files lmms-eval logged under the checkpoint's folder."""
    folder = root / f"hash-{name}"
    entry = folder / f"prism_embedded-{key}"
    (entry / "model").mkdir(parents=True)
    rows = []
    for family, scores in scores_by_family.items():
        task = f"prism_embedded_{family}"
        lines = [json.dumps({"doc_id": i, "accuracy": float(s)}) for i, s in enumerate(scores)]
        (entry / "model" / f"20261201_000000_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
        rows.append({"checkpoint": name, "checkpoint_hash": folder.name, "suite": "embedded", "benchmark": "embedded",
                     "task": task, "metric": "accuracy", "value": float(np.mean(scores)), "eval_key": key})
    pd.DataFrame(rows).to_csv(entry / "rows.csv", index=False)
    return folder


def test_a_known_change_over_two_seeds_is_recovered_and_the_baseline_pairs_with_nothing(tmp_path, capsys, bench_script):
    rng = np.random.default_rng(0)
    base, changed = [], []
    for seed in range(2):
        scores = {f: rng.binomial(1, 0.5, size=100) for f in FAMILIES}
        presence = scores["presence"].copy()
        presence[np.flatnonzero(presence == 0)[:20]] = 1  # +20 points on presence in each seed, nothing else moved
        base.append(_evaluation(tmp_path, f"base{seed}", scores))
        changed.append(_evaluation(tmp_path, f"changed{seed}", {**scores, "presence": presence}))
    out = tmp_path / "paired.json"
    bench_script("paired_evals").main([f"base={base[0]},{base[1]}", f"changed={changed[0]},{changed[1]}",
                                       "--out", str(out)])

    result = json.loads(out.read_text())
    assert result["baseline"] == "base"
    assert result["labels"]["base"]["presence"]["delta"] is None
    changed_cell = result["labels"]["changed"]
    assert changed_cell["seeds"] == 2
    assert changed_cell["presence"]["delta"]["mean"] == pytest.approx(20.0)
    assert changed_cell["presence"]["delta"]["low"] > 0
    assert changed_cell["Avg"]["delta"]["mean"] == pytest.approx(20.0 / len(FAMILIES))
    for family in (f for f in FAMILIES if f != "presence"):
        assert changed_cell[family]["delta"]["mean"] == 0
    assert "| changed (2 seeds, minus base) |" in capsys.readouterr().out


def test_a_folder_with_two_evaluations_a_label_named_twice_and_one_without_folders_are_named(tmp_path, bench_script):
    scores = {f: np.ones(10) for f in FAMILIES}
    folder = _evaluation(tmp_path, "twice", scores)
    _evaluation(tmp_path, "twice", scores, key="key1")
    other = _evaluation(tmp_path, "once", scores)
    with pytest.raises(SystemExit, match=r"hash-twice: expected one evaluation .* found prism_embedded-key0, "
                                         r"prism_embedded-key1"):
        bench_script("paired_evals").main([f"a={folder}", f"b={other}", "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match="a label is named twice"):
        bench_script("paired_evals").main([f"a={other}", f"a={other}", "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match=r"'b': expected LABEL=DIR"):
        bench_script("paired_evals").main([f"a={other}", "b", "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
