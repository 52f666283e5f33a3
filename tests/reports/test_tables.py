"""Tables from recorded evaluations: every cell with its interval and n, deltas paired on the same items."""

import json

import numpy as np
import pandas as pd
import pytest

from reports import tables
from reports.stats import interval, paired_difference
from reports.tables import FAMILIES, table1


def _record(tmp_path, name, scores_by_family, targets_by_family=None):
    """An eval record and lmms-eval samples files for one checkpoint: {family: [0/1 per doc_id]}, and each item's
    reference answer where `targets_by_family` gives them ({family: [target per doc_id]})."""
    digest, key, date = f"hash-{name}", f"key{name}", "20261201T000000"
    entry = tmp_path / "evals" / digest / f"prism_embedded-{key}"
    entry.mkdir(parents=True)
    rows = []
    for family, scores in scores_by_family.items():
        task = f"prism_embedded_{family}"
        targets = (targets_by_family or {}).get(family)
        lines = [json.dumps({"doc_id": i, "accuracy": float(s), **({"target": targets[i]} if targets else {})})
                 for i, s in enumerate(scores)]
        (entry / f"{date}_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
        rows.append({"benchmark": "embedded", "task": task, "metric": "accuracy", "value": float(np.mean(scores)),
                     "checkpoint_hash": digest, "eval_key": key, "date": date})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"rows": rows}))
    return str(path)


def test_cells_carry_intervals_and_a_known_paired_effect_is_marked(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "EVAL_ROOT", tmp_path / "evals")
    rng = np.random.default_rng(0)
    base = {f: rng.binomial(1, 0.4, size=100) for f in FAMILIES}
    better = {}
    for family, scores in base.items():  # +20 points on the same items
        improved = scores.copy()
        improved[rng.choice(np.flatnonzero(scores == 0), size=20, replace=False)] = 1
        better[family] = improved
    rows = []
    for pipeline, scores in (("sft", base), ("sft+prism", better)):
        record = _record(tmp_path, pipeline.replace("+", "_"), scores)
        accuracies = {f: 100 * float(np.mean(s)) for f, s in scores.items()}
        rows.append({"size": "s", "pipeline": pipeline, "rl": "none", "seed": 0, "checkpoint": pipeline,
                     "record": record, **accuracies, "Avg": float(np.mean(list(accuracies.values())))})
    out = table1(pd.DataFrame(rows), ["s"])
    table = out["table"].set_index(["pipeline", "rl"])
    sft = table.loc[("sft", "none")]
    assert sft["items"] == 600 and sft["seeds"] == 1
    mean, low, high = (float(x) for x in sft["chart"].replace("[", "").replace("]", "").replace(",", "").split())
    assert mean == pytest.approx(100 * base["chart"].mean()) and low < mean < high
    assert table.loc[("sft", "grpo")]["Avg"] == "-"  # a cell that was not run
    delta = out["deltas"].set_index("comparison").loc["PRISM - SFT (none)"]
    assert delta["mean"] == pytest.approx(20.0) and delta["excludes 0"] and delta["p"] < 0.001
    assert delta["delta Avg (ours)"].startswith("+20.0 [") and delta["delta Avg (ours)"].endswith("*")
    assert delta["delta Avg (paper)"] == pytest.approx(0.4)  # 4B: SFT->PRISM 57.2 minus SFT 56.8
    per_column = out["deltas_by_column"]
    chart = per_column[(per_column["comparison"] == "PRISM - SFT (none)") & (per_column["column"] == "chart")]
    assert chart["mean"].iloc[0] == pytest.approx(20.0) and chart["items"].iloc[0] == 100


