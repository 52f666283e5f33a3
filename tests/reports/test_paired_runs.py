"""bench/paired_runs.py: two runs of a matrix, paired cell by cell on the same items and seeds."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.tables import FAMILIES


def _run(root: Path, cells: dict[str, dict[str, np.ndarray]]) -> Path:
    """A run folder as a report leaves it: results.csv naming each cell's record, records and samples files under
    outputs/, every path relative to the folder."""
    rows = []
    for name, scores_by_family in cells.items():
        digest, key = f"hash-{name}", f"key{name}"
        entry = root / "outputs" / "evals" / digest / f"prism_embedded-{key}"
        entry.mkdir(parents=True)
        records = []
        for family, scores in scores_by_family.items():
            task = f"prism_embedded_{family}"
            lines = [json.dumps({"doc_id": i, "accuracy": float(s)}) for i, s in enumerate(scores)]
            (entry / f"20261201T000000_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
            records.append({"benchmark": "embedded", "task": task, "metric": "accuracy",
                            "value": float(np.mean(scores)), "checkpoint_hash": digest, "eval_key": key})
        record = Path("outputs") / "matrix" / "evals" / f"{name}.json"
        (root / record).parent.mkdir(parents=True, exist_ok=True)
        (root / record).write_text(json.dumps({"rows": records}))
        accuracies = {f: 100 * float(np.mean(s)) for f, s in scores_by_family.items()}
        rows.append({"size": "s", "pipeline": name, "rl": "none", "seed": 0, "checkpoint": name,
                     "record": str(record), **accuracies, "Avg": float(np.mean(list(accuracies.values())))})
    report = root / "outputs" / "reports" / "table1-embedded"
    report.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(report / "results.csv", index=False)
    return root


def test_a_known_change_on_the_same_items_is_recovered_and_unchanged_cells_pair_to_zero(tmp_path, capsys, bench_script):
    rng = np.random.default_rng(0)
    sft = {f: rng.binomial(1, 0.5, size=100) for f in FAMILIES}
    presence = sft["presence"].copy()
    presence[np.flatnonzero(presence == 0)[:30]] = 1  # +30 points on presence, the other items unchanged
    run_a = _run(tmp_path / "a", {"sft": sft})
    run_b = _run(tmp_path / "b", {"sft": {**sft, "presence": presence}, "prism": sft})  # prism: in B only
    out = tmp_path / "paired.json"
    bench_script("paired_runs").main([str(run_a), str(run_b), "--out", str(out)])

    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["cell"] == ["s", "sft", "none"]
    assert cell["presence"]["delta"]["mean"] == pytest.approx(30.0)
    assert cell["presence"]["delta"]["low"] > 0 and cell["presence"]["delta"]["p_value"] < 0.001
    assert cell["presence"]["accuracy"]["mean"] == pytest.approx(100 * presence.mean())
    assert cell["Avg"]["delta"]["mean"] == pytest.approx(30.0 / len(FAMILIES))
    for family in (f for f in FAMILIES if f != "presence"):
        assert cell[family]["delta"]["mean"] == 0 and cell[family]["delta"]["p_value"] == 1
    assert "| s / sft / none |" in capsys.readouterr().out


def test_a_run_without_its_report_is_named(tmp_path, bench_script):
    with pytest.raises(SystemExit, match="results.csv not found"):
        bench_script("paired_runs").main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "p.json")])
