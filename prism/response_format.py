"""The tagged response format every stage trains and scores (docs/METHOD.md, "Response format").

A response has three tagged parts, in order:

    <caption>
    - a red square at row 1, column 2
    - a blue circle at row 3, column 1
    </caption>
    <think>
    step one
    step two
    </think>
    <answer>ANSWER</answer>

It is *format-valid* iff the whole text matches `RESPONSE_PATTERN`. The discriminator scores two
segments of it separately: the *perception* segment (the caption block) and the *reasoning* segment
(the think block and the answer block). `render_response` is the one canonical rendering used by every
generated demonstration; `Segments.perception` / `Segments.reasoning` re-render a parsed response the
same way, so teacher and student segments always share their layout and their final tokens.

`count_caption_bullets` / `count_reasoning_steps` are the cheap distribution proxies the alignment
stage logs (how much the policy describes, how many steps it writes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

# Short on purpose: a tiny model reads it in every example, so every token costs context and steps.
SYSTEM_PROMPT = (
    "Describe the image as bullet points inside <caption></caption>, then reason step by step inside "
    "<think></think>, then write only the final answer inside <answer></answer>."
)

RESPONSE_PATTERN = re.compile(
    r"^\s*<caption>.*?</caption>\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL
)

TAGS = ("caption", "think", "answer")
BULLET_MARKERS = ("-", "*", "•")

# Captures the three inner texts of a format-valid response; same shape as RESPONSE_PATTERN.
_SEGMENTS_PATTERN = re.compile(
    r"^\s*<caption>(?P<caption>.*?)</caption>\s*<think>(?P<think>.*?)</think>\s*"
    r"<answer>(?P<answer>.*?)</answer>\s*$",
    re.DOTALL,
)
_ANY_TAG = re.compile(r"</?(?:caption|think|answer)>")


def is_format_valid(text: str) -> bool:
    return RESPONSE_PATTERN.match(text) is not None


def _block(tag: str, body: str) -> str:
    # Tags on their own lines; an empty body gives "<tag>\n</tag>" rather than a blank line.
    return f"<{tag}>\n{body}\n</{tag}>" if body else f"<{tag}>\n</{tag}>"


@dataclass(frozen=True)
class Segments:
    """The inner texts of a format-valid response, stripped."""

    caption: str
    think: str
    answer: str

    @property
    def perception(self) -> str:
        """The caption segment as the discriminator sees it (canonical layout, tags included)."""
        return _block("caption", self.caption)

    @property
    def reasoning(self) -> str:
        """The think + answer segment as the discriminator sees it (the caption is not part of it)."""
        return _block("think", self.think) + f"\n<answer>{self.answer}</answer>"

    @property
    def text(self) -> str:
        """The whole response in the canonical rendering."""
        return self.perception + "\n" + self.reasoning


def split_segments(text: str) -> Segments | None:
    """The three inner texts, or None when `text` is not format-valid."""
    match = _SEGMENTS_PATTERN.match(text)
    if match is None:
        return None
    return Segments(match["caption"].strip(), match["think"].strip(), match["answer"].strip())


def scored_segments(text: str) -> tuple[dict[str, str], bool]:
    """({kind: segment} for the discriminator's kinds `perception`, `reasoning` and `response`, format-valid?).

    A format-valid response gives its canonical segments. Any other response is split at half its length (in
    characters) as the published code does: the first half stands for the caption, the second for the
    reasoning, the whole text for the response. Such scores count in the discriminator's regulariser; its
    advantage replaces them (prism.algorithms.compute_prism_advantage)."""
    segments = split_segments(text)
    if segments is not None:
        return {"perception": segments.perception, "reasoning": segments.reasoning, "response": segments.text}, True
    half = len(text) // 2
    return {"perception": text[:half], "reasoning": text[half:], "response": text}, False


def extract_answer(text: str) -> str | None:
    """Content of the last `<answer>...</answer>` block, stripped; None if there is none.

    Works on format-invalid text too: evaluation reads answers from `<answer>` whatever surrounds
    it, and the reward applies its format gate separately.
    """
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def untagged_answer(text: str) -> str | None:
    """The answer of a response written without the format: its last non-empty line, stripped; None when the text
    uses a response tag or is empty.

    An instruct model answers in plain text ("Yes.", "The answer is 4."); evaluation reads that answer as
    lmms-eval's extraction does for such models (the scorer then strips "The answer is" and the final period).
    A response that opened the format and never closed `<answer>` is not an untagged answer: it stays wrong.
    """
    if _ANY_TAG.search(text):
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def read_answer(text: str) -> str | None:
    """What evaluation scores: the last `<answer>` block, else an untagged response's plain answer."""
    answer = extract_answer(text)
    return answer if answer is not None else untagged_answer(text)


def render_response(caption_bullets: Sequence[str], steps: Sequence[str], answer: str) -> str:
    """The canonical rendering of a demonstration; round-trips through `split_segments`.

    Bullets and steps are plain one-line texts (the "- " marker is added here). A newline or a tag
    inside one would change the counts or the segmentation, so it is refused.
    """
    items = [*caption_bullets, *steps, answer]
    for item in items:
        if "\n" in item or _ANY_TAG.search(item):
            raise ValueError(f"render_response: item {item!r} contains a newline or a response tag")
    caption = "\n".join(f"- {bullet.strip()}" for bullet in caption_bullets)
    think = "\n".join(step.strip() for step in steps)
    return Segments(caption, think, answer.strip()).text


def _segment_body(text: str, tag: str) -> str:
    """The body of `<tag>` in a response; the whole text when it has no response tags at all.

    An opened but unclosed block runs to the end of the text, so truncated rollouts still count.
    A response with tags but without this one has an empty body.
    """
    if not _ANY_TAG.search(text):
        return text
    match = re.search(rf"<{tag}>(.*?)(?:</{tag}>|$)", text, re.DOTALL)
    return match.group(1) if match else ""


def count_caption_bullets(text: str) -> int:
    """Lines of the caption that start with a bullet marker (-, *, •)."""
    lines = _segment_body(text, "caption").splitlines()
    return sum(1 for line in lines if line.lstrip().startswith(BULLET_MARKERS))


def count_reasoning_steps(text: str) -> int:
    """Non-empty lines of the think block."""
    lines = _segment_body(text, "think").splitlines()
    return sum(1 for line in lines if line.strip())


def segment_counts(texts: Sequence[str]) -> tuple[list[int], list[int]]:
    """(caption bullets, reasoning steps) of the format-valid responses among `texts`."""
    bullets, steps = [], []
    for text in texts:
        segments = split_segments(text)
        if segments is not None:
            bullets.append(count_caption_bullets(segments.caption))
            steps.append(count_reasoning_steps(segments.think))
    return bullets, steps
