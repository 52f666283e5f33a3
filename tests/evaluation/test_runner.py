"""run_eval end to end on an untrained checkpoint: lmms-eval's files kept where its CLI puts them, rows stored,
re-runs skipped, the same seed giving the same results, and the parser checked on the results JSON lmms-eval wrote."""

import json
import math
import re

import pandas as pd
import pytest

from evaluation.config import EMBEDDED_GROUP, EMBEDDED_TASKS, DecodingConfig, EvalConfig, EvalError
from evaluation.results import STORE_COLUMNS, metrics_table, parse_results, read_store, results_files, samples_files
from evaluation.runner import checkpoint_hash, model_args_string, model_arguments, run_eval

CFG = EvalConfig(embedded=DecodingConfig(max_new_tokens=24), batch_size=16)
LIMIT = 4
METRICS = {"accuracy", "format_valid_rate", "mean_response_tokens"}


@pytest.fixture(scope="module")
def first(lmms_eval, checkpoint, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("evals")
    report = run_eval(checkpoint, "embedded", limit=LIMIT, world=world, out_root=out, config=CFG)
    return report, out


def _samples(directory):
    return {task: [json.loads(line) for line in path.read_text().splitlines()]
            for task, path in samples_files(directory).items()}


def test_lmms_eval_files_manifest_and_store(first, checkpoint):
    report, out = first
    (outcome,) = report.outcomes
    assert outcome.status == "evaluated" and outcome.samples == LIMIT * len(EMBEDDED_TASKS)
    assert report.checkpoint_hash == checkpoint_hash(checkpoint)
    assert outcome.directory.parent == out / report.checkpoint_hash
    assert outcome.directory.name.startswith(f"{EMBEDDED_GROUP}-")
    assert (outcome.directory / "DONE").is_file()
    assert len(results_files(outcome.directory)) == 1
    samples = _samples(outcome.directory)
    assert sorted(samples) == sorted(EMBEDDED_TASKS.values())
    assert all(len(lines) == LIMIT for lines in samples.values())
    line = samples["prism_embedded_counting"][0]
    assert {"accuracy", "format_valid_rate", "mean_response_tokens"} <= set(line)
    assert line["token_counts"][0]["output_tokens"] >= 1  # the adapter's exact count, kept by lmms-eval
    manifest = json.loads((outcome.directory / "eval.json").read_text())
    assert manifest["checkpoint"] == str(checkpoint.resolve()) and manifest["limit"] == LIMIT
    assert manifest["config"]["embedded"]["max_new_tokens"] == 24

    store = read_store(out / "results.csv")
    assert list(store.columns) == list(STORE_COLUMNS)
    assert set(store.task) == {EMBEDDED_GROUP, *EMBEDDED_TASKS.values()}
    presence = store[store.task == "prism_embedded_presence"]
    assert set(presence.metric) == METRICS | {"question_pair_acc"}
    group = store[store.task == EMBEDDED_GROUP].set_index("metric")
    assert set(group.index) == METRICS and group.loc["accuracy", "n"] == LIMIT * len(EMBEDDED_TASKS)
    assert (store[store.task != EMBEDDED_GROUP].n == LIMIT).all()
    # an untrained policy writes no tagged format and reads at most the chance answer by luck
    assert group.loc["format_valid_rate", "value"] == 0.0
    assert 0.0 <= group.loc["accuracy", "value"] <= 0.5
    assert 1 <= group.loc["mean_response_tokens", "value"] <= 24  # generated tokens, never more than the budget
    for task, lines in samples.items():  # the metric is the mean of the exact counts the adapter reported
        exact = sum(line["token_counts"][0]["output_tokens"] for line in lines) / len(lines)
        value = store[(store.task == task) & (store.metric == "mean_response_tokens")].value.item()
        assert value == pytest.approx(exact)
    print("\n" + metrics_table(report.rows))


def test_second_run_evaluates_nothing(first, checkpoint, world):
    report, out = first
    before = (out / "results.csv").read_text()

    def no_model(cfg, path):
        raise AssertionError("a finished evaluation must not load the model")

    again = run_eval(checkpoint, "embedded", limit=LIMIT, world=world, out_root=out, config=CFG, model_factory=no_model)
    assert again.evaluated == [] and again.skipped == [EMBEDDED_GROUP]
    assert (out / "results.csv").read_text() == before  # nothing appended
    assert pd.DataFrame(again.rows).equals(pd.DataFrame(report.rows))
    # a different decoding is another evaluation, and so is another limit
    other = run_eval(checkpoint, "embedded", limit=2, world=world, out_root=out, config=CFG)
    assert other.evaluated == [EMBEDDED_GROUP]
    assert len(list((out / report.checkpoint_hash).glob(f"{EMBEDDED_GROUP}-*"))) == 2


def test_same_checkpoint_and_seed_give_identical_results(first, checkpoint, world, tmp_path):
    report, _ = first
    twin = run_eval(checkpoint, "embedded", limit=LIMIT, world=world, out_root=tmp_path, config=CFG)
    assert twin.outcomes[0].status == "evaluated"
    values = lambda r: {(row["task"], row["metric"]): row["value"] for row in r.rows}  # noqa: E731
    assert values(twin) == values(report)
    responses = lambda d: {t: [s["filtered_resps"] for s in lines] for t, lines in _samples(d).items()}  # noqa: E731
    assert responses(twin.outcomes[0].directory) == responses(report.outcomes[0].directory)


def test_results_lie_and_read_as_lmms_eval_cli_writes_them(first, checkpoint):
    """The folder is what `lmms-eval --model prism_hf --model_args <ours> --output_path <folder> --log_samples
    --timezone UTC` writes: <model_name_sanitized>/<date>_results.json and _samples_<task>.jsonl, its names and
    date format, model name and arguments filled; the arguments are a string lmms-eval's CLI parses back."""
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lmms_eval.utils import simple_parse_args_string

    report, _ = first
    directory = report.outcomes[0].directory
    (path,) = results_files(directory)
    raw = json.loads(path.read_text())
    model_args = model_args_string(model_arguments(CFG, checkpoint.resolve()))
    assert model_args == f"pretrained={checkpoint.resolve()},seed=0,dtype=float32"
    assert raw["config"]["model"] == raw["model_source"] == "prism_hf"
    assert raw["config"]["model_args"] == model_args
    parsed = simple_parse_args_string(model_args)  # what the CLI hands PrismHF, beside --batch_size and --device
    assert parsed == {"pretrained": str(checkpoint.resolve()), "seed": 0, "dtype": "float32"}
    cli = GeneralConfigTracker()  # what the CLI's tracker derives from the same --model_args
    cli.log_experiment_args(model_source="prism_hf", model_args=model_args, system_instruction=None,
                            chat_template=None, fewshot_as_multiturn=False)
    assert raw["model_name"] == cli.model_name == str(checkpoint.resolve())
    assert raw["model_name_sanitized"] == cli.model_name_sanitized == f"{checkpoint.parent.name}__policy"
    assert (raw["config"]["batch_size"], raw["config"]["device"], raw["config"]["limit"]) == (16, "cpu", LIMIT)
    assert re.fullmatch(r"\d{8}_\d{6}", raw["date"])  # lmms-eval's get_datetime_str format
    folder = directory / raw["model_name_sanitized"]
    assert path == folder / f"{raw['date']}_results.json"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [path.name, *(f"{raw['date']}_samples_{task}.jsonl" for task in EMBEDDED_TASKS.values())])
    assert "doc" not in _samples(directory)["prism_embedded_chart"][0]  # lmms-eval 0.7.3 saves no document


