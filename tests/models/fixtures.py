"""Small inputs shared by the model tests: a synthetic corpus, noise images, a chat prompt."""

import random

import numpy as np
from PIL import Image


def shape_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circles", "squares", "triangles"]
    return [
        f"There are {rng.randint(1, 5)} {rng.choice(colours)} {rng.choice(shapes)} in the image."
        for _ in range(n)
    ]


def noise_image(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)
