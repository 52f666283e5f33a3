"""The rollout interface: prompts with images in, B x n sampled responses with behaviour log-probs out.

Conventions (shared by every backend):
- Rows are prompt-major: rollout i of prompt p is row p * n + i; `group_ids[row] == p`.
- `prompt_ids`/`prompt_mask` are LEFT-padded (pad id of the tokenizer), identical across a prompt's n rows.
- `response_ids` are RIGHT-padded to the longest response; `response_mask` is 1 up to and including the first
  stop token (eos) and 0 after it. Everything past the mask is padding and must be ignored.
- `behaviour_log_probs[row, t]` is log softmax(logits / temperature)[response_ids[row, t]]: the
  temperature-scaled distribution, as verl and TRL compute old log-probs. top_p (nucleus) truncation is NOT
  applied (no renormalisation over the nucleus), also as verl/TRL. Greedy decoding (temperature 0) reports
  log softmax(logits) (temperature 1). Positions outside `response_mask` hold 0.
- Vision placeholder tokens (`<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`) are never
  sampled: they are suppressed (logit -inf) in generation AND in every log-prob computation, so the log-probs
  stay those of the distribution actually sampled from, and a response can always be re-scored.
- Vision inputs are processed ONCE per prompt: `pixel_values` holds each prompt's image patches in prompt
  order, `image_grid_thw` one row per image, `images_per_prompt[p]` how many images prompt p has.
  `expand_vision_inputs` repeats the per-image blocks for the n rows of each prompt when a forward pass
  needs one copy per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from prism.response_format import SYSTEM_PROMPT


class RolloutError(ValueError):
    """A rollout backend cannot be built or run as asked (one line that says what to do)."""


@dataclass
class SamplingParams:
    """How to sample. temperature 0 means greedy; `seed` makes sampling reproducible (None: global RNG)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0  # stop tokens are masked until this many are generated
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RolloutError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise RolloutError(f"min_new_tokens must be an integer in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if not self.temperature >= 0:
            raise RolloutError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise RolloutError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise RolloutError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature the behaviour log-probs are scaled by (1.0 when greedy)."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclass
class RolloutPrompt:
    """One prompt: either full chat `messages` (with `{"type": "image"}` parts) or a `question` that is wrapped
    as [system: `system`, user: <one image part per image> + question]. `images` are PIL images, in the order
    their image parts appear."""

    question: str | None = None
    images: list[Any] = field(default_factory=list)
    messages: list[dict] | None = None
    system: str | None = SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if (self.question is None) == (self.messages is None):
            raise RolloutError("a RolloutPrompt needs exactly one of `question` or `messages`")
        if self.messages is not None:
            parts = sum(
                1
                for m in self.messages
                if not isinstance(m.get("content"), str)
                for part in m["content"]
                if part.get("type") == "image"
            )
            if parts != len(self.images):
                raise RolloutError(f"messages have {parts} image parts but {len(self.images)} images were given")

    def to_messages(self) -> list[dict]:
        if self.messages is not None:
            return self.messages
        messages = []
        if self.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        content = [{"type": "image"} for _ in self.images] + [{"type": "text", "text": self.question}]
        messages.append({"role": "user", "content": content})
        return messages


@dataclass
class RolloutBatch:
    """B prompts x n rollouts, rows prompt-major (see the module docstring for every convention)."""

    prompt_ids: torch.Tensor  # [rows, P] long, left-padded
    prompt_mask: torch.Tensor  # [rows, P] long
    response_ids: torch.Tensor  # [rows, R] long, right-padded
    response_mask: torch.Tensor  # [rows, R] long, 1 up to and including eos
    behaviour_log_probs: torch.Tensor | None  # [rows, R] float32, 0 outside response_mask; None if not asked
    texts: list[str]  # decoded responses, special tokens skipped
    finish_reasons: list[str]  # "stop" (eos produced) or "length"
    group_ids: torch.Tensor  # [rows] long, the prompt index of each row
    n: int
    sampling: SamplingParams
    pixel_values: torch.Tensor | None = None  # [patches of all images of all prompts, D], each image once
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    images_per_prompt: list[int] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return len(self.images_per_prompt)

    @property
    def num_rows(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def input_ids(self) -> torch.Tensor:
        """prompt + response ids, [rows, P + R]."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def select_prompts(self, prompt_indices: list[int]) -> RolloutBatch:
        """The rollouts of some prompts (all n rows of each, in the order given), with padding columns that
        no selected row uses trimmed and each selected prompt's image blocks kept."""
        idx = list(prompt_indices)
        rows = torch.tensor([p * self.n + k for p in idx for k in range(self.n)], dtype=torch.long)
        prompt_mask, response_mask = self.prompt_mask[rows], self.response_mask[rows]
        used_prompt = prompt_mask.any(0).nonzero()
        first = int(used_prompt[0]) if used_prompt.numel() else prompt_mask.shape[1]
        used_response = response_mask.any(0).nonzero()
        last = int(used_response[-1]) + 1 if used_response.numel() else 0
        pixel_values = image_grid_thw = None
        if self.pixel_values is not None and self.image_grid_thw is not None:
            blocks = list(torch.split(self.pixel_values, self.image_grid_thw.prod(-1).tolist(), dim=0))
            starts = [sum(self.images_per_prompt[:p]) for p in range(len(self.images_per_prompt))]
            images = [i for p in idx for i in range(starts[p], starts[p] + self.images_per_prompt[p])]
            if images:
                pixel_values = torch.cat([blocks[i] for i in images])
                image_grid_thw = self.image_grid_thw[images]
        return RolloutBatch(
            prompt_ids=self.prompt_ids[rows, first:],
            prompt_mask=prompt_mask[:, first:],
            response_ids=self.response_ids[rows, :last],
            response_mask=response_mask[:, :last],
            behaviour_log_probs=None if self.behaviour_log_probs is None else self.behaviour_log_probs[rows, :last],
            texts=[self.texts[r] for r in rows.tolist()],
            finish_reasons=[self.finish_reasons[r] for r in rows.tolist()],
            group_ids=torch.arange(len(idx)).repeat_interleave(self.n),
            n=self.n,
            sampling=self.sampling,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            images_per_prompt=[self.images_per_prompt[p] for p in idx],
        )

    def row_vision_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """pixel_values / image_grid_thw with each prompt's image blocks repeated for its n rows."""
        return expand_vision_inputs(self.pixel_values, self.image_grid_thw, self.images_per_prompt, self.n)


def expand_vision_inputs(
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    images_per_prompt: list[int],
    n: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Repeat each prompt's per-image pixel blocks n times, keeping prompt-major row order.

    `pixel_values.repeat_interleave(n)` would be wrong: blocks have one row per patch, so they are split by
    `image_grid_thw.prod(-1)` first (docs/ENVIRONMENT.md)."""
    if pixel_values is None or image_grid_thw is None or n == 1:
        return pixel_values, image_grid_thw
    patch_blocks = list(torch.split(pixel_values, image_grid_thw.prod(-1).tolist(), dim=0))
    grids = list(image_grid_thw)
    out_pixels, out_grids, start = [], [], 0
    for count in images_per_prompt:
        blocks, prompt_grids = patch_blocks[start : start + count], grids[start : start + count]
        start += count
        for _ in range(n):
            out_pixels.extend(blocks)
            out_grids.extend(prompt_grids)
    if not out_pixels:
        return None, None
    return torch.cat(out_pixels, dim=0), torch.stack(out_grids, dim=0)


def response_mask_and_finish(response_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """Mask 1 up to and including the first stop token; "stop" if one was produced, else "length"."""
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, dtype=response_ids.dtype))
    # positions strictly after the first stop token: cumulative count of stops before this position > 0
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (stops_before == 0).long()
    finish = ["stop" if bool(row.any()) else "length" for row in is_stop]
    return mask, finish


@runtime_checkable
class RolloutBackend(Protocol):
    """What the trainer needs from a generation engine."""

    def generate(self, prompts: list[RolloutPrompt], n: int, sampling: SamplingParams) -> RolloutBatch: ...

    def update_weights(self, model: Any) -> None: ...
