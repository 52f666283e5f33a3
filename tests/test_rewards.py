"""The RLVR reward: answer matching rules, the format gate, JSONL scoring (DAPO's overlong penalty: test_algorithms)."""

import json

import pytest

from prism.response_format import render_response
from prism.rewards import (
    RewardInputError,
    RewardResult,
    answers_match,
    compute_reward,
    score_jsonl,
)

CHOICES = {"A": "10", "B": "12", "C": "14 cm", "D": "none of these"}

# (predicted, ground truth, choices, expected). Hand-written; each line is one rule or one trap.
MATCH_CASES = [
    # multiple-choice letters
    ("B", "B", None, True),
    ("b", "B", None, True),
    ("(B)", "B", None, True),
    ("B.", "B", None, True),
    ("B)", "B", None, True),
    ("B) 12", "B", None, True),
    ("(B) 12", "B", CHOICES, True),
    ("Option B", "B", None, True),
    ("the answer is B", "B", None, True),
    ("The answer is (b).", "B", CHOICES, True),
    ("Answer: B", "B", CHOICES, True),
    ("C", "B", None, False),
    ("B) 12", "C", CHOICES, False),  # the letter decides, not the text after it
    ("B or C", "B", CHOICES, False),  # hedging is wrong
    ("B, C", "B", CHOICES, False),
    ("E", "E", CHOICES, True),  # not an option letter: plain string equality still holds
    # option text <-> letter
    ("12", "B", CHOICES, True),
    ("14", "C", CHOICES, True),  # option "14 cm", unit ignored
    ("none of these", "D", CHOICES, True),
    ("10", "B", CHOICES, False),
    ("B", "12", CHOICES, True),  # ground truth given as the option text
    ("D", "none of these", CHOICES, True),
    ("A", "12", CHOICES, False),
    ("A", "12", None, False),  # a letter answer when there are no choices
    ("12", "B", None, False),  # no choices: no option text to look up
    # numbers and tolerance
    ("12", "12", None, True),
    ("12", "1.2", None, False),
    ("1.2", "12", None, False),
    ("12.0", "12", None, True),
    ("12.", "12", None, True),
    ("12.0001", "12", None, True),  # within rel_tol 1e-4
    ("12.01", "12", None, False),
    ("-3", "3", None, False),
    ("3", "-3", None, False),
    ("−3", "-3", None, True),  # unicode minus
    ("+3", "3", None, True),
    ("0", "0.0", None, True),
    ("0", "0.0001", None, False),
    ("1000001", "1000000", None, False),  # integers match exactly, whatever their size
    ("99999999999999999999", "99999999999999999998", None, False),
    ("123456789012345678901234567890", "123456789012345678901234567890", None, True),
    ("1e6", "1000000", None, True),
    ("1.5 \\times 10^{6}", "1500000", None, True),
    ("  12  ", "12", None, True),
    ("$12$", "12", None, True),
    ("twelve", "12", None, False),
    # thousands separators and multi-part answers
    ("1,234", "1234", None, True),
    ("1234", "1,234", None, True),
    ("1,000,000", "1000000", None, True),
    ("1,2", "12", None, False),  # two parts, not twelve
    ("12", "1,2", None, False),
    ("3, 5", "3,5", None, True),
    ("3; 5", "3, 5", None, True),
    ("(a) 3 (b) 5", "3, 5", None, True),
    ("(a) 3, (b) 5", "(a) 3 (b) 5", None, True),
    ("5, 3", "3, 5", None, False),  # order matters
    ("{5, 3}", "{3, 5}", None, True),  # ... unless the ground truth is a set
    ("5, 3", "\\{3, 5\\}", None, True),
    ("3, 5, 7", "3, 5", None, False),
    ("3", "3, 5", None, False),
    ("x = 3, y = 5", "3, 5", None, True),
    ("(3, 5)", "(3,5)", None, True),
    ("(5, 3)", "(3, 5)", None, False),
    # fractions, roots, LaTeX
    ("0.75", "3/4", None, True),
    ("3/4", "0.75", None, True),
    ("\\frac{3}{4}", "0.75", None, True),
    ("\\dfrac{3}{4}", "3/4", None, True),
    ("\\tfrac{-3}{4}", "-0.75", None, True),
    ("\\frac{3}{4}", "\\frac{4}{3}", None, False),
    ("0.33", "1/3", None, False),
    ("\\sqrt{2}", "1.41421", None, True),
    ("\\sqrt{2}", "2", None, False),
    ("2\\sqrt{3}", "\\sqrt{12}", None, True),  # math_verify fallback
    ("\\frac{\\pi}{2}", "\\pi/2", None, True),  # math_verify fallback
    ("x^2+2x+1", "(x+1)^2", None, True),  # math_verify fallback
    ("2^{10}", "1024", None, True),  # math_verify fallback
    ("90", "\\frac{\\pi}{2}", None, False),
    ("\\boxed{7}", "7", None, True),
    ("so the result is \\boxed{\\frac{1}{2}}", "0.5", None, True),
    ("\\boxed{8}", "7", None, False),
    ("x = 3", "3", None, True),
    ("3x", "3", None, False),
    ("2\\pi", "2", None, False),
    ("9^{9^{9}}", "3", None, False),  # never handed to sympy without a timeout
    # units and percents
    ("12 cm", "12", None, True),
    ("12\\text{ cm}", "12", None, True),
    ("\\text{12 cm}", "12 cm", None, True),
    ("5 square units", "5", None, True),
    ("12 m/s", "12", None, True),
    ("13 cm", "12 cm", None, False),
    ("45°", "45", None, True),
    ("45^\\circ", "45", None, True),
    ("45^{\\circ}", "45°", None, True),
    ("45 degrees", "45", None, True),
    ("30%", "30", None, True),
    ("30\\%", "30%", None, True),
    ("30", "30%", None, True),
    ("0.3", "30%", None, True),
    ("3%", "30", None, False),
    # yes / no / true / false
    ("Yes.", "yes", None, True),
    ("yes", "Yes", None, True),
    ("YES", "yes", None, True),
    ("Yes, there is a green square.", "Yes", None, True),
    ("No", "no", None, True),
    ("No", "Not sure", None, False),
    ("Not sure", "No", None, False),
    ("No", "Yes", None, False),
    ("Nope", "No", None, False),
    ("True", "yes", None, False),  # true/false do not answer a yes/no question
    ("false", "No", None, False),
    ("true", "True", None, True),
    ("yes", "True", None, True),  # ... but yes/no answer a true/false one
    ("no", "True", None, False),
    # strings
    ("Red", "red", None, True),
    ("  red  square. ", "Red Square", None, True),
    ("red", "blue", None, False),
    ("the red one", "red", None, False),
    # empty answers
    ("", "12", None, False),
    ("   ", "12", None, False),
    ("", "", None, False),
    ("12", "", None, False),
]


