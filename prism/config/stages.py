"""The stage configs: one dataclass per stage, fields documented in groups, validated in `__post_init__`.

Defaults are the published full-scale values of docs/METHOD.md; the embedded presets are YAML files that
override them (experiments/configs/embedded/). RLVR's algorithms are data: RLVR_ALGORITHM_PRESETS holds each
one's published bundle, laid under the user's values by the loader (`RLVRConfig.config_preset`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from prism.config.loader import check, check_range, deep_merge
from prism.config.sections import (
    HASH_IF_SET,
    ModelConfig,
    OptimConfig,
    PolicyUpdateConfig,
    RolloutBackend,
    RolloutConfig,
    StageConfig,
)

# base and sft
SPLIT_BY_LENGTH_HELP = ("Run each micro-batch in up to four forwards by sample length (prism.data.encoding."
                        "length_buckets), each padded to its own longest sample rather than the micro-batch's; the "
                        "loss is summed over tokens, so loss and gradients equal one forward's to float rounding "
                        "(hence part of the stage's hash). Not with packing.")
TORCH_COMPILE_HELP = ("torch.compile each repeated block (decoder layers, vision blocks) in place for the training "
                      "forward and backward: regional compilation, dynamic shapes. Compiled kernels sum in another "
                      "order than eager ones, so it is part of the stage's hash; a resumed run still ends "
                      "bit-identical on CPU, where it paid only in a process that had the cores to itself "
                      "(README, Throughput).")


@dataclass
class BaseConfig(StageConfig):
    """Embedded world only: generic captioning pretraining of the tiny model (an 'instruct' model that
    does not know the tagged format). In the full world `base` is a checkpoint path."""

    # --- model and data ---
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(preset="embedded-s", dtype="float32", mixed_precision="no"),
        metadata={"help": "The tiny model, built from its preset (random init); float32 throughout on CPU."},
    )
    data_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Untagged caption/QA files (sharegpt JSON); the pipeline fills these from the world export."},
    )
    max_length: int = field(default=1024, metadata={"help": "Maximum sequence length (tokens, prompt + response)."})
    packing: bool = field(default=False, metadata={"help": "Pack each micro-batch's samples into rows of max_length tokens (attention stays within a sample)."})
    split_by_length: bool = field(default=False, metadata={**HASH_IF_SET, "help": SPLIT_BY_LENGTH_HELP})
    torch_compile: bool = field(default=False, metadata={**HASH_IF_SET, "help": TORCH_COMPILE_HELP})

    # --- batching and schedule ---
    per_device_batch_size: int = field(default=16, metadata={"help": "Sequences per device per micro-step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    epochs: int = field(default=1, metadata={"help": "Passes over the data (epochs)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps; null = the epochs decide."},
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.01, lr_scheduler="cosine", warmup_ratio=0.05),
        metadata={"help": "AdamW and schedule."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "max_length", low=1)
        check(not (self.packing and self.split_by_length), "split_by_length",
              "false when packing is true (packed rows have no padding to split)", self.split_by_length,
              related=("packing",))
        check_range(self, "per_device_batch_size", low=1)
        check_range(self, "gradient_accumulation_steps", low=1)
        check_range(self, "epochs", low=1)
        check_range(self, "max_steps", low=1)


@dataclass
class SFTConfig(StageConfig):
    """Stage 1: supervised fine-tuning on tagged demonstrations, loss on assistant tokens only."""

    # --- model and data ---
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(preset="qwen3-vl-4b"),
        metadata={"help": "Policy to fine-tune (published: Qwen3-VL-4B or -8B Instruct)."},
    )
    data_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Demonstration files, sharegpt JSON: files, folders (their *.json) or Hub dataset ids "
                          "org/name[@revision][:path] (prism.hub) (published: 1.26M public + 113K teacher demos)."},
    )
    max_records: int | None = field(
        default=None,
        metadata={"help": "Train on the first N records of data_files only (the SFT data scale ablation); null = all."},
    )
    max_length: int = field(default=8192, metadata={"help": "Maximum sequence length (tokens, prompt + response)."})
    packing: bool = field(default=False, metadata={"help": "Pack each micro-batch's samples into rows of max_length tokens (attention stays within a sample)."})
    split_by_length: bool = field(default=False, metadata={**HASH_IF_SET, "help": SPLIT_BY_LENGTH_HELP})
    torch_compile: bool = field(default=False, metadata={**HASH_IF_SET, "help": TORCH_COMPILE_HELP})

    # --- batching and schedule ---
    per_device_batch_size: int = field(default=4, metadata={"help": "Sequences per device per micro-step (not published)."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "Micro-steps per optimizer step (not published)."})
    epochs: int = field(default=1, metadata={"help": "Passes over the data (epochs; published 1)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps; null = the epochs decide."},
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, lr_scheduler="cosine", warmup_ratio=0.1),
        metadata={"help": "AdamW (published: lr 1e-5, cosine, warm-up ratio 0.1)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "max_records", low=1)
        check_range(self, "max_length", low=1)
        check(not (self.packing and self.split_by_length), "split_by_length",
              "false when packing is true (packed rows have no padding to split)", self.split_by_length,
              related=("packing",))
        check_range(self, "per_device_batch_size", low=1)
        check_range(self, "gradient_accumulation_steps", low=1)
        check_range(self, "epochs", low=1)
        check_range(self, "max_steps", low=1)


@dataclass
class DiscWarmupConfig(StageConfig):
    """Stage 2a: sparse-upcycle a small dense VLM into an MoE discriminator and warm it up with
    Bradley-Terry on (teacher, student) segment pairs of both kinds (caption, think+answer)."""

    # --- backbone ---
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(preset="qwen3-vl-2b"),
        metadata={"help": "Dense backbone VLM that is upcycled (published: Qwen3-VL-2B); its dtype and "
                          "mixed_precision are the discriminator's."},
    )
    variant: Literal["moe", "dense", "text_only", "hard_routed", "whole_response"] = field(
        default="moe",
        metadata={"help": "moe (published); ablations: dense, text_only (no image), hard_routed "
                          "(perception/reasoning experts), whole_response (one score)."},
    )

    # --- mixture of experts (sparse upcycling) ---
    num_experts: int = field(
        default=4, metadata={"help": "Experts per decoder MLP (count); each starts as the dense MLP plus noise."},
    )
    top_k: int = field(default=2, metadata={"help": "Experts routed per token (count), <= num_experts."})
    expert_noise_std: float = field(
        default=0.01, metadata={"help": "Std of the Gaussian noise added to copied expert weights (weight units)."},
    )
    router_init_std: float = field(
        default=0.02, metadata={"help": "Std of the fresh router weights' normal init (weight units)."},
    )
    aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight of the load-balancing aux loss in the total loss (unitless)."},
    )

    # --- value head ---
    head_dropout: float = field(
        default=0.1, metadata={"help": "Dropout probability before the linear(hidden, 1) head, in [0, 1)."},
    )

    # --- data: pair files, or pairs generated by rolling out the SFT policy on the teacher prompts ---
    data_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Warm-up pair files, JSONL: files, folders or Hub dataset ids (prism.hub) (published: ~120K "
                          "pairs); empty = generate pairs (below)."},
    )
    policy: ModelConfig = field(
        default_factory=lambda: ModelConfig(preset="qwen3-vl-4b"),
        metadata={"help": "SFT policy whose rollouts are the student side of generated pairs (the pipeline sets path)."},
    )
    teacher_files: list[str] = field(
        default_factory=list,
        metadata={"help": "RL parquet files with teacher_caption and teacher_cot (files, folders or Hub dataset ids): "
                          "the prompts of generated pairs."},
    )
    rollout_backend: RolloutBackend = field(
        default="vllm", metadata={"help": "Generation backend for generated pairs: hf (CPU, tests) or vllm (GPU)."},
    )
    rollouts_per_prompt: int = field(
        default=1, metadata={"help": "Student rollouts per teacher prompt (count); each format-valid one is a pair."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Student sampling temperature (unitless)."})
    max_new_tokens: int = field(default=8192, metadata={"help": "Maximum student response length (tokens)."})
    heldout_fraction: float = field(
        default=0.05, metadata={"help": "Share of the pairs held out to measure accuracy per segment kind, in [0, 1)."},
    )
    max_length: int = field(default=8192, metadata={"help": "Maximum scored sequence length (tokens, prompt + segment)."})

    # --- batching and schedule ---
    effective_batch_size: int = field(
        default=128, metadata={"help": "Pairs per optimizer step over all devices and accumulation (published 128)."},
    )
    micro_batch_size: int = field(
        default=8, metadata={"help": "Pairs per device per forward/backward (memory only); divides effective_batch_size."},
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the pairs (epochs; published 1)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps; null = the epochs decide."},
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, lr_scheduler="cosine", warmup_ratio=0.1),
        metadata={"help": "AdamW (published: lr 1e-5, cosine, warm-up ratio 0.1)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "num_experts", low=1)
        check(1 <= self.top_k <= self.num_experts, "top_k", f"an int in [1, num_experts={self.num_experts}]",
              self.top_k, related=("num_experts",))
        if self.variant == "hard_routed":  # half the experts per segment kind, routing within its half
            check(self.num_experts % 2 == 0, "num_experts", "an even int for variant hard_routed",
                  self.num_experts, related=("variant",))
            check(self.top_k <= self.num_experts // 2, "top_k",
                  f"an int <= num_experts / 2 = {self.num_experts // 2} for hard_routed",
                  self.top_k, related=("num_experts", "variant"))
        check_range(self, "expert_noise_std", low=0)
        check_range(self, "router_init_std", low=0, low_inclusive=False)
        check_range(self, "aux_loss_coef", low=0)
        check_range(self, "head_dropout", low=0, high=1, high_inclusive=False)
        check_range(self, "rollouts_per_prompt", low=1)
        check_range(self, "temperature", low=0, low_inclusive=False)
        check_range(self, "max_new_tokens", low=1)
        check_range(self, "heldout_fraction", low=0, high=1, high_inclusive=False)
        check_range(self, "max_length", low=1)
        check_range(self, "effective_batch_size", low=1)
        check_range(self, "micro_batch_size", low=1)
        check(self.effective_batch_size % self.micro_batch_size == 0, "micro_batch_size",
              f"a divisor of effective_batch_size={self.effective_batch_size}",
              self.micro_batch_size, related=("effective_batch_size",))
        check_range(self, "epochs", low=1)
        check_range(self, "max_steps", low=1)
        check_whole_model(self, "model", "policy")


@dataclass
class AlignConfig(StageConfig):
    """Stage 2b (PRISM): adversarial on-policy distillation. Each step: rollouts, scores from the
    discriminator before its update, multi-reward GRPO advantages, 1 discriminator update, 1 policy update."""

    # --- models ---
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(preset="qwen3-vl-4b"),
        metadata={"help": "Policy (the SFT checkpoint; the pipeline sets path)."},
    )
    discriminator: ModelConfig = field(
        default_factory=lambda: ModelConfig(preset="qwen3-vl-2b"),
        metadata={"help": "Warmed-up discriminator checkpoint (the pipeline sets path), with its own dtype and "
                          "mixed_precision."},
    )
    data_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompt files with teacher segments: verl parquet with teacher_caption, teacher_cot; files, "
                          "folders or Hub dataset ids (prism.hub)."},
    )

    # --- rollouts ---
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=4, rollouts_per_prompt=16, max_new_tokens=6144),
        metadata={"help": "Sampling (published: 4 prompts x 16 rollouts, temperature 1.0, max response 6144)."},
    )

    # --- reward from discriminator scores ---
    advantage: Literal["prism"] = field(
        default="prism",
        metadata={"help": "Advantage estimator (prism.algorithms.ADVANTAGE_ESTIMATORS): prism = multi-reward GRPO."},
    )
    score_clip: float = field(
        default=10.0,
        metadata={"help": "Scores are clamped to [-score_clip, score_clip] before the advantage and the "
                          "discriminator loss (score units)."},
    )
    alpha: float = field(
        default=0.5, metadata={"help": "Weight of the perception (caption) advantage; 1 - alpha for reasoning. In [0, 1]."},
    )
    format_penalty: float = field(
        default=1.5, metadata={"help": "Advantage subtracted from format-invalid rollouts (advantage units)."},
    )

    # --- discriminator update ---
    disc_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01, grad_clip=1.0, lr_scheduler="constant"),
        metadata={"help": "Discriminator AdamW (published: lr 1e-6, wd 0.01, grad clip 1.0)."},
    )
    score_reg_coef: float = field(
        default=0.001,
        metadata={"help": "Weight of the score regulariser: the mean of the four kinds' mean squared scores "
                          "(teacher and student, caption and reasoning; unitless)."},
    )
    fallback_loss_coef: float = field(
        default=0.01,
        metadata={"help": "When no rollout of the step is format-valid, the discriminator steps on this weight x "
                          "(-log sigmoid of each kind's mean teacher score) + the regulariser (unitless)."},
    )
    teacher_scoring: Literal["per_rollout", "shared"] = field(
        default="per_rollout",
        metadata={"help": "per_rollout (published): the teacher segment is paired with each of the G rollouts and "
                          "scored per pair in train mode (its own head-dropout draw); shared: one draw per prompt "
                          "serves its G pairs, which correlates the group's G teacher terms. The backbone runs "
                          "once per teacher segment either way."},
    )
    disc_aux_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the router load-balancing loss in the discriminator update (unitless; METHOD.md "
                          "lists none for this stage, warm-up uses 0.01)."},
    )
    disc_micro_batch_size: int = field(
        default=8,
        metadata={"help": "Rollouts per discriminator micro-batch (count). As in the published critic, the loss's "
                          "means are taken per micro-batch and the step's gradient is the micro-batches' mean, so "
                          "this is a setting of the loss as well as of memory."},
    )
    disc_forward_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rollouts per discriminator forward (count, a multiple of disc_micro_batch_size): the "
                          "micro-batches it holds run through the backbone together, each keeping its own loss "
                          "means, so the gradient is the same to float rounding. null: one micro-batch a forward "
                          "(the published critic's memory use); larger: fewer, larger forwards where memory allows."},
    )
    disc_max_length: int = field(
        default=8192, metadata={"help": "Maximum scored sequence length (tokens, prompt + segment); longer segments are cut."},
    )

    # --- policy update ---
    policy_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01, lr_scheduler="constant"),
        metadata={"help": "Policy AdamW (published: lr 1e-6 constant, weight decay 0.01)."},
    )
    update: PolicyUpdateConfig = field(
        default_factory=lambda: PolicyUpdateConfig(policy_loss="ppo_clip", clip_low=0.2, clip_high=0.2,
                                                   dual_clip_c=3.0, loss_agg="token-mean"),
        metadata={"help": "Policy loss and batching (published: PPO-clip 0.2, dual clip 3.0, token-mean, no KL)."},
    )

    # --- schedule and diagnostics ---
    steps: int = field(
        default=500, metadata={"help": "Alignment steps (each 1 discriminator + 1 policy update; published 500)."},
    )
    proxy_prompts: int = field(
        default=64,
        metadata={"help": "Fixed prompts rolled out before and after alignment for the distribution proxies "
                          "(proxies.json; count, 0 = skip)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "score_clip", low=0, low_inclusive=False)
        check_range(self, "alpha", low=0, high=1)
        check_range(self, "format_penalty", low=0)
        check_range(self, "score_reg_coef", low=0)
        check_range(self, "fallback_loss_coef", low=0)
        check_range(self, "disc_aux_loss_coef", low=0)
        check_range(self, "disc_micro_batch_size", low=1)
        forward = self.disc_forward_batch_size
        check(forward is None or (forward > 0 and forward % self.disc_micro_batch_size == 0), "disc_forward_batch_size",
              f"null or a positive multiple of disc_micro_batch_size ({self.disc_micro_batch_size})", forward,
              related=("disc_micro_batch_size",))
        check_range(self, "disc_max_length", low=1)
        check_mini_batches(self)
        check_range(self, "steps", low=1)
        check_range(self, "proxy_prompts", low=0)
        check_whole_model(self, "model", "discriminator")


def check_whole_model(cfg: DiscWarmupConfig | AlignConfig, *sections: str) -> None:
    """Freezing and LoRA adapters are the policy stages' (base, sft, rlvr): the other stages train or load their
    models whole, so a setting that they would ignore is refused."""
    for name in sections:
        section = getattr(cfg, name)
        check(section.lora_r == 0, f"{name}.lora_r", "0 (LoRA trains in base, sft and rlvr only)", section.lora_r)
        check(not section.freeze_vision, f"{name}.freeze_vision",
              "false (the vision tower is frozen in base, sft and rlvr only)", section.freeze_vision)


def check_mini_batches(cfg: AlignConfig | RLVRConfig) -> None:
    """Each mini-batch is a slice of whole prompt groups: mini_batches must divide prompts_per_step."""
    check(cfg.rollout.prompts_per_step % cfg.update.mini_batches == 0, "update.mini_batches",
          f"a divisor of rollout.prompts_per_step={cfg.rollout.prompts_per_step}", cfg.update.mini_batches,
          related=("rollout.prompts_per_step",))


# RL algorithm presets are data: the published bundle of choices per algorithm (docs/METHOD.md).
# Class defaults equal the grpo bundle; the others are laid under the user's values by load_config.
RLVR_ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {
        "update": {"policy_loss": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2, "dual_clip_c": 3.0,
                   "loss_agg": "token-mean"},
        "dynamic_sampling": False, "overlong_buffer": None,
        "optim": {"weight_decay": 0.01, "warmup_steps": 0, "warmup_ratio": 0.0},
    },
    "dapo": {
        "update": {"policy_loss": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": 10.0,
                   "loss_agg": "token-mean"},
        "dynamic_sampling": True, "max_num_gen_batches": 10, "gen_batch_multiplier": 3, "overlong_buffer": 4096,
        "optim": {"weight_decay": 0.1, "warmup_steps": 10},
    },
    "gspo": {
        # Sequence-level ratio: its own tiny clip range; no dual clip.
        "update": {"policy_loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4, "dual_clip_c": None,
                   "loss_agg": "seq-mean-token-mean"},
        "dynamic_sampling": False, "overlong_buffer": None,
        "optim": {"weight_decay": 0.1, "warmup_ratio": 0.05},
    },
}


_MISSING = object()


def _get_path(data: Mapping, path: str, default: Any = _MISSING) -> Any:
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return default
        data = data[part]
    return data


def _rlvr_preset_under(data: Mapping) -> tuple[str, dict[str, Any]]:
    """(source label, preset mapping) for the algorithm `data` selects, minus linked settings the user set."""
    algorithm = data.get("algorithm", "grpo")
    if not isinstance(algorithm, str) or algorithm not in RLVR_ALGORITHM_PRESETS:
        return "", {}  # the Literal check reports it, with its line
    preset = copy.deepcopy(RLVR_ALGORITHM_PRESETS[algorithm])
    # Warm-up is one setting spelt two ways: a user's warmup_ratio must not meet the preset's warmup_steps.
    for group in OptimConfig.__config_linked__:
        if any(_get_path(data, f"optim.{name}") is not _MISSING for name in group):
            for name in group:
                preset.get("optim", {}).pop(name, None)
    # DAPO's buffer is 4096 of 8192 published tokens: a smaller response budget keeps at most half of it.
    if preset.get("overlong_buffer") is not None and "overlong_buffer" not in data:
        budget = _get_path(data, "rollout.max_new_tokens", 8192)
        if isinstance(budget, int) and budget >= 2:
            preset["overlong_buffer"] = min(preset["overlong_buffer"], budget // 2)
    return f"RLVR preset {algorithm!r}", preset


def apply_rlvr_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` (a user's RLVR mapping) laid over the preset of the algorithm it selects (default grpo):
    user values win, nested sections merge key by key."""
    return deep_merge(_rlvr_preset_under(data)[1], data)


