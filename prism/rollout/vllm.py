"""Rollouts with a colocated vLLM engine on GPU nodes, written against vLLM 0.32 (pyproject's `gpu` extra).

Design (TRL's and verl's "colocate" pattern): every trainer process owns one `vllm.LLM` on its own GPU, built
from the policy's checkpoint folder, and generates its own share of the step's prompts. The vLLM 0.32 API used:

- `LLM(..., distributed_executor_backend="external_launcher")`: the engine core and its single worker live in
  this process (vLLM turns V1 multiprocessing off for it, VLLM_ENABLE_V1_MULTIPROCESSING=0) and join the
  torch.distributed world of `torchrun` / `accelerate launch`, each process an engine of tensor-parallel size 1;
- `LLM.apply_model(fn)` (= `collective_rpc("apply_model")`, `fn(worker.get_model())`): in-process, so the
  weights reach the engine's model by reference, with no serialisation. `fn` calls the model's
  `load_weights(iterable of (name, tensor))` with Hugging Face parameter names: vLLM's Qwen3-VL maps them
  itself (`hf_to_vllm_mapper`: "model.visual." -> "visual.", "model.language_model." ->
  "language_model.model.", "lm_head." -> "language_model.lm_head.") and its weight loaders fuse q/k/v and
  gate/up; a tied `lm_head` is the embedding, so the deduplicated parameters are exactly the checkpoint's keys;
- `LLM.sleep(level=1)` / `LLM.wake_up(tags=[...])` (`enable_sleep_mode=True`): level 1 keeps the weights
  (offloaded to CPU) and frees the KV cache while the trainer needs the memory; an update wakes the weights
  alone, generation then the KV cache;
- `LLM.reset_prefix_cache()` and `LLM.llm_engine.reset_encoder_cache()` after an update: cached KV blocks and
  vision-encoder outputs (keyed by image hash only) were computed with the old weights.

Not used: `llm.llm_engine.model_executor.driver_worker...` (internal, and absent when the engine core runs in
another process); vLLM's weight-transfer engines (`WeightTransferConfig(backend="nccl" | "ipc")`,
`init_weight_transfer_engine` / `update_weights`), made for an engine in another process (NCCL broadcast, CUDA
IPC handles) and whose trainer-side API changed between 0.22 and 0.29: an in-process engine needs neither.

Weight sync (`update_weights`) gathers the trainer's parameters one at a time (FSDP2: `DTensor.full_tensor()`,
an all-gather every process joins, so every process calls `update_weights`), casts each to the engine's compute
dtype (bfloat16 under mixed precision; the float32 master weights stay with the trainer) before gathering, and
pushes them one module at a time (a decoder layer, a vision block, an embedding): the full model never sits in
one buffer. Each process pushes into its own engine.

Old log-probs: the trainer recomputes them with its own model (prism.stages.policy_update, as verl does); the
sampler's log-probs (which vLLM computes from its bfloat16 weights and kernels) are only returned when asked
for, for diagnostics.

Honest limits: vLLM is not installed here and there is no GPU in CI. The tests drive this module through a
fake engine with the same API surface (tests/rollout/test_vllm_weight_sync.py), and the FSDP2 gather under two
CPU processes; no real engine has run it.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from prism.rollout.base import (
    RolloutBatch,
    RolloutError,
    RolloutPrompt,
    SamplingParams,
    response_mask_and_finish,
)

VLLM_SERIES = (0, 32)  # keep in step with pyproject.toml's `gpu` extra: vllm>=0.32.0,<0.33
VLLM_MISSING = "vLLM is not installed: pip install 'prism[gpu]' on a GPU node, or use rollout_backend=hf"
# Wrappers that rename parameters without changing them (activation checkpointing, torch.compile, FSDP1).
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def check_vllm_version(version: str) -> None:
    """One line if `version` is not of the series this module's calls were written against."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        release = ()
    if release != VLLM_SERIES:
        wanted = ".".join(map(str, VLLM_SERIES))
        raise RolloutError(f"vLLM {version} is installed but prism's vllm backend is written against vLLM {wanted}.x "
                           f"(in-process engine, LLM.apply_model weight sync): pip install 'vllm=={wanted}.*'")


def _import_vllm() -> Any:
    try:
        vllm = importlib.import_module("vllm")
    except ImportError:
        raise RolloutError(VLLM_MISSING) from None
    check_vllm_version(getattr(vllm, "__version__", "unknown"))
    return vllm


# ----------------------------------------------------------------------------------------------------
# Weights: full tensors, one parameter gathered at a time, grouped one module at a time
# ----------------------------------------------------------------------------------------------------


