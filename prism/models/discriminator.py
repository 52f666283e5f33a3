"""The PRISM discriminator: a sparse-upcycled Qwen3-VL MoE with a value head that scores response segments.

  D(x, y_k) = head(h_last),   h_last = last hidden state at the last token of [prompt(image, question) + y_k]

- Upcycling (METHOD.md, Stage 2a): every decoder MLP of a dense Qwen3-VL becomes E experts with top-k routing.
  Each expert is the dense MLP plus N(0, noise^2); routers are fresh N(0, router_std^2); everything else is
  copied. transformers keeps the experts fused (checked on the installed version, docs/ENVIRONMENT.md):
  `experts.gate_up_proj` [E, 2I, H] (gate rows first, then up rows) and `experts.down_proj` [E, H, I].
- Segments: the caption segment and the think+answer segment are scored in separate forwards, neither with the
  other in context. Both teacher and student segments are the canonical renderings of prism.response_format.Segments
  followed by `<|im_end|>`, so a pair never differs in its last token (the known flaw METHOD.md warns about).
- Variants (the ablations): `moe` (published), `dense` (no upcycling), `text_only` (the image is left out of the
  prompt), `hard_routed` (perception segments may only use the first half of the experts, reasoning segments
  the second half), `whole_response` (one score for the whole response, as GAD).

On disk a discriminator is a plain Hugging Face checkpoint folder (the backbone, loadable on its own) plus
`value_head.safetensors` and `discriminator.json` (variant and routing settings). `load_discriminator` also reads a
folder saved by the PRISM authors' code (the released `prism-vlm/Qwen3-VL-2B-4X-Moe-warmup-120k`): see
`read_authors_head`.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoeTextTopKRouter,
    load_balancing_loss_func,
)

from prism.atomic_io import atomic_directory
from prism.data.encoding import (
    IGNORE,
    Encoded,
    bucket_inverse,
    chat_messages,
    collate,
    expand_image_tokens,
    length_buckets,
    process_images,
)
from prism.data.formats import IMAGE_TOKEN
from prism.kv_prefix import (
    MIN_SHARED_PREFIX,
    cache_kwarg,
    common_prefix_length,
    continuation_positions,
    gathered_cache,
    image_token_types,
    opening_cache,
    output_cache,
)
from prism.models.experts import PER_EXPERT
from prism.models.presets import DENSE, MOE, check_checkpoint_folder, construct_model, load_model, save_model
from prism.models.processor import ModelError

Variant = Literal["moe", "dense", "text_only", "hard_routed", "whole_response"]
SegmentKind = Literal["perception", "reasoning", "response"]
VARIANTS: tuple[str, ...] = ("moe", "dense", "text_only", "hard_routed", "whole_response")
HEAD_FILE = "value_head.safetensors"
SPEC_FILE = "discriminator.json"
# The PRISM authors' discriminator folder (github.com/XIAO4579/PRISM, moe/value_head.py:430-471,
# Qwen3VLMoeValueHead.save_pretrained): the backbone saved by transformers 4.57 with the value head
# nn.Sequential(Dropout(0.1), Linear(hidden, 1, bias=False)) merged into its weights as `v_head.1.weight`, plus a
# pickled copy `value_head.pt` = {"v_head.summary.weight": [1, hidden]} (trl's names). Their alignment loads the
# merged copy (value_head.py:473-542 via verl's load_valuehead_model); moe/extract_value_head.py writes the trl names
# to a `value_head.safetensors` instead. The backbone itself is a stock Qwen3VLMoeForConditionalGeneration
# (top-k routing over all experts: the `moe` variant); transformers transposes its 4.57 expert layout on load.
AUTHORS_HEAD_FILE = "value_head.pt"
AUTHORS_HEAD_NAMES = {"v_head.1.weight": "weight", "v_head.summary.weight": "weight",
                      "v_head.1.bias": "bias", "v_head.summary.bias": "bias"}
AUTHORS_HEAD_DROPOUT = 0.1  # Qwen3VLMoeValueHead's default, which their warm-up script keeps


@dataclass(frozen=True)
class DiscriminatorSpec:
    """What a saved discriminator needs besides its backbone's config.json."""

    variant: str = "moe"
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ModelError(f"discriminator variant {self.variant!r} is not one of {', '.join(VARIANTS)}")

    @property
    def segment_kinds(self) -> tuple[str, ...]:
        return ("response",) if self.variant == "whole_response" else ("perception", "reasoning")

    @property
    def uses_images(self) -> bool:
        return self.variant != "text_only"


