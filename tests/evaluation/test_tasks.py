"""The embedded lmms-eval tasks: names, data from a world chosen at run time, prompts, per-sample scores."""

import json

import pandas as pd
import pytest

from evaluation.config import EMBEDDED_GROUP, EMBEDDED_TASKS, EvalConfig
from evaluation.scoring import question_pair_acc, register_tokenizer, score_response
from prism.response_format import SYSTEM_PROMPT


@pytest.fixture(scope="module")
def tokenizer(world):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(world / "tokenizer"))
    register_tokenizer(tok, str(world / "tokenizer"))
    return tok


@pytest.fixture(scope="module")
def manager(lmms_eval):
    from evaluation.runner import task_manager

    return task_manager("embedded")


def test_task_names_do_not_clash_with_lmms_eval_builtins(lmms_eval, manager):
    from lmms_eval.tasks import TaskManager

    ours = set(manager.all_tasks)
    assert {EMBEDDED_GROUP, *EMBEDDED_TASKS.values()} <= ours
    builtins = set(TaskManager(verbosity="ERROR").all_tasks)  # lmms-eval's own index, defaults only
    assert not ours & builtins


def test_world_is_chosen_at_run_time_and_requests_carry_the_prism_prompt(manager, world, tokenizer):
    from evaluation.runner import plan_suite

    (entry,) = plan_suite("embedded", EvalConfig(), world, limit=None)
    assert entry.overrides["dataset_path"] == str(world.resolve() / "bench")
    loaded = manager.load_config(entry.lmms_task())  # {group: {task: Task}}
    (group,) = loaded
    tasks = loaded[group]
    assert sorted(tasks) == sorted(EMBEDDED_TASKS.values())
    task = tasks["prism_embedded_presence"]
    assert type(task).__name__ == "ConfigurableMessagesTask"  # chat interface: doc_to_messages requests
    assert len(task.test_docs()) == 10  # bench_size of the tiny world
    task.build_all_requests(limit=4, rank=0, world_size=1)
    assert len(task.instances) == 4
    ctx, doc_to_messages, gen_kwargs, doc_id, name, split = task.instances[0].args
    assert (name, split, doc_id) == ("prism_embedded_presence", "test", 0)
    assert gen_kwargs == {"max_new_tokens": 256, "temperature": 1.0, "top_p": 0.7, "do_sample": True, "until": []}
    bench = pd.read_parquet(world / "bench" / "presence.parquet")
    messages = doc_to_messages(task.test_docs()[0])
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}
    image, text = messages[1]["content"]
    assert image["type"] == "image" and image["url"].size == (96, 96)  # the image first, as in training
    assert text == {"type": "text", "text": bench.question[0]}
    # the item's own id rides in the per-sample results, which lmms-eval saves without `doc` (prism submit keys by it)
    doc = task.test_docs()[0]
    result = task.process_results(doc, ["<answer>Yes</answer>"])
    assert result["submission"] == {"id": bench.id[0]} and "accuracy" in result


def test_scores_of_a_teacher_response_and_of_junk(world, tokenizer):
    from prism.data.world import WorldConfig, make_sample

    tiny = WorldConfig(base_size=8, sft_size=8, teacher_size=4, rl_size=4, bench_size=10)  # as the fixture's
    sample = make_sample(tiny, "bench", 0)
    good = score_response(sample.teacher.text, sample.answer, choices=sample.choices)
    assert good["accuracy"] == 1.0 and good["format_valid_rate"] == 1.0
    assert good["mean_response_tokens"] == len(tokenizer(sample.teacher.text, add_special_tokens=False)["input_ids"])
    junk = score_response("red red red", sample.answer)
    assert junk["accuracy"] == 0.0 and junk["format_valid_rate"] == 0.0
    # the answer counts without the format: answers are read from <answer> whatever surrounds it
    loose = score_response(f"blah <answer>{sample.answer}</answer>", sample.answer)
    assert loose["accuracy"] == 1.0 and loose["format_valid_rate"] == 0.0
    # an instruct model's untagged answer is read from its last line; a response that opened the format is not
    plain = score_response(f"Let me look.\nThe answer is {sample.answer}.", sample.answer, choices=sample.choices)
    assert plain["accuracy"] == 1.0 and plain["format_valid_rate"] == 0.0
    opened = score_response(f"<caption>\n{sample.answer}", sample.answer, choices=sample.choices)
    assert opened["accuracy"] == 0.0


def test_multichoice_letters_and_option_text(world, tokenizer):
    bench = pd.read_parquet(world / "bench" / "multichoice.parquet")
    row = bench.iloc[0]
    choices = json.loads(row.choices)
    text = choices[row.answer]
    assert score_response(f"<answer>{row.answer}</answer>", row.answer, choices=choices)["accuracy"] == 1.0
    assert score_response(f"<answer>{text}</answer>", row.answer, choices=choices)["accuracy"] == 1.0
    wrong = next(letter for letter in choices if letter != row.answer)
    assert score_response(f"<answer>({wrong})</answer>", row.answer, choices=choices)["accuracy"] == 0.0


def test_question_pair_accuracy_counts_complete_pairs_only():
    items = [
        {"group": "p0", "correct": 1.0}, {"group": "p0", "correct": 1.0},  # both right
        {"group": "p1", "correct": 1.0}, {"group": "p1", "correct": 0.0},  # one wrong
        {"group": "p2", "correct": 1.0},  # cut in half by --limit: left out
    ]
    assert question_pair_acc(items) == 0.5
    assert question_pair_acc(items[4:]) != question_pair_acc(items[4:])  # NaN: no complete pair
