"""What every stage recipe does the same way: where it writes, how it loads the policy, its optimizer and
schedule, the process group, and the resume / finish protocol. Training loops themselves live in the
recipes (sft.py, rlvr.py), one file each, read top to bottom.

A stage directory holds:
  config.yaml        the resolved config (written once the data and models have loaded)
  checkpoints/       resumable checkpoints (model, optimizer, scheduler, RNG, data position)
  metrics.jsonl      one line per logged step
  model/             the final policy as a plain Hugging Face checkpoint folder (with its processor and its model
                     card, README.md: prism.model_card)
  manifest.json      config, seed, versions, git commit, upstream hashes, checkpoint checksums
  DONE               written last: the stage is finished and is never run again
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from prism.atomic_io import check_output_folder
from prism.config import ModelConfig, OptimConfig, config_hash, load_config, write_config_yaml
from prism.data.formats import DataError
from prism.hub import HubError, resolve_data_files, resolve_model_path
from prism.models import ModelError, build_model, check_checkpoint_folder, load_model, load_processor
from prism.models.peft import setup_trainable
from prism.models.presets import get_preset
from prism.runtime import (
    RuntimeConfigError,
    StagePreempted,
    full_model_state,
    is_done,
    is_sharded_checkpoint,
    latest_checkpoint,
    mark_done,
    preemption_requested,
    require_tracker,
    restore_checkpoint,
    restore_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    sha256_file,
    write_manifest,
)

FINAL_MODEL = "model"


def stage_dir(stage: str, cfg: Any) -> Path:
    """cfg.output_dir, or outputs/stages/<stage>-<config hash> (the hash covers model and data paths)."""
    return Path(cfg.output_dir) if cfg.output_dir else Path("outputs/stages") / f"{stage}-{config_hash(cfg)}"


# The format a stage's data settings are read in: a folder (or a whole Hub dataset) expands to these files.
DATA_SUFFIXES = {"base": ".json", "sft": ".json", "disc_warmup": ".jsonl", "align": ".parquet", "rlvr": ".parquet"}
MODEL_ROLES = ("model", "policy", "discriminator")


def resolve_sources(stage: str, cfg: Any) -> Any:
    """A copy of `cfg` whose model folders and data files are local (prism.hub): a local path stays as it is, a
    Hub id becomes its snapshot in the Hugging Face cache (downloaded when the Hub may be used), a folder of data
    expands to its files. The stage's config.yaml and hash keep what the user wrote; only loading reads the copy.
    HubError (one line) names a Hub id that cannot be had."""
    changes: dict[str, Any] = {}
    try:
        for role in MODEL_ROLES:
            section = getattr(cfg, role, None)
            if isinstance(section, ModelConfig):
                changes[role] = replace(
                    section, path=resolve_model_path(section.path, f"{role}.path"),
                    processor_path=resolve_model_path(section.processor_path, f"{role}.processor_path"))
        teacher_suffix = DATA_SUFFIXES["rlvr"]  # teacher prompts are RL parquet files
        for name, suffix in (("data_files", DATA_SUFFIXES.get(stage, "")), ("teacher_files", teacher_suffix)):
            if getattr(cfg, name, None):
                changes[name] = resolve_data_files(list(getattr(cfg, name)), name, suffix)
    except (HubError, DataError) as error:
        raise type(error)(f"{stage}: {error}") from None
    return replace(cfg, **changes)


def source_changes(cfg: Any, local: Any) -> dict[str, Any]:
    """What resolve_sources changed, for the manifest: setting -> {"given": ..., "local": ...}."""
    found: dict[str, Any] = {}
    for role in MODEL_ROLES:
        for key in ("path", "processor_path"):
            given = getattr(getattr(cfg, role, None), key, None)
            resolved = getattr(getattr(local, role, None), key, None)
            if given != resolved:
                found[f"{role}.{key}"] = {"given": given, "local": resolved}
    for name in ("data_files", "teacher_files"):
        given, resolved = getattr(cfg, name, None), getattr(local, name, None)
        if given != resolved:
            found[name] = {"given": given, "local": resolved}
    return found


def upstream_hashes(cfg: Any) -> dict[str, str]:
    """Identify what the stage starts from: the upstream stage's config hash when the model was written by
    one of ours (its manifest sits beside the model folder), and the sha256 of every data file."""
    found: dict[str, str] = {}
    for role in ("model", "policy", "discriminator"):
        model_path = getattr(getattr(cfg, role, None), "path", None)
        manifest = Path(model_path).parent / "manifest.json" if model_path else None
        if manifest is not None and manifest.is_file():
            found[role] = json.loads(manifest.read_text(encoding="utf-8")).get("config_hash", "")
    for name in [*(getattr(cfg, "data_files", None) or []), *(getattr(cfg, "teacher_files", None) or [])]:
        if Path(name).is_file():
            found[f"data:{name}"] = sha256_file(Path(name))
    return found


# ----------------------------------------------------------------------------------------------------
# Policy and processor
# ----------------------------------------------------------------------------------------------------


def load_policy(model_cfg: Any, seed: int) -> tuple[torch.nn.Module, Any]:
    """(model in train mode, processor). A path loads a local checkpoint (safetensors, no remote code unless
    asked); an embedded preset without a path is built from random init with the processor at processor_path.
    Parameters are in `model_cfg.dtype` (float32 master weights under mixed precision, whatever the checkpoint
    holds); forwards pick the compute dtype by autocast."""
    preset = get_preset(model_cfg.preset)
    processor_dir = model_cfg.processor_path or model_cfg.path
    if processor_dir is None:
        raise ModelError(
            f"model.preset {model_cfg.preset!r} is built from scratch and needs model.processor_path "
            "(the world export's tokenizer/ folder)"
        )
    if model_cfg.path is not None:  # before the processor, whose loading reads (and warns about) the config
        check_checkpoint_folder(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    processor = load_processor(processor_dir, trust_remote_code=model_cfg.trust_remote_code)
    dtype = getattr(torch, model_cfg.dtype)
    if model_cfg.path is not None:
        model = load_model(model_cfg.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
        if type(model).__name__ != preset.architecture:
            raise ModelError(f"model.path {model_cfg.path} holds a {type(model).__name__}, "
                             f"but model.preset {model_cfg.preset!r} expects {preset.architecture}")
    elif preset.kind == "local":
        raise ModelError(f"model.preset {model_cfg.preset!r} ({preset.description}) loads only from a checkpoint: "
                         "set model.path (a folder or a Hub model id, e.g. Qwen/Qwen3-VL-4B-Instruct)")
    else:
        model = build_model(model_cfg.preset, processor.tokenizer, seed=seed).to(dtype)
    if model.config._attn_implementation != model_cfg.attn_implementation:
        model.set_attn_implementation(model_cfg.attn_implementation)
    model.config.use_cache = False  # training forwards; generation turns the cache on per call
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), processor


def setup_policy_training(model: torch.nn.Module, cfg: Any, local: Any, accelerator):
    """The policy recipes' (base, sft, rlvr) model setup, right after load_policy: `model.freeze_vision` and the
    LoRA adapters of `model.lora_r`, applied in place (prism.models.peft). Returns the PeftModel for
    `final_model_saver` when LoRA is on, else None. `local` is start_stage's resolved config."""
    if cfg.model.lora_r and is_fsdp(accelerator):
        raise RuntimeConfigError("model.lora_r: LoRA runs are not FSDP-sharded (the adapter and the merged model are "
                                 "saved from the whole model): launch in one process or with DDP, or set lora_r 0")
    return setup_trainable(model, cfg.model, local.model.path)


