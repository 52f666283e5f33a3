"""The published benchmarks: tasks resolve offline with the paper's decoding, requests are built from a local
mirror in the benchmark's schema (no download), answers come from <answer>, and the judge is explicit."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from evaluation import published
from evaluation.config import JUDGE_METRICS, PUBLISHED_TASKS, EvalConfig, JudgeConfig, PaperConfig
from evaluation.judge import JudgeError, JudgeUnavailable, judge_equivalent, resolve_judge
from evaluation.scoring import register_tokenizer
from prism.response_format import SYSTEM_PROMPT

SECRET = "sk-test-never-written-1234"


def image(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def _no_judge_in_environment(monkeypatch):
    for name in ("PRISM_JUDGE_BASE_URL", "PRISM_JUDGE_MODEL", "PRISM_JUDGE_API_KEY", "PRISM_JUDGE_API_KEY_ENV"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def manager(lmms_eval):
    from evaluation.runner import task_manager

    return task_manager("paper")


@pytest.fixture(scope="module")
def tokenizer(world):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(world / "tokenizer"))
    register_tokenizer(tok, "world tokenizer")
    return tok


def test_every_published_task_resolves_with_the_paper_decoding(manager):
    names = [*PUBLISHED_TASKS.values(), "prism_mmmu_pro_standard", "prism_mmmu_pro_vision"]
    assert set(names) <= set(manager.all_tasks)
    for name in names:
        if name == "prism_mmmu_pro":
            continue  # the group; its two tasks are checked
        config = manager._get_config(name)  # full mode: the !function hooks are imported, no dataset is read
        gen = config["generation_kwargs"]
        assert (gen["temperature"], gen["top_p"], gen["do_sample"]) == (1.0, 0.7, True), name
        assert callable(config["doc_to_messages"]) and callable(config["process_results"]), name
        metrics = {m["metric"] for m in config["metric_list"]}
        assert {"accuracy", "format_valid_rate", "mean_response_tokens"} <= metrics, name
        judged = any(name == PUBLISHED_TASKS[b] for b in JUDGE_METRICS)
        assert ("judge_accuracy" in metrics) == judged, name
    assert manager._get_config("prism_mathvista_testmini")["dataset_path"] == "AI4Math/MathVista"


def _mathvista_mirror(root):
    """A local folder laid out like the hub's parquet mirror of AI4Math/MathVista (split testmini)."""
    import datasets

    features = datasets.Features({
        "pid": datasets.Value("string"), "query": datasets.Value("string"), "decoded_image": datasets.Image(),
        "answer": datasets.Value("string"), "choices": datasets.Sequence(datasets.Value("string")),
        "question_type": datasets.Value("string"),
    })
    rows = {
        "pid": ["1", "2", "3"],
        "query": ["Hint: answer with a letter.\nQuestion: Which angle?\nChoices:\n(A) 30\n(B) 45",
                  "Question: How many bars?", "Question: Is it red?\nChoices:\n(A) yes\n(B) no"],
        "decoded_image": [image(1), image(2), image(3)],
        "answer": ["45", "7", "no"],
        "choices": [["30", "45"], [], ["yes", "no"]],
        "question_type": ["multi_choice", "free_form", "multi_choice"],
    }
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / "testmini-00000-of-00001.parquet"))
    return root


