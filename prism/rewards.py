"""The RLVR reward (docs/METHOD.md, "Stage 3: RLVR"); DAPO's overlong shaping is prism.algorithms.overlong_penalty.

    reward = accuracy_weight * accuracy + format_weight * format      (published 0.8 / 0.2)

Format gate first: a format-invalid response scores 0 whatever its answer. Accuracy reads the last
`<answer>` block and compares it with the ground truth (or any equivalent answer) by rules, in order:

1. normalise both sides: strip `$...$`, `\\(...\\)`, unwrap `\\boxed{}` (the last one wins),
   `\\text{}`/`\\mathrm{}`/..., `\\dfrac`/`\\tfrac` -> `\\frac`, drop `\\left`/`\\right` and LaTeX spacing,
   `^\\circ` -> `°`, `\\%` -> `%`, a leading "the answer is" / "Answer:" / "Option", a trailing period;
2. multiple choice: a letter written `B`, `(B)`, `B.`, `B) 12`, `Option B`, lowercase too, equals the
   ground-truth letter; with `choices`, the option's text answers for its letter and a letter answers
   for its option's text;
3. yes/no: the first word decides (`Yes, because...` is yes; `Not sure` is neither). `true`/`false`
   do not answer a yes/no question; a true/false ground truth accepts `yes`/`no` for `true`/`false`;
4. multi-part: top-level `,` / `;` separate parts (a comma inside brackets does not; `1,234` with
   3-digit groups and no space is one number), and `(a) 3 (b) 5` is two parts. Parts are compared
   in order, except when the ground truth is a set `{3, 5}` (then in any order). A different number
   of parts never matches (`1,2` is not `12`);
5. each part: case- and whitespace-insensitive string equality, else numbers: integers exactly,
   anything else within `rel_tol`; fractions (`3/4`, `\\frac{3}{4}`), roots (`\\sqrt{2}`),
   `1e6` / `1 \\times 10^{6}`, a unit after the number (`12 cm`, `45°`, `5 square units`) is ignored,
   and a percent on one side only may be read either as the number or as the number / 100;
6. `math_verify` (parse + verify) as fallback only when the rules say no, the parts are not both plain
   numbers (the rules are exact there) and both sides look mathematical: short, a digit or a LaTeX
   command, and no prose words. It runs without its signal-based timeout (`parsing_timeout=None`,
   `timeout_seconds=None`) so that it works off the main thread; instead, inputs that could make
   sympy compute for ever (tower exponents, factorials, long texts) are not given to it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from prism.response_format import extract_answer, is_format_valid


class RewardInputError(ValueError):
    """A malformed reward input line; the one-line message names the file, the line and the field."""


@dataclass(frozen=True)
class RewardResult:
    score: float
    accuracy: float
    format: float
    extracted_answer: str | None


# ---------------------------------------------------------------------------------------------
# Normalisation

_UNICODE = {"−": "-", "–": "-", "，": ",", "：": ":", "；": ";", "\u00a0": " ", "º": "°", "×": "\\times "}
_TEXT_COMMANDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "operatorname")
_ANSWER_PREFIX = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\s*,?\s+)?(?:the\s+)?(?:final\s+|correct\s+)?"
    r"(?:answer|option|choice)\b(?:\s+is\b)?\s*[:=]?\s*",
    re.IGNORECASE,
)


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """Content of the `{...}` group opening at `open_at` and the index after it; None if unbalanced."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
    return None