def test_seeds_pair_by_seed_and_count_in_the_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "EVAL_ROOT", tmp_path / "evals")
    rng = np.random.default_rng(1)
    rows = []
    for seed in (0, 1):
        for pipeline, p in (("sft", 0.3), ("sft+prism", 0.3)):
            scores = {f: rng.binomial(1, p, size=40) for f in FAMILIES}
            record = _record(tmp_path, f"{pipeline.replace('+', '_')}{seed}", scores)
            rows.append({"size": "s", "pipeline": pipeline, "rl": "none", "seed": seed, "checkpoint": "c",
                         "record": record, **{f: 100 * float(np.mean(s)) for f, s in scores.items()}})
    out = table1(pd.DataFrame(rows), ["s"])
    cell = out["table"].set_index(["pipeline", "rl"]).loc[("sft", "none")]
    assert cell["seeds"] == 2 and cell["items"] == 240
    delta = out["deltas"].set_index("comparison").loc["PRISM - SFT (none)"]
    assert delta["seeds"] == 2 and delta["items"] == 240 and not delta["excludes 0"]  # no effect: none found
    assert delta["p"] > 0.05


def test_sft_against_instruct_and_the_larger_size_against_the_smaller_are_paired(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "EVAL_ROOT", tmp_path / "evals")
    rng = np.random.default_rng(2)
    instruct = {f: rng.binomial(1, 0.3, size=100) for f in FAMILIES}

    def plus(scores, count):  # `count` more items right, on the same items
        out = {}
        for family, values in scores.items():
            improved = values.copy()
            improved[rng.choice(np.flatnonzero(values == 0), size=count, replace=False)] = 1
            out[family] = improved
        return out

    small_sft = plus(instruct, 10)  # +10 points over instruct
    large_sft = plus(small_sft, 15)  # +15 points over the small size's SFT
    rows = []
    for size, pipeline, scores in (("s", "instruct", instruct), ("s", "sft", small_sft), ("m", "sft", large_sft)):
        record = _record(tmp_path, f"{size}_{pipeline}", scores)
        rows.append({"size": size, "pipeline": pipeline, "rl": "none", "seed": 0, "checkpoint": f"{size}{pipeline}",
                     "record": record, **{f: 100 * float(np.mean(s)) for f, s in scores.items()}})
    deltas = table1(pd.DataFrame(rows), ["s", "m"])["deltas"]
    by_name = deltas.set_index(["size", "comparison"])
    sft_gain = by_name.loc[("s", "SFT - instruct")]
    assert sft_gain["mean"] == pytest.approx(10.0) and sft_gain["excludes 0"] and sft_gain["items"] == 600
    assert sft_gain["delta Avg (paper)"] == pytest.approx(56.8 - 59.7)  # Qwen3-VL-4B: SFT below its instruct model
    size_gain = by_name.loc[("m - s", "M - S (sft)")]
    assert size_gain["mean"] == pytest.approx(15.0) and size_gain["excludes 0"]
    assert size_gain["delta Avg (paper)"] == pytest.approx(58.1 - 56.8)  # 8B minus 4B after SFT
    assert by_name.loc[("m - s", "M - S (sft+prism)")]["delta Avg (ours)"] == "-"  # no such cells were run
    assert by_name.loc[("m", "SFT - instruct")]["delta Avg (ours)"] == "-"


def test_a_cells_columns_computed_on_the_cores_equal_one_by_one(monkeypatch):
    """The columns' bootstraps and permutation tests run on a thread per core: each is seeded, so the estimates
    equal a loop's, keyed in the columns' order with Avg last."""
    rng = np.random.default_rng(4)
    a = {f: pd.DataFrame(rng.binomial(1, 0.5, size=(1, 60)) * 100.0) for f in FAMILIES}
    b = {f: pd.DataFrame(rng.binomial(1, 0.6, size=(1, 60)) * 100.0) for f in FAMILIES}
    monkeypatch.setattr(tables, "available_cores", lambda: 2)
    threaded = tables.paired_estimates(a, b, [*FAMILIES, "Avg"])
    assert list(threaded) == [*FAMILIES, "Avg"]
    for family in FAMILIES:
        assert threaded[family] == paired_difference({family: a[family].to_numpy()}, {family: b[family].to_numpy()})
    assert threaded["Avg"] == paired_difference({f: x.to_numpy() for f, x in a.items()},
                                                {f: x.to_numpy() for f, x in b.items()})
    intervals = tables.cell_estimates(a, [*FAMILIES, "Avg"])
    assert list(intervals) == [*FAMILIES, "Avg"]
    assert intervals["chart"] == interval({"chart": a["chart"].to_numpy()})
    assert intervals["Avg"] == interval({f: x.to_numpy() for f, x in a.items()})