def test_request_construction_from_a_local_mirror(manager, tmp_path, tokenizer):
    mirror = _mathvista_mirror(tmp_path / "MathVista")
    loaded = manager.load_config({"task": "prism_mathvista_testmini", "dataset_path": str(mirror),
                                  "generation_kwargs": {"max_new_tokens": 64, "temperature": 1.0, "top_p": 0.7, "do_sample": True, "until": []}})
    task = loaded["prism_mathvista_testmini"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    assert len(task.instances) == 3
    ctx, doc_to_messages, gen_kwargs, doc_id, name, split = task.instances[0].args
    assert (name, split, doc_id) == ("prism_mathvista_testmini", "testmini", 0)
    assert gen_kwargs["max_new_tokens"] == 64 and gen_kwargs["temperature"] == 1.0 and gen_kwargs["top_p"] == 0.7
    system, user = doc_to_messages(task.test_docs()[0])
    assert system["content"][0]["text"] == SYSTEM_PROMPT
    assert [p["type"] for p in user["content"]] == ["image", "text"]
    assert user["content"][1]["text"].startswith("Hint: answer with a letter.")
    # a choice answer may be the letter or the option's text; the answer is read from <answer>, or from the last
    # line of a response with no response tags (an instruct model's plain answer)
    doc = task.test_docs()[0]
    rule = lambda text: published.process_results("mathvista_testmini", doc, [text], judged=False)  # noqa: E731
    assert rule("<answer>B</answer>")["accuracy"] == 1.0
    assert rule("<answer>45</answer>")["accuracy"] == 1.0
    assert rule("<answer>A</answer>")["accuracy"] == 0.0
    assert rule("The answer is B")["accuracy"] == 1.0
    assert rule("<think>The answer is B")["accuracy"] == 0.0


def test_hooks_of_the_other_benchmarks_on_schema_docs(tokenizer):
    mmmu = {"question": "See <image 2> and <image 1>. Which?", "options": "['1', '2', '3']", "answer": "C",
            "question_type": "multiple-choice", "image_1": image(1), "image_2": image(2), "image_3": None}
    assert len(published.mmmu_visual(mmmu)) == 2
    assert "C. 3" in published.mmmu_text(mmmu)
    assert published.process_results("mmmu_val", mmmu, ["<answer>3</answer>"], judged=False)["accuracy"] == 1.0
    open_ended = {**mmmu, "question_type": "open", "options": "[]", "answer": "['24', '24.0']"}
    assert published.mmmu_target(open_ended).equivalents == ("24.0",)
    vision = {"image": image(4), "options": "['a', 'b']", "answer": "B"}  # MMMU-Pro vision: no question field
    assert len(published.mmmu_visual(vision)) == 1 and "image" in published.mmmu_text(vision)
    hb = {"question": "Is the sky green?", "gt_answer": "0", "image": image(5), "category": "VS",
          "subcategory": "chart", "set_id": 1, "figure_id": 1, "question_id": 0}
    scores = published.process_results("hallusion_bench_image", hb, ["<answer>No, it is blue.</answer>"], judged=False)
    assert scores["accuracy"] == 1.0 and scores["question_pair_acc"] == {"group": "VS_chart_1_0", "correct": 1.0}
    mathvision = {"question": "Area?", "options": ["2", "4"], "answer": "B", "decoded_image": image(6)}
    assert "B. 4" in published.mathvision_text(mathvision)
    assert published.process_results("mathvision_testmini", mathvision, ["<answer>4</answer>"], judged=False)["accuracy"] == 1.0
    wemath = {"question": "Length?", "option": "A. 1; B. 2", "answer": "B", "image_path": image(7)}
    assert published.process_results("wemath_testmini_reasoning", wemath, ["<answer>B</answer>"], judged=False)["accuracy"] == 1.0
    mathverse = {"query_cot": "Find x.", "question": "", "answer": "5", "image": ""}
    assert published.mathverse_visual(mathverse) == []  # text-only versions have no image


def test_judge_dependent_metric_without_a_judge_fails_with_one_line(checkpoint, tmp_path):
    from evaluation.runner import run_eval

    def no_model(cfg, path):
        raise AssertionError("the judge check must come before any model is loaded")

    with pytest.raises(JudgeUnavailable) as info:
        run_eval(checkpoint, "paper", out_root=tmp_path, config=EvalConfig(), model_factory=no_model)
    message = str(info.value)
    print(f"\n{type(info.value).__name__}: {message}")
    assert message.startswith("prism_mathvista_testmini: metric 'judge_accuracy' needs an OpenAI-compatible judge endpoint")
    assert "PRISM_JUDGE_BASE_URL" in message and "paper.judge_metrics=false" in message and "\n" not in message
    # inside lmms-eval the hook refuses too, rather than scoring 0
    doc = {"query": "Q", "decoded_image": image(), "answer": "1", "choices": None}
    with pytest.raises(JudgeUnavailable):
        published.process_results("mathvista_testmini", doc, ["<answer>1</answer>"], judged=True)


def test_rule_based_paper_suite_needs_no_judge():
    from evaluation.runner import plan_suite

    entries = plan_suite("paper", EvalConfig(paper=PaperConfig(judge_metrics=False)), None, None)
    assert [e.benchmark for e in entries] == list(PUBLISHED_TASKS)
    assert all(e.judge_metrics == () for e in entries)
    hallusion = next(e for e in entries if e.benchmark == "hallusion_bench_image")
    assert {m["metric"] for m in hallusion.overrides["metric_list"]} == {
        "accuracy", "format_valid_rate", "mean_response_tokens", "question_pair_acc", "figure_acc"}
    assert hallusion.overrides["generation_kwargs"]["max_new_tokens"] == 8192


class _Judge(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        type(self).seen.append({"authorization": self.headers.get("Authorization"), "model": body["model"]})
        reference = prompt.split("Reference answer: ")[1].split("\n")[0]
        answer = prompt.split("Model's final answer: ")[1].split("\n")[0]
        verdict = "yes" if reference.split(" ")[0] == answer or f"({answer})" in reference else "no"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_server():
    _Judge.seen = []
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_client(judge_server, monkeypatch):
    monkeypatch.setenv("PRISM_JUDGE_API_KEY", SECRET)
    judge = resolve_judge(JudgeConfig(base_url=judge_server, model="tiny-judge"))
    assert judge_equivalent(judge, "Which?", "B (45)", "45") is True
    assert judge_equivalent(judge, "Which?", "7", "8") is False
    assert judge_equivalent(judge, "Which?", "7", None) is False  # no answer: no request
    assert _Judge.seen == [{"authorization": f"Bearer {SECRET}", "model": "tiny-judge"}] * 2
    assert SECRET not in json.dumps(judge.describe())
    with pytest.raises(JudgeError, match="unreachable"):
        judge_equivalent(resolve_judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", timeout_s=2)), "q", "1", "1")


class _ScriptedModel:
    """A chat-interface lmms-eval model answering B in the PRISM format, recording what it was asked."""

    def __new__(cls):
        from lmms_eval.api.model import lmms

        class Scripted(lmms):
            is_simple = False

            def __init__(self):
                super().__init__()
                self.asked = []

            def generate_until(self, requests):
                out = []
                for request in requests:
                    _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
                    self.asked.append((doc_to_messages(self.task_dict[task][split][doc_id]), gen_kwargs))
                    out.append("<caption>\n- a chart\n</caption>\n<think>\nlook\n</think>\n<answer>B</answer>")
                return out

            def loglikelihood(self, requests):
                raise NotImplementedError

            def generate_until_multi_round(self, requests):
                raise NotImplementedError

        return Scripted()


def test_judged_paper_task_end_to_end_keeps_the_key_out_of_every_file(lmms_eval, checkpoint, tmp_path, judge_server, monkeypatch, tokenizer):
    from evaluation.results import read_store
    from evaluation.runner import run_eval

    monkeypatch.setenv("PRISM_JUDGE_API_KEY", SECRET)
    mirror = _mathvista_mirror(tmp_path / "MathVista")
    cfg = EvalConfig(
        paper=PaperConfig(tasks=["mathvista_testmini"], dataset_paths={"mathvista_testmini": str(mirror)},
                          max_new_tokens={"mathvista_testmini": 32}),
        judge=JudgeConfig(base_url=judge_server, model="tiny-judge"),
    )
    model = _ScriptedModel()
    out = tmp_path / "evals"
    report = run_eval(checkpoint, "paper", out_root=out, config=cfg, model_factory=lambda c, p: model)
    assert report.evaluated == ["prism_mathvista_testmini"]
    messages, gen_kwargs = model.asked[0]
    assert messages[0]["content"][0]["text"] == SYSTEM_PROMPT
    assert (gen_kwargs["temperature"], gen_kwargs["top_p"], gen_kwargs["max_new_tokens"]) == (1.0, 0.7, 32)
    values = read_store(out / "results.csv").set_index("metric")["value"]
    # B is the option "45" of question 1 and "no" of question 3; question 2 wants 7
    assert values["accuracy"] == pytest.approx(2 / 3)
    assert values["format_valid_rate"] == 1.0
    assert values["judge_accuracy"] == pytest.approx(2 / 3)
    assert len(_Judge.seen) == 3 and all(s["authorization"] == f"Bearer {SECRET}" for s in _Judge.seen)
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="ignore"), path


def _parquet_mirror(root, split, rows, features):
    """A local folder laid out like a hub dataset's parquet mirror: data/<split>-00000-of-00001.parquet."""
    import datasets

    (root / "data").mkdir(parents=True)
    table = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_published_tasks_carry_the_benchmarks_ids_into_lmms_eval_saved_samples(lmms_eval, checkpoint, tmp_path,
                                                                               tokenizer):
    """lmms-eval 0.7.3 saves samples without their document; the tasks' own ids survive (as `submission`), and
    `prism submit` keys the official files by them, from the folder exactly as `prism eval` left it."""
    import datasets

    from evaluation.results import read_store, samples_files
    from evaluation.runner import run_eval
    from reports.submit import submission_bundle

    text = datasets.Value("string")
    mmmu = _parquet_mirror(tmp_path / "MMMU", "validation", {
        "id": ["validation_Art_1", "validation_Art_2"], "question": ["<image 1> Which?", "<image 1> Which one?"],
        "options": ["['a', 'b']", "['c', 'd']"], "answer": ["B", "A"],
        "question_type": ["multiple-choice", "multiple-choice"], "image_1": [image(1), image(2)],
    }, {"id": text, "question": text, "options": text, "answer": text, "question_type": text,
        "image_1": datasets.Image()})
    fields = ("category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note", "question_id",
              "question", "gt_answer_details", "gt_answer", "filename")
    hallusion = _parquet_mirror(tmp_path / "HallusionBench", "image", {
        **{name: ["VD", "VD"] if name == "category" else [f"{name}-0", f"{name}-1"] for name in fields},
        "gt_answer": ["1", "0"], "image": [image(3), image(4)],
    }, {**{name: text for name in fields}, "image": datasets.Image()})
    cfg = EvalConfig(paper=PaperConfig(
        tasks=["mmmu_val", "hallusion_bench_image"], judge_metrics=False,
        dataset_paths={"mmmu_val": str(mmmu), "hallusion_bench_image": str(hallusion)},
        max_new_tokens={"mmmu_val": 16, "hallusion_bench_image": 16}))
    out = tmp_path / "evals"
    report = run_eval(checkpoint, "paper", out_root=out, config=cfg, model_factory=lambda c, p: _ScriptedModel())
    assert report.evaluated == ["prism_mmmu_val", "prism_hallusion_bench_image"]

    saved = {}
    for outcome in report.outcomes:
        for task, path in samples_files(outcome.directory).items():
            assert path.parent.name == f"{checkpoint.parent.name}__policy"  # lmms-eval's <model_name_sanitized>/
            saved[task] = [json.loads(line) for line in path.read_text().splitlines()]
    assert all("doc" not in sample for samples in saved.values() for sample in samples)
    assert [s["submission"] for s in saved["prism_mmmu_val"]] == [{"id": f"validation_Art_{i}"} for i in (1, 2)]
    first = saved["prism_hallusion_bench_image"][0]["submission"]
    assert first == {name: {"category": "VD", "gt_answer": "1"}.get(name, f"{name}-0") for name in fields}
    assert set(read_store(out / "results.csv").metric) == {  # the record is no metric
        "accuracy", "format_valid_rate", "mean_response_tokens", "question_pair_acc", "figure_acc"}

    bundle = submission_bundle(checkpoint, out_root=tmp_path / "submissions", eval_root=out)
    assert json.loads((bundle / "predictions/mmmu_val.json").read_text()) == {
        "validation_Art_1": "B", "validation_Art_2": "B"}
    records = json.loads((bundle / "predictions/hallusion_bench_image.json").read_text())
    assert [r["question_id"] for r in records] == ["question_id-0", "question_id-1"]
    assert records[0]["model_prediction"].endswith("<answer>B</answer>")