def compile_repeated_blocks(model: torch.nn.Module) -> int:
    """`torch.compile` each repeated block in place (the classes the model names in `_no_split_modules`: its
    decoder layers and vision blocks) and return how many. Regional compilation: one graph per block class, shared
    by its instances, so a deep model compiles as fast as one layer; dynamic shapes, so a new sequence length
    does not recompile. In place (`Module.compile`), so parameter names, checkpoints and FSDP wrapping are
    unchanged. Used by the recipes that only train (base, sft): a rollout's decode would compile other graphs."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_classes]
    if not blocks:
        raise RuntimeConfigError(f"torch_compile: {type(model).__name__} names no repeated blocks "
                                 "(_no_split_modules) to compile; set torch_compile false")
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


# ----------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases), as usual for transformers."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def lr_multiplier(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Linear warm-up from lr/warmup to lr over the warm-up steps, then cosine or linear decay to 0, or constant."""
    warmup = optim.warmup_steps or math.ceil(optim.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if optim.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if optim.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, optim))


# ----------------------------------------------------------------------------------------------------
# Processes: one, or many under `accelerate launch`
# ----------------------------------------------------------------------------------------------------


def make_accelerator(model: ModelConfig):
    """accelerate's Accelerator: a no-op wrapper in one process, DDP/FSDP under `accelerate launch`.

    Mixed precision is `model.mixed_precision`: the recipes autocast their forwards (prism.runtime.autocast) over
    the float32 master weights, whatever the launcher; bf16 on CPU also flushes denormals. It is not passed on to
    Accelerator, whose state is one per process and refuses a second, different setting (tests and sweeps run
    several stages in one process). A launch config's `mixed_precision` must be `no` or the same. Under an FSDP2 launch the plugin carries
    `fsdp_mixed_precision_policy(model)`: accelerate's own `bf16` policy would reduce-scatter gradients in bf16."""
    from accelerate import Accelerator

    plugin = fsdp_plugin(model)
    # cpu=True on a CPU-only machine: without it accelerate ignores a torchrun world and runs each process alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **({"fsdp_plugin": plugin} if plugin else {}))
    check_launch_precision(accelerator.mixed_precision, model)
    if model.precision == "bf16" and not torch.cuda.is_available():
        # CPU bf16 compute meets denormal floats as a run trains: without flushing them (FTZ/DAZ, this process's
        # threads from here on) M's SFT step slowed from 0.47 to 0.63 s within 120 steps (README, "bf16 where AMX
        # pays"). float32 runs keep IEEE denormals.
        torch.set_flush_denormal(True)
    version = getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 2)
    if is_fsdp(accelerator) and version != 2:  # checkpoints, shard_whole and weight sync are FSDP2's
        raise RuntimeConfigError(f"accelerate is launched with fsdp_version {version}: the recipes shard with FSDP2 "
                                 "(set fsdp_version: 2 in the accelerate config, as experiments/accelerate/ does)")
    return accelerator