def test_each_family_is_set_against_the_answer_its_items_most_often_expect(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "EVAL_ROOT", tmp_path / "evals")
    targets = ["a"] * 16 + ["b"] * 12 + ["c"] * 12  # "a" is right on 40% of the items
    majority_only = np.array([t == "a" for t in targets], dtype=int)  # answers "a" whatever it sees
    learned = np.ones(40, dtype=int)
    scores = {f: (learned if f == "presence" else majority_only) for f in FAMILIES}
    rows = []
    for pipeline, with_targets in (("sft", True), ("sft+prism", False)):
        record = _record(tmp_path, pipeline.replace("+", "_"), scores,
                         dict.fromkeys(FAMILIES, targets) if with_targets else None)
        rows.append({"size": "s", "pipeline": pipeline, "rl": "none", "seed": 0, "checkpoint": pipeline,
                     "record": record, **{f: 100 * float(np.mean(s)) for f, s in scores.items()}})
    out = table1(pd.DataFrame(rows), ["s"])
    majority = out["majority"].set_index(["pipeline", "rl"])
    assert majority.loc[("majority answer", "share % (answer)")]["chart"] == "40.0 (a)"
    sft = majority.loc[("sft", "none")]
    assert sft["chart"].startswith("+0.0 [") and sft["chart"].endswith("p=1")  # no better than the guess
    assert sft["presence"].startswith("+60.0 [") and sft["presence"].endswith("*")  # all 40 right: learned
    assert majority.loc[("sft+prism", "none")]["presence"] == "-"  # its samples carry no targets
    long = out["majority_by_column"].set_index(["pipeline", "column"])
    presence = long.loc[("sft", "presence")]
    assert presence["answer"] == "a" and presence["share"] == pytest.approx(40.0) and presence["items"] == 40
    # 40 of 40 against p = 0.4: P(X = 40); no outcome of the lower tail is as unlikely (P(X = 0) = 0.6^40)
    assert presence["p"] == pytest.approx(0.4**40, rel=1e-6, abs=0)


def test_the_majority_answer_ties_go_to_the_lowest_doc_id():
    scores = {"counting": pd.DataFrame([[100.0, 0.0, 0.0, 100.0]], columns=[0, 1, 2, 3])}
    answers = tables.majority_answers(scores, {"counting": {0: "2", 1: "1", 2: "1", 3: "2"}})
    assert answers == {"counting": ("2", 50.0)}
    assert tables.majority_answers(scores, {"counting": {0: "2", 1: "1"}}) is None  # an item without its answer


def test_ablation_settings_are_set_against_the_majority_answer_too(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(tables, "EVAL_ROOT", tmp_path / "evals")
    targets = ["yes"] * 20 + ["no"] * 20
    guess_yes = np.array([t == "yes" for t in targets], dtype=int)  # 50%: the share of "yes"
    settings = [SimpleNamespace(name="full", group="reference"), SimpleNamespace(name="no_sft", group="stages")]
    rows = []
    for setting, scores in (("full", np.ones(40, dtype=int)), ("no_sft", guess_yes)):
        family_scores = dict.fromkeys(FAMILIES, scores)
        record = _record(tmp_path, setting, family_scores, dict.fromkeys(FAMILIES, targets))
        rows.append({"setting": setting, "seed": 0, "checkpoint": setting, "record": record,
                     **{f: 100 * float(np.mean(s)) for f, s in family_scores.items()}})
    majority = tables.ablation_table(pd.DataFrame(rows), settings)["majority"].set_index("setting")
    assert majority.loc["majority answer"]["presence"] == "50.0 (yes)"
    assert majority.loc["full"]["presence"].startswith("+50.0 [") and majority.loc["full"]["presence"].endswith("*")
    assert majority.loc["no_sft"]["presence"].startswith("+0.0 [") and not majority.loc["no_sft"]["presence"].endswith("*")
