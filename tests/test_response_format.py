"""The tagged response format: validity, segmentation, answer extraction, canonical rendering, counts."""

import re

import pytest

from prism.response_format import (
    RESPONSE_PATTERN,
    SYSTEM_PROMPT,
    Segments,
    count_caption_bullets,
    count_reasoning_steps,
    extract_answer,
    is_format_valid,
    read_answer,
    render_response,
    split_segments,
)

CANONICAL = (
    "<caption>\n- a red square\n- a blue circle\n</caption>\n"
    "<think>\nThere are two shapes.\n1 + 1 = 2.\n</think>\n"
    "<answer>2</answer>"
)


def test_system_prompt_names_the_three_parts_briefly():
    for tag in ("<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"):
        assert tag in SYSTEM_PROMPT
    assert len(SYSTEM_PROMPT.split()) <= 45
    assert SYSTEM_PROMPT.index("<caption>") < SYSTEM_PROMPT.index("<think>") < SYSTEM_PROMPT.index("<answer>")


def test_response_pattern_is_the_specified_one():
    assert RESPONSE_PATTERN.pattern == r"^\s*<caption>.*?</caption>\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
    assert RESPONSE_PATTERN.flags & re.DOTALL


@pytest.mark.parametrize(
    "text",
    [
        CANONICAL,
        "<caption>x</caption><think>y</think><answer>z</answer>",
        "\n  <caption>x</caption>\n\n<think>y</think> <answer>z</answer>\n\n",
        "<caption></caption><think></think><answer></answer>",
        "<caption>\nline 1\nline 2\n</caption><think>a\n\nb</think><answer>multi\nline</answer>",
    ],
)
def test_format_valid(text):
    assert is_format_valid(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2",
        "<answer>2</answer>",
        "<think>y</think><answer>z</answer>",  # no caption
        "<caption>x</caption><answer>z</answer>",  # no think
        "<caption>x</caption><think>y</think>",  # no answer
        "<think>y</think><caption>x</caption><answer>z</answer>",  # wrong order
        "Sure! <caption>x</caption><think>y</think><answer>z</answer>",  # text before
        "<caption>x</caption><think>y</think><answer>z</answer> Hope this helps.",  # text after
        "<caption>x</caption>between<think>y</think><answer>z</answer>",  # text between
        "<caption>x</caption><think>y</think><answer>z",  # truncated
        "<caption>x<think>y</think><answer>z</answer>",  # caption never closed
    ],
)
def test_format_invalid(text):
    assert not is_format_valid(text)
    assert split_segments(text) is None


def test_split_segments_strips_inner_texts():
    segments = split_segments("  <caption>\n - a\n</caption> <think>  s1\ns2 \n</think><answer> 7 </answer>\n")
    assert segments == Segments(caption="- a", think="s1\ns2", answer="7")


def test_segments_render_the_discriminator_views():
    segments = split_segments(CANONICAL)
    assert segments.caption == "- a red square\n- a blue circle"
    assert segments.perception == "<caption>\n- a red square\n- a blue circle\n</caption>"
    assert segments.reasoning == "<think>\nThere are two shapes.\n1 + 1 = 2.\n</think>\n<answer>2</answer>"
    assert "caption" not in segments.reasoning  # the reasoning view never sees the caption


def test_segments_are_frozen():
    segments = split_segments(CANONICAL)
    with pytest.raises(AttributeError):
        segments.answer = "3"


def test_render_response_canonical_string():
    text = render_response(["b1", "b2"], ["step1", "step2"], "ANSWER")
    assert text == "<caption>\n- b1\n- b2\n</caption>\n<think>\nstep1\nstep2\n</think>\n<answer>ANSWER</answer>"
    assert render_response(("a red square", "a blue circle"), ("There are two shapes.", "1 + 1 = 2."), "2") == CANONICAL


@pytest.mark.parametrize(
    "bullets, steps, answer",
    [
        (["a red square at row 1"], ["Count: 1."], "1"),
        (["x", "y", "z"], ["a", "b", "c", "d"], "B"),
        ([], [], "yes"),
        (["bullet with <b>html</b>"], ["3 < 4 > 2"], "\\frac{3}{4}"),
    ],
)
def test_render_round_trips(bullets, steps, answer):
    text = render_response(bullets, steps, answer)
    assert is_format_valid(text)
    segments = split_segments(text)
    assert segments.perception + "\n" + segments.reasoning == text
    assert segments.text == text
    assert segments.answer == answer == extract_answer(text)
    assert count_caption_bullets(text) == len(bullets)
    assert count_reasoning_steps(text) == len(steps)
    assert count_caption_bullets(segments.perception) == len(bullets)
    assert count_reasoning_steps(segments.reasoning) == len(steps)


@pytest.mark.parametrize("bad", ["two\nlines", "sneaky </caption>", "<answer>x"])
def test_render_refuses_items_that_break_the_format(bad):
    with pytest.raises(ValueError):
        render_response([bad], ["s"], "1")
    with pytest.raises(ValueError):
        render_response(["b"], [bad], "1")
    with pytest.raises(ValueError):
        render_response(["b"], ["s"], bad)


@pytest.mark.parametrize(
    "text, expected",
    [
        (CANONICAL, "2"),
        ("<answer> 42 </answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last block
        ("no tags at all", None),
        ("<answer>unclosed", None),
        ("closed only</answer>", None),
        ("<answer></answer>", ""),
        ("<think>hmm</think>\n<answer>\nB\n</answer> trailing text", "B"),  # format-invalid still read
        ("<answer>a</answer><answer>b", "a"),  # the last *complete* block
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (CANONICAL, "2"),  # <answer> first
        ("Yes.", "Yes."),  # an instruct model's plain answer, read from its last line
        ("Two red shapes.\n\nThe answer is 3.\n", "The answer is 3."),
        ("<caption>\n- a red square\n3", None),  # opened the format: no untagged reading
        ("<answer>unclosed", None),
        ("  \n ", None),
    ],
)
def test_read_answer_falls_back_to_an_untagged_last_line(text, expected):
    assert read_answer(text) == expected


@pytest.mark.parametrize(
    "text, bullets",
    [
        (CANONICAL, 2),
        ("<caption>\n- a\n* b\n• c\nplain line\n  - indented\n</caption><think>- not a bullet</think><answer>1</answer>", 4),
        ("<caption>one sentence only</caption><think>x</think><answer>1</answer>", 0),
        ("- a\n- b\n- c", 3),  # no tags: the text is the caption body
        ("<think>\n- x\n</think><answer>1</answer>", 0),  # tags, but no caption
        ("<caption>\n- a\n- b (truncated", 2),  # unclosed caption runs to the end
    ],
)
def test_count_caption_bullets(text, bullets):
    assert count_caption_bullets(text) == bullets


@pytest.mark.parametrize(
    "text, steps",
    [
        (CANONICAL, 2),
        ("<caption>- a\n- b\n- c</caption><think>\n\nstep 1\n   \nstep 2\nstep 3\n</think><answer>1</answer>", 3),
        ("<caption>- a</caption><think></think><answer>1</answer>", 0),
        ("one\ntwo\n\nthree", 3),  # no tags: the text is the think body
        ("<caption>\n- a\n</caption><answer>1</answer>", 0),  # tags, but no think
        ("<caption>x</caption><think>a\nb\nc", 3),  # truncated rollout
    ],
)
def test_count_reasoning_steps(text, steps):
    assert count_reasoning_steps(text) == steps