def _unwrap_commands(text: str, names: Sequence[str]) -> str:
    """Replace `\\name{X}` by `X` (nesting-aware) for every name."""
    pattern = re.compile(r"\\(?:" + "|".join(names) + r")\s*(?=\{)")
    while (match := pattern.search(text)) is not None:
        group = _braced(text, match.end())
        if group is None:
            return text[: match.start()] + text[match.end() :]
        text = text[: match.start()] + group[0] + text[group[1] :]
    return text


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*(?=\{)", text)]
    for start in reversed(starts):
        group = _braced(text, start)
        if group is not None:
            return group[0]
    return None


def _normalise(text: str) -> str:
    """A canonical spelling of an answer; case is kept (letters and LaTeX commands need it)."""
    for old, new in _UNICODE.items():
        text = text.replace(old, new)
    boxed = _last_boxed(text)
    if boxed is not None:
        text = boxed  # a boxed answer is the answer; the words around it are not
    text = text.replace("\\$", "").replace("$", "")
    text = re.sub(r"\\[()\[\]]", " ", text)
    text = _unwrap_commands(text, _TEXT_COMMANDS)
    text = re.sub(r"\\[dt]frac\b", r"\\frac", text)
    text = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", text)
    text = re.sub(r"\\(?:[,;:! ]|quad\b|qquad\b)|~", " ", text)
    text = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ\b|\\circ\b|\\degree\b", "°", text)
    text = text.replace("\\%", "%").replace("\\{", "{").replace("\\}", "}")
    text = _ANSWER_PREFIX.sub("", text.strip(), count=1)
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(" .。").strip()


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


# ---------------------------------------------------------------------------------------------
# Multiple choice and yes/no

_LETTER_ALONE = re.compile(r"^\(?([A-Za-z])\)?:?$")
_LETTER_WITH_TEXT = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.):])\s*\S")


def _choice_letter(text: str, letters: Mapping[str, str] | None) -> str | None:
    """The option letter `text` names (upper case), or None. With choices, only their letters count."""
    match = _LETTER_ALONE.match(text) or _LETTER_WITH_TEXT.match(text)
    if match is None:
        return None
    letter = next(g for g in match.groups() if g).upper()
    if letters is not None and letter not in letters:
        return None
    return letter


_AS_TRUE_FALSE = {"true": "true", "yes": "true", "false": "false", "no": "false"}


def _first_boolean_word(text: str) -> str | None:
    match = re.match(r"^(yes|no|true|false)\b", text.lower())
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# Numbers

_D = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?"
_POWER = r"(?:\^\s*\{?\s*\d\s*\}?|[²³])"
_UNIT_WORD = rf"[a-z]{{1,15}}{_POWER}?"
_NUMBER = re.compile(
    rf"""^(?P<sign>[-+])?\s*(?:
        \\frac\s*\{{\s*(?P<fn>[-+]?{_D})\s*\}}\s*\{{\s*(?P<fd>[-+]?{_D})\s*\}}
      | (?P<coef>{_D})?\s*(?:\\sqrt|√)\s*(?:\{{\s*(?P<rad>{_D})\s*\}}|(?P<rad2>{_D}))
      | (?P<num>{_D})\s*/\s*(?P<den>{_D})
      | (?P<mant>{_D})\s*(?:\\times|\\cdot|x|\*)\s*10\s*\^\s*\{{?\s*(?P<exp>[-+]?\d+)\s*\}}?
      | (?P<plain>{_D})
    )\s*(?P<unit>
        %|percent
      | °|degrees?
      | {_UNIT_WORD}(?:\s*/\s*{_UNIT_WORD})?(?:\s+{_UNIT_WORD}){{0,2}}
    )?$""",
    re.IGNORECASE | re.VERBOSE,
)
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d]|,\d)")
# Words that read as mathematics, not as a unit: "2 pi" is not "2".
_NOT_UNITS = frozenset({"pi", "e", "i", "sqrt", "frac", "times", "cdot", "and", "or", "to", "x", "y", "z", "n"})


class _Number(NamedTuple):
    value: Fraction | float
    percent: bool


def _drop_thousands(text: str) -> str:
    return _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)


