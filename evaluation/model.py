"""lmms-eval models for PRISM checkpoints: `prism_hf` (in-process transformers) and `prism_vllm` (full world).

Both use lmms-eval's chat interface (`is_simple = False`): each request carries the task's
`doc_to_messages`, which puts the PRISM system prompt first and the images before the question, and
the checkpoint's own chat template renders it (PRISM checkpoints ship theirs; released Qwen3-VL ones too).

Determinism. `prism_hf` samples each batch under its own seed, derived from (seed, task, the batch's
doc ids), inside a forked RNG: the same checkpoint, config and seed give the same responses on CPU, and
the caller's RNG is left untouched. `prism_vllm` gives every request its own seed (seed, task, doc id).

Requests are served in lmms-eval's order, batched among requests with equal generation settings.
`until` stop strings cut the decoded text; generation itself stops at the checkpoint's eos tokens.
Both adapters register the checkpoint's tokenizer for `mean_response_tokens` (evaluation.scoring).

From the lmms-eval CLI (after `pip install -e .`, which declares the `lmms_eval.models` entry points):
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
from evaluation.scoring import register_tokenizer

try:  # lmms-eval >= 0.7 keeps per-sample token counts in the samples log
    from lmms_eval.api.instance import GenerationResult, TokenCounts
except ImportError:  # pragma: no cover
    GenerationResult = TokenCounts = None

VLLM_MISSING = (
    "backend 'vllm' needs the vllm package, which is not installed here: install prism[gpu] on a GPU node, "
    "or evaluate with backend=hf"
)


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
    """Batched `generate` of a local checkpoint with transformers (CPU in the embedded world)."""

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
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.pad_token_id}
        self.stop_ids.discard(None)
        self._torch = torch
        register_tokenizer(self.tokenizer, self.pretrained)

    def generate_until(self, requests) -> list:
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
        torch = self._torch
        gen_kwargs, _, task, _ = items[0]
        texts, images = [], []
        for _, messages, _, _ in items:
            rendered, message_images = split_messages(messages)
            texts.append(self.processor.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False))
            images.extend(message_images)
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(self.device_name)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        sample = temperature > 0 and _as_bool(gen_kwargs.get("do_sample", True))
        settings: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 256)), "do_sample": sample}
        if sample:
            settings.update(temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0)), top_k=0)
        seed = derive_seed(self.seed, task, [doc_id for *_, doc_id in items])
        devices = [] if self.device_name == "cpu" else [torch.device(self.device_name)]
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            sequences = self.model.generate(**batch, **settings)
        new_tokens = sequences[:, batch["input_ids"].shape[1] :].tolist()
        results = []
        for ids in new_tokens:
            length = next((k for k, token in enumerate(ids) if token in self.stop_ids), len(ids))
            text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
            results.append(_result(_cut_at_stop_strings(text, gen_kwargs.get("until")), length))
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


class PrismVLLM(_PrismLMM):
    """vLLM offline engine over a local checkpoint (the full world). Fails with one line without vLLM."""

    def __init__(
        self,
        pretrained: str,
        seed: int = 0,
        batch_size: int = 256,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        max_images_per_prompt: int = 8,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        require_vllm()
        super().__init__()
        from vllm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        self.pretrained = str(pretrained)
        self.seed = int(seed)
        self.batch_size_per_call = int(batch_size)
        self.chat_template = Path(chat_template).read_text(encoding="utf-8") if chat_template else None
        engine_args: dict[str, Any] = {
            "model": self.pretrained,
            "tokenizer": self.pretrained,
            "seed": self.seed,
            "dtype": dtype,
            "tensor_parallel_size": int(tensor_parallel_size),
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "limit_mm_per_prompt": {"image": int(max_images_per_prompt)},
            "trust_remote_code": False,
        }
        if max_model_len:
            engine_args["max_model_len"] = int(max_model_len)
        self.llm = LLM(**engine_args)
        register_tokenizer(self.llm.get_tokenizer(), self.pretrained)

    def generate_until(self, requests) -> list:
        out = []
        for start in range(0, len(requests), self.batch_size_per_call):
            chunk = [self._unpack(r) for r in requests[start : start + self.batch_size_per_call]]
            conversations = [openai_messages(messages) for _, messages, _, _ in chunk]
            params = [
                self._sampling_params(**vllm_sampling(gen_kwargs, derive_seed(self.seed, task, [doc_id])))
                for gen_kwargs, _, task, doc_id in chunk
            ]
            responses = self.llm.chat(conversations, sampling_params=params, chat_template=self.chat_template, use_tqdm=False)
            for response in responses:
                completion = response.outputs[0]
                out.append(_result(completion.text, len(completion.token_ids)))
        return out


def hf_manifest():
    """Entry point of the `lmms_eval.models` group: `--model prism_hf`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prism_hf", chat_class_path="evaluation.model.PrismHF")


def vllm_manifest():
    """Entry point of the `lmms_eval.models` group: `--model prism_vllm`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prism_vllm", chat_class_path="evaluation.model.PrismVLLM")
