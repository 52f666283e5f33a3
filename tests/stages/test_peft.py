"""LoRA adapters and vision-tower freezing in the policy stages (prism.models.peft): what trains, what is saved,
what loads it, resume, and the settings refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prism.config import ConfigError
from prism.data.encoding import collate, encode_conversation
from prism.data.formats import read_sharegpt
from prism.models import load_model, load_processor
from prism.models.peft import ADAPTER_DIR, LANGUAGE_MODEL, VISION_TOWER
from prism.models.tokenizer import IMAGE_TOKEN_ID
from prism.runtime import list_checkpoints, load_checkpoint
from prism.stages import sft
from prism.stages.rlvr import run as run_rlvr
from prism.stages.sft import run as run_sft
from prism.workers import worker_env
from tests.models.fixtures import checkpoint_layout
from tests.torchrun import torchrun

from .conftest import interrupted_after, model_tensors
from .test_rlvr import rlvr_config, varied_reward  # noqa: F401  (fixture)
from .test_sft import sft_config

LORA = ["model.lora_r=4", "model.lora_alpha=8", "optim.lr=1e-2"]
SHORT = ["max_steps=3", "per_device_batch_size=2", "gradient_accumulation_steps=1", "save_every_steps=1",
         "keep_last_checkpoints=0"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def checkpoint_state(out, step: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(dict(list_checkpoints(out))[step])["model_state"]


def base_weights_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict without its adapters, under the plain model's names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def adapted(name: str) -> bool:
    """Whether a plain checkpoint's tensor belongs to a layer that the default lora_target_modules adapt."""
    return name.startswith(f"{LANGUAGE_MODEL}.") and name.rsplit(".", 2)[-2] in PROJECTIONS


def sample_batch(world, processor) -> dict[str, torch.Tensor]:
    """Two SFT records with their images, as the recipe feeds them (labels dropped)."""
    encoded = [encode_conversation(processor, record, 512) for record in read_sharegpt(world / "sft.json")[:2]]
    batch = collate(encoded, processor.tokenizer.pad_token_id, IMAGE_TOKEN_ID)
    return {k: v for k, v in batch.items() if k != "labels"}


def test_lora_sft_trains_only_the_adapters_and_saves_an_adapter_that_peft_loads(world, policy_dir, tmp_path):
    from peft import PeftModel

    out = run_sft(sft_config(world, policy_dir, tmp_path / "lora", *LORA, *SHORT))
    before = model_tensors(policy_dir)

    # every base weight, vision tower included, is what it was; every adapter moved (B starts at zero)
    first, last = checkpoint_state(out, 1), checkpoint_state(out, 3)
    base = checkpoint_layout(base_weights_of(last))
    assert all(torch.equal(base[k], before[k]) for k in before)  # (base also holds lm_head, tied to the embedding)
    adapters = {k: v for k, v in last.items() if ".lora_" in k}
    assert len(adapters) == 2 * 2 * len(PROJECTIONS)  # A and B of 7 projections in each of 2 decoder layers
    assert all(k.startswith(f"{LANGUAGE_MODEL}.") for k in adapters)
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_B." in k)
    assert all(not torch.equal(first[k], last[k]) for k in adapters)
    saved = load_checkpoint(dict(list_checkpoints(out))[3])["optimizer"]
    assert sum(len(group["params"]) for group in saved["param_groups"]) == len(adapters)  # AdamW holds them only

    # model/ is the merged plain checkpoint: only the adapted projections differ from the base
    merged = model_tensors(out / "model")
    assert merged.keys() == before.keys()
    assert {k for k in before if not torch.equal(merged[k], before[k])} == {k for k in before if adapted(k)}

    # model/adapter/ is a peft adapter of the stage's base folder, and it computes what the merged model does
    adapter_dir = out / "model" / ADAPTER_DIR
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(policy_dir.resolve())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert not (adapter_dir / "README.md").exists()  # no placeholder card naming a local path as base_model
    batch = sample_batch(world, load_processor(policy_dir))
    assert batch["pixel_values"] is not None
    with torch.no_grad():
        from_adapter = PeftModel.from_pretrained(load_model(config["base_model_name_or_path"]), adapter_dir).eval()
        expected = load_model(out / "model")(**batch).logits
        found = from_adapter(**batch).logits
        plain_base = load_model(policy_dir)(**batch).logits
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(plain_base, expected, atol=1e-3)  # the adapter changes what the model computes

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"]["lora_r"] == 4 and (out / "DONE").is_file()


