"""Model cards: the README.md of every model folder a stage writes, and of every `prism submit` bundle.

Built with huggingface_hub's ModelCard, ModelCardData and EvalResult, so the front matter is the Hub's own:

    library_name: transformers          every folder loads with transformers (AutoModelForImageTextToText)
    pipeline_tag: image-text-to-text    policies; a discriminator (a reward model: backbone + value head) has none
    base_model: <Hub model id>          the Hub checkpoint the chain of stages started from, when one did
    license: <id>                       apache-2.0 for a model prism built from scratch (an embedded preset); for one
                                        fine-tuned from a Hub checkpoint, the license the base's card states, else none
    datasets: [<Hub dataset id>, ...]   the Hub datasets of this stage and of the stages before it; local data (the
                                        embedded world) has no id and is described in the text instead
    model-index: ...                    evaluation results (submissions)

Lineage: a stage's card carries on from the folder it started from. A folder a prism stage wrote passes on its
base model, license, datasets and training history; a Hub id (`model.path=Qwen/Qwen3-VL-4B-Instruct`, or a snapshot
folder of the Hugging Face cache) is itself the base model, with the license its own card states; any other folder
has no known Hub id, and only its card's license carries over.

`ModelCard.validate` posts the card to the Hub; `check_card` checks offline what can be checked: the card parses
back through ModelCard (its model-index through huggingface_hub's own parser), ids are valid Hub repo ids, and the
fixed fields hold their values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from prism.atomic_io import atomic_write_text
from prism.hub import parse_hub_ref

CARD_FILE = "README.md"  # huggingface_hub.constants.REPOCARD_NAME: what the Hub shows and ModelCard.load reads
LIBRARY = "transformers"
PIPELINE = "image-text-to-text"
OWN_LICENSE = "apache-2.0"  # prism's own (pyproject.toml), for the models it builds from random weights
PRISM_TAG = "prism"  # marks a card written here: a later stage inherits its lineage
REWARD_MODEL_TAG = "reward-model"  # a discriminator's card
TRAINING_HEADING = "## Training"
WORLD_MANIFEST = "world.json"  # prism.data.export.MANIFEST: the folder holding it is an embedded world export
# huggingface_hub's cache layout: models--<org>--<name>/snapshots/<commit> (a repo id never contains "--").
_CACHED_MODEL = re.compile(r"^models--(?P<org>.+?)--(?P<name>.+)$")
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")  # the Hub's license ids: apache-2.0, mit, llama3.1, other, ...

Kind = Literal["policy", "discriminator"]


class ModelCardError(ValueError):
    """A card the Hub would refuse: one line naming the card and the field."""


@dataclass(frozen=True)
class Lineage:
    """Where a model comes from, as its card records it."""

    base_model: str | None = None  # a Hub model id
    license: str | None = None
    license_name: str | None = None  # with license_link, for `license: other`
    license_link: str | None = None
    datasets: tuple[str, ...] = ()  # Hub dataset ids
    history: tuple[str, ...] = ()  # one line per stage that made the model, oldest first


# ----------------------------------------------------------------------------------------------------
# Reading a folder's lineage
# ----------------------------------------------------------------------------------------------------


def read_card(folder: str | Path) -> ModelCard | None:
    """The card in `folder`, or None when it has none or one whose front matter does not parse."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path, ignore_metadata_errors=True)
    except (ValueError, OSError, yaml.YAMLError):
        return None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _history(text: str) -> tuple[str, ...]:
    """The bullet lines of a card's Training section (written by build_model_card)."""
    _, found, rest = text.partition(f"\n{TRAINING_HEADING}\n")
    section = rest.split("\n## ", 1)[0] if found else ""
    return tuple(line[2:] for line in section.splitlines() if line.startswith("- "))


def cached_model_id(folder: str | Path) -> str | None:
    """The Hub id of a snapshot folder of the Hugging Face cache (…/models--org--name/snapshots/<commit>)."""
    folder = Path(folder)
    match = _CACHED_MODEL.match(folder.parent.parent.name) if folder.parent.name == "snapshots" else None
    return f"{match['org']}/{match['name']}" if match and _is_repo_id(f"{match['org']}/{match['name']}") else None


def _is_repo_id(text: Any) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _license_fields(data: ModelCardData) -> dict[str, str]:
    """A card's license, when it states a well-formed one (`other` with its name and link); else nothing, so that
    an odd upstream card costs its license, never the stage's end."""
    fields = {key: data.get(key) for key in ("license", "license_name", "license_link")}
    license_id = fields["license"]
    if not (isinstance(license_id, str) and _LICENSE_ID.match(license_id)):
        return {}
    if license_id != "other":
        return {"license": license_id}
    return fields if all(isinstance(v, str) and v for v in fields.values()) else {}