def _to_number(text: str) -> _Number | None:
    """The value of a number written alone, optionally followed by a unit; None otherwise."""
    match = _NUMBER.match(_drop_thousands(text.strip()))
    if match is None:
        return None
    unit = (match["unit"] or "").lower()
    first_unit_word = re.split(r"[\s/^²³]", unit)[0]
    if first_unit_word in _NOT_UNITS:
        return None
    unit_start = match.start("unit")
    # "3x" is an expression, "3 m" and "3cm" carry units: a glued one-letter unit is refused.
    if unit and unit[0].isalpha() and len(first_unit_word) == 1 and not text[unit_start - 1 : unit_start].isspace():
        return None
    try:
        if match["fn"] is not None:
            value: Fraction | float = Fraction(match["fn"]) / Fraction(match["fd"])
        elif match["rad"] is not None or match["rad2"] is not None:
            value = Fraction(match["coef"] or 1) * math.sqrt(Fraction(match["rad"] or match["rad2"]))
        elif match["num"] is not None:
            value = Fraction(match["num"]) / Fraction(match["den"])
        elif match["mant"] is not None:
            value = Fraction(match["mant"]) * Fraction(10) ** int(match["exp"])
        else:
            value = Fraction(match["plain"])
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    if match["sign"] == "-":
        value = -value
    return _Number(value, unit in ("%", "percent"))


def _close(a: Fraction | float, b: Fraction | float, rel_tol: float) -> bool:
    if a == b:
        return True
    if isinstance(a, Fraction) and isinstance(b, Fraction) and a.denominator == 1 and b.denominator == 1:
        return False  # integers match exactly: 1000001 is not 1000000, however large
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=0.0)
    except OverflowError:
        return False


def _numbers_equal(pred: _Number, gold: _Number, rel_tol: float) -> bool:
    # A percent on one side only: "30%" may mean 30 (the question asked in percent) or 0.3.
    pred_values = [pred.value] + ([pred.value / 100] if pred.percent and not gold.percent else [])
    gold_values = [gold.value] + ([gold.value / 100] if gold.percent and not pred.percent else [])
    return any(_close(p, g, rel_tol) for p in pred_values for g in gold_values)


# ---------------------------------------------------------------------------------------------
# math_verify fallback

_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp sqrt pi frac lim max min "
    "gcd lcm mod inf infty deg".split()
)
_MAX_MATH_VERIFY_CHARS = 200


