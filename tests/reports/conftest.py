"""Fixtures for the report tests: the bench scripts that read reports, loaded by path (bench/ is not a package), and
evaluation folders as `prism eval` leaves them."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_script():
    """bench_script("paired_runs") -> the module bench/paired_runs.py."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def evaluation_folder():
    """evaluation_folder(root, name, {family: scores}) -> an evaluation folder root/<hash> with those per-item
    scores."""
    def write_evaluation(root: Path, name: str, scores_by_family: dict[str, np.ndarray], key: str = "key0",
                         targets: dict[str, list[str]] | None = None) -> Path:
        """An evaluation folder as `prism eval --out root` leaves it: root/<hash>/prism_embedded-<key>/rows.csv and the
        samples files lmms-eval logged under the checkpoint's folder (with each item's `target` where given)."""
        folder = root / f"hash-{name}"
        entry = folder / f"prism_embedded-{key}"
        (entry / "model").mkdir(parents=True)
        rows = []
        for family, scores in scores_by_family.items():
            task = f"prism_embedded_{family}"
            lines = [json.dumps({"doc_id": i, "accuracy": float(s),
                                 **({"target": targets[family][i]} if targets else {})}) for i, s in enumerate(scores)]
            (entry / "model" / f"20261201_000000_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
            rows.append({"checkpoint": name, "checkpoint_hash": folder.name, "suite": "embedded",
                         "benchmark": "embedded", "task": task, "metric": "accuracy", "value": float(np.mean(scores)),
                         "eval_key": key})
        pd.DataFrame(rows).to_csv(entry / "rows.csv", index=False)
        return folder
    return write_evaluation