def folder_lineage(folder: str | Path, hub_id: str | None = None) -> Lineage:
    """The lineage of the model in `folder` (see the module docstring); `hub_id` is the Hub model id the folder
    holds, when the setting named one."""
    card = read_card(folder)
    data = card.data if card is not None else ModelCardData()
    license_fields = _license_fields(data)
    hub_id = hub_id or cached_model_id(folder)
    if hub_id is not None:
        return Lineage(base_model=hub_id, **license_fields)
    if card is not None and PRISM_TAG in (data.get("tags") or []):
        base = [repo_id for repo_id in _as_list(data.get("base_model")) if _is_repo_id(repo_id)]
        datasets = tuple(repo_id for repo_id in _as_list(data.get("datasets")) if _is_repo_id(repo_id))
        return Lineage(base_model=base[0] if base else None, datasets=datasets, history=_history(card.text),
                       **license_fields)
    return Lineage(**license_fields)


def source_lineage(given: str | None, local: str | None) -> Lineage:
    """The lineage of a model setting: `given` as the config writes it, `local` as prism.hub resolved it. None for
    both: the model was built from an embedded preset, with random weights."""
    if local is None:
        return Lineage(license=OWN_LICENSE)
    ref = parse_hub_ref(given)
    return folder_lineage(local, hub_id=ref.repo_id if ref is not None else None)


# ----------------------------------------------------------------------------------------------------
# A stage's card
# ----------------------------------------------------------------------------------------------------


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def dataset_ids(specs: Iterable[str]) -> tuple[str, ...]:
    """The Hub dataset ids among data settings (`org/name[@revision][:path]` gives `org/name`); local paths have none."""
    return _unique(ref.repo_id for ref in map(parse_hub_ref, specs) if ref is not None)


def _in_world(spec: str) -> bool:
    """Whether a local data setting is (a file of) an embedded world export."""
    return any((folder / WORLD_MANIFEST).is_file() for folder in (Path(spec), Path(spec).parent))


def describe_data(specs: Sequence[str]) -> str:
    """The data settings in words: Hub datasets by id, local files by path, the embedded world said so."""
    words = []
    for spec in specs:
        if parse_hub_ref(spec) is not None:
            words.append(f"`{spec}` (Hub dataset)")
        elif _in_world(spec):
            words.append(f"`{spec}` (the PRISM embedded world: generated visual-reasoning scenes, no Hub dataset)")
        else:
            words.append(f"`{spec}` (local file)")
    return ", ".join(words)


def stage_history(stage: str, cfg: Any, role: str, steps: int | None = None) -> str:
    """One line on what `stage` did to the model of its `role` section (`model`, or align's `discriminator`)."""
    section = getattr(cfg, role)
    algorithm = getattr(cfg, "algorithm", None)
    name = f"{stage} ({algorithm})" if algorithm else stage
    start = f"`{section.path}`" if section.path else f"the `{section.preset}` preset with random weights"
    data = [*(getattr(cfg, "data_files", None) or []), *(getattr(cfg, "teacher_files", None) or [])]
    parts = [f"**{name}** from {start}"]
    if data:
        parts.append(f"data {describe_data(data)}")
    policy = getattr(cfg, "policy", None)
    if not getattr(cfg, "data_files", None) and getattr(policy, "path", None):  # disc_warmup generating its pairs
        parts.append(f"student segments generated by `{policy.path}`")
    if steps is not None:
        parts.append(f"{steps} optimizer step{'' if steps == 1 else 's'}")
    parts.append(f"seed {cfg.seed}")
    return "; ".join(parts)


def stage_card(stage: str, cfg: Any, local: Any, folder: str | Path, *, role: str = "model", kind: Kind = "policy",
               steps: int | None = None) -> ModelCard:
    """The card of `folder`, a model the stage trained from its `role` section: the lineage of where it started,
    plus this stage's Hub datasets and one line of history. `local` is the config with its sources resolved."""
    folder = Path(folder)
    upstream = source_lineage(getattr(cfg, role).path, getattr(local, role).path)
    specs = [*(getattr(cfg, "data_files", None) or []), *(getattr(cfg, "teacher_files", None) or [])]
    lineage = replace(upstream, datasets=_unique([*upstream.datasets, *dataset_ids(specs)]),
                      history=(*upstream.history, stage_history(stage, cfg, role, steps)))
    name = folder.parent.name if role == "model" else f"{folder.parent.name}-{folder.name}"
    return build_model_card(name, lineage, kind=kind,
                            about=f"Written by the `{stage}` stage of the PRISM harness into `{folder}`.")


# ----------------------------------------------------------------------------------------------------
# The builder (stages and `prism submit`), the offline check, the write
# ----------------------------------------------------------------------------------------------------

