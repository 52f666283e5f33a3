"""prism.hub: Hub ids in model and data settings resolve to a local path, the Hugging Face cache, or one line.

The cache here is built by hand in the layout huggingface_hub reads (`<cache>/<type>s--<org>--<name>/refs/main`
holding a commit, `snapshots/<commit>/<files>`); HF_HUB_OFFLINE=1 keeps every test off the network."""

import json
import shutil
from pathlib import Path

import pytest

from prism.config import ConfigError
from prism.data.formats import DataError
from prism.hub import (
    HubError,
    HubRef,
    cache_status,
    fetch_command,
    parse_hub_ref,
    resolve_data_files,
    resolve_model_path,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty HF_HOME under tmp_path and the Hub switched off; returns the hub cache folder."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home" / "hub"


def cached_repo(cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes | str], commit: str = COMMIT) -> Path:
    """A snapshot of `repo_id` in `cache` as huggingface_hub lays it out; returns the snapshot folder."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline: huggingface_hub reads the file as the hash
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        (snapshot / name).write_bytes(data)
    return snapshot


CHECKPOINT = {"config.json": "{}", "model.safetensors": b"weights", "tokenizer_config.json": "{}"}


def test_parse_reads_org_name_revision_and_path_and_leaves_paths_alone(tmp_path, monkeypatch):
    assert parse_hub_ref("Qwen/Qwen3-VL-4B-Instruct") == HubRef("Qwen/Qwen3-VL-4B-Instruct")
    assert parse_hub_ref("prism-vlm/rl_dataset@v1:data/rl.parquet") == HubRef("prism-vlm/rl_dataset", "v1", "data/rl.parquet")
    assert str(parse_hub_ref("o/n@v1:a/*.json")) == "o/n@v1:a/*.json" and parse_hub_ref("o/n:a/*.json").is_glob
    for local in (None, "/abs/org/name", "./org/name", "~/org/name", "outputs/stages/sft-1/model", "a/b/c.json",
                  "o/n:../escape", "bad//name", "o/n:/abs"):
        assert parse_hub_ref(local) is None, local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub_ref("org/name") is None  # an existing local path always wins


def test_offline_and_not_cached_is_one_line_naming_the_id_the_fetch_and_the_setting(offline):
    with pytest.raises(HubError) as raised:
        resolve_model_path("Qwen/Qwen3-VL-4B-Instruct", "model.path")
    message = str(raised.value)
    assert isinstance(raised.value, ConfigError)  # the CLI prints it as one line and exits 2
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and str(offline) in message
    assert "`hf download Qwen/Qwen3-VL-4B-Instruct`" in message
    assert "`hf download Qwen/Qwen3-VL-4B-Instruct --local-dir DIR` and set model.path=DIR" in message

    with pytest.raises(HubError) as raised:
        resolve_data_files(["/local/a.parquet", "prism-vlm/rl_dataset:rl_training_data_5.9k.parquet"], "data_files",
                           ".parquet")
    message = str(raised.value)
    assert message.startswith("data_files[1]=prism-vlm/rl_dataset:rl_training_data_5.9k.parquet: ")
    assert ("`hf download prism-vlm/rl_dataset rl_training_data_5.9k.parquet --repo-type dataset --local-dir DIR` "
            "and set data_files[1]=DIR/rl_training_data_5.9k.parquet") in message
    assert cache_status("Qwen/Qwen3-VL-4B-Instruct", "model") == "not cached"
    assert cache_status("/local/model", "model") is None


def test_fetch_commands_for_globs_folders_and_revisions():
    assert fetch_command(HubRef("o/n", None, "data/*.json"), "dataset") == \
        "hf download o/n --include 'data/*.json' --repo-type dataset"
    assert fetch_command(HubRef("o/n", "abc", "ckpt/"), "model") == "hf download o/n --include 'ckpt/*' --revision abc"


def test_a_cached_snapshot_resolves_offline(offline):
    snapshot = cached_repo(offline, "model", "Qwen/Qwen3-VL-4B-Instruct", CHECKPOINT)
    assert resolve_model_path("Qwen/Qwen3-VL-4B-Instruct", "model.path") == str(snapshot)
    assert resolve_model_path(f"Qwen/Qwen3-VL-4B-Instruct@{COMMIT}", "model.path") == str(snapshot)  # pinned
    assert cache_status("Qwen/Qwen3-VL-4B-Instruct", "model") == "cached"
    # a folder inside a model repository (several checkpoints in one repo)
    inner = cached_repo(offline, "model", "org/ckpts", {f"step-2/{k}": v for k, v in CHECKPOINT.items()})
    assert resolve_model_path("org/ckpts:step-2", "model.path") == str(inner / "step-2")
    # a partial snapshot (config only, say from an earlier single-file download) is not a checkpoint
    cached_repo(offline, "model", "org/partial", {"config.json": "{}"})
    with pytest.raises(HubError, match="no complete copy of model org/partial"):
        resolve_model_path("org/partial", "policy.path")


def test_cached_datasets_resolve_to_files_a_whole_repo_to_its_files_of_the_stage_format(offline):
    rl = cached_repo(offline, "dataset", "prism-vlm/rl_dataset",
                     {"rl_training_data_5.9k.parquet": b"a", "rl_training_data_filtered_2k.parquet": b"b", "README.md": "x"})
    assert resolve_data_files(["prism-vlm/rl_dataset:rl_training_data_5.9k.parquet"], "data_files", ".parquet") == \
        [str(rl / "rl_training_data_5.9k.parquet")]
    assert resolve_data_files(["prism-vlm/rl_dataset:rl_training_data_*.parquet"], "data_files", ".parquet") == \
        [str(rl / "rl_training_data_5.9k.parquet"), str(rl / "rl_training_data_filtered_2k.parquet")]
    with pytest.raises(HubError, match="rl_dataset:missing.parquet"):
        resolve_data_files(["prism-vlm/rl_dataset:missing.parquet"], "data_files", ".parquet")
    sft = cached_repo(offline, "dataset", "prism-vlm/gemini_distill",
                      {"dataset_info.json": "{}", "part-2.json": "[]", "sub/part-1.json": "[]", "images/a.png": b"",
                       ".cache/huggingface/x.json": "{}"})
    assert resolve_data_files(["prism-vlm/gemini_distill"], "data_files", ".json") == \
        [str(sft / "part-2.json"), str(sft / "sub/part-1.json")]
    with pytest.raises(DataError, match="holds no .jsonl file"):
        resolve_data_files(["prism-vlm/gemini_distill"], "data_files", ".jsonl")


def test_online_an_uncached_id_is_downloaded_into_the_cache_and_a_dead_network_is_one_line(tmp_path, monkeypatch):
    """The download branch, with huggingface_hub's snapshot_download stood in for (no network in tests)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    cache, calls = tmp_path / "hf_home" / "hub", []

    def download(repo_id, *, repo_type, revision, cache_dir, allow_patterns, local_files_only=False):
        calls.append((repo_id, repo_type, allow_patterns, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(cached_repo(Path(cache_dir), repo_type, repo_id, {"rl.parquet": b"x"}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_data_files(["o/rl:rl.parquet"], "data_files", ".parquet") == \
        [str(cache / "datasets--o--rl" / "snapshots" / COMMIT / "rl.parquet")]
    assert calls == [("o/rl", "dataset", ["rl.parquet", "rl.parquet/*"], True),
                     ("o/rl", "dataset", ["rl.parquet", "rl.parquet/*"], False)]

    def unreachable(repo_id, *, local_files_only=False, **kwargs):
        raise LocalEntryNotFoundError("not cached") if local_files_only else ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(HubError, match=r"^model.path=o/m: .* is unreachable \(ConnectionError\)"):
        resolve_model_path("o/m", "model.path")


def test_local_paths_pass_through_and_local_folders_expand(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(None, "model.path") is None
    assert resolve_model_path(str(tmp_path / "absent"), "model.path") == str(tmp_path / "absent")  # the loader reports it
    Path("Qwen/Qwen3-VL-4B-Instruct").mkdir(parents=True)  # a local folder that looks like an id wins
    assert resolve_model_path("Qwen/Qwen3-VL-4B-Instruct", "model.path") == "Qwen/Qwen3-VL-4B-Instruct"
    (tmp_path / "pairs").mkdir()
    for name in ("b.jsonl", "a.jsonl", "notes.txt"):
        (tmp_path / "pairs" / name).write_text("")
    assert resolve_data_files(["missing.jsonl", "pairs"], "data_files", ".jsonl") == \
        ["missing.jsonl", "pairs/a.jsonl", "pairs/b.jsonl"]


def test_a_stage_starts_from_cached_hub_ids_and_records_them(world, policy_dir, tmp_path, offline):
    """SFT with model.path and data_files as Hub ids: config.yaml keeps the ids, the manifest records the snapshots."""
    from prism.config import SFTConfig, load_config
    from prism.stages.sft import run

    model = cached_repo(offline, "model", "prism-test/tiny-policy", {})
    shutil.copytree(policy_dir, model, dirs_exist_ok=True)
    data = cached_repo(offline, "dataset", "prism-test/world", {})
    shutil.copytree(world, data, dirs_exist_ok=True)
    cfg = load_config(SFTConfig, overrides=[
        "model.preset=embedded-s", "model.path=prism-test/tiny-policy", "model.dtype=float32",
        "model.mixed_precision=no", "data_files=[prism-test/world:sft.json]", "max_length=512",
        "per_device_batch_size=4", "gradient_accumulation_steps=1", "max_steps=1", f"output_dir={tmp_path / 'sft'}"])
    out = run(cfg)
    assert (out / "DONE").is_file()
    assert "prism-test/tiny-policy" in (out / "config.yaml").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"]["path"] == "prism-test/tiny-policy"
    assert manifest["extra"]["sources"]["model.path"] == {"given": "prism-test/tiny-policy", "local": str(model)}
    assert manifest["extra"]["sources"]["data_files"]["local"] == [str(data / "sft.json")]
    assert set(manifest["upstream"]) == {f"data:{data / 'sft.json'}"}


def test_cli_stage_with_an_uncached_id_offline_is_one_line_and_writes_nothing(tmp_path, capsys, offline):
    from prism.cli import main

    assert main(["train", "sft", "model.path=Qwen/Qwen3-VL-4B-Instruct",
                 "data_files=[prism-vlm/gemini_distill]", f"output_dir={tmp_path}/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("prism: error: sft: model.path=Qwen/Qwen3-VL-4B-Instruct: ")
    assert "hf download Qwen/Qwen3-VL-4B-Instruct" in err and "set model.path=DIR" in err
    assert not (tmp_path / "out").exists()