@pytest.mark.parametrize("predicted, ground_truth, choices, expected", MATCH_CASES)
def test_answers_match(predicted, ground_truth, choices, expected):
    assert answers_match(predicted, ground_truth, choices=choices) is expected


def test_there_are_enough_hand_written_cases():
    assert len(MATCH_CASES) >= 70
    assert sum(not case[-1] for case in MATCH_CASES) >= 30


def test_equivalent_answers_count():
    assert answers_match("0.5", "1/3", equivalent_answers=["1/2"])
    assert answers_match("half", "0.5", equivalent_answers=["one half", "half"])
    assert not answers_match("0.25", "1/3", equivalent_answers=["1/2"])


def test_rel_tol_is_a_parameter():
    assert not answers_match("12.1", "12")
    assert answers_match("12.1", "12", rel_tol=0.01)
    assert not answers_match("13", "12", rel_tol=0.01)
    with pytest.raises(ValueError, match="rel_tol"):
        answers_match("1", "1", rel_tol=-1)


def _response(answer: str) -> str:
    return render_response(["a red square"], ["One square."], answer)


@pytest.mark.parametrize(
    "response, ground_truth, expected",
    [
        (_response("2"), "2", RewardResult(1.0, 1.0, 1.0, "2")),
        (_response("3"), "2", RewardResult(0.2, 0.0, 1.0, "3")),
        ("<answer>2</answer>", "2", RewardResult(0.0, 0.0, 0.0, "2")),  # gated, answer still reported
        (_response("2") + " extra", "2", RewardResult(0.0, 0.0, 0.0, "2")),
        ("2", "2", RewardResult(0.0, 0.0, 0.0, None)),
        (_response(""), "2", RewardResult(0.2, 0.0, 1.0, "")),
    ],
)
def test_compute_reward(response, ground_truth, expected):
    result = compute_reward(response, ground_truth)
    assert result.score == pytest.approx(expected.score)
    assert (result.accuracy, result.format, result.extracted_answer) == (
        expected.accuracy,
        expected.format,
        expected.extracted_answer,
    )