def _looks_mathematical(text: str) -> bool:
    if not text or len(text) > _MAX_MATH_VERIFY_CHARS:
        return False
    if not re.search(r"[\d\\π√^=+*/]", text):
        return False
    words = re.findall(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", " ", text))
    return all(word.lower() in _MATH_WORDS for word in words)


def _safe_for_sympy(text: str) -> bool:
    """No timeout runs math_verify here, so refuse what sympy may evaluate for ever: 9^{9^{9}}, 1000!."""
    if "!" in text or re.search(r"\\(?:binom|prod|sum|int)\b", text):
        return False
    if re.search(r"\^\s*\{[^{}]*\^|\^\s*-?[\w.]*\s*\^", text):
        return False
    exponents = re.findall(r"\^\s*\{?\s*\(?\s*-?(\d+)", text)
    return all(len(e) <= 3 for e in exponents) and not re.search(r"\d{40,}", text)


class _DropTimeoutDisabled(logging.Filter):
    # math_verify warns once that its timeout is off; it is off on purpose (see the module docstring).
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _as_latex(text: str) -> str:
    # `$...$` makes math_verify read the whole text as one expression ("3 and 5" is a set, not 5);
    # a bare "%" would start a LaTeX comment.
    return "$" + text.replace("%", "\\%") + "$"


def _math_verify_equal(pred: str, gold: str) -> bool:
    if not (_safe_for_sympy(pred) and _safe_for_sympy(gold)):
        return False
    try:
        # Imported here: sympy and the LaTeX parser take a while to load and most answers never need them.
        from math_verify import parse, verify
    except ImportError:
        return False
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTimeoutDisabled) for f in logger.filters):
            logger.addFilter(_DropTimeoutDisabled())
    try:
        gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
        pred_parsed = parse(_as_latex(pred), parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # a parser crash on odd input is a non-match, never a crashed training step
        return False


# ---------------------------------------------------------------------------------------------
# Matching

_PART_LABEL = re.compile(r"\(\s*(?:[a-h]|i{1,3}|iv|vi{0,3}|\d{1,2})\s*\)", re.IGNORECASE)
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")


def _is_one_group(text: str, opening: str, closing: str) -> bool:
    """True when `text` is a single bracket group: `{3, 5}` yes, `{3} + {5}` no."""
    if not (text.startswith(opening) and text.endswith(closing)):
        return False
    depth = 0
    for i, char in enumerate(text):
        depth += char == opening
        depth -= char == closing
        if depth == 0 and i < len(text) - 1:
            return False
    return True


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        if char in ",;" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _parts(text: str) -> tuple[bool, list[str]]:
    """(is an unordered set, its parts) of a normalised answer."""
    unordered = _is_one_group(text, "{", "}")
    if unordered:
        text = text[1:-1].strip()
    labels = list(_PART_LABEL.finditer(text))
    if len(labels) >= 2 and labels[0].start() == 0:
        bounds = [m.end() for m in labels] + [len(text)]
        starts = [m.start() for m in labels[1:]] + [len(text)]
        parts = [text[bounds[i] : starts[i]].strip(" ,;") for i in range(len(labels))]
        parts = [re.sub(r"\s+and$", "", p).strip() for p in parts]
        return unordered, [p for p in parts if p]
    return unordered, _split_top_level(_drop_thousands(text))


def _match_part(pred: str, gold: str, rel_tol: float) -> bool:
    if _compact(pred) == _compact(gold):
        return True
    if "=" not in gold:
        pred = _ASSIGNMENT.sub("", pred)  # "x = 3" answers "3"
        if _compact(pred) == _compact(gold):
            return True
    pred_number, gold_number = _to_number(pred), _to_number(gold)
    if pred_number is not None and gold_number is not None:
        return _numbers_equal(pred_number, gold_number, rel_tol)
    if _looks_mathematical(pred) and _looks_mathematical(gold):
        return _math_verify_equal(pred, gold)
    return False


def _match_value(pred: str, gold: str, rel_tol: float) -> bool:
    """Compare two normalised answers that are not option letters."""
    if _compact(pred) == _compact(gold):
        return True
    gold_word, pred_word = gold.lower(), _first_boolean_word(pred)
    if gold_word in ("yes", "no"):
        return pred_word == gold_word
    if gold_word in ("true", "false"):
        return _AS_TRUE_FALSE.get(pred_word) == gold_word
    unordered, gold_parts = _parts(gold)
    _, pred_parts = _parts(pred)
    if len(pred_parts) != len(gold_parts) or not gold_parts:
        return False
    if not unordered:
        return all(_match_part(p, g, rel_tol) for p, g in zip(pred_parts, gold_parts))
    remaining = list(pred_parts)
    for g in gold_parts:
        hit = next((i for i, p in enumerate(remaining) if _match_part(p, g, rel_tol)), None)
        if hit is None:
            return False
        remaining.pop(hit)
    return True


def _match_one(pred: str, gold: str, letters: Mapping[str, str] | None, rel_tol: float) -> bool:
    if not pred or not gold:
        return False  # an empty answer answers nothing, and nothing answers an empty ground truth
    gold_letter = _choice_letter(gold, letters)
    pred_letter = _choice_letter(pred, letters)
    if gold_letter is not None:
        if pred_letter is not None:
            return pred_letter == gold_letter  # "B) 12": the letter decides, the text is ignored
        if letters is not None:
            return _match_value(pred, _normalise(letters[gold_letter]), rel_tol)
    elif letters is not None and pred_letter is not None:
        pred = _normalise(letters[pred_letter])  # the ground truth is an option's text
    return _match_value(pred, gold, rel_tol)


def answers_match(
    predicted: str,
    ground_truth: str,
    equivalent_answers: Sequence[str] = (),
    choices: Mapping[str, str] | None = None,
    rel_tol: float = 1e-4,
) -> bool:
    """Whether `predicted` (the `<answer>` text) answers the ground truth or any equivalent answer."""
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    letters = {key.strip().upper(): str(text) for key, text in choices.items()} if choices else None
    pred = _normalise(predicted)
    return any(_match_one(pred, _normalise(gold), letters, rel_tol) for gold in (ground_truth, *equivalent_answers))


# ---------------------------------------------------------------------------------------------
# Reward


def compute_reward(
    response: str,
    ground_truth: str,
    equivalent_answers: Sequence[str] = (),
    choices: Mapping[str, str] | None = None,
    accuracy_weight: float = 0.8,
    format_weight: float = 0.2,
) -> RewardResult:
    """Format-gated accuracy reward; the extracted answer is reported even when the gate fails."""
    answer = extract_answer(response)
    if not is_format_valid(response):
        return RewardResult(score=0.0, accuracy=0.0, format=0.0, extracted_answer=answer)
    correct = answer is not None and answers_match(answer, ground_truth, equivalent_answers, choices)
    accuracy = 1.0 if correct else 0.0
    return RewardResult(accuracy_weight * accuracy + format_weight, accuracy, 1.0, answer)


# ---------------------------------------------------------------------------------------------
# JSONL scoring (`prism reward score --jsonl FILE`)

_JSON_TYPE = {str: "string", int: "int", float: "float", bool: "bool", list: "list", dict: "object", type(None): "null"}
_FIELDS = ("response", "ground_truth", "equivalent_answers", "choices")


def _type_name(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _check_line(record: Any, where: str) -> None:
    def fail(field: str, expected: str, value: Any) -> RewardInputError:
        return RewardInputError(f"{where}: field '{field}': expected {expected}, got {_type_name(value)}")

    if not isinstance(record, dict):
        raise RewardInputError(f"{where}: expected a JSON object, got {_type_name(record)}")
    for field in record:
        if field not in _FIELDS:
            raise RewardInputError(f"{where}: unknown field {field!r} (expected {', '.join(_FIELDS)})")
    for field in ("response", "ground_truth"):
        if field not in record:
            raise RewardInputError(f"{where}: field '{field}': missing (expected a string)")
        if not isinstance(record[field], str):
            raise fail(field, "a string", record[field])
    equivalents = record.get("equivalent_answers", [])
    if not isinstance(equivalents, list):
        raise fail("equivalent_answers", "a list of strings", equivalents)
    for i, item in enumerate(equivalents):
        if not isinstance(item, str):
            raise fail(f"equivalent_answers[{i}]", "a string", item)
    choices = record.get("choices", {})
    if not isinstance(choices, dict):
        raise fail("choices", "an object of letter -> option text", choices)
    for letter, text in choices.items():
        if not isinstance(text, str):
            raise fail(f"choices.{letter}", "a string", text)


def score_jsonl(path: str | Path) -> Iterator[dict]:
    """Score each line `{"response", "ground_truth", "equivalent_answers"?, "choices"?}` of a JSONL file.

    Yields `{"line", "score", "accuracy", "format", "extracted_answer"}` as it reads (blank lines are
    skipped); a bad line raises `RewardInputError` naming the file, the line and the field.
    """
    try:
        handle = open(path, "rb")  # bytes, so that a bad encoding is reported with its line number
    except OSError as error:
        raise RewardInputError(f"{path}: cannot read: {error.strerror or error}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RewardInputError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RewardInputError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
            _check_line(record, where)
            result = compute_reward(
                record["response"],
                record["ground_truth"],
                equivalent_answers=record.get("equivalent_answers", ()),
                choices=record.get("choices") or None,
            )
            yield {
                "line": number,
                "score": result.score,
                "accuracy": result.accuracy,
                "format": result.format,
                "extracted_answer": result.extracted_answer,
            }