def fsdp_mixed_precision_policy(model: ModelConfig):
    """FSDP2's MixedPrecisionPolicy for `model.mixed_precision` bf16, as verl and TRL run it: parameters gathered
    and computed in bf16, gradients reduce-scattered in float32 (a bf16 sum over many processes loses the small
    updates that float32 master weights exist to keep), outputs in bf16. None for `no` (float32 throughout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if model.precision != "bf16":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16)


def fsdp_plugin(model: ModelConfig):
    """accelerate's FSDP plugin for an FSDP launch (ACCELERATE_USE_FSDP, set by `accelerate launch`; its other
    settings come from the launch config as accelerate reads them) with our mixed-precision policy; else None.
    accelerate keeps a policy it is given (it fills one in only when there is none)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    policy = fsdp_mixed_precision_policy(model)
    if policy is not None and plugin.fsdp_version == 2:
        plugin.mixed_precision_policy = policy
    return plugin


def check_launch_precision(launch: str, model: ModelConfig) -> None:
    """`launch` (accelerate's mixed_precision: launch config, --mixed_precision, ACCELERATE_MIXED_PRECISION) must
    be `no` or agree with `model.mixed_precision` (auto as it resolves here), which decides the autocast of every
    forward."""
    if launch not in ("no", model.precision):
        resolved = f" ({model.precision} here)" if model.precision != model.mixed_precision else ""
        raise RuntimeConfigError(
            f"accelerate is launched with mixed_precision {launch!r} but model.mixed_precision is "
            f"{model.mixed_precision!r}{resolved}: set one to match the other (accelerate's setting decides FSDP's "
            "parameter dtype, the model's the autocast of the forwards)")


