"""lmms-eval models for PRISM checkpoints: `prism_hf` (in-process transformers) here, and `prism_vllm` (the
full world: lmms-eval's own vLLM chat model, seeded per request) in evaluation/vllm_model.py.

Both use lmms-eval's chat interface (`is_simple = False`): each request carries the task's
`doc_to_messages`, which puts the PRISM system prompt first and the images before the question, and
the checkpoint's own chat template renders it (PRISM checkpoints ship theirs; released Qwen3-VL ones too).

Determinism. `prism_hf` samples each batch under its own seed, derived from (seed, task, the batch's
doc ids), inside a forked RNG: the same checkpoint, config and seed give the same responses on CPU, and
the caller's RNG is left untouched. `prism_vllm` gives every request its own seed (seed, task, doc id).
lmms-eval calls `clean()` after generating, which would delete the model; ours keep it for the next task.

Requests are served in lmms-eval's order, batched among requests with equal generation settings.
`until` stop strings cut the decoded text; generation itself stops at the checkpoint's eos tokens.
Both adapters register the checkpoint's tokenizer for `mean_response_tokens` (evaluation.scoring).

From the lmms-eval CLI (after `pip install -e .`, which declares the `lmms_eval.models` entry points in
evaluation/plugin.py):
    lmms-eval --model prism_hf --model_args pretrained=DIR,seed=0 --tasks prism_embedded \
              --include_path evaluation/tasks/embedded
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from lmms_eval.api.model import lmms

from evaluation.config import EvalError
from evaluation.scoring import clear_response_tokens, note_response_tokens, register_tokenizer

try:  # lmms-eval >= 0.7 keeps per-sample token counts in the samples log
    from lmms_eval.api.instance import GenerationResult, TokenCounts
except ImportError:  # pragma: no cover
    GenerationResult = TokenCounts = None

VLLM_MISSING = (
    "backend 'vllm' needs the vllm package, which is not installed here: install prism[gpu] on a GPU node, "
    "or evaluate with backend=hf"
)


PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")  # the processor's


def derive_seed(seed: int, task: str, doc_ids: Sequence[Any]) -> int:
    """A 63-bit seed for one batch (or one request), stable across runs and machines."""
    text = f"{seed}|{task}|{','.join(str(d) for d in doc_ids)}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def _open_image(source: Any):
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (str, Path)):
        return Image.open(source).convert("RGB")
    if isinstance(source, dict) and source.get("bytes") is not None:
        return Image.open(io.BytesIO(source["bytes"])).convert("RGB")
    raise EvalError(f"unsupported image in a request: {type(source).__name__}")


def split_messages(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """lmms-eval protocol messages -> (messages for a chat template with {"type": "image"} parts, PIL images)."""
    rendered, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            rendered.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                images.append(_open_image(part.get("url", part.get("image"))))
                parts.append({"type": "image"})
            else:
                raise EvalError(f"prism adapters take text and image parts only, got a {kind!r} part")
        rendered.append({"role": message["role"], "content": parts})
    return rendered, images


def _cut_at_stop_strings(text: str, until: Sequence[str] | str | None) -> str:
    if not until:
        return text
    for stop in [until] if isinstance(until, str) else until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def _result(text: str, output_tokens: int):
    if GenerationResult is None:
        return text
    return GenerationResult(text=text, token_counts=TokenCounts(output_tokens=output_tokens))


class _PrismLMM(lmms):
    is_simple = False

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{type(self).__name__} generates only (generate_until tasks)")

    def clean(self):
        """lmms-eval calls this after generating and would delete the model: keep it for the next task."""
        import gc

        gc.collect()

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{type(self).__name__} generates single-round responses only")

    def _unpack(self, request) -> tuple[dict, list[dict], str, Any]:
        """(gen_kwargs, messages, task, doc_id) of a chat-interface request."""
        _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        return dict(gen_kwargs or {}), doc_to_messages(doc), task, doc_id


class PrismHF(_PrismLMM):
    """Batched `generate` of a local checkpoint with transformers (CPU in the embedded world): the reference decoder.
    The rollout loop (prism.rollout.hf.sample_responses) is about a fifth faster, and no accuracy difference was
    detected (bench/eval_decode.py: over six seeds -1.0 points, 95% interval [-2.7, +0.7]). A batch's common
    opening (the system prompt) is computed once and `generate` continues every row from its cache: the same
    responses, 18-27% less evaluation time on the tiny presets."""

    lmms_name = "prism_hf"

    def __init__(
        self,
        pretrained: str,
        seed: int = 0,
        batch_size: int = 64,
        dtype: str = "float32",
        device: str = "cpu",
        model: Any = None,
        processor: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import torch

        from prism.models import load_model, load_processor

        self.pretrained = str(pretrained)
        self.seed = int(seed)
        self.batch_size_per_call = int(batch_size)
        self.device_name = str(device)
        self.model = model if model is not None else load_model(self.pretrained, dtype=dtype)
        self.model.to(self.device_name).eval()
        self.processor = processor if processor is not None else load_processor(self.pretrained)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues each row from its last column
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.pad_token_id}
        self.stop_ids.discard(None)
        self._torch = torch
        register_tokenizer(self.tokenizer, self.pretrained)

    def generate_until(self, requests) -> list:
        clear_response_tokens()
        unpacked = [self._unpack(request) for request in requests]
        by_settings: dict[str, list[int]] = defaultdict(list)
        for index, (gen_kwargs, _messages, task, _doc_id) in enumerate(unpacked):
            by_settings[repr((task, sorted(gen_kwargs.items())))].append(index)
        out: list[Any] = [None] * len(requests)
        for indices in by_settings.values():
            for start in range(0, len(indices), self.batch_size_per_call):
                chunk = indices[start : start + self.batch_size_per_call]
                results = self._generate([unpacked[i] for i in chunk])
                for i, result in zip(chunk, results):
                    out[i] = result
        return out

    def _generate(self, items: list[tuple[dict, list[dict], str, Any]]) -> list:
        from transformers import LogitsProcessorList

        from prism.kv_prefix import cache_kwarg, prefix_first
        from prism.rollout.hf import NucleusWarper, prefix_cache, reserving_cache

        torch = self._torch
        gen_kwargs, _, task, _ = items[0]
        texts, images = [], []
        for _, messages, _, _ in items:
            rendered, message_images = split_messages(messages)
            texts.append(self.processor.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False))
            images.extend(message_images)
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(self.device_name)
        # the prompts' common opening (the system prompt, ~100 tokens of the embedded prompts' ~150) moved to the
        # front of every row, its cache computed once for the batch (`prefix_cache`); the same tokens come out
        order, prefix = prefix_first(batch["input_ids"], batch["attention_mask"],
                                     getattr(self.model.config, "image_token_id", -1))
        for key in PER_TOKEN_INPUTS:
            if prefix and key in batch:
                batch[key] = batch[key].gather(1, order)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        sample = temperature > 0 and _as_bool(gen_kwargs.get("do_sample", True))
        settings: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 256)), "do_sample": sample}
        if sample:
            settings.update(temperature=temperature, top_p=1.0, top_k=0)
            top_p = float(gen_kwargs.get("top_p", 1.0))
            if top_p < 1.0:  # transformers' top-p, sorted by numpy on CPU (NucleusWarper): the same tokens
                settings["logits_processor"] = LogitsProcessorList([NucleusWarper(top_p)])
        seed = derive_seed(self.seed, task, [doc_id for *_, doc_id in items])
        devices = [] if self.device_name == "cpu" else [torch.device(self.device_name)]
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            # a cache with room for the responses: each step writes its token in place (the default cache copies
            # the whole cache every step, a fifth of the decode here); the same tokens. With the prefix in it, or
            # empty where the prompts share none.
            if prefix:
                rows, width = batch["input_ids"].shape
                cache = prefix_cache(self.model, batch["input_ids"][:1, :prefix], rows,
                                     width - prefix + settings["max_new_tokens"])
            else:
                cache = reserving_cache(self.model.config, settings["max_new_tokens"])
            sequences = self.model.generate(**batch, **settings, **{cache_kwarg(self.model): cache})
        new_tokens = sequences[:, batch["input_ids"].shape[1] :].tolist()
        results = []
        for ids in new_tokens:
            length = next((k for k, token in enumerate(ids) if token in self.stop_ids), len(ids))
            text = _cut_at_stop_strings(self.tokenizer.decode(ids[:length], skip_special_tokens=True), gen_kwargs.get("until"))
            note_response_tokens(text, length)
            results.append(_result(text, length))
        return results


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise EvalError(VLLM_MISSING)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(messages: list[dict]) -> list[dict]:
    """lmms-eval protocol messages -> OpenAI chat format (images as PNG data URLs), for vLLM's `LLM.chat`."""
    rendered, images = split_messages(messages)
    images = iter(images)
    out = []
    for message in rendered:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": _data_url(next(images))}})
            else:
                parts.append(part)
        if message["role"] == "system" and all(p["type"] == "text" for p in parts):
            out.append({"role": "system", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": message["role"], "content": parts})
    return out


def vllm_sampling(gen_kwargs: dict, seed: int) -> dict:
    """SamplingParams keyword arguments for one request (temperature 0 = greedy)."""
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if not _as_bool(gen_kwargs.get("do_sample", True)):
        temperature = 0.0
    until = gen_kwargs.get("until") or None
    return {
        "temperature": temperature,
        "top_p": float(gen_kwargs.get("top_p", 1.0)) if temperature > 0 else 1.0,
        "top_k": -1,
        "max_tokens": int(gen_kwargs.get("max_new_tokens", 256)),
        "seed": seed,
        "stop": [until] if isinstance(until, str) else until,
    }