def test_vllm_model_args_parse_back_into_the_models_arguments(lmms_eval, tmp_path):
    """`--model prism_vllm --model_args <ours>` gives PrismVLLM what `prism eval` built it with; unset ones are left
    out (the model's default), and the batch size stays the CLI's own --batch_size."""
    import inspect

    from lmms_eval.utils import simple_parse_args_string

    from evaluation.config import VLLMConfig
    from evaluation.vllm_model import PrismVLLM

    cfg = EvalConfig(backend="vllm", dtype="bfloat16", seed=3, vllm=VLLMConfig(max_model_len=16384))
    args = model_arguments(cfg, tmp_path / "model")
    text = model_args_string(args)
    assert text == (f"pretrained={tmp_path / 'model'},seed=3,dtype=bfloat16,tensor_parallel_size=1,"
                    "gpu_memory_utilization=0.85,max_model_len=16384,max_images_per_prompt=8")
    assert simple_parse_args_string(text) == args
    bound = inspect.signature(PrismVLLM).bind(**simple_parse_args_string(text), batch_size=cfg.batch_size)
    assert "chat_template" not in bound.arguments and bound.arguments["batch_size"] == 64


def test_parser_reads_lmms_eval_results_json(first):
    report, _ = first
    (path,) = results_files(report.outcomes[0].directory)
    raw = json.loads(path.read_text())
    assert {"results", "n-samples", "configs", "versions", "group_subtasks", "lmms_eval_version"} <= set(raw)
    rows = parse_results(path, checkpoint="ckpt", checkpoint_hash="h", suite="embedded")
    assert {row["checkpoint"] for row in rows} == {"ckpt"}
    by_key = {(row["task"], row["metric"]): row for row in rows}
    for task in EMBEDDED_TASKS.values():
        for metric in METRICS:
            row = by_key[(task, metric)]
            assert row["value"] == raw["results"][task][f"{metric},none"]
            stderr = raw["results"][task][f"{metric}_stderr,none"]
            assert (math.isnan(row["stderr"]) if stderr == "N/A" else row["stderr"] == stderr)
            assert row["n"] == raw["n-samples"][task]["effective"] == LIMIT
    assert by_key[(EMBEDDED_GROUP, "accuracy")]["n"] == LIMIT * len(EMBEDDED_TASKS)
    assert ("prism_embedded_presence", "question_pair_acc") in by_key