_WHAT = {
    "policy": ("A Qwen3-VL vision-language model trained with the PRISM harness; the training history below lists "
               "the stages that made it (from `sft` on, it answers in PRISM's format: a `<caption>` of bullet "
               "points, `<think>` steps, then `<answer>`)."),
    "discriminator": ("PRISM's discriminator, a reward model: a Qwen3-VL backbone (in the published variant "
                      "sparse-upcycled to a mixture of experts) and a linear value head that score a response's "
                      "caption and its reasoning separately against a teacher's. The head is "
                      "`value_head.safetensors`, the variant and its settings `discriminator.json`."),
}
_USE = {
    "policy": "from transformers import AutoModelForImageTextToText\n\n"
              "model = AutoModelForImageTextToText.from_pretrained(\"path/to/model\")",
    "discriminator": "from prism.models.discriminator import load_discriminator\n\n"
                     "discriminator = load_discriminator(\"path/to/model\")",
}


def _evaluation_table(results: Sequence[EvalResult]) -> str:
    lines = ["| dataset | Hub id or task | split | metric | value |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.dataset_name} | {r.dataset_type} | {r.dataset_split or ''} "
                     f"| {r.metric_name or r.metric_type} | {r.metric_value} |")
    return "\n".join(lines)


def build_model_card(name: str, lineage: Lineage, *, kind: Kind = "policy", about: str = "",
                     eval_results: Sequence[EvalResult] = ()) -> ModelCard:
    """The card of a model: front matter from `lineage` (and `eval_results` as model-index), text saying what the
    model is, how it was trained and, with results, how it scored. Checked offline (check_card)."""
    data = ModelCardData(
        base_model=lineage.base_model,
        license=lineage.license, license_name=lineage.license_name, license_link=lineage.license_link,
        library_name=LIBRARY,
        pipeline_tag=PIPELINE if kind == "policy" else None,
        datasets=list(lineage.datasets) or None,
        tags=[PRISM_TAG, "qwen3-vl", *([REWARD_MODEL_TAG] if kind == "discriminator" else [])],
        model_name=name if eval_results else None,
        eval_results=list(eval_results) or None,
    )
    base = (f"[`{lineage.base_model}`](https://huggingface.co/{lineage.base_model})" if lineage.base_model
            else "none on the Hub (the chain starts from an embedded preset with random weights, or from a local folder)")
    sections = [f"# {name}", " ".join(part for part in (_WHAT[kind], about) if part),
                f"{TRAINING_HEADING}\n\nBase model: {base}.\n\n"
                + ("\n".join(f"- {line}" for line in lineage.history) or "No training history recorded with it.")]
    if eval_results:
        sections.append(f"## Evaluation\n\nWith lmms-eval through `prism eval`.\n\n{_evaluation_table(eval_results)}")
    sections.append(f"## Use\n\n```python\n{_USE[kind]}\n```")
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    check_card(card, where=f"model card of {name}")
    return card


def check_card(card: ModelCard, where: str = "model card") -> None:
    """What the Hub checks that can be checked offline; ModelCardError (one line) names the field."""
    def fail(field: str, expected: str, value: Any) -> ModelCardError:
        return ModelCardError(f"{where}: field '{field}': expected {expected}, got {value!r}")

    try:
        data = ModelCard(str(card)).data  # read back as the Hub and ModelCard.load read it
    except (ValueError, yaml.YAMLError) as error:
        raise ModelCardError(f"{where}: the front matter does not parse: {str(error).splitlines()[0]}") from None
    if data.get("library_name") != LIBRARY:
        raise fail("library_name", repr(LIBRARY), data.get("library_name"))
    if data.get("pipeline_tag") not in (PIPELINE, None):
        raise fail("pipeline_tag", f"{PIPELINE!r} or none", data.get("pipeline_tag"))
    for field in ("base_model", "datasets"):
        for repo_id in _as_list(data.get(field)):
            if not _is_repo_id(repo_id):
                raise fail(field, "Hub repo ids (org/name)", repo_id)
    license_id = data.get("license")
    if license_id is not None and not (isinstance(license_id, str) and _LICENSE_ID.match(license_id)):
        raise fail("license", "a Hub license id (e.g. apache-2.0)", license_id)
    if license_id == "other" and not (data.get("license_name") and data.get("license_link")):
        raise fail("license_name", "license_name and license_link with license 'other'", data.get("license_name"))
    for index, result in enumerate(data.get("eval_results") or []):
        value = result.metric_value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"model-index results[{index}].metrics.value", "a finite number", value)


def write_model_card(folder: str | Path, card: ModelCard) -> Path:
    """`folder`/README.md, checked first, written atomically."""
    path = Path(folder) / CARD_FILE
    check_card(card, where=str(path))
    atomic_write_text(path, str(card))
    return path


def checkpoint_card(checkpoint: str | Path, name: str, eval_results: Sequence[EvalResult]) -> ModelCard:
    """The card of a submission: the lineage of `checkpoint` (from the card its stage wrote into it) with its
    evaluation results as model-index."""
    card = read_card(checkpoint)
    tags = (card.data.get("tags") or []) if card is not None else []
    kind: Kind = "discriminator" if REWARD_MODEL_TAG in tags else "policy"
    return build_model_card(name, folder_lineage(checkpoint), kind=kind, eval_results=eval_results,
                            about=f"Checkpoint `{checkpoint}`.")
