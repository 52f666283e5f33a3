"""The local leaderboard (standard errors shown, a `--limit` evaluation never displaces a full one, the newest full
one wins across date formats) and the official prediction files, built from samples in lmms-eval 0.7.3's saved
layout: written by its own EvaluationTracker, which drops the document."""

import json

import pandas as pd
import pytest

from reports.submit import SubmitError, prediction_files, write_leaderboard


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


def test_the_newest_full_evaluation_wins_across_date_formats(tmp_path):
    """lmms-eval's `20261201_110000` (written now) beside the `20261201T120000_000000Z` written before: by time."""
    rows = [
        _evaluation(tmp_path, "aaaa", "k1", 0.50, 300, None, "20261201T120000_000000Z", "ckpt-a"),  # newer
        _evaluation(tmp_path, "aaaa", "k2", 0.30, 300, None, "20261201_110000", "ckpt-a"),
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    board = write_leaderboard(tmp_path, tmp_path / "leaderboard.md").read_text().splitlines()
    (row,) = [line.split("|") for line in board if line.startswith("| 1 ")]
    assert row[3].strip() == "50.00 ± 2.00" and row[7].strip() == "20261201T120000_000000Z"


def test_submit_refuses_an_unevaluated_checkpoint_and_leaves_nothing(tmp_path):
    from reports.submit import submission_bundle

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    evals, out = tmp_path / "evals", tmp_path / "submissions"
    with pytest.raises(SubmitError, match="no finished evaluation"):
        submission_bundle(checkpoint, out_root=out, eval_root=evals)
    assert not evals.exists() and not out.exists()


# Documents as each benchmark publishes them (images left out: lmms-eval saves none).
DOCS = {
    "mmmu_val": [
        {"id": "validation_Art_1", "question": "<image 1> Which?", "options": "['a', 'b']", "answer": "B",
         "question_type": "multiple-choice"},
        {"id": "validation_Art_2", "question": "<image 1> Which one?", "options": "['c', 'd']", "answer": "A",
         "question_type": "multiple-choice"},
    ],
    "mathvista_testmini": [{"pid": "17", "query": "Question: How long?", "answer": "4.5", "choices": None,
                            "question_type": "free_form"}],
    "mathverse_testmini": [
        {"sample_index": "3421", "problem_index": "685", "problem_version": "Text Dominant", "question": "Find L.",
         "answer": "14", "question_type": "free-form", "query_wo": "Answer: Find L.", "query_cot": "Reason: Find L.",
         "metadata": {"split": "testmini", "subject": "Solid Geometry", "subfield": "Length"},
         "question_for_eval": "Find L."},
    ],
    "mathvision_testmini": [
        {"id": "1", "question": "Which?", "options": ["1", "2", "3"], "answer": "C", "level": 2, "subject": "logic"},
        {"id": "2", "question": "How many?", "options": [], "answer": "7", "level": 1, "subject": "counting"},
    ],
    "wemath_testmini_reasoning": [
        {"ID": "2steps_10", "split": "testmini", "knowledge concept": "Area", "question": "Area?",
         "option": "A. 1;B. 2", "answer": "B", "key": "2steps_1", "question number": 7, "knowledge concept description": "Area of ..."},
    ],
    "hallusion_bench_image": [
        {"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0", "figure_id": "1",
         "sample_note": "circle", "question_id": "2", "question": "Is the right circle larger?",
         "gt_answer_details": "They are the same size.", "gt_answer": "0", "filename": "./VD/illusion/0_1.png"},
    ],
    "mmmu_pro": [{"id": "test_Art_7", "question": "Which?", "options": "['a', 'b', 'c']", "answer": "C"}],
}
TASK = {"mmmu_pro": "prism_mmmu_pro_standard"}  # a task of the group; the others are named prism_<benchmark>


def saved_samples(tmp_path, benchmark, responses):
    """`<date>_samples_<task>.jsonl` read back, as lmms-eval 0.7.3 writes it: the sample its evaluator logs (document,
    target, arguments, responses and what the task's process_results returned) saved by its EvaluationTracker."""
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

    from evaluation.scoring import clear_response_tokens, note_response_tokens
    from evaluation.tasks.published.utils import process_results

    task = TASK.get(benchmark, f"prism_{benchmark}")
    logged = []
    for doc_id, (doc, response) in enumerate(zip(DOCS[benchmark], responses)):
        note_response_tokens(response, 5)  # as the prism adapters record each response's generated tokens
        logged.append({
            "doc_id": doc_id, "doc": doc, "target": doc.get("answer", doc.get("gt_answer")),  # the YAML's doc_to_target
            "arguments": ["<question>", {"max_new_tokens": 16}, doc_id, task, "test"],
            "resps": [[response]], "filtered_resps": [response], "token_counts": [None], "doc_hash": f"{doc_id:064x}",
            **process_results(benchmark, doc, [response], judged=False),
        })
    clear_response_tokens()
    tracker = EvaluationTracker(output_path=str(tmp_path))
    tracker.general_config_tracker.log_experiment_args(
        model_source="prism_hf", model_args="pretrained=/runs/sft/model,seed=0,dtype=float32", system_instruction=None,
        chat_template=None, fewshot_as_multiturn=False)
    tracker.save_results_aggregated(results={}, samples={task: logged}, datetime_str="20260105_143000")
    tracker.save_results_samples(task_name=task, samples=logged)
    path = tmp_path / "sft__model" / f"20260105_143000_samples_{task}.jsonl"
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    assert samples and all("doc" not in sample for sample in samples)  # the real layout: no document
    return task, samples


def test_official_files_are_keyed_by_each_benchmarks_own_ids(lmms_eval_installed, tmp_path):
    right, untagged = "<think>\nI see it.\n</think>\n<answer>B</answer>", "The answer is C."
    task, samples = saved_samples(tmp_path / "mmmu", "mmmu_val", [right, untagged])
    # an untagged response is read as evaluation reads it (its last line)
    assert json.loads(prediction_files(task, samples)["mmmu_val.json"]) == {
        "validation_Art_1": "B", "validation_Art_2": "The answer is C."}

    task, samples = saved_samples(tmp_path / "vista", "mathvista_testmini", ["<answer>4.5</answer>"])
    assert json.loads(prediction_files(task, samples)["mathvista_testmini.json"]) == {
        "17": {"response": "<answer>4.5</answer>", "extraction": "4.5"}}

    # MathVerse's output_testmini.json: the benchmark's records, each with the model's answer
    task, samples = saved_samples(tmp_path / "verse", "mathverse_testmini", ["<answer>14</answer>"])
    (record,) = json.loads(prediction_files(task, samples)["mathverse_testmini.json"])
    assert record == {**{k: v for k, v in DOCS["mathverse_testmini"][0].items() if k != "question_for_eval"},
                      "model_answer": "<answer>14</answer>", "extraction": "14"}

    # MATH-V's outputs/Random-Chance.jsonl: id, model, response, model_answer, correct
    responses = ["<answer>C</answer>", "<answer>8</answer>"]
    task, samples = saved_samples(tmp_path / "vision", "mathvision_testmini", responses)
    lines = prediction_files(task, samples, model="sft-1a2b3c4d")["mathvision_testmini.jsonl"].splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": "1", "model": "sft-1a2b3c4d", "response": "<answer>C</answer>", "model_answer": "C", "correct": True},
        {"id": "2", "model": "sft-1a2b3c4d", "response": "<answer>8</answer>", "model_answer": "8", "correct": False}]

    # We-Math's result JSON: its records with the response
    task, samples = saved_samples(tmp_path / "wemath", "wemath_testmini_reasoning", ["<answer>B</answer>"])
    (record,) = json.loads(prediction_files(task, samples)["wemath_testmini_reasoning.json"])
    assert record == {**DOCS["wemath_testmini_reasoning"][0], "response": "<answer>B</answer>"}

    # HallusionBench's HallusionBench_result.json: its records with model_prediction
    task, samples = saved_samples(tmp_path / "hallusion", "hallusion_bench_image", ["<answer>no</answer>"])
    (record,) = json.loads(prediction_files(task, samples)["hallusion_bench_image.json"])
    assert record == {**DOCS["hallusion_bench_image"][0], "model_prediction": "<answer>no</answer>"}

    # no official format: one line per sample, with the benchmark's id beside lmms-eval's doc_id
    task, samples = saved_samples(tmp_path / "pro", "mmmu_pro", ["<answer>C</answer>"])
    (line,) = prediction_files(task, samples)["prism_mmmu_pro_standard.jsonl"].splitlines()
    assert json.loads(line) == {"doc_id": 0, "id": "test_Art_7", "prediction": "C", "response": "<answer>C</answer>"}


def test_samples_without_the_benchmarks_ids_are_refused_with_one_line(lmms_eval_installed, tmp_path):
    """Samples saved before the tasks carried the ids hold only lmms-eval's doc_id: no file keyed "0", "1"."""
    task, samples = saved_samples(tmp_path, "mmmu_val", ["<answer>B</answer>", "<answer>A</answer>"])
    for sample in samples:
        sample.pop("submission")
    with pytest.raises(SubmitError) as info:
        prediction_files(task, samples)
    assert str(info.value).startswith("prism_mmmu_val: samples without the benchmark's id ")
    assert "evaluate the checkpoint again" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def lmms_eval_installed():
    return pytest.importorskip("lmms_eval")