# ----------------------------------------------------------------------------------------------------
# Sparse upcycling
# ----------------------------------------------------------------------------------------------------


def moe_config(dense_config, num_experts: int, top_k: int, aux_loss_coef: float) -> Qwen3VLMoeConfig:
    """The Qwen3VLMoeConfig of a dense Qwen3VLConfig with every decoder MLP made sparse."""
    text = dense_config.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "intermediate_size", "dtype"):
        text.pop(key, None)
    text.update(
        intermediate_size=dense_config.text_config.intermediate_size,
        moe_intermediate_size=dense_config.text_config.intermediate_size,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=aux_loss_coef,
        tie_word_embeddings=dense_config.tie_word_embeddings,  # the MoE text config defaults to True
    )
    vision = dense_config.vision_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        vision.pop(key, None)
    return Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=dense_config.image_token_id,
        video_token_id=dense_config.video_token_id,
        vision_start_token_id=dense_config.vision_start_token_id,
        vision_end_token_id=dense_config.vision_end_token_id,
        tie_word_embeddings=dense_config.tie_word_embeddings,
    )


@torch.no_grad()
def upcycle(dense: nn.Module, num_experts: int, top_k: int, expert_noise_std: float, router_init_std: float,
            aux_loss_coef: float = 0.01, seed: int = 0) -> Qwen3VLMoeForConditionalGeneration:
    """Sparse upcycling of a dense Qwen3VLForConditionalGeneration (seeded; the caller's RNG is untouched)."""
    if type(dense).__name__ != DENSE:
        raise ModelError(f"upcycling needs a dense {DENSE}, got {type(dense).__name__}")
    config = moe_config(dense.config, num_experts, top_k, aux_loss_coef)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe = construct_model(Qwen3VLMoeForConditionalGeneration, config).to(next(dense.parameters()).dtype)
    dense_state = dense.state_dict()
    moe_state = moe.state_dict()
    for name, tensor in moe_state.items():
        if ".mlp.experts." in name or name.endswith(".mlp.gate.weight"):  # new in the MoE
            continue
        if name not in dense_state or dense_state[name].shape != tensor.shape:
            raise ModelError(f"upcycling: dense model has no tensor matching {name} {tuple(tensor.shape)}")
        tensor.copy_(dense_state[name])

    def noisy(weight: torch.Tensor) -> torch.Tensor:  # [E, ...] copies of one dense weight, each with own noise
        copies = weight.float().unsqueeze(0).repeat(num_experts, *([1] * weight.dim()))
        noise = torch.randn(copies.shape, generator=generator) * expert_noise_std
        return (copies + noise).to(weight.dtype)

    for index, layer in enumerate(moe.model.language_model.layers):
        prefix = f"model.language_model.layers.{index}.mlp."
        gate, up, down = (dense_state[prefix + f"{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj"))
        layer.mlp.experts.gate_up_proj.copy_(noisy(torch.cat([gate, up], dim=0)))  # chunk(2): gate first
        layer.mlp.experts.down_proj.copy_(noisy(down))
        router = layer.mlp.gate.weight
        router.copy_((torch.randn(router.shape, generator=generator) * router_init_std).to(router.dtype))
    moe.generation_config = dense.generation_config
    return moe.eval()


class HardRoutedRouter(Qwen3VLMoeTextTopKRouter):
    """A top-k router that may only choose among `allowed` experts (None: all of them).

    The discriminator sets `allowed` before each forward: perception segments route within the first half
    of the experts, reasoning segments within the second half. The other experts' logits are -inf, so their
    routing probability is 0 and the load-balancing loss sees them unused."""

    allowed: tuple[int, int] | None = None

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = nn.functional.linear(hidden_states, self.weight)
        if self.allowed is not None:
            keep = torch.zeros(self.num_experts, dtype=torch.bool, device=router_logits.device)
            keep[self.allowed[0] : self.allowed[1]] = True
            router_logits = router_logits.masked_fill(~keep, float("-inf"))
        router_probs = nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
        top_value = (top_value / top_value.sum(dim=-1, keepdim=True)).to(router_logits.dtype)
        return router_logits, top_value, top_index


def _install_hard_routers(backbone: nn.Module) -> list[HardRoutedRouter]:
    routers = []
    for layer in backbone.model.language_model.layers:
        old = layer.mlp.gate
        new = HardRoutedRouter(backbone.config.text_config).to(old.weight.device, old.weight.dtype)
        new.weight = old.weight  # the same parameter: checkpoints and optimizers see no difference
        layer.mlp.gate = new
        routers.append(new)
    return routers