def no_sync(accelerator, model: torch.nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if last_micro_step or accelerator.num_processes == 1:
        return nullcontext()
    return accelerator.no_sync(model)


def average_gradients(model: torch.nn.Module, accelerator) -> None:
    """Mean of every parameter's gradient over the processes (a missing gradient counts as zero).

    For modules trained without a DDP wrapper: the discriminator takes several forwards per backward (teacher
    and student rows, two segment kinds) and an MoE leaves experts unused in a micro-batch, both of which
    DDP's reducer refuses."""
    if accelerator.num_processes == 1 or is_sharded(model):  # FSDP2 has reduce-scattered (averaged) them
        return
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


# ----------------------------------------------------------------------------------------------------
# Resume and finish
# ----------------------------------------------------------------------------------------------------


def start_stage(stage: str, cfg: Any) -> tuple[Path, bool, Any]:
    """(run directory, already finished?, the config to load from). The last is `resolve_sources(stage, cfg)`:
    model folders and data files made local, Hub ids resolved (a finished stage resolves nothing). Writes
    nothing: the recipe calls `record_config` once its data and models have loaded, so a stage refused for a
    bad data file or checkpoint leaves no run directory behind."""
    run_dir = stage_dir(stage, cfg)
    check_output_folder(run_dir, "output_dir")  # a file there would fail the first write, after the model loaded
    require_tracker(cfg.tracking)
    recorded = run_dir / "config.yaml"
    if recorded.is_file():  # a finished or interrupted run: only the same config may finish or resume it
        previous = config_hash(load_config(type(cfg), recorded))
        if previous != config_hash(cfg):
            raise FileExistsError(f"{run_dir} holds a run of another {type(cfg).__name__} (config_hash {previous}, "
                                  f"this one {config_hash(cfg)}): choose another output_dir or delete it")
    if is_done(run_dir):
        if not recorded.is_file():  # DONE without the config it finished: nothing says which run this was
            raise FileExistsError(f"{run_dir} is marked finished but has no config.yaml, so it cannot be told to be "
                                  f"this {type(cfg).__name__}'s run: choose another output_dir or delete it")
        return run_dir, True, cfg
    return run_dir, False, resolve_sources(stage, cfg)


def write_stage_config(run_dir: Path, cfg: Any) -> Path:
    """run_dir/config.yaml with the settings as given (the folder is created): one process writes it."""
    return write_config_yaml(cfg, Path(run_dir) / "config.yaml")


def record_config(run_dir: Path, cfg: Any, accelerator) -> None:
    """The first write of a run (every process calls it, the main process writes): config.yaml, once the data
    files and models have loaded, so that a refused stage leaves nothing behind. From here on the directory
    belongs to this config: start_stage compares a later run's hash with it before resuming."""
    if accelerator.is_main_process:
        write_stage_config(run_dir, cfg)
    accelerator.wait_for_everyone()


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded by FSDP2 (accelerate's FSDP2 `prepare`, or fully_shard): an FSDPModule inside,
    not merely DTensor parameters, which a forward without backward leaves gathered as plain tensors."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _bare_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper(s)."""
    while hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class NamedParts:
    """state_dict / load_state_dict over named parts, so that one checkpoint holds several optimizers (schedulers):
    align's policy and discriminator. With an nn.ModuleDict of the models under the same names, save_progress and
    prepare_and_resume checkpoint them together (sharded: each model with its optimizer, `sharded_arguments`)."""

    def __init__(self, **parts):
        self.parts = parts

    def state_dict(self):
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state):
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def sharded_arguments(model, optimizer) -> dict[str, Any]:
    """save/restore_sharded_checkpoint's arguments for what a recipe checkpoints: one model and its optimizer, or
    an nn.ModuleDict of models with a NamedParts of their optimizers, each pair under its name (`parts`)."""
    if isinstance(optimizer, NamedParts):
        return {"parts": {name: (model[name], _bare_optimizer(part)) for name, part in optimizer.parts.items()}}
    return {"model": model, "optimizer": _bare_optimizer(optimizer)}


def prepare_and_resume(run_dir: Path, accelerator, model, optimizer, scheduler, prepare=None):
    """(model, optimizer, restored): `prepare(model, optimizer)` (default accelerator.prepare) with the newest
    checkpoint restored; `restored` is None when starting fresh. A plain checkpoint is restored into the live
    objects before prepare; a sharded one (written by an FSDP run) into the FSDP2 shards after it, each process
    reading its own (prism.runtime.restore_sharded_checkpoint). A run resumes in the format it was checkpointed
    in: FSDP from FSDP, anything else from anything else. `model` may be an nn.ModuleDict of models and
    `optimizer` a NamedParts of their optimizers (align), which `prepare` prepares each in its own way."""
    prepare = prepare or accelerator.prepare
    newest = latest_checkpoint(run_dir)
    sharded_checkpoint = newest is not None and is_sharded_checkpoint(newest)
    restored = None
    if newest is not None and not sharded_checkpoint and is_fsdp(accelerator):
        raise RuntimeConfigError(f"{newest} was written by a non-FSDP run (or by an older prism that did not save "
                                 "FSDP optimizer state) and this run is FSDP: start a new output_dir")
    if newest is not None and not sharded_checkpoint:
        restored = restore_checkpoint(newest, model=model, optimizer=optimizer, scheduler=scheduler)
    model, optimizer = prepare(model, optimizer)
    if newest is not None and is_sharded(model) != sharded_checkpoint:
        raise RuntimeConfigError(
            f"{newest} was written by {'an FSDP' if sharded_checkpoint else 'a non-FSDP'} run and this run "
            f"{'is not' if sharded_checkpoint else 'is'} FSDP-sharded: resume with the launch config it was "
            "started with, or start a new output_dir")
    if sharded_checkpoint:
        restored = restore_sharded_checkpoint(newest, **sharded_arguments(model, optimizer), scheduler=scheduler)
    return model, optimizer, restored


def shard_whole(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                forward_methods: tuple[str, ...] = (), model_config: ModelConfig | None = None,
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """FSDP2 for a module that accelerate does not prepare (the discriminator): `fully_shard` on the whole module,
    one unit (parameters, gradients and AdamW state sharded; the parameters gathered whole for each forward and
    backward), and `optimizer` pointed at the sharded parameters. `forward_methods` are the module's methods called
    instead of `forward` (FSDP2 gathers around them too). Its MixedPrecisionPolicy is the launch's, or, when the
    launch has one and `model_config` is given, that config's own (align's discriminator has its own
    `mixed_precision`, which may differ from the policy's that the launch follows).

    One unit, not one per decoder layer: the discriminator's prompt-prefix forward (prefill, then continue_hidden
    from its K/V cache) and its MoE router logits leave each decoder layer as side outputs, not through the layer's
    return value, so a per-layer unit would be resharded before their gradients arrive."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if isinstance(policy, MixedPrecisionPolicy) and model_config is not None:
        policy = fsdp_mixed_precision_policy(model_config)
    names = {id(p): name for name, p in model.named_parameters()}
    fully_shard(model, **({"mp_policy": policy} if isinstance(policy, MixedPrecisionPolicy) else {}))
    for method in forward_methods:
        register_fsdp_forward_method(model, method)
    sharded = dict(model.named_parameters())  # fully_shard registers new (DTensor) parameters
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model, optimizer


def plain_norm(norm):
    """A gradient norm as a plain tensor: under FSDP2 clip_grad_norm_ may return a DTensor (collective)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def save_progress(run_dir: Path, step: int, cfg: Any, accelerator, model, optimizer, scheduler,
                  data_position: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Checkpoint `step` (every process calls it). An FSDP2-sharded model is saved sharded with its optimizer
    state (torch.distributed.checkpoint, each process its shards); otherwise the plain format, from the main
    process."""
    keep_last = cfg.keep_last_checkpoints or None
    if is_sharded(model):
        save_sharded_checkpoint(run_dir, step, **sharded_arguments(model, optimizer), scheduler=scheduler,
                                data_position=data_position, extra=extra, keep_last=keep_last)
        accelerator.wait_for_everyone()
        return
    # get_state_dict is a collective under FSDP (it gathers the shards): every process calls it.
    model_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_checkpoint(run_dir, step, model_state=model_state,
                        optimizer=None if is_fsdp(accelerator) else optimizer, scheduler=scheduler,
                        data_position=data_position, extra=extra, keep_last=keep_last)
    accelerator.wait_for_everyone()


def preempted(accelerator) -> bool:
    """Whether to stop after the optimizer step just taken: a preemption signal (prism.runtime.preemption_signals,
    installed by `prism train`) reached any of the stage's processes. Every process asks after every step (one
    all-reduce of a flag when there are several), so all of them save the same step and stop together."""
    local = preemption_requested()
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([float(local)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def stop_preempted(stage: str, run_dir: Path, step: int, accelerator, *open_logs) -> NoReturn:
    """After the checkpoint of `step` is saved: close the metrics log and progress (main process), then raise
    StagePreempted (`prism train` exits with PREEMPTED_EXIT; the next run resumes from that checkpoint)."""
    if accelerator.is_main_process:
        for log in open_logs:
            log.close()
        print(f"{stage}: preempted, checkpoint saved at step {step}", flush=True)
    raise StagePreempted(stage, run_dir, step)


def stage_name(cfg: Any) -> str:
    """The stage a config runs, as `prism train` names it (prism.stages.STAGES, which would import the recipes)."""
    from prism.config import AlignConfig, BaseConfig, DiscWarmupConfig, RLVRConfig, SFTConfig

    names = {BaseConfig: "base", SFTConfig: "sft", DiscWarmupConfig: "disc_warmup", AlignConfig: "align",
             RLVRConfig: "rlvr"}
    return names[type(cfg)]


# The model folders a stage writes, and the config section each one was trained from: the final model (a policy,
# or disc_warmup's discriminator) and align's updated discriminator.
MODEL_FOLDERS = {FINAL_MODEL: "model", "discriminator": "discriminator"}


def write_model_cards(run_dir: Path, cfg: Any, local: Any, steps: int | None = None) -> None:
    """README.md (prism.model_card: base model, license, Hub datasets, training history) into every model folder
    the stage wrote; a folder with discriminator.json gets a discriminator's card."""
    from prism.model_card import stage_card, write_model_card
    from prism.models.discriminator import SPEC_FILE

    for name, role in MODEL_FOLDERS.items():
        folder = run_dir / name
        if (folder / "config.json").is_file() and isinstance(getattr(cfg, role, None), ModelConfig):
            kind = "discriminator" if (folder / SPEC_FILE).is_file() else "policy"
            write_model_card(folder, stage_card(stage_name(cfg), cfg, local, folder, role=role, kind=kind, steps=steps))


def finish_stage(run_dir: Path, cfg: Any, accelerator, model, processor, *, extra: dict[str, Any] | None = None,
                 save=None, local: Any = None) -> Path:
    """Final HF checkpoint and the model cards, manifest, then DONE (in that order: DONE means everything else is
    in place).
    `save(model, processor, folder, state_dict=...)` writes the final folder (default: prism.models.save_model).
    `local` is start_stage's resolved config: the manifest hashes its files and records what each Hub id became."""
    from prism.models import save_model

    save = save or save_model
    local = cfg if local is None else local
    sources = source_changes(cfg, local)
    final = run_dir / FINAL_MODEL
    # collective under FSDP: the full state, gathered on the main process
    model_state = full_model_state(model) if is_sharded(model) else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save(accelerator.unwrap_model(model), processor, final, state_dict=model_state)
        write_model_cards(run_dir, cfg, local, steps=(extra or {}).get("steps"))
        newest = latest_checkpoint(run_dir)
        write_manifest(run_dir, config=cfg, seed=cfg.seed, upstream=upstream_hashes(local), checkpoint_dir=newest,
                       extra={**({"sources": sources} if sources else {}), "final_model": str(final),
                              "final_model_sha256": {p.name: sha256_file(p) for p in sorted(final.glob("*.safetensors"))},
                              **(extra or {})})
        mark_done(run_dir)
    accelerator.wait_for_everyone()
    return final
