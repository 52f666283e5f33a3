"""bench/paired_evals.py: evaluations run by hand, each label paired with the first on the same items and seeds."""

import json

import numpy as np
import pytest

from reports.tables import FAMILIES


def test_a_known_change_over_two_seeds_is_recovered_and_the_baseline_pairs_with_nothing(tmp_path, capsys, bench_script,
                                                                                        evaluation_folder):
    rng = np.random.default_rng(0)
    base, changed = [], []
    for seed in range(2):
        scores = {f: rng.binomial(1, 0.5, size=100) for f in FAMILIES}
        presence = scores["presence"].copy()
        presence[np.flatnonzero(presence == 0)[:20]] = 1  # +20 points on presence in each seed, nothing else moved
        base.append(evaluation_folder(tmp_path, f"base{seed}", scores))
        changed.append(evaluation_folder(tmp_path, f"changed{seed}", {**scores, "presence": presence}))
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


def test_a_folder_with_two_evaluations_a_label_named_twice_and_one_without_folders_are_named(tmp_path, bench_script,
                                                                                             evaluation_folder):
    scores = {f: np.ones(10) for f in FAMILIES}
    folder = evaluation_folder(tmp_path, "twice", scores)
    evaluation_folder(tmp_path, "twice", scores, key="key1")
    other = evaluation_folder(tmp_path, "once", scores)
    with pytest.raises(SystemExit, match=r"hash-twice: expected one evaluation .* found prism_embedded-key0, "
                                         r"prism_embedded-key1"):
        bench_script("paired_evals").main([f"a={folder}", f"b={other}", "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match="a label is named twice"):
        bench_script("paired_evals").main([f"a={other}", f"a={other}", "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match=r"'b': expected LABEL=DIR"):
        bench_script("paired_evals").main([f"a={other}", "b", "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