# ----------------------------------------------------------------------------------------------------
# The discriminator module
# ----------------------------------------------------------------------------------------------------


class Discriminator(nn.Module):
    """backbone (dense or MoE Qwen3-VL) + value head; `forward` gives one score per row and the aux loss."""

    def __init__(self, backbone: nn.Module, spec: DiscriminatorSpec, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        hidden = backbone.config.text_config.hidden_size
        self.dropout = nn.Dropout(spec.head_dropout)
        self.head = head if head is not None else nn.Linear(hidden, 1, bias=False)
        self.is_moe = type(backbone).__name__ == MOE
        if spec.variant in ("moe", "text_only", "hard_routed", "whole_response") and not self.is_moe:
            raise ModelError(f"discriminator variant {spec.variant!r} needs an MoE backbone, got {type(backbone).__name__}")
        if spec.variant == "dense" and self.is_moe:
            raise ModelError("discriminator variant 'dense' needs a dense backbone, got an MoE one")
        self.routers = _install_hard_routers(backbone) if spec.variant == "hard_routed" else []
        if self.is_moe:
            backbone.set_experts_implementation(PER_EXPERT)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _route(self, kind: str | None) -> None:
        if not self.routers:
            return
        experts = self.backbone.config.text_config.num_experts
        allowed = {"perception": (0, experts // 2), "reasoning": (experts // 2, experts)}.get(kind or "")
        if allowed is None:
            raise ModelError(f"hard-routed discriminator: segment kind must be perception or reasoning, got {kind!r}")
        for router in self.routers:
            router.allowed = allowed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [rows] float32, load-balancing aux loss: a 0-d tensor, 0 for a dense backbone).

        Rows are right-padded; each is scored at its last attended token. Head dropout acts in train mode."""
        hidden, aux = self.last_hidden(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw, kind)
        return self.head_scores(hidden, dropout=self.training), aux

    def last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor,
                    pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                    kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state of each row [rows, hidden], aux loss): the backbone part of `forward`."""
        self._route(kind)
        extra = {} if pixel_values is None else {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        if self.is_moe:
            extra["output_router_logits"] = True
        out = self.backbone.model(input_ids=input_ids, attention_mask=attention_mask,
                                  mm_token_type_ids=mm_token_type_ids, use_cache=False, **extra)
        last = attention_mask.sum(-1) - 1
        hidden = out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        aux = torch.zeros((), device=hidden.device)
        if self.is_moe:
            text = self.backbone.config.text_config
            aux = load_balancing_loss_func(out.router_logits, text.num_experts, text.num_experts_per_tok,
                                           attention_mask).float()
        return hidden, aux

    def prefill(self, prefix: PromptPrefix, kind: str | None = None) -> Prefill:
        """One forward of the distinct prompts (and their images), kept for `continue_hidden`. Routing depends on
        the kind only for the hard-routed variant (`routes_by_kind`): otherwise one prefill serves every kind.
        The opening every prompt holds alike (the system prompt: about 99 of the embedded world's ~130 prompt
        tokens) runs once, as one row, and the prompts continue on its key/value cache repeated for them; keys,
        values, router logits and gradients are those of whole prompts, to float rounding."""
        self._route(kind)
        model = self.backbone.model
        ids, mask = prefix.prompt_ids, prefix.prompt_mask
        rows, width = ids.shape
        types = image_token_types(self.backbone.config.image_token_id, ids, width)
        routing_kwargs = {"output_router_logits": True} if self.is_moe else {}
        shared = min(common_prefix_length(ids, mask, self.backbone.config.image_token_id), width - 1)
        deltas = None
        top_k = self.backbone.config.text_config.num_experts_per_tok if self.is_moe else 0
        routing = None
        if rows > 1 and shared >= MIN_SHARED_PREFIX:
            positions, deltas = model.get_rope_index(input_ids=ids, mm_token_type_ids=types, attention_mask=mask,
                                                   image_grid_thw=prefix.vision.get("image_grid_thw"))
            head, cache = opening_cache(model, ids[:1, :shared], rows, attention_mask=mask[:1, :shared],
                                        position_ids=positions[:, :1, :shared], **routing_kwargs)
            out = model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions[:, :, shared:],
                        mm_token_type_ids=types[:, shared:], use_cache=True, **{cache_kwarg(model): cache},
                        **prefix.vision, **routing_kwargs)
            if self.is_moe:  # the opening's sums counted once for each prompt that holds it, as whole prompts would
                opening = routing_sums(head.router_logits, mask[:, :shared], top_k)
                tail = routing_sums(out.router_logits, mask[:, shared:], top_k)
                routing = RoutingSums(*(a + b for a, b in zip(opening, tail)))
        else:
            out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=True, **prefix.vision,
                        **routing_kwargs)
            if self.is_moe:
                routing = routing_sums(out.router_logits, mask, top_k)
        layers = [(layer.keys, layer.values) for layer in output_cache(out).layers]
        start = continuation_positions(model, ids, mask, types, prefix.vision.get("image_grid_thw"), deltas)
        return Prefill(layers, routing, start, mask)

    def continue_hidden(self, prefill: Prefill, rows: SegmentRows, kind: str | None = None,
                        parts: Sequence[int] | None = None,
                        split_by_length: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`last_hidden` of rows [prompt + segment] from their prompts' prefill: each row's prompt cache is
        gathered (gradients flow back into the one prompt forward) and only its segment runs. The aux loss is
        that of the whole rows: each prompt's routing sums are added to each of its rows'. `parts`: the sizes of
        consecutive groups of rows (a step's teacher and student segments, say) that share this one forward but
        each take the aux loss over their own rows, returned as a [groups] tensor (padding is masked out of it).
        `split_by_length`: run the rows in up to four forwards by length, each at its own width, where that saves
        enough padded tokens (`length_buckets`); rows never interact, so hidden states and aux loss are those of
        one forward, to float rounding."""
        self._route(kind)
        model = self.backbone.model
        routing_kwargs = {"output_router_logits": True} if self.is_moe else {}
        top_k = self.backbone.config.text_config.num_experts_per_tok if self.is_moe else 0
        lengths = rows.segment_mask.sum(-1).tolist()
        buckets = length_buckets(lengths) if split_by_length else [list(range(len(lengths)))]
        hidden_parts, routing_parts = [], []
        for bucket in buckets:
            index = torch.tensor(bucket, dtype=torch.long, device=rows.owner.device)
            owner = rows.owner.index_select(0, index)
            bucket_width = max(lengths[row] for row in bucket)
            segment_ids = rows.segment_ids.index_select(0, index)[:, :bucket_width]
            segment_mask = rows.segment_mask.index_select(0, index)[:, :bucket_width]
            cache = gathered_cache(self.backbone.config, prefill.layers, owner)
            positions = prefill.start[owner][:, None] + torch.arange(bucket_width, device=owner.device)
            mask = torch.cat([prefill.prompt_mask[owner], segment_mask], dim=1)
            out = model(input_ids=segment_ids, attention_mask=mask, position_ids=positions[None].expand(3, -1, -1),
                        use_cache=True, **{cache_kwarg(model): cache}, **routing_kwargs)
            last = segment_mask.sum(-1) - 1
            hidden_parts.append(out.last_hidden_state[torch.arange(len(bucket), device=last.device), last])
            if self.is_moe:
                routing_parts.append(routing_sums(out.router_logits, segment_mask, top_k))
        inverse = bucket_inverse(buckets, rows.owner.device)
        hidden = torch.cat(hidden_parts).index_select(0, inverse)
        sizes = [hidden.shape[0]] if parts is None else list(parts)
        if sum(sizes) != hidden.shape[0]:
            raise ValueError(f"parts {sizes} do not add up to the {hidden.shape[0]} rows")
        groups = [slice(end - size, end) for size, end in zip(sizes, itertools.accumulate(sizes))]
        aux = torch.zeros(len(groups), device=hidden.device)
        if self.is_moe:  # each row's sums: its prompt's (a prompt counted once per row that holds it) + its segment's
            per_row = [torch.cat(segment).index_select(0, inverse) + prompt.index_select(0, rows.owner)
                       for segment, prompt in zip(zip(*routing_parts), prefill.routing)]
            num_experts = self.backbone.config.text_config.num_experts
            aux = torch.stack([balancing_loss(RoutingSums(*(sums[group].sum(0) for sums in per_row)), num_experts)
                               for group in groups])
        return hidden, (aux[0] if parts is None else aux)

    @property
    def routes_by_kind(self) -> bool:
        return bool(self.routers)

    def head_scores(self, hidden: torch.Tensor, dropout: bool) -> torch.Tensor:
        """Scores [rows] float32 of last hidden states; `dropout` draws the head's dropout mask (one per row)."""
        if dropout:
            hidden = nn.functional.dropout(hidden, self.dropout.p, training=True)
        return self.head(hidden).squeeze(-1).float()


def build_discriminator(dense: nn.Module, spec: DiscriminatorSpec, *, num_experts: int, top_k: int,
                        expert_noise_std: float, router_init_std: float, aux_loss_coef: float,
                        seed: int) -> Discriminator:
    """A fresh discriminator from a dense backbone: upcycled unless the variant is `dense`; seeded head."""
    backbone = dense if spec.variant == "dense" else upcycle(
        dense, num_experts, top_k, expert_noise_std, router_init_std, aux_loss_coef, seed=seed)
    hidden = backbone.config.text_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        head = nn.Linear(hidden, 1, bias=False).to(next(backbone.parameters()).dtype)
    return Discriminator(backbone, spec, head)


# ----------------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------------


def save_discriminator(discriminator: Discriminator, processor, directory: str | os.PathLike,
                       state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The backbone as an HF checkpoint folder, then the head and spec inside it; renamed into place whole."""
    state = state_dict if state_dict is not None else discriminator.state_dict()
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    with atomic_directory(directory) as tmp:
        save_model(discriminator.backbone, processor, tmp, state_dict=backbone_state)
        save_file({"weight": state["head.weight"].detach().contiguous().cpu()}, str(tmp / HEAD_FILE))
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(discriminator.spec), indent=2) + "\n", encoding="utf-8")
    return Path(directory)


def load_discriminator(directory: str | os.PathLike, dtype: str = "float32") -> Discriminator:
    """A discriminator folder saved by `save_discriminator`, or by the PRISM authors' code (no discriminator.json:
    `read_authors_head`)."""
    directory = Path(directory)
    if not (directory / SPEC_FILE).is_file():
        if directory.is_dir() and authors_head_files(directory):
            return load_authors_discriminator(directory, dtype)
        raise ModelError(f"{directory} is not a discriminator folder: {SPEC_FILE} is missing (nor does it hold a value "
                         f"head saved by the PRISM authors' code: no {AUTHORS_HEAD_FILE}, no v_head.* tensors in its "
                         "weights)")
    if not (directory / HEAD_FILE).is_file():
        raise ModelError(f"{directory} is not a discriminator folder: {HEAD_FILE} is missing")
    try:
        spec = DiscriminatorSpec(**json.loads((directory / SPEC_FILE).read_text(encoding="utf-8")))
    except (TypeError, json.JSONDecodeError) as error:
        raise ModelError(f"{directory / SPEC_FILE}: not a discriminator spec ({error})") from None
    backbone = load_model(directory, dtype=dtype)
    weight = load_file(str(directory / HEAD_FILE))["weight"].to(getattr(torch, dtype))
    return Discriminator(backbone, spec, _linear_head(weight))


def _linear_head(weight: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], 1, bias=False).to(weight.dtype)
    head.weight.data.copy_(weight)
    return head


def authors_head_files(directory: Path) -> list[Path]:
    """The files of `directory` that hold the PRISM authors' value head: the weights files holding `v_head.*`
    tensors (the shards the index names, or the single weights file), then `value_head.pt`, then an extracted
    `value_head.safetensors` with trl's names. Empty for any other folder (ours keeps its head under `weight`)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            weights = sorted({directory / file for name, file in weight_map.items() if name.startswith("v_head.")})
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelError(f"{index}: not a safetensors index ({error})") from None
    else:
        weights = [file for file in sorted(directory.glob("*.safetensors"))
                   if file.name != HEAD_FILE and any(name.startswith("v_head.") for name in _tensor_names(file))]
    extra = [directory / AUTHORS_HEAD_FILE] if (directory / AUTHORS_HEAD_FILE).is_file() else []
    extracted = directory / HEAD_FILE
    if extracted.is_file() and any(name in AUTHORS_HEAD_NAMES for name in _tensor_names(extracted)):
        extra.append(extracted)
    return weights + extra


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{file}: not a readable safetensors file ({error})") from None


def _head_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The `v_head.*` tensors of one file, by their names there."""
    if file.suffix == ".pt":
        try:  # weights_only: tensors and containers only, no code from the file runs
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
            raise ModelError(f"{file}: not a weights-only torch file of tensors ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"{file}: expected a dict of tensor name -> tensor, got {type(state).__name__}")
        return {name: tensor for name, tensor in state.items() if str(name).startswith("v_head.")}
    if not file.is_file():
        raise ModelError(f"{file}: missing (model.safetensors.index.json names it for the v_head.* tensors)")
    try:
        with safe_open(str(file), framework="pt") as handle:
            names = [name for name in list(handle.keys()) if name.startswith("v_head.")]  # a header, not a dict
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{file}: not a readable safetensors file ({error})") from None


def read_authors_head(directory: str | os.PathLike, hidden_size: int) -> torch.Tensor:
    """The value head weight [1, hidden_size] of a discriminator folder saved by the PRISM authors' code.

    Every file holding it (`authors_head_files`) is read and must agree; the first (the merged weights, which the
    authors' alignment loads) is returned. A head prism's cannot hold (a bias, several outputs, other layers) is a
    NotImplementedError naming what differs; a missing or misshapen tensor is a ModelError naming file and tensor."""
    directory = Path(directory)
    files = authors_head_files(directory)
    if not files:
        raise ModelError(f"{directory}: no value head in the PRISM authors' layout (no {AUTHORS_HEAD_FILE} and no "
                         "v_head.* tensors in its weights)")
    weights: list[tuple[Path, torch.Tensor]] = []
    for file in files:
        state = _head_tensors(file)
        for name in state:
            if AUTHORS_HEAD_NAMES.get(name) != "weight":
                if AUTHORS_HEAD_NAMES.get(name) == "bias":
                    raise NotImplementedError(
                        f"{file}: tensor '{name}': the value head has a bias; prism's discriminator head is "
                        "Linear(hidden, 1) without one (as the authors' MoE head: moe/value_head.py), so it cannot "
                        "be loaded as it is")
                raise NotImplementedError(
                    f"{file}: tensor '{name}' is not part of a Dropout + Linear(hidden, 1, no bias) value head, the "
                    "only head prism's discriminator has")
        names = [name for name in state if AUTHORS_HEAD_NAMES.get(name) == "weight"]
        if not names:
            raise ModelError(f"{file}: no tensor 'v_head.1.weight' or 'v_head.summary.weight' (the value head)")
        if len(names) > 1:
            raise ModelError(f"{file}: two value head weights, {names[0]!r} and {names[1]!r}")
        weight = state[names[0]]
        if weight.dim() != 2 or weight.shape[1] != hidden_size or not weight.is_floating_point():
            raise ModelError(f"{file}: tensor '{names[0]}': expected a float tensor of shape [1, {hidden_size}] (the "
                             f"backbone's hidden size), got {weight.dtype} {list(weight.shape)}")
        if weight.shape[0] != 1:
            raise NotImplementedError(
                f"{file}: tensor '{names[0]}': the value head gives {weight.shape[0]} scores per token; prism's "
                "discriminator head gives one")
        weights.append((file, weight))
    first_file, first = weights[0]
    for file, weight in weights[1:]:
        if not torch.equal(weight.float(), first.float()):
            raise ModelError(f"{file} and {first_file} hold different value heads: the folder is not one checkpoint")
    return first


def load_authors_discriminator(directory: str | os.PathLike, dtype: str = "float32") -> Discriminator:
    """A discriminator from a folder saved by the PRISM authors' code: their backbone loaded as it is (the merged
    `v_head.*` tensors are not part of it and are left out), their value head as ours, variant `moe` (or `dense`
    for a dense backbone), head dropout 0.1 as theirs."""
    directory = Path(directory)
    check_checkpoint_folder(directory)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        hidden_size = int(config["text_config"]["hidden_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{directory / 'config.json'}: no text_config.hidden_size ({error})") from None
    weight = read_authors_head(directory, hidden_size)
    backbone = load_model(directory, dtype=dtype)
    variant = "moe" if type(backbone).__name__ == MOE else "dense"
    head = _linear_head(weight.to(getattr(torch, dtype)))
    return Discriminator(backbone, DiscriminatorSpec(variant=variant, head_dropout=AUTHORS_HEAD_DROPOUT), head)


# ----------------------------------------------------------------------------------------------------
# Segment batches
# ----------------------------------------------------------------------------------------------------


@dataclass
class EncodedPrompt:
    """A prompt rendered up to the assistant turn, its image tokens expanded, vision inputs processed once."""

    ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


def encode_prompt(processor, messages: list[dict[str, str]], images: Sequence, uses_images: bool) -> EncodedPrompt:
    """sharegpt-style messages with `<image>` placeholders (+ PIL images) -> ids ending in the assistant header.

    Text-only scoring drops the placeholders and the images."""
    if not uses_images:
        messages = [{**m, "content": m["content"].replace(IMAGE_TOKEN, "")} for m in messages]
        images = []
    tokenizer = processor.tokenizer
    text = tokenizer.apply_chat_template(chat_messages(messages), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not images:
        return EncodedPrompt(ids, None, None)
    pixel_values, image_grid_thw, tokens_per_image = process_images(processor, list(images))
    expanded, _ = expand_image_tokens(ids, tokenizer.convert_tokens_to_ids("<|image_pad|>"), tokens_per_image,
                                      "the discriminator's prompt")
    return EncodedPrompt(expanded, pixel_values, image_grid_thw)


def scored_segment_ids(tokenizer, segment: str, prompt_length: int, max_length: int | None) -> list[int]:
    """A segment's ids + <|im_end|>, its tail cut so that the row [prompt + segment] fits `max_length` (the
    terminator is kept: teacher and student rows always end in the same token)."""
    ids = tokenizer(segment, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if max_length is not None and prompt_length + len(ids) > max_length:
        if prompt_length + 1 >= max_length:
            raise ModelError(f"a prompt of {prompt_length} tokens leaves no room for a segment in "
                             f"max_length={max_length}")
        ids = ids[: max_length - prompt_length - 1] + ids[-1:]
    return ids


def segment_batch(processor, prompts: Sequence[EncodedPrompt], segments: Sequence[str],
                  max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded rows [prompt_i + segment_i + <|im_end|>], vision blocks in row order.

    Every row ends in the same terminator, so teacher and student segments share their last token."""
    if len(prompts) != len(segments):
        raise ValueError(f"{len(prompts)} prompts for {len(segments)} segments")
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows = [prompt.ids + scored_segment_ids(tokenizer, segment, len(prompt.ids), max_length)
            for prompt, segment in zip(prompts, segments)]
    # collate pads and concatenates vision blocks in row order; a scored segment has no labels
    encoded = [Encoded(ids, [IGNORE] * len(ids), p.pixel_values, p.image_grid_thw) for ids, p in zip(rows, prompts)]
    batch = collate(encoded, tokenizer.pad_token_id, image_token)
    del batch["labels"]
    return batch


@dataclass
class PromptPrefix:
    """Distinct prompts, right-padded (their common opening in the same columns, run once by `prefill`; a row's
    segment continues after the padding, its positions explicit), with their vision inputs (the images of the
    prompts that have them, in order)."""

    prompt_ids: torch.Tensor  # [prompts, P]
    prompt_mask: torch.Tensor
    vision: dict[str, torch.Tensor]  # pixel_values, image_grid_thw, or empty

    def to(self, device: torch.device) -> PromptPrefix:
        return PromptPrefix(self.prompt_ids.to(device), self.prompt_mask.to(device),
                            {k: v.to(device) for k, v in self.vision.items()})


@dataclass
class SegmentRows:
    """Rows continuing a `PromptPrefix`: each row's prompt index and its segment + <|im_end|>, right-padded."""

    owner: torch.Tensor  # [rows]
    segment_ids: torch.Tensor  # [rows, S]
    segment_mask: torch.Tensor

    def to(self, device: torch.device) -> SegmentRows:
        return SegmentRows(self.owner.to(device), self.segment_ids.to(device), self.segment_mask.to(device))


class RoutingSums(NamedTuple):
    """What transformers' `load_balancing_loss_func` sums over tokens and layers, per row (or summed over rows):
    top-k assignments per expert, router probabilities per expert (differentiable) and attended tokens x layers.
    Sums add, so a prompt's are computed once and added to each row that continues it."""

    assignments: torch.Tensor  # [rows, experts]
    probabilities: torch.Tensor  # [rows, experts]
    tokens: torch.Tensor  # [rows]


def routing_sums(router_logits: Sequence[torch.Tensor], mask: torch.Tensor, top_k: int) -> RoutingSums:
    """Per row of `mask` [rows, tokens], the sums of its attended tokens over the layers' `router_logits` (each
    [rows' * tokens, experts], rows' = rows, or 1 for tokens every row holds alike), as the load-balancing loss
    takes them: softmax, top-k of the probabilities, in float32."""
    weight = mask.unsqueeze(-1).float()
    assignments = probabilities = 0.0
    for logits in router_logits:
        probs = nn.functional.softmax(logits.float(), dim=-1).view(-1, mask.shape[1], logits.shape[-1])
        chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
        assignments = assignments + (chosen * weight).sum(1)
        probabilities = probabilities + (probs * weight).sum(1)
    return RoutingSums(assignments, probabilities, weight.sum((1, 2)) * len(router_logits))


def balancing_loss(sums: RoutingSums, num_experts: int) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` of the tokens whose sums (over rows) are `sums`:
    E * sum_e (share of assignments to e) * (mean probability of e)."""
    return num_experts * torch.sum(sums.assignments / sums.tokens * (sums.probabilities / sums.tokens))


@dataclass
class Prefill:
    """A `PromptPrefix` run through the backbone: per layer its keys and values, each prompt's routing sums (MoE),
    the position after each prompt, and the prompts' mask."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    routing: RoutingSums | None
    start: torch.Tensor
    prompt_mask: torch.Tensor


def prompt_prefix(processor, prompts: Sequence[EncodedPrompt]) -> PromptPrefix:
    width = max(len(p.ids) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), processor.tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        prompt_ids[i, : len(prompt.ids)] = torch.tensor(prompt.ids)
        prompt_mask[i, : len(prompt.ids)] = 1
    with_images = [p for p in prompts if p.pixel_values is not None]
    vision = {}
    if with_images:
        vision = {"pixel_values": torch.cat([p.pixel_values for p in with_images]),
                  "image_grid_thw": torch.cat([p.image_grid_thw for p in with_images])}
    return PromptPrefix(prompt_ids, prompt_mask, vision)


def segment_rows(processor, prompts: Sequence[EncodedPrompt], owner: Sequence[int], segments: Sequence[str],
                 max_length: int | None = None) -> SegmentRows:
    """Row i continues `prompts[owner[i]]` with `segments[i]` (`scored_segment_ids`, as `segment_batch`'s whole
    rows)."""
    if len(owner) != len(segments):
        raise ValueError(f"{len(owner)} rows for {len(segments)} segments")
    tokenizer = processor.tokenizer
    rows = [scored_segment_ids(tokenizer, segment, len(prompts[index].ids), max_length)
            for index, segment in zip(owner, segments)]
    length = max(len(ids) for ids in rows)
    segment_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    segment_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, ids in enumerate(rows):
        segment_ids[i, : len(ids)] = torch.tensor(ids)
        segment_mask[i, : len(ids)] = 1
    return SegmentRows(torch.tensor(list(owner), dtype=torch.long), segment_ids, segment_mask)


def distinct_prompts(prompts: Sequence[EncodedPrompt]) -> tuple[list[EncodedPrompt], list[int]]:
    """The distinct prompt objects of `prompts` (first-seen order) and each row's index among them."""
    index: dict[int, int] = {}
    distinct: list[EncodedPrompt] = []
    for prompt in prompts:
        if id(prompt) not in index:
            index[id(prompt)] = len(distinct)
            distinct.append(prompt)
    return distinct, [index[id(p)] for p in prompts]


def segment_hidden(discriminator: Discriminator, processor, prompts: Sequence[EncodedPrompt], segments: Sequence[str],
                   kind: str, micro_batch_size: int, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states [rows, hidden] of [prompt_i + segment_i + <|im_end|>] and the mean aux loss over
    micro-batches of `micro_batch_size` rows, under the caller's grad mode. Within a micro-batch, rows holding
    the same prompt object share one forward of it (`Discriminator.prefill`): a prompt with its image is most
    of a row's tokens."""
    if len(prompts) != len(segments):
        raise ValueError(f"{len(prompts)} prompts for {len(segments)} segments")
    hidden, aux = [], []
    device = discriminator.device
    for start in range(0, len(segments), micro_batch_size):
        distinct, owner = distinct_prompts(prompts[start : start + micro_batch_size])
        prefill = discriminator.prefill(prompt_prefix(processor, distinct).to(device), kind=kind)
        rows = segment_rows(processor, distinct, owner, segments[start : start + micro_batch_size], max_length)
        h, a = discriminator.continue_hidden(prefill, rows.to(device), kind=kind)
        hidden.append(h)
        aux.append(a)
    return torch.cat(hidden), torch.stack(aux).mean()


def score_segments(discriminator: Discriminator, processor, prompts: Sequence[EncodedPrompt], segments: Sequence[str],
                   kind: str, micro_batch_size: int, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [rows] and the mean aux loss over micro-batches, under the caller's grad mode (head dropout in
    train mode)."""
    hidden, aux = segment_hidden(discriminator, processor, prompts, segments, kind, micro_batch_size, max_length)
    return discriminator.head_scores(hidden, dropout=discriminator.training), aux
