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


def test_learned_counts_the_runs_above_their_majority_answer_and_sets_the_counts_against_the_first(
        tmp_path, capsys, bench_script, evaluation_folder):
    """Presence at 80% on 100 yes/no items (majority share 50%) is learned, at 55% it is not (its interval holds
    0); 1 of 4 runs against 4 of 4: Fisher's exact p by hand, the hypergeometric tables as or less likely than
    [[1, 3], [4, 0]]: (4 + 4) / 56."""
    targets = {f: ["yes", "no"] * 50 for f in FAMILIES}
    learned, at_chance = np.r_[np.ones(80), np.zeros(20)], np.r_[np.ones(55), np.zeros(45)]
    others = {f: np.ones(100) for f in FAMILIES if f != "presence"}

    def folders(label, presence_per_seed):
        return ",".join(str(evaluation_folder(tmp_path, f"{label}{seed}", {**others, "presence": presence},
                                              targets=targets)) for seed, presence in enumerate(presence_per_seed))

    out = tmp_path / "paired.json"
    bench_script("paired_evals").main([f"plain={folders('plain', [learned, at_chance, at_chance, at_chance])}",
                                       f"kept={folders('kept', [learned] * 4)}", "--learned", "presence",
                                       "--out", str(out)])
    result = json.loads(out.read_text())["learned"]
    assert result["column"] == "presence"
    plain, kept = result["labels"]["plain"], result["labels"]["kept"]
    assert [run["learned"] for run in plain["runs"]] == [True, False, False, False]
    assert (plain["learned"], plain["of"], kept["learned"], kept["of"]) == (1, 4, 4, 4)
    assert plain["runs"][1]["majority_share"] == 50.0 and plain["runs"][1]["accuracy"] == 55.0
    assert plain["runs"][0]["above_majority"]["mean"] == pytest.approx(30.0)
    assert "fisher_p" not in plain and kept["fisher_p"] == pytest.approx(8 / 56)
    assert "| plain | 80.0 / 55.0 x / 55.0 x / 55.0 x (50.0) | 1 of 4 |  |" in capsys.readouterr().out


def test_learned_names_the_folder_whose_samples_carry_no_reference_answers(tmp_path, bench_script, evaluation_folder):
    scores = {f: np.ones(10) for f in FAMILIES}
    folder = evaluation_folder(tmp_path, "untargeted", scores)
    with pytest.raises(SystemExit, match=r"--learned presence: .*hash-untargeted: its samples carry no reference"):
        bench_script("paired_evals").main([f"a={folder}", f"b={folder}", "--learned", "presence",
                                           "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()
