"""What every stage shares: the learning-rate schedule, optimizer groups, stage directories, loading."""

import math

import pytest
import torch

from prism.config import ModelConfig, OptimConfig, SFTConfig, load_config
from prism.models import ModelError
from prism.runtime import RuntimeConfigError, autocast
from prism.stages.common import (
    build_optimizer,
    check_launch_precision,
    compile_repeated_blocks,
    load_policy,
    lr_multiplier,
    make_accelerator,
    stage_dir,
)


def test_warmup_then_cosine_by_hand():
    optim = OptimConfig(lr=1.0, warmup_steps=2, lr_scheduler="cosine")
    # warm-up: (step + 1) / 2; then cosine over the remaining 8 of 10 steps
    assert [lr_multiplier(s, 10, optim) for s in (0, 1)] == [0.5, 1.0]
    assert lr_multiplier(2, 10, optim) == 1.0
    assert lr_multiplier(6, 10, optim) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_multiplier(10, 10, optim) == pytest.approx(0.0)


def test_linear_constant_and_warmup_ratio():
    assert lr_multiplier(6, 10, OptimConfig(warmup_steps=2, lr_scheduler="linear")) == pytest.approx(0.5)
    assert lr_multiplier(9, 10, OptimConfig(lr_scheduler="constant")) == 1.0
    # ratio 0.1 of 25 steps rounds up to 3 warm-up steps
    ratio = OptimConfig(warmup_ratio=0.1, lr_scheduler="constant")
    assert [lr_multiplier(s, 25, ratio) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.05))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, norm weight and bias


def test_stage_dir_is_content_addressed_unless_given(tmp_path):
    a = load_config(SFTConfig, overrides=["model.preset=embedded-s", "optim.lr=1e-4"])
    b = load_config(SFTConfig, overrides=["model.preset=embedded-s", "optim.lr=2e-4"])
    c = load_config(SFTConfig, overrides=["model.preset=embedded-s", "optim.lr=1e-4", "save_every_steps=7"])
    assert stage_dir("sft", a).name.startswith("sft-") and stage_dir("sft", a) != stage_dir("sft", b)
    assert stage_dir("sft", a) == stage_dir("sft", c)  # bookkeeping is not part of the hash
    d = load_config(SFTConfig, overrides=[f"output_dir={tmp_path}/x"])
    assert stage_dir("sft", d) == tmp_path / "x"


def test_torch_compile_is_part_of_the_stage_hash_only_when_set():
    eager = load_config(SFTConfig, overrides=["model.preset=embedded-s"])
    compiled = load_config(SFTConfig, overrides=["model.preset=embedded-s", "torch_compile=true"])
    assert stage_dir("sft", compiled) != stage_dir("sft", eager)  # compiled kernels sum in another order
    assert stage_dir("sft", load_config(SFTConfig, overrides=["model.preset=embedded-s", "torch_compile=false"])) \
        == stage_dir("sft", eager)  # and runs from before the field keep their directories


def test_compile_repeated_blocks_compiles_each_decoder_layer_and_vision_block_in_place(world):
    cfg = load_config(SFTConfig, overrides=["model.preset=embedded-s", f"model.processor_path={world}/tokenizer"])
    model, _ = load_policy(cfg.model, seed=0)
    names = list(model.state_dict())
    text, vision = model.config.text_config.num_hidden_layers, model.config.vision_config.depth
    assert compile_repeated_blocks(model) == text + vision
    layers = [m for m in model.modules() if type(m).__name__.endswith(("TextDecoderLayer", "VisionBlock"))]
    assert len(layers) == text + vision and all(m._compiled_call_impl is not None for m in layers)
    assert list(model.state_dict()) == names  # checkpoints keep their keys
    with pytest.raises(RuntimeConfigError, match="torch_compile: Sequential names no repeated blocks"):
        compile_repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_load_policy_errors_name_the_missing_field():
    cfg = load_config(SFTConfig, overrides=["model.preset=embedded-s"])
    with pytest.raises(ModelError, match="model.processor_path"):
        load_policy(cfg.model, seed=0)
    cfg = load_config(SFTConfig, overrides=["model.preset=qwen3-vl-4b", "model.processor_path=/nowhere"])
    with pytest.raises(ModelError, match="/nowhere"):
        load_policy(cfg.model, seed=0)