def test_compute_reward_weights_choices_and_equivalents():
    assert compute_reward(_response("2"), "2", accuracy_weight=0.5, format_weight=0.5).score == pytest.approx(1.0)
    assert compute_reward(_response("3"), "2", accuracy_weight=0.5, format_weight=0.5).score == pytest.approx(0.5)
    assert compute_reward(_response("12"), "B", choices=CHOICES).accuracy == 1.0
    assert compute_reward(_response("2.0"), "3", equivalent_answers=["2"]).accuracy == 1.0


def _write(tmp_path, lines):
    path = tmp_path / "rewards.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_score_jsonl_scores_each_line(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps({"response": _response("2"), "ground_truth": "2"}),
            "",
            json.dumps({"response": _response("12"), "ground_truth": "B", "choices": CHOICES}),
            json.dumps({"response": "<answer>2</answer>", "ground_truth": "2", "equivalent_answers": ["two"]}),
            json.dumps({"response": _response("0.5"), "ground_truth": "1/3", "equivalent_answers": ["1/2"]}),
        ],
    )
    rows = list(score_jsonl(path))
    assert [row["line"] for row in rows] == [1, 3, 4, 5]  # the blank line keeps its number
    assert rows[0] == {"line": 1, "score": pytest.approx(1.0), "accuracy": 1.0, "format": 1.0, "extracted_answer": "2"}
    assert rows[1]["accuracy"] == 1.0
    assert rows[2] == {"line": 4, "score": 0.0, "accuracy": 0.0, "format": 0.0, "extracted_answer": "2"}
    assert rows[3]["accuracy"] == 1.0


GOOD = {"response": "<answer>1</answer>", "ground_truth": "1"}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"response": "x", ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"response": "x"}), "field 'ground_truth': missing"),
        (json.dumps({"ground_truth": "x"}), "field 'response': missing"),
        (json.dumps({"response": "x", "ground_truth": 12}), "field 'ground_truth': expected a string, got int"),
        (json.dumps({"response": None, "ground_truth": "1"}), "field 'response': expected a string, got null"),
        (json.dumps({**GOOD, "equivalent_answers": "2"}), "field 'equivalent_answers': expected a list of strings, got string"),
        (json.dumps({**GOOD, "equivalent_answers": ["2", 3]}), "field 'equivalent_answers[1]': expected a string, got int"),
        (json.dumps({**GOOD, "choices": ["A", "B"]}), "field 'choices': expected an object"),
        (json.dumps({**GOOD, "choices": {"A": 1.5}}), "field 'choices.A': expected a string, got float"),
        (json.dumps({**GOOD, "answer": "1"}), "unknown field 'answer'"),
    ],
)
def test_score_jsonl_errors_name_file_line_and_field(tmp_path, bad_line, message):
    path = _write(tmp_path, [json.dumps(GOOD), "", bad_line])
    rows = score_jsonl(path)
    assert next(rows)["line"] == 1  # lines before the bad one are scored
    with pytest.raises(RewardInputError) as error:
        list(rows)
    text = str(error.value)
    assert text.startswith(f"{path}:3: ")
    assert message in text
    assert "\n" not in text
    assert isinstance(error.value, ValueError)


def test_score_jsonl_bad_encoding_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"response": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(RewardInputError, match=r":2: not UTF-8"):
        list(score_jsonl(path))


def test_score_jsonl_missing_file(tmp_path):
    with pytest.raises(RewardInputError, match="cannot read"):
        list(score_jsonl(tmp_path / "absent.jsonl"))