@dataclass
class RLVRConfig(StageConfig):
    """Stage 3: RL with verifiable rewards (GRPO, DAPO or GSPO). Choosing `algorithm` in a YAML file or
    an override brings its published bundle (RLVR_ALGORITHM_PRESETS); fields set explicitly win."""

    # --- model and data ---
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(preset="qwen3-vl-4b"),
        metadata={"help": "Policy (the SFT or PRISM checkpoint; the pipeline sets path)."},
    )
    data_files: list[str] = field(
        default_factory=list,
        metadata={"help": "RL prompt files: verl parquet with reward_model.ground_truth; files, folders or Hub dataset "
                          "ids (prism.hub)."},
    )
    algorithm: Literal["grpo", "dapo", "gspo"] = field(
        default="grpo", metadata={"help": "RL algorithm; selects the preset bundle laid under this config."},
    )

    # --- rollouts ---
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=32, rollouts_per_prompt=16, max_new_tokens=8192),
        metadata={"help": "Sampling (published: 32 prompts x 16 rollouts, temperature 1.0, max response 8192)."},
    )

    # --- reward and advantage ---
    accuracy_weight: float = field(
        default=0.8, metadata={"help": "Weight of rule-based accuracy in the reward (unitless; published 0.8)."},
    )
    format_weight: float = field(
        default=0.2, metadata={"help": "Weight of format validity in the reward (unitless; published 0.2)."},
    )
    overlong_buffer: int | None = field(
        default=None,
        metadata={"help": "DAPO overlong shaping buffer (tokens): penalty ramps over the last N tokens; null = off."},
    )
    advantage: Literal["grpo"] = field(
        default="grpo",
        metadata={"help": "Advantage estimator (prism.algorithms.ADVANTAGE_ESTIMATORS): grpo = group-normalised "
                          "reward, shared by GRPO, DAPO and GSPO."},
    )

    # --- dynamic sampling (DAPO) ---
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "Drop prompt groups whose accuracies are all equal and sample more until the batch is full."},
    )
    max_num_gen_batches: int = field(
        default=10, metadata={"help": "Most generation batches per step when sampling dynamically (count)."},
    )
    gen_batch_multiplier: int = field(
        default=3, metadata={"help": "Generation batch size as a multiple of prompts_per_step (count)."},
    )
    on_underfilled_batch: Literal["partial", "error"] = field(
        default="partial",
        metadata={"help": "When max_num_gen_batches cannot fill the batch: train on the groups kept and log "
                          "it (partial), or stop with an error (error)."},
    )

    # --- policy update and schedule ---
    update: PolicyUpdateConfig = field(
        default_factory=lambda: PolicyUpdateConfig(policy_loss="ppo_clip", clip_low=0.2, clip_high=0.2,
                                                   dual_clip_c=3.0, loss_agg="token-mean"),
        metadata={"help": "Policy loss and batching; each algorithm's preset sets the loss, clip range, dual clip "
                          "and aggregation."},
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.01, lr_scheduler="constant"),
        metadata={"help": "Policy AdamW (published lr 1e-6; weight decay and warm-up per algorithm)."},
    )
    steps: int = field(default=1500, metadata={"help": "RL steps (published 1500)."})

    @classmethod
    def config_preset(cls, data: Mapping) -> tuple[str, dict[str, Any]]:
        """load_config's hook: the preset to lay under the user's values."""
        return _rlvr_preset_under(data)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "accuracy_weight", low=0)
        check_range(self, "format_weight", low=0)
        check(self.accuracy_weight + self.format_weight > 0, "accuracy_weight",
              "weights with a positive sum", self.accuracy_weight, related=("format_weight",))
        check_range(self, "overlong_buffer", low=1)
        if self.overlong_buffer is not None:
            check(self.overlong_buffer <= self.rollout.max_new_tokens, "overlong_buffer",
                  f"an int <= rollout.max_new_tokens ({self.rollout.max_new_tokens})", self.overlong_buffer,
                  related=("rollout.max_new_tokens",))
        check_range(self, "max_num_gen_batches", low=1)
        check_range(self, "gen_batch_multiplier", low=1)
        check_mini_batches(self)
        check_range(self, "steps", low=1)
        # vLLM's engine is loaded from the checkpoint and synced by weight name; adapters are neither.
        check(self.model.lora_r == 0 or self.rollout.backend == "hf", "model.lora_r",
              "0 with rollout.backend vllm (LoRA runs roll out with the hf backend)", self.model.lora_r,
              related=("rollout.backend",))
