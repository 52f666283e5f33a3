"""prism.model_card: the README.md every model folder a stage writes carries, read back with huggingface_hub.

Hub ids resolve from a Hugging Face cache built by hand under tmp_path (HF_HUB_OFFLINE=1: nothing downloads)."""

import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard

from prism.config import AlignConfig, BaseConfig, SFTConfig, load_config
from prism.model_card import (
    Lineage,
    ModelCardError,
    build_model_card,
    folder_lineage,
    source_lineage,
    write_model_card,
)
from prism.stages import STAGES
from prism.stages.common import stage_name, write_model_cards

COMMIT = "0123456789abcdef0123456789abcdef01234567"
QWEN = "Qwen/Qwen3-VL-4B-Instruct"
QWEN_CARD = "---\nlicense: apache-2.0\npipeline_tag: image-text-to-text\nlibrary_name: transformers\n---\n\n# Qwen3-VL\n"
FIXED = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": ["prism", "qwen3-vl"]}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, the Hub switched off; returns the cache folder."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home" / "hub"


def cached_repo(cache: Path, repo_type: str, repo_id: str, files: dict[str, Path | str]) -> Path:
    """A snapshot of `repo_id` in `cache` as huggingface_hub lays it out (files or folders copied, or texts)."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        if isinstance(source, str):
            (snapshot / name).write_text(source)
        elif source.is_dir():
            shutil.copytree(source, snapshot / name, dirs_exist_ok=True)
        else:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, snapshot / name)
    return snapshot


def sft_config(out: Path, model: str, data: str) -> SFTConfig:
    return load_config(SFTConfig, overrides=[
        "model.preset=embedded-s", f"model.path={model}", "model.dtype=float32", "model.mixed_precision=no",
        f"data_files=[{data}]", "max_length=512", "per_device_batch_size=2", "gradient_accumulation_steps=1",
        "max_steps=1", "optim.warmup_steps=1", f"output_dir={out}"])


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_a_stage_from_hub_ids_names_them_and_the_next_stage_carries_them_on(world, policy_dir, hub_cache, tmp_path):
    from prism.stages.sft import run

    cached_repo(hub_cache, "model", QWEN, {".": policy_dir, "README.md": QWEN_CARD})
    cached_repo(hub_cache, "dataset", "prism-vlm/gemini_distill",
                {"sft.json": world / "sft.json", "images/sft": world / "images" / "sft"})
    first = run(sft_config(tmp_path / "sft", QWEN, "prism-vlm/gemini_distill"))
    card = card_of(first / "model")
    assert card.data.to_dict() == {"base_model": QWEN, "datasets": ["prism-vlm/gemini_distill"],
                                   "license": "apache-2.0", **FIXED}

    # from that folder, on local data: base model, license and Hub datasets carry on; the world adds no id
    second = run(sft_config(tmp_path / "sft2", str(first / "model"), f"{world}/sft.json"))
    card = card_of(second / "model")
    assert card.data.to_dict() == {"base_model": QWEN, "datasets": ["prism-vlm/gemini_distill"],
                                   "license": "apache-2.0", **FIXED}
    history = folder_lineage(second / "model").history
    assert len(history) == 2 and history[0].startswith(f"**sft** from `{QWEN}`; data `prism-vlm/gemini_distill` "
                                                       "(Hub dataset); 1 optimizer step")
    assert history[1].startswith(f"**sft** from `{first / 'model'}`; data `{world}/sft.json` (the PRISM embedded world")


def test_a_model_built_from_a_preset_is_apache_2_with_no_base_model_and_no_hub_data(world, tmp_path):
    cfg = load_config(BaseConfig, overrides=[
        "model.preset=embedded-s", f"model.processor_path={world}/tokenizer", f"data_files=[{world}/base.json]",
        "max_length=512", "per_device_batch_size=2", "max_steps=1", "optim.warmup_steps=1",
        f"output_dir={tmp_path / 'base'}"])
    out = STAGES["base"][1](cfg)
    card = card_of(out / "model")
    assert card.data.to_dict() == {"license": "apache-2.0", **FIXED}  # no base_model, no datasets: none is known
    assert "Base model: none on the Hub" in card.text
    assert f"- **base** from the `embedded-s` preset with random weights; data `{world}/base.json` (the PRISM " \
           "embedded world: generated visual-reasoning scenes, no Hub dataset); 1 optimizer step; seed 0" in card.text


def test_align_writes_a_card_into_its_policy_and_into_its_discriminator(tmp_path):
    sft, warm, run_dir = tmp_path / "sft" / "model", tmp_path / "disc_warmup" / "model", tmp_path / "align"
    upstream = [(sft, "policy", Lineage(base_model=QWEN, license="apache-2.0", datasets=("prism-vlm/gemini_distill",),
                                        history=("**sft** ...",))),
                (warm, "discriminator", Lineage(base_model="Qwen/Qwen3-VL-2B-Instruct", license="apache-2.0",
                                                datasets=("prism-vlm/pairs",), history=("**disc_warmup** ...",)))]
    for folder, kind, lineage in upstream:  # the cards their stages wrote
        folder.mkdir(parents=True)
        write_model_card(folder, build_model_card(folder.parent.name, lineage, kind=kind))
    for folder, files in (("model", ["config.json"]), ("discriminator", ["config.json", "discriminator.json"])):
        (run_dir / folder).mkdir(parents=True)
        for name in files:
            (run_dir / folder / name).write_text("{}")
    cfg = load_config(AlignConfig, overrides=[f"model.path={sft}", f"discriminator.path={warm}",
                                              "data_files=[prism-vlm/rl_dataset:rl_training_data_5.9k.parquet]"])
    write_model_cards(run_dir, cfg, cfg, steps=12)

    policy = card_of(run_dir / "model").data.to_dict()
    assert policy == {"base_model": QWEN, "datasets": ["prism-vlm/gemini_distill", "prism-vlm/rl_dataset"],
                      "license": "apache-2.0", **FIXED}
    discriminator = card_of(run_dir / "discriminator").data.to_dict()
    assert discriminator == {"base_model": "Qwen/Qwen3-VL-2B-Instruct", "datasets": ["prism-vlm/pairs", "prism-vlm/rl_dataset"],
                             "license": "apache-2.0", "library_name": "transformers",  # no pipeline: a reward model
                             "tags": ["prism", "qwen3-vl", "reward-model"]}
    align = f"**align** from `{warm}`; data `prism-vlm/rl_dataset:rl_training_data_5.9k.parquet` (Hub dataset); "
    assert folder_lineage(run_dir / "discriminator").history == ("**disc_warmup** ...",
                                                                 align + "12 optimizer steps; seed 0")


def test_lineage_of_a_hub_snapshot_a_foreign_folder_and_a_folder_without_a_card(tmp_path):
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-3.2-11B-Vision" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.2\nbase_model: meta-llama/Llama-3.2-11B\n---\n")
    assert folder_lineage(snapshot) == Lineage(base_model="meta-llama/Llama-3.2-11B-Vision", license="llama3.2")
    # a folder whose Hub id is unknown: its card's license carries over, its own base model is not ours to claim
    foreign = tmp_path / "downloaded"
    foreign.mkdir()
    (foreign / "README.md").write_text("---\nlicense: other\nlicense_name: custom\nlicense_link: https://x.org/l\n"
                                       "base_model: someone/else\ntags: [vision]\n---\n")
    assert folder_lineage(foreign) == Lineage(license="other", license_name="custom", license_link="https://x.org/l")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "README.md").write_text("---\nlicense: [mit, Apache 2]\n---\n")  # costs the license, never the stage
    assert folder_lineage(odd, hub_id="org/odd") == Lineage(base_model="org/odd")
    (tmp_path / "bare").mkdir()
    assert folder_lineage(tmp_path / "bare") == Lineage()
    assert source_lineage(None, None) == Lineage(license="apache-2.0")  # built from a preset: our own model
    assert source_lineage(QWEN, str(foreign)).base_model == QWEN  # the setting named the Hub id


def test_model_index_round_trips_through_the_hubs_parser():
    result = EvalResult(task_type="image-text-to-text", dataset_type="lmms-lab-encoder/MMMU", dataset_name="prism_mmmu_val",
                        dataset_split="validation", metric_type="accuracy", metric_value=41.23)
    card = build_model_card("ckpt-1", Lineage(license="apache-2.0"), eval_results=[result])
    data = ModelCard(str(card)).data
    assert data.model_name == "ckpt-1" and data.eval_results == [result]
    assert "| prism_mmmu_val | lmms-lab-encoder/MMMU | validation | accuracy | 41.23 |" in card.text


@pytest.mark.parametrize("lineage, results, field", [
    (Lineage(datasets=("not a valid id!",)), [], "datasets"),
    (Lineage(base_model="org/name/extra"), [], "base_model"),
    (Lineage(license="Apache 2.0"), [], "license"),
    (Lineage(license="other"), [], "license_name"),
    (Lineage(), [EvalResult(task_type="t", dataset_type="d", dataset_name="d", metric_type="accuracy",
                            metric_value=float("nan"))], "model-index results[0].metrics.value"),
])
def test_a_card_the_hub_would_refuse_is_one_line_naming_the_field(lineage, results, field):
    with pytest.raises(ModelCardError, match=rf"^model card of m: field '{re.escape(field)}': expected "):
        build_model_card("m", lineage, eval_results=results)


def test_stage_names_agree_with_the_cli():
    for name, (config_class, _) in STAGES.items():
        assert stage_name(config_class()) == name
