"""Where presence answers go wrong: perception (the model's own caption) or reasoning (the chain from it).

Reads the presence samples an embedded evaluation wrote (lmms-eval's `samples_prism_embedded_presence.jsonl` under an
evaluation folder, `prism eval --suite embedded`) and counts, over its items:
  - accuracy;
  - caption decides right: the model's own caption bullets contain "<colour> <shape>" exactly when the answer is
    yes, i.e. a reader of the bullets alone would answer right (perception of the colour-shape binding);
  - answer follows caption: the model's answer is what its bullets say (reasoning from its own caption);
  - chain names the asked object: its count line ("Red squares: 1.") and conclusion ("So a red square is ...")
    both name the question's colour and shape, as the world's chains do;
  - count follows list, over the chains whose first two lines are the world's list ("Red shapes: circle at top,
    square at center.") and count ("Red squares: 1."): the count is how many listed shapes are the asked one, i.e.
    the last lookup is right whatever the list got wrong;
  - count by listed, over the same chains: how many listed shapes are the asked one -> the count written -> how many
    chains, which tells a lookup that errs both ways at random from one that counts every listed shape;
  - matches follow list, over the chains whose second line copies the list's items of the asked shape instead of
    counting them (a world with `presence_steps=matches`: "Red squares: square at center." or "none"): the items
    written are exactly the listed ones of that shape;
  - conclusion follows list, over the chains with a list and a conclusion ("So a red square is present."), either
    form: the conclusion says present exactly when the list holds the asked shape (the decision the lookup serves,
    comparable across the two forms).
Writes outputs/bench/presence-chains.json.

    .venv/bin/python bench/presence_chains.py outputs/evals/<hash> [outputs/evals/<hash> ...]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from prism.atomic_io import atomic_write_text

QUESTION = re.compile(r"Is there an? (\w+) (\w+) in the image")
LIST_THEN_COUNT = re.compile(r"^\w+ shapes: (.*?)\.\n\w+ \w+: (\d+)\.$", re.M)
LIST_THEN_MATCHES = re.compile(r"^\w+ shapes: (.*?)\.\n\w+ \w+: (none|\w+ at .*?)\.$", re.M)
LIST_LINE = re.compile(r"^\w+ shapes: (.*?)\.$", re.M)
CONCLUSION = re.compile(r"^So an? \w+ \w+ is (present|absent)\.$", re.M)


def items(listed: str) -> list[str]:
    """'square at top, circle at left' -> ['square at top', 'circle at left']; 'none' -> []."""
    return [] if listed == "none" else listed.split(", ")


def tag(text: str, name: str) -> str:
    found = re.search(rf"<{name}>(.*?)</{name}>", text, re.S)
    return found.group(1) if found else ""


def chain_counts(samples: list[dict]) -> dict:
    counts = {"items": len(samples), "accuracy": 0.0, "caption_decides_right": 0, "answer_follows_caption": 0,
              "chain_names_asked_object": 0}
    listed_chains = count_follows_list = matched_chains = matches_follow_list = concluded_chains = 0
    conclusion_follows_list = 0
    count_by_listed: dict[str, dict[str, int]] = {}
    for sample in samples:
        colour, shape = QUESTION.match(sample["input"]).groups()
        response = sample["filtered_resps"]
        caption_says = "yes" if re.search(rf"^- {colour} {shape}\b", tag(response, "caption"), re.M) else "no"
        answer = tag(response, "answer").strip()
        chain = tag(response, "think")
        counts["accuracy"] += sample["accuracy"]
        counts["caption_decides_right"] += caption_says == sample["target"]
        counts["answer_follows_caption"] += caption_says == answer
        counts["chain_names_asked_object"] += (f"{colour.capitalize()} {shape}" in chain
                                               and f"So a {colour} {shape} is" in chain)
        chain = chain.strip()
        listed_line, conclusion = LIST_LINE.search(chain), CONCLUSION.search(chain)
        if listed_line and conclusion:
            concluded_chains += 1
            holds = shape in [item.split(" at ")[0] for item in items(listed_line.group(1))]
            conclusion_follows_list += holds == (conclusion.group(1) == "present")
        lines = LIST_THEN_MATCHES.search(chain)
        if lines:
            matched_chains += 1
            matches_follow_list += items(lines.group(2)) == [item for item in items(lines.group(1))
                                                             if item.split(" at ")[0] == shape]
        lines = LIST_THEN_COUNT.search(chain)
        if lines:
            listed = [item.split(" at ")[0] for item in items(lines.group(1))]
            listed_chains += 1
            matching, written = listed.count(shape), int(lines.group(2))
            count_follows_list += matching == written
            by_written = count_by_listed.setdefault(str(matching), {})
            by_written[str(written)] = by_written.get(str(written), 0) + 1
    shares = {key: (value if key == "items" else round(100 * value / len(samples), 1)) for key, value in counts.items()}
    return {**shares, "chains_with_list_and_count": listed_chains,
            "count_follows_list": round(100 * count_follows_list / listed_chains, 1) if listed_chains else None,
            "count_by_listed": {key: dict(sorted(value.items())) for key, value in sorted(count_by_listed.items())},
            "chains_with_list_and_matches": matched_chains,
            "matches_follow_list": round(100 * matches_follow_list / matched_chains, 1) if matched_chains else None,
            "chains_with_list_and_conclusion": concluded_chains,
            "conclusion_follows_list": (round(100 * conclusion_follows_list / concluded_chains, 1) if concluded_chains
                                        else None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", type=Path, help="evaluation folders (outputs/evals/<hash>)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/presence-chains.json"))
    args = parser.parse_args()
    results = {}
    for folder in args.evaluations:
        if not (folder / "checkpoint.json").is_file():
            raise SystemExit(f"{folder}: no checkpoint.json in it: expected one evaluation's folder (outputs/evals/<hash>)")
        files = sorted(folder.glob("**/*samples_prism_embedded_presence.jsonl"))
        if not files:
            raise SystemExit(f"{folder}: no samples_prism_embedded_presence.jsonl under it (an embedded evaluation?)")
        checkpoint = json.loads((folder / "checkpoint.json").read_text())["paths"][0]
        samples = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
        results[str(folder)] = {"checkpoint": checkpoint, **chain_counts(samples)}
        print(folder, json.dumps(results[str(folder)]))
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