def test_user_mistakes_are_one_line(checkpoint, world, tmp_path):
    cases = [
        (dict(checkpoint=tmp_path / "nothing"), "does not exist"),
        (dict(world=tmp_path), "not a world export"),
        (dict(limit=0), "--limit"),
        (dict(suite="nope"), "unknown suite"),
    ]
    for kwargs, words in cases:
        args = {"checkpoint": checkpoint, "suite": "embedded", "world": world, "out_root": tmp_path / "evals", **kwargs}
        with pytest.raises(EvalError) as info:
            run_eval(**args)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_a_hub_id_checkpoint_offline_and_not_cached_is_one_line(world, tmp_path, monkeypatch):
    """The instruct row of a full-world matrix evaluates a Hub id: offline with an empty cache, one line."""
    from prism.hub import HubError

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(HubError) as info:
        run_eval("Qwen/Qwen3-VL-4B-Instruct", "embedded", world=world, out_root=tmp_path / "evals")
    message = str(info.value)
    assert "\n" not in message and "hf download Qwen/Qwen3-VL-4B-Instruct" in message
    assert "set --checkpoint=DIR" in message and not (tmp_path / "evals").exists()


def test_checkpoint_hash_follows_the_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"1")
    (tmp_path / ".lock").write_bytes(b"x")
    first = checkpoint_hash(tmp_path, tmp_path.parent / "cache.json")
    assert first == checkpoint_hash(tmp_path, tmp_path.parent / "cache.json")  # from the cache
    (tmp_path / ".lock").write_bytes(b"y")  # hidden files do not count
    assert checkpoint_hash(tmp_path) == first
    (tmp_path / "a.bin").write_bytes(b"22")
    assert checkpoint_hash(tmp_path, tmp_path.parent / "cache.json") != first


def test_metrics_table_columns_have_a_fixed_order():
    rows = [{"task": "t", "metric": m, "value": v, "stderr": "nan", "n": 2}
            for m, v in (("mean_response_tokens", 12.0), ("question_pair_acc", 0.5), ("format_valid_rate", 1.0),
                         ("accuracy", 0.25))]
    header = metrics_table(rows).splitlines()[0].split()
    assert header == ["task", "n", "accuracy", "format_valid_rate", "mean_response_tokens", "question_pair_acc"]
    assert metrics_table(list(reversed(rows))).splitlines()[0].split() == header


def test_a_model_that_fails_to_load_leaves_the_output_folder_untouched(checkpoint, world, tmp_path):
    out = tmp_path / "evals"

    def broken(cfg, path):
        raise EvalError(f"{path}: cannot load")

    with pytest.raises(EvalError, match="cannot load"):
        run_eval(checkpoint, "embedded", limit=1, world=world, out_root=out, config=CFG, model_factory=broken)
    assert not out.exists()  # no hash cache, no checkpoint record, no result folder
