"""Config sections that several stages hold: optimizer, model, bookkeeping, and the rollout and policy-update
sections that alignment and RLVR share. Each stage gives a section its own defaults (a default_factory); a YAML
file that sets part of a section starts from the stage's default for the rest (prism.config.loader)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prism.config.loader import check, check_nonempty, check_range, check_types

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
RolloutBackend = Literal["hf", "vllm"]
PolicyLoss = Literal["ppo_clip", "gspo"]
NO_HASH = {"hash": False}  # field metadata: left out of config_hash (bookkeeping, not what a stage computes)
# Field metadata of a field added after runs exist: in config_hash only when set to something other than its
# default, so adding it renames no existing stage directory.
HASH_IF_SET = {"hash": "if_set"}


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule. Each stage holds one (or two) with its own defaults."""

    __config_linked__ = (("warmup_ratio", "warmup_steps"),)

    # --- AdamW ---
    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate (per optimizer step)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (AdamW), unitless."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW (beta1, beta2), unitless."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon, unitless."})
    grad_clip: float | None = field(default=1.0, metadata={"help": "Max global gradient L2 norm; null = no clipping."})

    # --- schedule ---
    lr_scheduler: Literal["cosine", "constant", "linear"] = field(
        default="cosine", metadata={"help": "Decay after warm-up: cosine or linear to 0, or constant."},
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Linear warm-up as a fraction of total optimizer steps, in [0, 1)."},
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Linear warm-up in optimizer steps; use this or warmup_ratio, not both."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self, "lr", low=0, low_inclusive=False)
        check_range(self, "weight_decay", low=0)
        check(all(0 <= b < 1 for b in self.betas), "betas", "two floats in [0, 1)", self.betas)
        check_range(self, "eps", low=0, low_inclusive=False)
        check_range(self, "grad_clip", low=0, low_inclusive=False)
        check_range(self, "warmup_ratio", low=0, high=1, high_inclusive=False)
        check_range(self, "warmup_steps", low=0)
        check(self.warmup_steps == 0 or self.warmup_ratio == 0, "warmup_steps",
              "0 when warmup_ratio is set (give one of the two)", self.warmup_steps, related=("warmup_ratio",))


@dataclass
class ModelConfig:
    """Which model a stage loads, and its precision: float32 master weights and optimizer state with bf16
    compute by default. Whether the preset exists and needs a `path` is the model code's call."""

    preset: str = field(
        default="qwen3-vl-4b", metadata={"help": "Model preset: embedded-s/-m (tiny, built offline) or qwen3-vl-2b/4b/8b."},
    )
    path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder, or a Hub model id org/name[@revision] resolved when the stage starts "
                          "(prism.hub: the HF cache, else a download); null = build from the preset (embedded only)."},
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "Parameter dtype: the master weights the optimizer updates (its AdamW state has the same "
                          "dtype), what checkpoints hold (so a resumed run equals an uninterrupted one) and what "
                          "the final model/ folder is saved in. float32 with mixed_precision bf16 is the standard; "
                          "bfloat16 with mixed_precision no is pure bf16, an explicit choice: an update much smaller "
                          "than a weight's bf16 spacing (at lr 1e-6 almost all of them) rounds away."},
    )
    mixed_precision: Literal["bf16", "no", "auto"] = field(
        default="bf16",
        metadata={"help": "Compute dtype of the forwards (training, scoring, HF rollouts): bf16 runs them under "
                          "torch.autocast to bfloat16 over the float32 weights (on CPU attention itself computes in "
                          "float32: prism.models.attention); no computes in dtype; auto is bf16 where the device "
                          "computes bf16 in hardware (a GPU that supports it; a CPU with AMX or AVX-512 BF16: "
                          "prism.hardware) and no elsewhere, where bf16 is emulated and slow. vLLM rollouts run in "
                          "the compute dtype. No fp16: it needs loss scaling."},
    )
    processor_path: str | None = field(
        default=None,
        metadata={"help": "Processor folder (tokenizer, image processor) for a model built from its preset, e.g. the "
                          "world export's tokenizer/, or a Hub model id; null = model.path."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code shipped with the checkpoint to run."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (memory for time; 4B/8B on GPU)."},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "transformers attention backend: sdpa, eager, flash_attention_2, ..."},
    )

    # --- what trains (the policy stages base, sft and rlvr; prism.models.peft) ---
    freeze_vision: bool = field(
        default=False,
        metadata={**HASH_IF_SET,
                  "help": "Keep the vision tower (patch embedding, blocks, mergers) fixed: requires_grad false, left "
                          "out of the optimizer; the language model trains alone."},
    )
    lora_r: int = field(
        default=0,
        metadata={**HASH_IF_SET,
                  "help": "LoRA rank (peft); 0 = off: every weight trains. With LoRA only the adapters train, model/ "
                          "holds the merged model and model/adapter/ the adapter. Needs model.path."},
    )
    lora_alpha: int | None = field(
        default=None,
        metadata={**HASH_IF_SET,
                  "help": "LoRA scale: an adapter's update is multiplied by lora_alpha / lora_r; null = 2 x lora_r "
                          "(LLaMA-Factory's default)."},
    )
    lora_dropout: float = field(
        default=0.0, metadata={**HASH_IF_SET, "help": "Dropout on the input of each LoRA adapter, in [0, 1)."},
    )
    lora_target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        metadata={**HASH_IF_SET,
                  "help": "Linear layers of the language model that get adapters, by name (attention and MLP "
                          "projections); never the vision tower. Each name must match a layer."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_nonempty(self, "preset")
        check_nonempty(self, "path")
        check_nonempty(self, "processor_path")
        check_nonempty(self, "attn_implementation")
        check_range(self, "lora_r", low=0)
        check_range(self, "lora_alpha", low=0, low_inclusive=False)
        check_range(self, "lora_dropout", low=0, high=1, high_inclusive=False)
        check_nonempty(self, "lora_target_modules")
        for index, name in enumerate(self.lora_target_modules):
            check(bool(name.strip()), f"lora_target_modules[{index}]", "a module name such as q_proj", name)
        # An adapter is saved relative to the checkpoint it adapts; a model built from random init has none.
        check(self.lora_r == 0 or self.path is not None, "lora_r", "0 when model.path is null (LoRA adapts a "
              "checkpoint: set path)", self.lora_r, related=("path",))
        # Autocast over low-precision parameters would keep no full-precision master copy to update.
        check(self.mixed_precision == "no" or self.dtype == "float32", "mixed_precision",
              f"'no' with dtype {self.dtype} (bf16 autocasts float32 master weights; pure {self.dtype} "
              "parameters are chosen by dtype with mixed_precision: no)", self.mixed_precision, related=("dtype",))

    @property
    def precision(self) -> Literal["bf16", "no"]:
        """`mixed_precision` with auto resolved on this machine (prism.hardware.native_bf16)."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        from prism.hardware import native_bf16

        return "bf16" if native_bf16() else "no"

    @property
    def autocast_dtype(self) -> str | None:
        """The dtype forwards autocast to (bfloat16), or None: they compute in `dtype`."""
        return "bfloat16" if self.precision == "bf16" else None

    @property
    def compute_dtype(self) -> str:
        """The dtype forwards compute in (what a vLLM engine is built with)."""
        return self.autocast_dtype or self.dtype


@dataclass
class StageConfig:
    """What every stage has: its seed and its bookkeeping (bookkeeping is left out of config_hash)."""

    # --- reproducibility and bookkeeping ---
    seed: int = field(default=0, metadata={"help": "Root seed of the stage (data order, init, sampling), in [0, 2**32)."})
    output_dir: str | None = field(
        default=None, metadata={**NO_HASH, "help": "Stage directory; null = outputs/stages/<stage>-<config hash>."},
    )
    save_every_steps: int = field(
        default=100, metadata={**NO_HASH, "help": "Checkpoint every N optimizer steps (0 = only at the end)."},
    )
    log_every_steps: int = field(
        default=1, metadata={**NO_HASH, "help": "Append metrics to metrics.jsonl every N optimizer steps."},
    )
    keep_last_checkpoints: int = field(
        default=2, metadata={**NO_HASH, "help": "Resumable checkpoints kept (newest first; 0 = keep all)."},
    )
    tracking: Literal["none", "wandb", "tensorboard"] = field(
        default="none",
        metadata={**NO_HASH, "help": "Experiment tracker besides metrics.jsonl, one run per stage across resumes, its "
                                     "files in the stage directory: wandb (offline unless WANDB_MODE is set or wandb "
                                     "has an API key; `wandb sync` uploads) or tensorboard (needs the tensorboard "
                                     "package)."},
    )
    tracking_group: str | None = field(
        default=None,
        metadata={**NO_HASH, "help": "Tracker group of the stage's run (wandb's group); a matrix sets "
                                     "<matrix>-<preset>; null = WANDB_RUN_GROUP if set, else none."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self, "seed", low=0, high=2**32, high_inclusive=False)
        check_nonempty(self, "output_dir")
        check_range(self, "save_every_steps", low=0)
        check_range(self, "log_every_steps", low=1)
        check_range(self, "keep_last_checkpoints", low=0)
        check_nonempty(self, "tracking_group")


@dataclass
class RolloutConfig:
    """How a step samples: which prompts, how many rollouts, and the decoding settings (alignment and RLVR)."""

    backend: RolloutBackend = field(
        default="vllm", metadata={"help": "Generation backend: hf (any device; CPU tests) or vllm (GPU)."},
    )
    prompts_per_step: int = field(default=32, metadata={"help": "Prompts per step, over all processes (count)."})
    rollouts_per_prompt: int = field(
        default=16, metadata={"help": "Rollouts per prompt (group size G, count), >= 2 for group normalisation."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (unitless; published 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    max_new_tokens: int = field(default=8192, metadata={"help": "Maximum response length (tokens)."})
    min_new_tokens: int = field(
        default=0, metadata={"help": "Minimum response length (tokens; 0 = none). Benchmarks set it to fix the work."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self, "prompts_per_step", low=1)
        check_range(self, "rollouts_per_prompt", low=2)
        check_range(self, "temperature", low=0, low_inclusive=False)
        check_range(self, "top_p", low=0, high=1, low_inclusive=False)
        check_range(self, "max_new_tokens", low=1)
        check_range(self, "min_new_tokens", low=0, high=self.max_new_tokens)


@dataclass
class PolicyUpdateConfig:
    """The policy update of a step (alignment and RLVR): its loss, looked up by name in
    prism.algorithms.POLICY_LOSSES and LOSS_AGGREGATIONS, and how the step's groups are batched. The clip
    bounds keep these names from the YAML file to the loss function."""

    # --- loss ---
    policy_loss: PolicyLoss = field(
        default="ppo_clip",
        metadata={"help": "ppo_clip (token-level ratio: GRPO, DAPO, alignment) or gspo (sequence-level ratio)."},
    )
    clip_low: float = field(
        default=0.2, metadata={"help": "Ratio lower clip: 1 - clip_low (unitless; GRPO/DAPO 0.2, GSPO 3e-4)."},
    )
    clip_high: float = field(
        default=0.2, metadata={"help": "Ratio upper clip: 1 + clip_high (unitless; GRPO 0.2, DAPO 0.28, GSPO 4e-4)."},
    )
    dual_clip_c: float | None = field(
        default=3.0,
        metadata={"help": "Dual clip for negative advantages: the token loss is at most -A * c (ratio units, > 1; "
                          "GRPO and alignment 3, DAPO 10); null = off. ppo_clip only."},
    )
    loss_agg: LossAgg = field(
        default="token-mean", metadata={"help": "How token losses are aggregated into the batch loss."},
    )
    kl_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the k3 KL penalty to the initial policy (unitless; published 0 = no reference "
                          "model)."},
    )

    # --- batching ---
    mini_batches: int = field(
        default=1,
        metadata={"help": "Optimizer updates per step (count; published 1), each on a slice of the prompt groups. "
                          "With more than one, the ratio leaves 1 and the clip acts."},
    )
    micro_batch_size: int = field(
        default=4, metadata={"help": "Rollouts per forward/backward, rounded to whole groups (memory only)."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self, "clip_low", low=0, high=1, low_inclusive=False, high_inclusive=False)
        check_range(self, "clip_high", low=0, low_inclusive=False)
        check_range(self, "dual_clip_c", low=1, low_inclusive=False)
        check(self.policy_loss == "ppo_clip" or self.dual_clip_c is None, "dual_clip_c",
              "null for policy_loss gspo (its ratio is per sequence; the dual clip is token-level)",
              self.dual_clip_c, related=("policy_loss",))
        check_range(self, "kl_coef", low=0)
        check_range(self, "mini_batches", low=1)
        check_range(self, "micro_batch_size", low=1)