def test_embedded_policy_is_built_from_the_world_processor(world):
    cfg = load_config(SFTConfig, overrides=["model.preset=embedded-s", "model.dtype=float32",
                                            "model.mixed_precision=no",
                                            f"model.processor_path={world}/tokenizer"])
    model, processor = load_policy(cfg.model, seed=3)
    again, _ = load_policy(cfg.model, seed=3)
    assert model.training and model.config.text_config.vocab_size == len(processor.tokenizer)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    eager = load_config(SFTConfig, overrides=["model.preset=embedded-s", f"model.processor_path={world}/tokenizer",
                                              "model.attn_implementation=eager"])
    assert load_policy(eager.model, seed=3)[0].config._attn_implementation == "eager"


def test_autocast_computes_in_bf16_over_float32_weights_and_the_launch_must_agree():
    layer = torch.nn.Linear(4, 4)
    with autocast("cpu", ModelConfig().autocast_dtype):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with autocast("cpu", ModelConfig(mixed_precision="no").autocast_dtype):
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    assert layer.weight.dtype == torch.float32
    # accelerate's own setting (launch config): "no", or the model's; it decides FSDP's parameter dtype
    for launch, model in (("no", "bf16"), ("no", "no"), ("bf16", "bf16")):
        check_launch_precision(launch, ModelConfig(mixed_precision=model))
    with pytest.raises(RuntimeConfigError, match="model.mixed_precision is 'no'"):
        check_launch_precision("bf16", ModelConfig(mixed_precision="no"))



def test_an_fsdp_launch_reduces_gradients_in_float32_under_bf16_compute(monkeypatch):
    """accelerate's `mixed_precision: bf16` alone gives MixedPrecisionPolicy(reduce_dtype=bf16); under an FSDP2
    launch our plugin carries param bf16 / reduce float32, and accelerate's own bf16 setting keeps it."""
    from prism.stages.common import fsdp_plugin

    assert fsdp_plugin(ModelConfig()) is None  # not an FSDP launch
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    plugin = fsdp_plugin(ModelConfig())
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with the launch config's mixed_precision
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32,
                                                                               torch.bfloat16)
    assert fsdp_plugin(ModelConfig(mixed_precision="no")).mixed_precision_policy is None  # float32 throughout

def test_a_finished_directory_without_its_config_is_refused_not_taken_as_finished(tmp_path):
    from prism.runtime import mark_done
    from prism.stages.common import start_stage

    run_dir = tmp_path / "sft"
    cfg = load_config(SFTConfig, overrides=["model.preset=embedded-s", f"output_dir={run_dir}"])
    mark_done(run_dir)
    with pytest.raises(FileExistsError, match="marked finished but has no config.yaml"):
        start_stage("sft", cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == ["DONE"]  # nothing written


def test_start_stage_writes_nothing_and_record_config_writes_the_config_on_the_main_process(tmp_path):
    from types import SimpleNamespace

    from prism.config import config_hash
    from prism.stages.common import record_config, start_stage

    run_dir = tmp_path / "runs" / "sft"
    cfg = load_config(SFTConfig, overrides=["model.preset=embedded-s", f"output_dir={run_dir}"])
    assert start_stage("sft", cfg) == (run_dir, False, cfg)
    assert not (tmp_path / "runs").exists()  # a refusal before record_config leaves nothing behind
    waits = []
    record_config(run_dir, cfg, SimpleNamespace(is_main_process=False, wait_for_everyone=lambda: waits.append(1)))
    assert not (tmp_path / "runs").exists() and waits == [1]
    record_config(run_dir, cfg, SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: waits.append(1)))
    assert config_hash(load_config(SFTConfig, run_dir / "config.yaml")) == config_hash(cfg) and waits == [1, 1]
    assert start_stage("sft", cfg)[:2] == (run_dir, False)  # the same config resumes there


def test_bf16_compute_on_cpu_flushes_denormals_and_float32_keeps_them():
    denormal = torch.tensor([1e-39])  # below float32's smallest normal, 1.2e-38
    try:
        make_accelerator(ModelConfig(mixed_precision="no"))
        assert float(denormal * 2) == pytest.approx(2e-39)
        make_accelerator(ModelConfig(mixed_precision="bf16"))
        assert float(denormal * 2) == 0.0
    finally:
        torch.set_flush_denormal(False)
    assert float(denormal * 2) == pytest.approx(2e-39)