def test_lora_sft_interrupted_after_a_checkpoint_resumes_bit_identical(world, policy_dir, tmp_path, monkeypatch):
    """LoRA dropout draws from the RNG the checkpoint restores; the adapters and AdamW's state of them resume."""
    steps = [*LORA, "model.lora_dropout=0.1", "max_steps=4", "per_device_batch_size=2",
             "gradient_accumulation_steps=1", "save_every_steps=2"]
    whole = run_sft(sft_config(world, policy_dir, tmp_path / "whole", *steps))
    with interrupted_after(monkeypatch, sft, step=2):
        run_sft(sft_config(world, policy_dir, tmp_path / "cut", *steps))
    torch.manual_seed(12345)  # the process's RNG moved on meanwhile: the checkpoint must restore it
    resumed = run_sft(sft_config(world, policy_dir, tmp_path / "cut", *steps))

    for file in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        a, b = load_file(str(whole / "model" / file)), load_file(str(resumed / "model" / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    timing = {"seconds", "tokens_per_s"}
    metrics = [[{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (whole, resumed)]
    assert metrics[0] == metrics[1]


def test_freeze_vision_leaves_every_vision_weight_and_trains_the_language_model(world, policy_dir, tmp_path):
    out = run_sft(sft_config(world, policy_dir, tmp_path / "frozen", "model.freeze_vision=true", *SHORT))
    before, after = model_tensors(policy_dir), model_tensors(out / "model")
    vision = [k for k in before if k.startswith(f"{VISION_TOWER}.")]
    language = [k for k in before if k.startswith(f"{LANGUAGE_MODEL}.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert all(not torch.equal(before[k], after[k]) for k in language)  # embeddings, norms, every projection
    assert not (out / "model" / ADAPTER_DIR).exists()
    saved = load_checkpoint(dict(list_checkpoints(out))[3])["optimizer"]
    trainable = [k for k, _ in load_model(policy_dir).named_parameters() if not k.startswith(f"{VISION_TOWER}.")]
    assert sum(len(group["params"]) for group in saved["param_groups"]) == len(trainable)


def test_lora_rlvr_trains_only_the_adapters(world, policy_dir, tmp_path, varied_reward):  # noqa: F811
    # with a KL penalty: the reference is a frozen copy of the policy as it starts (its adapters' B = 0)
    out = run_rlvr(rlvr_config(world, policy_dir, tmp_path / "rlvr", "model.lora_r=4", "update.kl_coef=0.1"))
    before = model_tensors(policy_dir)
    state = checkpoint_state(out, 2)
    base = checkpoint_layout(base_weights_of(state))
    assert all(torch.equal(base[k], before[k]) for k in before)
    assert all(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)
    config = json.loads((out / "model" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(policy_dir.resolve())
    merged = model_tensors(out / "model")
    assert {k for k in before if not torch.equal(merged[k], before[k])} == {k for k in before if adapted(k)}
    kl = [json.loads(line)["kl_ref"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0  # the first step's policy is the reference


def test_a_target_module_that_matches_no_language_model_layer_is_refused_before_anything_is_written(
        world, policy_dir, tmp_path):
    # qkv is the vision tower's attention: adapters go to the language model only
    cfg = sft_config(world, policy_dir, tmp_path / "bad", *LORA, "model.lora_target_modules=[q_proj,qkv]")
    with pytest.raises(ConfigError, match=r"model\.lora_target_modules\[1\].*'qkv' matches no linear layer"):
        run_sft(cfg)
    assert not (tmp_path / "bad").exists()


def test_lora_under_fsdp_is_refused(world, policy_dir, tmp_path, monkeypatch):
    from prism.runtime import RuntimeConfigError
    from prism.stages import common

    monkeypatch.setattr(common, "is_fsdp", lambda accelerator: True)
    with pytest.raises(RuntimeConfigError, match="model.lora_r: LoRA runs are not FSDP-sharded"):
        run_sft(sft_config(world, policy_dir, tmp_path / "fsdp", *LORA))
    assert not (tmp_path / "fsdp").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_lora_sft_on_two_processes_equals_one_on_the_same_global_batch(world, policy_dir, tmp_path):
    """Under DDP only the adapters carry gradients (the frozen base weights have no hooks); the main process saves."""
    def train(out, processes, per_device):
        args = ["-m", "prism.cli", "train", "sft", f"model.path={policy_dir}", "model.preset=embedded-s",
                "model.dtype=float32", "model.mixed_precision=no", "model.lora_r=4", f"data_files=[{world}/sft.json]",
                "max_length=512", "max_steps=2", "optim.lr=1e-2", f"per_device_batch_size={per_device}",
                "gradient_accumulation_steps=1", f"output_dir={out}"]
        if processes > 1:
            result = torchrun(args, processes=processes, timeout=180)
        else:
            env = worker_env(1, shares_cores=False)
            result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    two, one = train(tmp_path / "two", 2, per_device=2), train(tmp_path / "one", 1, per_device=4)
    assert [a["loss"] for a in two] == pytest.approx([b["loss"] for b in one], rel=1e-5)
    for file in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "two" / "model" / file)), load_file(str(tmp_path / "one" / "model" / file))
        # AdamW's first step of A (its gradient is 0 until B moves) is about lr x sign: float rounding shows at 1e-5
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), file


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_fsdp_resume_freeze_vision_keeps_the_vision_tower_and_resumes_bit_identical(world, policy_dir, tmp_path):
    """FSDP2 shards frozen and trainable parameters alike (tests/stages/fsdp_stage_worker.py: uninterrupted, stopped
    after checkpoint 2, resumed from its shards)."""
    worker = Path(__file__).with_name("fsdp_stage_worker.py")
    overrides = ["model.preset=embedded-s", f"model.path={policy_dir}", "model.dtype=float32",
                 "model.mixed_precision=no", "model.freeze_vision=true", f"data_files=[{world}/sft.json]",
                 "max_length=512", "per_device_batch_size=4", "gradient_accumulation_steps=2", "max_steps=4",
                 "optim.lr=3e-3", "optim.warmup_steps=1", "save_every_steps=2"]
    result = torchrun([str(worker), "sft", str(tmp_path), "2", *overrides], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    before = model_tensors(policy_dir)
    whole, resumed = model_tensors(tmp_path / "whole" / "model"), model_tensors(tmp_path / "cut" / "model")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert all(torch.equal(whole[k], before[k]) for k in before if k.startswith(f"{VISION_TOWER}."))
    assert all(not torch.equal(whole[k], before[k]) for k in before if k.startswith(f"{LANGUAGE_MODEL}."))
