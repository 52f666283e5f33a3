"""An offline Qwen-style tokenizer: byte-level BPE trained on a corpus, Qwen chat specials, Qwen chat template.

No hub is reachable, so the embedded world trains its own tiny vocabulary. The special tokens get the fixed
ids 0..7, which lets model configs (prism.models.presets) name them as constants. The chat template follows
Qwen2/3-VL (`<|im_start|>role\\n...<|im_end|>\\n`, an image as `<|vision_start|><|image_pad|><|vision_end|>`)
and wraps each assistant turn, its closing `<|im_end|>` included, in `{% generation %}` so SFT can train on
exactly the assistant tokens via `return_assistant_tokens_mask`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Order is the id: <|endoftext|> = 0 ... <|video_pad|> = 7. Never reorder.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_TOKEN_IDS: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
PAD_TOKEN_ID = SPECIAL_TOKEN_IDS["<|endoftext|>"]
IM_START_TOKEN_ID = SPECIAL_TOKEN_IDS["<|im_start|>"]
EOS_TOKEN_ID = SPECIAL_TOKEN_IDS["<|im_end|>"]
VISION_START_TOKEN_ID = SPECIAL_TOKEN_IDS["<|vision_start|>"]
VISION_END_TOKEN_ID = SPECIAL_TOKEN_IDS["<|vision_end|>"]
IMAGE_TOKEN_ID = SPECIAL_TOKEN_IDS["<|image_pad|>"]
VIDEO_TOKEN_ID = SPECIAL_TOKEN_IDS["<|video_pad|>"]

# Content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts. Whitespace control
# (`-`) keeps every newline explicit, so the rendered text is exactly the Qwen layout.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- render(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a Qwen-style HF tokenizer (deterministic per corpus)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # trainer puts them first: ids 0..7
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen ones
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert bpe.token_to_id(token) == token_id, f"special token {token} got id {bpe.token_to_id(token)}"
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",  # decoder-only generation pads on the left
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def assistant_token_mask(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a 0/1 mask that is 1 on assistant tokens (incl. `<|im_end|>`).

    Images stay one `<|image_pad|>` each here; the processor's `apply_chat_template(...,
    return_assistant_tokens_mask=True)` gives the same mask with image tokens expanded.
    """
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])
