"""Config loading: strict, located errors; layering of file, data and overrides; hashes; presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from prism.config import (
    RLVR_ALGORITHM_PRESETS,
    AlignConfig,
    BaseConfig,
    ConfigError,
    DiscWarmupConfig,
    FieldError,
    OptimConfig,
    PolicyUpdateConfig,
    RLVRConfig,
    RolloutConfig,
    SFTConfig,
    apply_rlvr_preset,
    check,
    check_choice,
    check_range,
    check_types,
    config_hash,
    config_to_dict,
    load_config,
    parse_override,
    read_yaml,
    write_config_yaml,
)

STAGES = [BaseConfig, SFTConfig, DiscWarmupConfig, AlignConfig, RLVRConfig]


def _yaml(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(cls, path=None, overrides=(), data=None) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(cls, path, overrides, data)
    message = str(error.value)
    assert "\n" not in message  # one line, for the CLI
    return message


# A module-level dataclass with every supported field type (get_type_hints needs module globals).
@dataclass
class _Inner:
    rate: float = field(default=0.5, metadata={"help": "A probability."})

    def __post_init__(self) -> None:
        check_range(self, "rate", low=0, high=1)


@dataclass
class _AllTypes:
    count: int = 1
    rate: float = 0.1
    flag: bool = False
    name: str = "a"
    maybe: int | None = None
    mode: Literal["fast", "slow"] = "fast"
    values: list[float] = field(default_factory=list)
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[float, str] = (1.0, "x")
    weights: dict[str, float] = field(default_factory=dict)
    where: Path = Path("out")
    inner: _Inner = field(default_factory=_Inner)
    families: list[str] = field(default_factory=lambda: ["a"])

    def __post_init__(self) -> None:
        check_types(self)
        check_choice(self, "families", ["alpha", "beta", "a"])
        check(self.count <= 10, "count", "an int <= 10", self.count)


# --- located errors ---------------------------------------------------------------------------------


def test_unknown_key_names_file_line_key_suggestion_and_valid_keys(tmp_path):
    path = _yaml(tmp_path, "seed: 1\nmax_length: 4096\nepohcs: 2\n")
    message = _error(SFTConfig, path)
    assert message.startswith(f"{path}:3: field 'epohcs': unknown key")
    assert "did you mean 'epochs'?" in message
    assert "valid keys:" in message and "max_length" in message and "optim" in message


def test_wrong_type_names_expected_type_and_line(tmp_path):
    path = _yaml(tmp_path, "seed: 1\nrollout:\n  temperature: hot\n")
    message = _error(RLVRConfig, path)
    assert message == f"{path}:3: field 'rollout.temperature': expected a float, got 'hot' (a string)"
    assert "expected an int, got 1.5" in _error(SFTConfig, _yaml(tmp_path, "epochs: 1.5\n"))
    assert "expected an int, got true" in _error(SFTConfig, _yaml(tmp_path, "epochs: yes\n"))
    assert "expected a bool" in _error(SFTConfig, _yaml(tmp_path, "packing: 1\n"))


def test_nested_unknown_key_names_the_nested_path_and_line(tmp_path):
    path = _yaml(tmp_path, "optim:\n  lr: 2e-5\n  lrr: 3e-5\n")
    message = _error(SFTConfig, path)
    assert message.startswith(f"{path}:3: field 'optim.lrr': unknown key for OptimConfig (did you mean 'lr'?)")


def test_post_init_range_error_reports_the_nested_fields_line(tmp_path):
    path = _yaml(tmp_path, "seed: 3\noptim:\n  weight_decay: 0.1\n  lr: -1\n")
    assert _error(SFTConfig, path) == f"{path}:4: field 'optim.lr': expected a float > 0, got -1"
    path = _yaml(tmp_path, "model:\n  preset: qwen3-vl-2b\nnum_experts: 4\ntop_k: 6\n")
    assert _error(DiscWarmupConfig, path) == f"{path}:4: field 'top_k': expected an int in [1, num_experts=4], got 6"


def test_cross_field_error_on_a_default_points_at_the_field_it_depends_on(tmp_path):
    path = _yaml(tmp_path, "algorithm: dapo\nsteps: 10\nrollout:\n  max_new_tokens: 1024\noverlong_buffer: 2048\n")
    assert _error(RLVRConfig, path).startswith(
        f"{path}:5: field 'overlong_buffer': expected an int <= rollout.max_new_tokens (1024)")
    path = _yaml(tmp_path, "rollout:\n  prompts_per_step: 6\nupdate:\n  policy_loss: ppo_clip\n")
    assert _error(RLVRConfig, path, ["update.mini_batches=4"]) == (
        "override 'update.mini_batches=4': field 'update.mini_batches': expected a divisor of "
        "rollout.prompts_per_step=6, got 4")
    path = _yaml(tmp_path, "variant: hard_routed\nnum_experts: 2\n")
    assert _error(DiscWarmupConfig, path).startswith(f"{path}:2: field 'top_k': expected an int <= num_experts / 2 = 1")


def test_dapo_preset_buffer_keeps_at_most_half_the_response_budget(tmp_path):
    # Published: 4096 of 8192 tokens. A smaller budget gets half of it; a user's value always wins.
    assert load_config(RLVRConfig, overrides=["algorithm=dapo"]).overlong_buffer == 4096
    assert load_config(RLVRConfig, overrides=["algorithm=dapo", "rollout.max_new_tokens=1024"]).overlong_buffer == 512
    assert load_config(RLVRConfig, overrides=["algorithm=dapo", "rollout.max_new_tokens=1024",
                                              "overlong_buffer=100"]).overlong_buffer == 100
    assert load_config(RLVRConfig, overrides=["algorithm=grpo", "rollout.max_new_tokens=1024"]).overlong_buffer is None


def test_literal_and_list_item_errors(tmp_path):
    path = _yaml(tmp_path, "model:\n  dtype: bf16\ndata_files:\n  - a.json\n  - 3\n")
    message = _error(SFTConfig, path)
    assert message == f"{path}:2: field 'model.dtype': expected one of 'float32', 'bfloat16', 'float16', got 'bf16'; did you mean 'bfloat16'?"
    path = _yaml(tmp_path, "data_files:\n  - a.json\n  - 3\n")
    assert _error(SFTConfig, path).startswith(f"{path}:3: field 'data_files[1]': expected a string, got 3 (an int)")


def test_model_precision_defaults_to_fp32_master_weights_with_bf16_compute(tmp_path):
    for cls in (SFTConfig, DiscWarmupConfig, AlignConfig, RLVRConfig):  # the full world's stages
        cfg = cls()
        for model in [cfg.model, *(getattr(cfg, role) for role in ("policy", "discriminator") if hasattr(cfg, role))]:
            assert (model.dtype, model.mixed_precision, model.autocast_dtype, model.compute_dtype) == (
                "float32", "bf16", "bfloat16", "bfloat16")
    assert BaseConfig().model.mixed_precision == "no"  # embedded only: float32 on CPU
    # pure bf16 is an explicit choice: bf16 parameters, no autocast; `no` unquoted (YAML 1.1 false) means no
    pure = load_config(SFTConfig, overrides=["model.dtype=bfloat16", "model.mixed_precision=no"]).model
    assert (pure.mixed_precision, pure.autocast_dtype, pure.compute_dtype) == ("no", None, "bfloat16")
    # autocast over bf16 parameters (no float32 master copy) is refused, at the line that set the dtype
    path = _yaml(tmp_path, "model:\n  preset: qwen3-vl-4b\n  dtype: bfloat16\n")
    assert _error(SFTConfig, path).startswith(
        f"{path}:3: field 'model.mixed_precision': expected 'no' with dtype bfloat16 (bf16 autocasts float32 master")
    assert _error(AlignConfig, overrides=["discriminator.dtype=float16"]).startswith(
        "override 'discriminator.dtype=float16': field 'discriminator.mixed_precision': expected 'no' with dtype float16")
    assert _error(SFTConfig, overrides=["model.mixed_precision=fp16"]).startswith(  # fp16 needs loss scaling: none
        "override 'model.mixed_precision=fp16': field 'model.mixed_precision': expected one of 'bf16', 'no', 'auto', "
        "got 'fp16'")


def test_duplicate_keys_are_errors_naming_both_lines(tmp_path):
    path = _yaml(tmp_path, "optim:\n  lr: 1e-5\n  warmup_ratio: 0.1\n  lr: 2e-5\n")
    assert _error(SFTConfig, path) == f"{path}:4: field 'optim.lr': duplicate key (first set at line 2)"


def test_file_level_errors(tmp_path):
    assert _error(SFTConfig, _yaml(tmp_path, "- seed: 1\n")).endswith(":1: expected a mapping of fields at the top level, got a list")
    assert "invalid YAML" in _error(SFTConfig, _yaml(tmp_path, "seed: 1\noptim: [1,\n"))
    assert _error(SFTConfig, tmp_path / "missing.yaml") == f"{tmp_path / 'missing.yaml'}: no such config file"
    assert load_config(SFTConfig, _yaml(tmp_path, "# only a comment\n")) == SFTConfig()


# --- overrides and layering ---------------------------------------------------------------------------


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = _yaml(tmp_path, "seed: 1\noutput_dir: outputs/x\noptim:\n  lr: 3e-5\n  weight_decay: 0.1\ndata_files: [a.json]\n")
    cfg = load_config(SFTConfig, path, ["optim.lr=1e-5", "data_files=[b.json, c.json]", "output_dir=null", "seed=7", "model.preset=embedded-s"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.1  # the file's sibling survives a nested override
    assert cfg.data_files == ["b.json", "c.json"] and cfg.output_dir is None and cfg.seed == 7
    assert cfg.model.preset == "embedded-s" and cfg.model.dtype == "float32"  # the stage default's other fields
    assert load_config(SFTConfig, path, ["seed=2", "seed=3"]).seed == 3  # later overrides win


def test_yaml_1_1_floats_without_a_dot_are_floats(tmp_path):
    cfg = load_config(SFTConfig, _yaml(tmp_path, "optim:\n  lr: 1e-5\n  eps: 1.0e8\n"))
    assert cfg.optim.lr == 1e-5 and cfg.optim.eps == 1e8
    # A mapping read elsewhere with plain yaml.safe_load still holds "1e-5" strings.
    assert load_config(SFTConfig, data=yaml.safe_load("optim: {lr: 1e-5}")).optim.lr == 1e-5
    assert load_config(SFTConfig, overrides=["max_steps=1e3"]).max_steps == 1000


def test_bad_override_syntax_names_the_override():
    assert _error(SFTConfig, overrides=["optim.lr"]) == "override 'optim.lr': expected key=value with a dotted key, e.g. optim.lr=1e-5"
    assert _error(SFTConfig, overrides=["optim..lr=1"]).startswith("override 'optim..lr=1': expected key=value")
    assert _error(SFTConfig, overrides=["seeds=[1,"]).startswith("override 'seeds=[1,': invalid YAML")
    assert parse_override("prompt=Answer: yes") == ("prompt", "Answer: yes")
    assert parse_override("x={a: 1}") == ("x", {"a": 1})


def test_unknown_key_and_bad_value_in_override_name_the_override():
    message = _error(SFTConfig, overrides=["optim.lrr=1e-5"])
    assert message.startswith("override 'optim.lrr=1e-5': field 'optim.lrr': unknown key for OptimConfig (did you mean 'lr'?)")
    assert _error(SFTConfig, overrides=["optim.lr=-1"]) == "override 'optim.lr=-1': field 'optim.lr': expected a float > 0, got -1"
    assert _error(SFTConfig, overrides=["optim=3"]).startswith("override 'optim=3': field 'optim': expected a mapping of OptimConfig fields")


def test_partial_section_starts_from_the_stages_default_not_the_class_default(tmp_path):
    cfg = load_config(SFTConfig, _yaml(tmp_path, "optim:\n  lr: 2e-5\n"))
    assert cfg.optim == OptimConfig(lr=2e-5, lr_scheduler="cosine", warmup_ratio=0.1)
    # Warm-up is one setting spelt two ways: giving steps replaces the stage's default ratio.
    cfg = load_config(SFTConfig, overrides=["optim.warmup_steps=50"])
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_ratio) == (50, 0.0)
    assert load_config(AlignConfig, overrides=["disc_optim.lr=2e-6"]).disc_optim.weight_decay == 0.01


def test_data_mapping_layers_between_file_and_overrides(tmp_path):
    path = _yaml(tmp_path, "seed: 1\nsteps: 10\n")
    cfg = load_config(AlignConfig, path, ["steps=30"], data={"steps": 20, "alpha": 0.25})
    assert (cfg.seed, cfg.steps, cfg.alpha) == (1, 30, 0.25)
    assert _error(AlignConfig, data={"alpha": 2}) == "config data: field 'alpha': expected a float in [0, 1], got 2"


def test_sections_of_a_bigger_yaml_keep_their_lines(tmp_path):
    path = _yaml(tmp_path, "name: table1\nrlvr:\n  algorithm: grpo\n  rollout:\n    temperature: -1\n")
    document = read_yaml(path)
    assert document.lines["rlvr.rollout.temperature"] == 5
    assert _error(RLVRConfig, data=document.section("rlvr")) == (
        f"{path}:5: field 'rollout.temperature': expected a float > 0, got -1")


def test_defaults_load_with_no_file():
    for cls in STAGES:
        assert load_config(cls) == cls()
    cfg = load_config(RLVRConfig)
    rollout = cfg.rollout
    assert (rollout.prompts_per_step, rollout.rollouts_per_prompt, cfg.steps, rollout.max_new_tokens) == (32, 16, 1500, 8192)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.accuracy_weight, cfg.format_weight, cfg.update.kl_coef) == (
        1e-6, 0.01, 0.8, 0.2, 0.0)
    align = AlignConfig()
    assert (align.rollout.prompts_per_step, align.rollout.rollouts_per_prompt, align.rollout.max_new_tokens) == (4, 16, 6144)
    assert (align.alpha, align.format_penalty, align.score_clip, align.fallback_loss_coef) == (0.5, 1.5, 10.0, 0.01)
    assert (align.disc_optim.lr, align.disc_optim.weight_decay, align.policy_optim.lr_scheduler, align.steps) == (1e-6, 0.01, "constant", 500)
    assert (align.policy_optim.weight_decay, align.update.clip_low, align.update.dual_clip_c) == (0.01, 0.2, 3.0)
    assert (align.teacher_scoring, align.advantage, cfg.advantage) == ("per_rollout", "prism", "grpo")
    disc = DiscWarmupConfig()
    assert (disc.num_experts, disc.top_k, disc.expert_noise_std, disc.router_init_std, disc.aux_loss_coef) == (4, 2, 0.01, 0.02, 0.01)
    sft = SFTConfig()
    assert (sft.optim.lr, sft.optim.lr_scheduler, sft.optim.warmup_ratio, sft.max_length, sft.epochs) == (1e-5, "cosine", 0.1, 8192, 1)


def test_every_field_has_help():
    for cls in [*STAGES, OptimConfig, RolloutConfig, PolicyUpdateConfig]:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


# --- direct construction uses the same checks -----------------------------------------------------------


def test_direct_construction_is_checked_and_normalised():
    with pytest.raises(FieldError) as error:
        PolicyUpdateConfig(clip_low=0)
    assert str(error.value) == "field 'clip_low': expected a float in (0, 1), got 0"
    with pytest.raises(FieldError, match="field 'update.clip_low': expected a float in"):
        RLVRConfig(update={"clip_low": 1})
    with pytest.raises(FieldError, match="field 'steps': expected an int, got '10'"):
        AlignConfig(steps="10")
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)
    assert OptimConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert config_hash(OptimConfig(lr=1)) == config_hash(OptimConfig(lr=1.0))


def test_all_supported_types(tmp_path):
    text = (
        "count: 3\nrate: 1\nflag: true\nname: b\nmaybe: 4\nmode: slow\nvalues: [1, 2.5, 3e-2]\n"
        "sizes: [3, 4, 5]\npair: [2, y]\nweights: {a: 1, b: 2e-1}\nwhere: x/y\ninner: {rate: 0.2}\nfamilies: [alpha]\n"
    )
    cfg = load_config(_AllTypes, _yaml(tmp_path, text))
    assert cfg == _AllTypes(3, 1.0, True, "b", 4, "slow", [1.0, 2.5, 0.03], (3, 4, 5), (2.0, "y"), {"a": 1.0, "b": 0.2},
                            Path("x/y"), _Inner(0.2), ["alpha"])
    assert load_config(_AllTypes, overrides=["maybe=null"]).maybe is None
    assert load_config(_AllTypes, overrides=["inner.rate=1"]).inner.rate == 1.0
    assert "expected a list of 2 items (float, string)" in _error(_AllTypes, overrides=["pair=[1]"])
    assert "field 'weights.a': expected a float" in _error(_AllTypes, overrides=["weights={a: x}"])
    assert "field 'inner.rate': expected a float in [0, 1], got 2" in _error(_AllTypes, overrides=["inner.rate=2"])
    assert "field 'maybe': expected an int, got 'x'" in _error(_AllTypes, overrides=["maybe=x"])
    message = _error(_AllTypes, overrides=["families=[alpha, betta]"])
    assert "field 'families[1]': expected one of 'alpha', 'beta', 'a', got 'betta'; did you mean 'beta'?" in message
    assert "field 'count': expected an int <= 10, got 11" in _error(_AllTypes, overrides=["count=11"])


# --- hashes and round trips -----------------------------------------------------------------------------


def test_config_hash_is_stable_and_changes_with_one_field():
    first = load_config(RLVRConfig, overrides=["algorithm=dapo"])
    again = load_config(RLVRConfig, overrides=["algorithm=dapo"])
    assert config_hash(first) == config_hash(again) and len(config_hash(first)) == 12
    assert config_hash(first) != config_hash(load_config(RLVRConfig, overrides=["algorithm=dapo", "optim.lr=2e-6"]))
    assert config_hash(first) != config_hash(load_config(RLVRConfig, overrides=["algorithm=dapo", "seed=1"]))
    # Where a stage writes and how often it logs do not change what it computes.
    assert config_hash(first) == config_hash(load_config(RLVRConfig, overrides=["algorithm=dapo", "log_every_steps=5", "output_dir=elsewhere"]))
    assert json.loads(json.dumps(config_to_dict(first))) == config_to_dict(first)
    assert config_to_dict(first)["optim"]["betas"] == [0.9, 0.999]


def test_write_config_yaml_round_trips(tmp_path):
    cfgs = [
        load_config(SFTConfig, overrides=["optim.lr=3e-5", "data_files=['1e-5', 'yes', a.json]", "output_dir=out/sft", "max_steps=7"]),
        load_config(RLVRConfig, overrides=["algorithm=gspo", "update.kl_coef=0.1", "seed=4"]),
        load_config(DiscWarmupConfig, overrides=["variant=hard_routed", "top_k=1"]),
        load_config(AlignConfig, overrides=["alpha=0.3"]),
        BaseConfig(),
        _AllTypes(where=Path("a/b"), weights={"x": 0.5}),
    ]
    for cfg in cfgs:
        path = write_config_yaml(cfg, tmp_path / "resolved" / f"{type(cfg).__name__}.yaml")
        assert load_config(type(cfg), path) == cfg
        assert config_hash(load_config(type(cfg), path)) == config_hash(cfg)
    assert sorted(p.name for p in (tmp_path / "resolved").iterdir()) == sorted(f"{type(c).__name__}.yaml" for c in cfgs)


# --- RLVR algorithm presets ----------------------------------------------------------------------------


def test_rlvr_presets_apply_under_user_values(tmp_path):
    dapo = load_config(RLVRConfig, _yaml(tmp_path, "algorithm: dapo\n"))
    assert (dapo.update.clip_low, dapo.update.clip_high, dapo.update.loss_agg, dapo.dynamic_sampling) == (
        0.2, 0.28, "token-mean", True)
    assert (dapo.update.policy_loss, dapo.update.dual_clip_c) == ("ppo_clip", 10.0)
    assert (dapo.overlong_buffer, dapo.optim.weight_decay, dapo.optim.warmup_steps, dapo.optim.lr) == (4096, 0.1, 10, 1e-6)
    gspo = load_config(RLVRConfig, overrides=["algorithm=gspo"])
    assert (gspo.update.policy_loss, gspo.update.clip_low, gspo.update.clip_high, gspo.update.loss_agg,
            gspo.update.dual_clip_c) == ("gspo", 3e-4, 4e-4, "seq-mean-token-mean", None)
    assert (gspo.optim.weight_decay, gspo.optim.warmup_ratio, gspo.optim.warmup_steps, gspo.overlong_buffer) == (0.1, 0.05, 0, None)
    grpo = load_config(RLVRConfig)
    assert (grpo.update.clip_high, grpo.update.dual_clip_c, grpo.dynamic_sampling, grpo.overlong_buffer) == (
        0.2, 3.0, False, None)
    assert (grpo.optim.weight_decay, grpo.optim.warmup_steps) == (0.01, 0)

    # User values win, in the file and in overrides; a user's warm-up ratio replaces the preset's steps.
    path = _yaml(tmp_path, "algorithm: dapo\nupdate:\n  clip_high: 0.3\noptim:\n  warmup_ratio: 0.02\n")
    cfg = load_config(RLVRConfig, path, ["overlong_buffer=null"])
    assert (cfg.update.clip_high, cfg.update.dual_clip_c, cfg.overlong_buffer, cfg.dynamic_sampling) == (
        0.3, 10.0, None, True)
    assert (cfg.optim.warmup_ratio, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (0.02, 0, 0.1)
    # The algorithm chosen by an override picks the preset, even over the file's.
    assert load_config(RLVRConfig, path, ["algorithm=grpo"]).update.clip_high == 0.3
    assert load_config(RLVRConfig, path, ["algorithm=grpo"]).dynamic_sampling is False

    merged = apply_rlvr_preset({"algorithm": "dapo", "update": {"clip_high": 0.25}, "optim": {"lr": 2e-6}})
    assert merged["update"]["clip_high"] == 0.25 and merged["update"]["dual_clip_c"] == 10.0
    assert merged["optim"] == {"weight_decay": 0.1, "warmup_steps": 10, "lr": 2e-6}
    assert RLVR_ALGORITHM_PRESETS["dapo"]["update"]["clip_high"] == 0.28  # the preset itself is untouched
    assert "null for policy_loss gspo" in _error(RLVRConfig, overrides=["algorithm=gspo", "update.dual_clip_c=3"])
    assert "did you mean 'dapo'?" in _error(RLVRConfig, overrides=["algorithm=dapoo"])


def test_world_style_configs_get_located_field_errors(tmp_path):
    # Another module's dataclass raising FieldError itself (as WorldConfig does) is located the same way.
    path = _yaml(tmp_path, "count: 2\ninner:\n  rate: 0.5\nfamilies: [gamma]\n")
    assert _error(_AllTypes, path).startswith(f"{path}:4: field 'families[0]': expected one of")


# --- LoRA and vision-tower freezing (prism.models.peft applies them) ------------------------------------


def test_lora_fields_are_checked_with_their_line(tmp_path):
    path = _yaml(tmp_path, "model:\n  path: ckpt\n  lora_r: -1\n")
    assert _error(SFTConfig, path) == f"{path}:3: field 'model.lora_r': expected an int >= 0, got -1"
    assert _error(SFTConfig, overrides=["model.path=ckpt", "model.lora_r=8", "model.lora_dropout=1"]).endswith(
        "field 'model.lora_dropout': expected a float in [0, 1), got 1")
    assert _error(SFTConfig, overrides=["model.lora_alpha=0"]).endswith(
        "field 'model.lora_alpha': expected an int > 0, got 0")
    assert _error(SFTConfig, overrides=["model.lora_target_modules=[q_proj, '']"]).endswith(
        "field 'model.lora_target_modules[1]': expected a module name such as q_proj, got ''")
    # an adapter names the checkpoint it adapts: a model built from its preset has none
    assert _error(BaseConfig, overrides=["model.lora_r=8"]).endswith(
        "field 'model.lora_r': expected 0 when model.path is null (LoRA adapts a checkpoint: set path), got 8")


def test_lora_settings_round_trip_and_change_the_hash(tmp_path):
    cfg = load_config(SFTConfig, overrides=["model.path=ckpt", "model.lora_r=16", "model.freeze_vision=true",
                                            "model.lora_target_modules=[q_proj,v_proj]"])
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_target_modules) == (16, None, ("q_proj", "v_proj"))
    assert load_config(SFTConfig, write_config_yaml(cfg, tmp_path / "c.yaml")) == cfg
    assert config_hash(cfg) != config_hash(load_config(SFTConfig, overrides=["model.path=ckpt"]))
    assert load_config(SFTConfig).model.lora_target_modules == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_stages_that_train_whole_models_refuse_lora_and_freezing():
    assert _error(AlignConfig, overrides=["model.path=ckpt", "model.lora_r=8"]).endswith(
        "field 'model.lora_r': expected 0 (LoRA trains in base, sft and rlvr only), got 8")
    assert _error(AlignConfig, overrides=["discriminator.freeze_vision=true"]).endswith(
        "field 'discriminator.freeze_vision': expected false (the vision tower is frozen in base, sft and rlvr only), "
        "got true")
    assert "field 'policy.lora_r'" in _error(DiscWarmupConfig, overrides=["policy.path=ckpt", "policy.lora_r=4"])
    # RLVR: the vLLM engine syncs weights by name, which adapters do not have; the hf backend rolls out with them
    assert _error(RLVRConfig, overrides=["model.path=ckpt", "model.lora_r=8"]).endswith(
        "field 'model.lora_r': expected 0 with rollout.backend vllm (LoRA runs roll out with the hf backend), got 8")
    hf = load_config(RLVRConfig, overrides=["model.path=ckpt", "model.lora_r=8", "rollout.backend=hf"])
    assert hf.model.lora_r == 8
    assert load_config(RLVRConfig, overrides=["model.freeze_vision=true"]).model.freeze_vision


def test_a_field_hashed_only_if_set_renames_no_existing_run():
    from dataclasses import dataclass, field

    from prism.config import config_hash
    from prism.config.sections import HASH_IF_SET

    @dataclass
    class Before:
        lr: float = 1e-3

    @dataclass
    class After:  # Before, plus a field added later
        lr: float = 1e-3
        lora_r: int = field(default=0, metadata=HASH_IF_SET)

    assert config_hash(After()) == config_hash(Before())
    assert config_hash(After(lora_r=8)) != config_hash(Before())
    assert config_hash(After(lr=2e-3)) == config_hash(Before(lr=2e-3))