def hf_parameter_name(name: str) -> str:
    """The Hugging Face checkpoint name of a trainer parameter (wrapper prefixes removed)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (an all-gather: every process must call it), or `tensor` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def module_key(name: str) -> str:
    """The module a parameter is pushed with: up to its first index ("model.language_model.layers.3"),
    otherwise its own module ("model.visual.patch_embed.proj")."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def weight_chunks(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(HF name, full tensor in `dtype`) for every parameter of `model`, one module (`module_key`) per chunk.

    Lazy: a chunk's tensors are gathered, one parameter at a time, only when the chunk is asked for (the
    grouping looks at names, not tensors). Tied parameters come once (named_parameters deduplicates), as in the
    checkpoint. Each shard is cast before its gather, so a bfloat16 engine costs half the traffic of float32
    master weights."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise RolloutError("vLLM weight sync supports FSDP2 (fsdp_version: 2, as experiments/accelerate/*.yaml) and "
                           "unsharded models, not FSDP1")
    # the checkpoint's layout (a fused patch embedding as its Conv3d), as the HF model inside any wrapper saves it
    hf_model = next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
    named = ((hf_parameter_name(name), param) for name, param in model.named_parameters())
    for _, group in itertools.groupby(named, key=lambda item: module_key(item[0])):
        chunk = {name: full_tensor(param.detach().to(dtype)) for name, param in group}
        yield list((revert_weight_conversion(hf_model, chunk) if hf_model is not None else chunk).items())


def _load_weights(weights: list[tuple[str, torch.Tensor]], model: Any) -> set[str]:
    """Runs on the engine's model (LLM.apply_model): vLLM maps the HF names and copies the tensors in."""
    return set(model.load_weights(weights))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_environment() -> None:
    """external_launcher joins the torch.distributed world of `torchrun` / `accelerate launch` (their RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a plain single process gets a world of one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


class VLLMRolloutBackend:
    """A colocated, in-process vLLM engine behind the RolloutBackend interface (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        processor: Any,
        *,
        gpu_memory_utilization: float = 0.4,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        enable_sleep_mode: bool = True,
        behaviour_log_probs: bool = False,
    ):
        """`dtype` is the compute dtype (the engine's weights); `behaviour_log_probs=True` also returns the
        sampler's log-probs (the trainers recompute theirs and ignore them)."""
        vllm = _import_vllm()
        self._vllm = vllm
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.enable_sleep_mode = enable_sleep_mode
        self.behaviour_log_probs = behaviour_log_probs
        self.dtype = getattr(torch, dtype)
        _launcher_environment()
        self.llm = vllm.LLM(
            model=str(model_path),
            distributed_executor_backend="external_launcher",  # in this process: apply_model gets our tensors
            tensor_parallel_size=1,  # each trainer process its own engine and its own prompts
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            limit_mm_per_prompt={"image": 8},
            logprobs_mode="processed_logprobs",  # after its logits processing (temperature), not raw logits
        )
        self.asleep: set[str] = set()  # the memory tags now released

    def sleep(self) -> None:
        """Free the KV cache and offload the weights to CPU while the trainer runs (level 1 keeps them)."""
        if self.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Bring back those of `tags` that are asleep (vLLM's executor tracks the sleeping tags: name only those)."""
        waking = [tag for tag in tags if tag in self.asleep]
        if waking:
            self.llm.wake_up(tags=waking)
            self.asleep -= set(waking)

    @torch.no_grad()
    def update_weights(self, model: Any) -> None:
        """Push the trainer's current parameters into the engine (see the module docstring).

        Under FSDP2 this is a collective: every process must call it, in the same order."""
        self.wake_up(("weights",))  # not the KV cache: the trainer may still hold its memory
        for chunk in weight_chunks(model, self.dtype):
            names = [name for name, _ in chunk]
            loaded = self.llm.apply_model(functools.partial(_load_weights, chunk))
            del chunk  # before the next chunk is gathered: at most one module's tensors at a time
            if not all(loaded):
                raise RolloutError(f"vLLM's model loaded none of {names}: the names do not match its checkpoint's")
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    @torch.no_grad()
    def generate(self, prompts: list[RolloutPrompt], n: int, sampling: SamplingParams) -> RolloutBatch:
        self.wake_up()
        params = self._vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.min_new_tokens,
            seed=sampling.seed,
            logprobs=0 if self.behaviour_log_probs else None,  # 0: the sampled token's log-prob only
        )
        texts = [self.processor.apply_chat_template(p.to_messages(), add_generation_prompt=True) for p in prompts]
        requests = [
            {"prompt": text, "multi_modal_data": {"image": p.images}} if p.images else {"prompt": text}
            for text, p in zip(texts, prompts)
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        images = [image for p in prompts for image in p.images]
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        pad = self.tokenizer.pad_token_id
        rows = [completion for output in outputs for completion in output.outputs]  # prompt-major
        resp_len = max(len(c.token_ids) for c in rows)
        response_ids = torch.full((len(rows), resp_len), pad, dtype=torch.long)
        log_probs = torch.zeros((len(rows), resp_len), dtype=torch.float32)
        for r, c in enumerate(rows):
            response_ids[r, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            for t, (token, entry) in enumerate(zip(c.token_ids, c.logprobs or [])):
                log_probs[r, t] = entry[token].logprob
        stop_ids = [self.tokenizer.eos_token_id]
        response_mask, _ = response_mask_and_finish(response_ids, stop_ids)
        return RolloutBatch(
            prompt_ids=inputs["input_ids"].repeat_interleave(n, 0),
            prompt_mask=inputs["attention_mask"].repeat_interleave(n, 0),
            response_ids=response_ids,
            response_mask=response_mask,
            behaviour_log_probs=log_probs * response_mask if self.behaviour_log_probs else None,
            texts=[c.text for c in rows],
            finish_reasons=["stop" if c.finish_reason == "stop" else "length" for c in rows],
            group_ids=torch.arange(len(prompts)).repeat_interleave(n),
            n=n,
            sampling=sampling,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            images_per_prompt=[len(p.images) for p in prompts],
        )
