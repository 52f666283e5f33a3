"""`prism reproduce table1 --preset smoke`: the whole DAG (world, every stage, evaluations) and the report, on a tiny
world; a second run recomputes nothing; the HTML report renders in headless Chromium."""

import json
import shutil
import subprocess
from contextlib import chdir
from pathlib import Path

import pandas as pd
import pytest

from prism.cli import main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke table in an empty working folder (outputs/ lands there); returns that folder. One node after
    another in this process: a node process's start (torch, transformers) would cost more than a smoke node's work;
    the parallel launcher is tested in tests/experiments/test_parallel.py."""
    root = tmp_path_factory.mktemp("reproduce")
    with chdir(root):
        assert main(["reproduce", "table1", "--preset", "smoke", "--jobs", "1"]) == 0
    return root


def test_the_report_holds_every_cell_beside_the_paper(smoke):
    report = smoke / "outputs/reports/table1-smoke"
    for name in ("table.md", "table.csv", "table.tex", "deltas.csv", "deltas.tex", "results.csv", "index.html"):
        assert (report / name).is_file(), name
    table = pd.read_csv(report / "table.csv")
    assert len(table) == 18 and set(table["pipeline"]) == {"instruct", "sft", "sft+prism"}
    row = table[(table["size"] == "s") & (table["pipeline"] == "sft") & (table["rl"] == "grpo")].iloc[0]
    assert row["Avg (paper)"] == 61.8 and row["MathVista (paper)"] == 75.7 and row["seeds"] == 1
    m_row = table[(table["size"] == "m") & (table["pipeline"] == "sft+prism") & (table["rl"] == "dapo")].iloc[0]
    assert m_row["Avg (paper)"] == 68.9  # the second size sits beside Qwen3-VL-8B
    deltas = pd.read_csv(report / "deltas.csv")
    assert deltas[(deltas["size"] == "s") & (deltas["rl"] == "grpo")]["delta Avg (paper)"].iloc[0] == pytest.approx(4.4)
    assert r"\begin{tabular}" in (report / "table.tex").read_text() and r"$\pm$" not in (report / "table.tex").read_text()
    # every family of every cell against its items' majority answer, read from lmms-eval's logged targets
    majority = pd.read_csv(report / "majority_by_column.csv")
    assert len(majority) == 18 * 6 and set(majority["column"]) == {"chart", "geometry", "composite", "multichoice",
                                                                    "presence", "counting"}
    presence = majority[majority["column"] == "presence"]
    assert set(presence["answer"]) <= {"yes", "no"} and (presence["share"] >= 50.0).all()
    assert "majority answer" in set(pd.read_csv(report / "majority.csv")["pipeline"])


def test_every_number_comes_from_a_recorded_evaluation(smoke):
    results = pd.read_csv(smoke / "outputs/reports/table1-smoke/results.csv")
    assert len(results) == 18
    records = [json.loads(p.read_text()) for p in (smoke / "outputs/matrix/evals").glob("*.json")]
    by_checkpoint = {r["checkpoint"]: r for r in records}
    for _, row in results.iterrows():
        record = by_checkpoint[row["checkpoint"]]
        families = {r["task"].removeprefix("prism_embedded_"): 100 * float(r["value"]) for r in record["rows"]
                    if r["metric"] == "accuracy" and r["task"] != "prism_embedded"}
        assert len(families) == 6
        assert row["Avg"] == pytest.approx(sum(families.values()) / 6)
        assert Path(smoke / row["checkpoint"]).is_dir() or Path(row["checkpoint"]).is_dir()


def test_a_second_run_recomputes_nothing(smoke):
    first = json.loads((smoke / "outputs/bench/reproduce-table1-smoke.json").read_text())
    assert first["nodes_run"] == first["nodes_total"] == 39
    assert first["jobs"] == 1 and first["cpu_seconds"] > 0 and first["cpu_percent"] > 0
    assert first["host"]["cpu_model"] and first["host"]["cpu_count"] >= 1  # timings are the host's
    with chdir(smoke):
        assert main(["reproduce", "table1", "--preset", "smoke", "--jobs", "1"]) == 0
    second = json.loads((smoke / "outputs/bench/reproduce-table1-smoke.json").read_text())
    assert second["nodes_run"] == 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_html_report_renders_in_headless_chromium(smoke, tmp_path):
    index = smoke / "outputs/reports/table1-smoke/index.html"
    images = index.read_text().count("<img ")
    assert images >= 2
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", index.as_uri()],
        capture_output=True, text=True, timeout=120, check=False).stdout
    assert "<table" in dom and "sft+prism" in dom
    assert f'data-images-loaded="{images}"' in dom  # every figure decoded


def test_submit_bundles_an_evaluated_checkpoint_and_ranks_all(smoke):
    import yaml

    results = pd.read_csv(smoke / "outputs/reports/table1-smoke/results.csv")
    checkpoint = results.sort_values("Avg").iloc[-1]["checkpoint"]
    with chdir(smoke):
        assert main(["submit", checkpoint]) == 0
        assert main(["submit", "outputs/stages"]) == 2  # a folder that was never evaluated: one line, exit 2
    bundle = next((smoke / "outputs/submissions").iterdir())
    predictions = sorted(p.name for p in (bundle / "predictions").iterdir())
    assert predictions == [f"prism_embedded_{f}.jsonl" for f in
                           ("chart", "composite", "counting", "geometry", "multichoice", "presence")]
    first = json.loads((bundle / "predictions/prism_embedded_chart.jsonl").read_text().splitlines()[0])
    assert set(first) == {"doc_id", "id", "prediction", "response"}
    card = (bundle / "README.md").read_text()
    index = yaml.safe_load(card.split("---")[1])["model-index"][0]
    assert len(index["results"]) == 7 and all(r["metrics"][0]["type"] == "accuracy" for r in index["results"])
    board = (smoke / "outputs/leaderboard.md").read_text().splitlines()
    ranked = [line for line in board if line.startswith("| ") and line[2].isdigit()]
    scores = [float(line.split("|")[3].split("±")[0]) for line in ranked]
    assert all("±" in line.split("|")[3] for line in ranked)  # every accuracy with its standard error
    assert len(ranked) >= 10 and scores == sorted(scores, reverse=True)


def test_official_prediction_formats():
    from reports.submit import prediction_files

    samples = [{"doc_id": 0, "doc": {"id": "validation_Art_1"}, "filtered_resps": ["<answer>B</answer>"]},
               {"doc_id": 1, "doc": {"id": "validation_Art_2"}, "filtered_resps": ["The answer is C."]},
               {"doc_id": 2, "doc": {"id": "validation_Art_3"}, "filtered_resps": ["<think>C"]}]
    mmmu = json.loads(prediction_files("prism_mmmu_val", samples)["mmmu_val.json"])
    # an untagged response is read as evaluation reads it (its last line); an opened format without <answer> is ""
    assert mmmu == {"validation_Art_1": "B", "validation_Art_2": "The answer is C.", "validation_Art_3": ""}
    vista = json.loads(prediction_files("prism_mathvista_testmini",
                                         [{"doc_id": 3, "doc": {"pid": "17"}, "filtered_resps": ["<answer>4.5</answer>"]}])
                       ["mathvista_testmini.json"])
    assert vista == {"17": {"response": "<answer>4.5</answer>", "extraction": "4.5"}}
