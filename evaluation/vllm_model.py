"""`prism_vllm`: lmms-eval's own vLLM chat model (`vllm_chat`) for PRISM checkpoints in the full world.

What it changes in lmms-eval 0.7.3's `lmms_eval.models.chat.vllm.VLLM`, and why:
- the messages come from the task's `doc_to_messages` (chat interface), so the PRISM system prompt and the
  image-before-question layout reach vLLM, rendered by the checkpoint's chat template (or `chat_template`);
- every request gets its own sampling seed, derived from (seed, task, doc id), so results do not depend on
  batching; lmms-eval's engine seed is fixed at 1 and requests carry none;
- the task's `max_new_tokens` is used as given: lmms-eval would take max(task value, model default 4096);
- `top_k` is disabled (-1) so that sampling is exactly temperature + top_p (docs/METHOD.md);
- it keeps the engine after a task (lmms-eval's `clean()` would drop it) and records each completion's
  generated-token count for `mean_response_tokens` (evaluation.scoring).
Without vLLM installed it refuses with one line (evaluation.model.VLLM_MISSING) before building anything.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.models.chat.vllm import VLLM as LmmsEvalChatVLLM

from evaluation.model import derive_seed, require_vllm, vllm_sampling
from evaluation.scoring import clear_response_tokens, note_response_tokens, register_tokenizer


class PrismVLLM(LmmsEvalChatVLLM):
    is_simple = False
    lmms_name = "prism_vllm"

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
        engine: dict[str, Any] = {
            "dtype": dtype,
            "tokenizer": str(pretrained),
            "limit_mm_per_prompt": {"image": int(max_images_per_prompt)},
        }
        if max_model_len:
            engine["max_model_len"] = int(max_model_len)
        super().__init__(
            model=str(pretrained),
            tensor_parallel_size=int(tensor_parallel_size),
            gpu_memory_utilization=float(gpu_memory_utilization),
            batch_size=int(batch_size),
            trust_remote_code=False,
            chat_template=chat_template,
            max_new_tokens=1,  # lmms-eval takes max(task, this): 1 lets the task's budget decide
            **engine,
        )
        self.pretrained = str(pretrained)
        self.seed = int(seed)
        register_tokenizer(self.client.get_tokenizer(), self.pretrained)
        self.client = _CountingClient(self.client)

    def generate_until(self, requests):
        clear_response_tokens()
        return super().generate_until(requests)

    def make_one_request(self, request) -> tuple[list[dict], dict]:
        messages, _ = super().make_one_request(request)
        _ctx, _doc_to_messages, gen_kwargs, doc_id, task, _split = request.arguments
        return messages, vllm_sampling(dict(gen_kwargs or {}), derive_seed(self.seed, task, [doc_id]))

    def clean(self):
        """Keep the engine for the next task (lmms-eval's clean() would delete it)."""


class _CountingClient:
    """The vLLM engine, recording each completion's generated-token count for `mean_response_tokens`."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def chat(self, *args: Any, **kwargs: Any):
        outputs = self._engine.chat(*args, **kwargs)
        for output in outputs:
            completion = output.outputs[0]
            note_response_tokens(completion.text, len(completion.token_ids))
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)
