"""The embedded world: seeded, rendered visual-reasoning scenes with their ground truth.

Every sample is a pure function of (seed, split, index): the generator can be sharded, resumed or
re-run and always yields the same image, question, answer and demonstrations. Scenes live on a
G x G grid of 32 px cells (G = image_size // 32), so with Qwen3-VL's 32 px merged patches each image
token sees exactly one cell; a tiny model can then learn perception, and the families differ in how
much reasoning sits on top of it.

Six task families mirror the axes of the published benchmarks:
  counting    attribute counting                      (count by colour or by shape)
  presence    HallusionBench: yes/no with absent-object traps, generated in question pairs
  chart       MathVista: read bar heights, then add / subtract / find the maximum
  geometry    MathVerse / MathVision: area or perimeter of a shaded figure on a grid
  composite   WeMath: multi-step (two counts, then combine)
  multichoice MMMU: four options (in a fixed order unless shuffled), answer with a letter

From one ground truth come two demonstrations, as in the paper: a *teacher* one (every object in a
caption bullet, every reasoning step written) and a *public* one (bullets dropped or terse, steps
skipped, a configurable rate of wrong answers). The untagged `base` corpus is general instruction data on the
same scenes: the family's question with a short direct answer (what an instruct model does), full descriptions
(perception), what sits in one cell and, where `base_lookup_rate` is set, a list of one colour's (or shape's) objects
then those of that colour and a shape. Trained on it, the base stage is the table's Instruct row.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from prism.config import HASH_IF_SET, FieldError, check_choice
from prism.data.families import FAMILIES
from prism.response_format import SYSTEM_PROMPT, render_response

SPLITS = ("base", "sft", "teacher", "rl", "bench")
# Split codes seed independent random streams, so growing one split never changes another.
_SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}

PALETTE = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (30, 160, 60),
    "yellow": (230, 190, 20),
    "purple": (140, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PRESENCE_STEPS = ("count", "matches")
CELL_PX = 32
# Field metadata naming the splits whose text the field changes: the tokenizer corpus (`export.corpus_texts`) takes
# the field at its default there, so the tokenizer stays the default world's and so, where the base split is the
# default's, do the base models: a variant's SFT starts from the same bases as the default's.
TOKENIZER_AT_DEFAULT = "tokenizer_at_default"


def _tokenizer_at_default(*splits: str) -> dict:
    return {TOKENIZER_AT_DEFAULT: splits}


@dataclass
class WorldConfig:
    """What the embedded world generates. Difficulty and noise are knobs, not constants."""

    # --- reproducibility ---
    seed: int = field(default=0, metadata={"help": "Root seed; every sample is a function of (seed, split, index)."})

    # --- split sizes (samples) ---
    base_size: int = field(default=20000, metadata={"help": "Untagged captioning/QA samples for the embedded base stage."})
    sft_size: int = field(default=20000, metadata={"help": "Public (lower-fidelity) tagged demonstrations for SFT."})
    teacher_size: int = field(default=2000, metadata={"help": "Teacher (high-fidelity) demonstrations for alignment and warm-up."})
    rl_size: int = field(default=4000, metadata={"help": "RL prompts with ground truth."})
    bench_size: int = field(default=200, metadata={"help": "Held-out benchmark samples per family."})

    # --- difficulty ---
    families: list[str] = field(default_factory=lambda: list(FAMILIES), metadata={"help": "Task families to generate."})
    sft_family_repeats: dict[str, int] = field(
        default_factory=dict,
        metadata={**HASH_IF_SET, **_tokenizer_at_default("sft"),
                  "help": "How many times each family comes up in the SFT split's cycle of families (name -> count, "
                          "unnamed families 1; the other training splits cycle them evenly; the tokenizer is the even "
                          "mix's). table1's embedded default repeats presence 4 times: its lookup needs several times "
                          "the presence chains an even mix holds (README, \"Presence, learned?\")."},
    )
    image_size: int = field(default=96, metadata={"help": "Image side in px, a multiple of 32 (grid = image_size / 32 cells)."})
    num_colours: int = field(default=4, metadata={"help": "Colours in use, taken in order from the palette (2-6)."})
    num_shapes: int = field(default=3, metadata={"help": "Shapes in use, taken in order from circle, square, triangle, diamond (2-4)."})
    min_objects: int = field(default=1, metadata={"help": "Fewest objects in a grid scene."})
    max_objects: int = field(default=5, metadata={"help": "Most objects in a grid scene (at most grid cells)."})
    shuffle_options: bool = field(
        default=False,
        metadata={"help": "Shuffle the multiple-choice options (world format 5). Off, they keep the shape list's or "
                          "palette's order, so a letter always names the same option: shuffled, the tiny presets never "
                          "learned to look the letter up in the question (embedded-m answered C to every item)."},
    )

    # --- public-corpus noise (the SFT data is lower-fidelity than the teacher's) ---
    caption_drop_rate: float = field(default=0.2, metadata={"help": "Probability that a public caption bullet is dropped."})
    terse_caption_rate: float = field(default=0.4, metadata={"help": "Probability that a public caption omits positions."})
    skip_steps_rate: float = field(default=0.3, metadata={"help": "Probability that a public demonstration skips the intermediate steps."})
    wrong_answer_rate: float = field(default=0.15, metadata={"help": "Probability that a public demonstration ends in a wrong answer."})
    skip_steps_by_family: dict[str, float] = field(
        default_factory=dict,
        metadata={**HASH_IF_SET, **_tokenizer_at_default("base", "sft", "teacher", "rl"),
                  "help": "skip_steps_rate for the named families (name -> probability; the others keep "
                          "skip_steps_rate). Only the public demonstrations change (the SFT file, the student side "
                          "of the warm-up pairs); the tokenizer stays the default's, so the bases are shared."},
    )
    presence_steps: str = field(
        default="count",
        metadata={**HASH_IF_SET, **_tokenizer_at_default("base", "sft", "teacher", "rl"),
                  "help": "The presence chain's middle line: 'count' counts the asked shape in the colour's list "
                          "(\"Red squares: 1.\"); 'matches' copies the list's items of that shape (\"Red squares: "
                          "square at center.\", or \"none\"), existence by copying instead of counting. Every other "
                          "draw and the tokenizer stay the default's, so the bases are shared."},
    )

    # --- the untagged base corpus (instruction data) ---
    base_answer_rate: float = field(
        default=0.5,
        metadata={"help": "Share of base samples that answer the family's question directly, untagged (e.g. 'Yes.'); "
                          "the rest describe the scene (4 in 5) or name what sits in one cell."},
    )
    base_system_prompt_rate: float = field(
        default=0.5,
        metadata={"help": "Share of base samples under the PRISM system prompt, answered untagged all the same: the "
                          "instruct model has seen the prompt every row is evaluated with, and was never taught its format."},
    )
    base_lookup_rate: float = field(
        default=0.0,
        metadata={**HASH_IF_SET, **_tokenizer_at_default("base", "sft", "teacher", "rl"),
                  "help": "Share of base samples on grid scenes that list the objects of one colour (or one shape), "
                          "then those of that colour and one shape: \"List the red shapes, then the red squares.\" -> "
                          "\"Red shapes: circle at left, square at center. Red squares: square at center.\" (or "
                          "\"none\"), a lookup from a list the model wrote, practised before SFT. Only base.json "
                          "changes; the tokenizer stays the default's."},
    )

    def __post_init__(self) -> None:
        for name in ("base_size", "sft_size", "teacher_size", "rl_size", "bench_size"):
            if getattr(self, name) < 0:
                raise FieldError(name, "an integer >= 0", getattr(self, name))
        if self.bench_size % 2:
            raise FieldError("bench_size", "an even integer (presence questions come in yes/no pairs)", self.bench_size)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise FieldError("families", f"a non-empty list from {list(FAMILIES)}", self.families)
        if len(set(self.families)) != len(self.families):
            raise FieldError("families", "a list without repeats", self.families)
        for family, count in self.sft_family_repeats.items():
            if family not in self.families:
                raise FieldError(f"sft_family_repeats.{family}", f"a family of `families` ({', '.join(self.families)})",
                                 family)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise FieldError(f"sft_family_repeats.{family}", "an integer >= 1", count)
        for family, rate in self.skip_steps_by_family.items():
            if family not in self.families:
                raise FieldError(f"skip_steps_by_family.{family}",
                                 f"a family of `families` ({', '.join(self.families)})", family)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
                raise FieldError(f"skip_steps_by_family.{family}", "a probability in [0, 1]", rate)
        check_choice(self, "presence_steps", PRESENCE_STEPS)
        if self.image_size % CELL_PX or not 64 <= self.image_size <= 256:
            raise FieldError("image_size", "a multiple of 32 between 64 and 256", self.image_size)
        if not 2 <= self.num_colours <= len(PALETTE):
            raise FieldError("num_colours", f"an integer in [2, {len(PALETTE)}]", self.num_colours)
        if not 2 <= self.num_shapes <= len(SHAPES):
            raise FieldError("num_shapes", f"an integer in [2, {len(SHAPES)}]", self.num_shapes)
        cells = self.grid * self.grid
        if not 1 <= self.min_objects <= cells:
            raise FieldError("min_objects", f"an integer in [1, {cells}] (grid cells)", self.min_objects)
        if not self.min_objects <= self.max_objects <= cells:
            raise FieldError("max_objects", f"an integer in [min_objects={self.min_objects}, {cells}]", self.max_objects)
        for name in ("caption_drop_rate", "terse_caption_rate", "skip_steps_rate", "wrong_answer_rate", "base_answer_rate",
                     "base_system_prompt_rate", "base_lookup_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FieldError(name, "a probability in [0, 1]", value)

    @property
    def grid(self) -> int:
        return self.image_size // CELL_PX

    @property
    def colours(self) -> list[str]:
        return list(PALETTE)[: self.num_colours]

    @property
    def shapes(self) -> list[str]:
        return list(SHAPES)[: self.num_shapes]

    def family_cycle(self, split: str) -> list[str]:
        """The families a training split cycles through, one entry per question pair: `families` in order, each
        repeated as `sft_family_repeats` says on the SFT split."""
        repeats = self.sft_family_repeats if split == "sft" else {}
        return [family for family in self.families for _ in range(repeats.get(family, 1))]

    def split_size(self, split: str) -> int:
        """Samples in a split; the benchmark split holds `bench_size` per family."""
        if split == "bench":
            return self.bench_size * len(self.families)
        return getattr(self, f"{split}_size")


# ---------------------------------------------------------------------------------------------
# Scenes and samples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridObject:
    row: int
    col: int
    colour: str
    shape: str


@dataclass(frozen=True)
class Demonstration:
    """A tagged response in parts; `text` renders it in the canonical format."""

    caption_bullets: tuple[str, ...]
    steps: tuple[str, ...]
    answer: str

    @property
    def text(self) -> str:
        return render_response(self.caption_bullets, self.steps, self.answer)


@dataclass(frozen=True)
class Sample:
    id: str
    split: str
    family: str
    image: Image.Image | None  # None in the samples an export returns once it wrote the image (`image_name`)
    question: str  # the user's text, options included for multiple choice
    answer: str  # ground truth as the reward reads it
    answer_type: Literal["integer", "number", "yes_no", "letter"]
    choices: dict[str, str] | None
    teacher: Demonstration
    public: Demonstration
    base_prompt: str  # untagged captioning / QA pair for the base stage
    base_response: str
    base_system_prompt: bool  # whether the base sample carries the PRISM system prompt
    pair_id: str | None = None  # presence questions come in yes/no pairs on one image

    def image_png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()

    def base_messages(self) -> list[dict[str, str]]:
        """The untagged base pair as chat messages (the system prompt only where the sample carries it)."""
        system = [{"role": "system", "content": SYSTEM_PROMPT}] if self.base_system_prompt else []
        return [*system, {"role": "user", "content": "<image>" + self.base_prompt},
                {"role": "assistant", "content": self.base_response}]

    def messages(self, source: Literal["teacher", "public"]) -> list[dict[str, str]]:
        """Chat messages in the LLaMA-Factory convention (`<image>` marks the image)."""
        demo = self.teacher if source == "teacher" else self.public
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "<image>" + self.question},
            {"role": "assistant", "content": demo.text},
        ]


def _position_name(row: int, col: int, grid: int) -> str:
    if grid == 3:
        vertical = ("top", "", "bottom")[row]
        horizontal = ("left", "", "right")[col]
        return f"{vertical} {horizontal}".strip() or "center"
    return f"row {row + 1} column {col + 1}"


def _object_phrase(obj: GridObject, grid: int, with_position: bool = True) -> str:
    phrase = f"{obj.colour} {obj.shape}"
    return f"{phrase} at {_position_name(obj.row, obj.col, grid)}" if with_position else phrase


def _list_objects(objects: list[GridObject], grid: int, show_colour: bool = True) -> str:
    if not objects:
        return "none"
    parts = [
        _object_phrase(o, grid) if show_colour else f"{o.shape} at {_position_name(o.row, o.col, grid)}"
        for o in objects
    ]
    return ", ".join(parts)


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


def _random_scene(rng: np.random.Generator, cfg: WorldConfig) -> list[GridObject]:
    cells = cfg.grid * cfg.grid
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    chosen = sorted(rng.choice(cells, size=count, replace=False).tolist())  # reading order
    return [
        GridObject(c // cfg.grid, c % cfg.grid, str(rng.choice(cfg.colours)), str(rng.choice(cfg.shapes)))
        for c in chosen
    ]


# --- drawing ---------------------------------------------------------------------------------


def _draw_grid_scene(objects: list[GridObject], cfg: WorldConfig) -> Image.Image:
    image = Image.new("RGB", (cfg.image_size, cfg.image_size), "white")
    draw = ImageDraw.Draw(image)
    margin = 5
    for obj in objects:
        x0, y0 = obj.col * CELL_PX + margin, obj.row * CELL_PX + margin
        x1, y1 = x0 + CELL_PX - 2 * margin, y0 + CELL_PX - 2 * margin
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
        else:  # diamond
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    return image


def _draw_chart(bars: list[tuple[str, int]], cfg: WorldConfig) -> Image.Image:
    image = Image.new("RGB", (cfg.image_size, cfg.image_size), "white")
    draw = ImageDraw.Draw(image)
    bottom = cfg.image_size - 1
    for col, (colour, height) in enumerate(bars):
        x0 = col * CELL_PX + 6
        draw.rectangle((x0, bottom - height * CELL_PX + 2, x0 + CELL_PX - 12, bottom), fill=PALETTE[colour])
    draw.line((0, bottom, cfg.image_size, bottom), fill=(0, 0, 0), width=2)  # the axis
    return image


def _draw_figure(kind: str, top: int, left: int, width: int, height: int, cfg: WorldConfig) -> Image.Image:
    image = Image.new("RGB", (cfg.image_size, cfg.image_size), "white")
    draw = ImageDraw.Draw(image)
    for k in range(cfg.grid + 1):  # unit grid lines: what the figure is measured against
        p = min(k * CELL_PX, cfg.image_size - 1)
        draw.line((p, 0, p, cfg.image_size), fill=(170, 170, 170), width=1)
        draw.line((0, p, cfg.image_size, p), fill=(170, 170, 170), width=1)
    x0, y0 = left * CELL_PX, top * CELL_PX
    x1, y1 = x0 + width * CELL_PX, y0 + height * CELL_PX
    fill = (60, 60, 160)
    if kind == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # right triangle with the right angle at the bottom left
        draw.polygon([(x0, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


# --- families ----------------------------------------------------------------------------------


class Drawn(NamedTuple):
    """What a family draws: the image, its question and answer, and the teacher's caption bullets and steps.
    `objects` is the scene where it is a grid of objects (None for charts and figures)."""

    image: Image.Image
    question: str
    answer: str
    answer_type: str
    choices: dict[str, str] | None
    bullets: list[str]
    steps: list[str]
    objects: list[GridObject] | None = None


def _grid_bullets(objects: list[GridObject], grid: int) -> list[str]:
    return [_object_phrase(o, grid) for o in objects]


def _counting(rng, cfg):
    objects = _random_scene(rng, cfg)
    grid = cfg.grid
    if rng.random() < 0.5:
        colour = str(rng.choice(cfg.colours))
        matches = [o for o in objects if o.colour == colour]
        question = f"How many {colour} shapes are there?"
        steps = [f"{colour.capitalize()} shapes: {_list_objects(matches, grid, show_colour=False)}."]
    else:
        shape = str(rng.choice(cfg.shapes))
        matches = [o for o in objects if o.shape == shape]
        question = f"How many {_plural(shape)} are there?"
        steps = [f"{_plural(shape).capitalize()}: {_list_objects(matches, grid)}."]
    answer = str(len(matches))
    steps.append(f"Count: {answer}.")
    return Drawn(_draw_grid_scene(objects, cfg), question, answer, "integer", None, _grid_bullets(objects, grid), steps,
                 objects)


def _presence(rng, cfg, want_yes: bool):
    grid = cfg.grid
    # Redraw until the scene supports a trap: a colour and a shape both present, never together.
    for _ in range(100):
        objects = _random_scene(rng, cfg)
        present = {(o.colour, o.shape) for o in objects}
        traps = [
            (c, s)
            for c in cfg.colours
            for s in cfg.shapes
            if (c, s) not in present and any(o.colour == c for o in objects) and any(o.shape == s for o in objects)
        ]
        if traps:
            break
    else:  # a tiny world may have no trap: fall back to any absent combination
        traps = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in present] or sorted(present)
    colour, shape = (sorted(present) if want_yes else traps)[int(rng.integers(len(present) if want_yes else len(traps)))]
    matches = [o for o in objects if o.colour == colour]
    both = [o for o in matches if o.shape == shape]
    answer = "yes" if both else "no"
    question = f"Is there a {colour} {shape} in the image? Answer yes or no."
    found = _list_objects(both, grid, show_colour=False) if cfg.presence_steps == "matches" else str(len(both))
    steps = [
        f"{colour.capitalize()} shapes: {_list_objects(matches, grid, show_colour=False)}.",
        f"{colour.capitalize()} {_plural(shape)}: {found}.",
        f"So a {colour} {shape} is {'present' if both else 'absent'}.",
    ]
    return Drawn(_draw_grid_scene(objects, cfg), question, answer, "yes_no", None, _grid_bullets(objects, grid), steps,
                 objects)


def _chart(rng, cfg):
    grid = cfg.grid
    colours = [str(c) for c in rng.choice(cfg.colours, size=min(grid, len(cfg.colours)), replace=False)]
    bars = [(c, int(rng.integers(1, grid + 1))) for c in colours]
    bullets = [f"{c} bar of height {h}" for c, h in bars]
    kind = rng.choice(["sum", "difference", "max"])
    if kind == "sum":
        (c1, h1), (c2, h2) = [bars[i] for i in sorted(rng.choice(len(bars), size=2, replace=False))]
        question = f"What is the total height of the {c1} and {c2} bars?"
        steps = [f"The {c1} bar has height {h1}.", f"The {c2} bar has height {h2}.", f"{h1} + {h2} = {h1 + h2}."]
        answer = h1 + h2
    elif kind == "difference":
        (c1, h1), (c2, h2) = sorted([bars[i] for i in rng.choice(len(bars), size=2, replace=False)], key=lambda b: -b[1])
        question = f"How much taller is the {c1} bar than the {c2} bar?"
        steps = [f"The {c1} bar has height {h1}.", f"The {c2} bar has height {h2}.", f"{h1} - {h2} = {h1 - h2}."]
        answer = h1 - h2
    else:
        question = "What is the height of the tallest bar?"
        steps = [", ".join(f"{c} {h}" for c, h in bars) + ".", f"The largest is {max(h for _, h in bars)}."]
        answer = max(h for _, h in bars)
    return Drawn(_draw_chart(bars, cfg), question, str(answer), "integer", None, bullets, steps)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _geometry(rng, cfg):
    grid = cfg.grid
    kind = str(rng.choice(["rectangle", "triangle"]))
    width, height = int(rng.integers(1, grid + 1)), int(rng.integers(1, grid + 1))
    top, left = int(rng.integers(0, grid - height + 1)), int(rng.integers(0, grid - width + 1))
    bullets = ["a shaded right triangle" if kind == "triangle" else "a shaded rectangle",
               f"width {width} grid units", f"height {height} grid units"]
    # Three questions of rising length: perimeter, area, and the area left unshaded (grid minus figure).
    question_kind = str(rng.choice(["perimeter", "area", "unshaded"])) if kind == "rectangle" else str(rng.choice(["area", "unshaded"]))
    area = width * height if kind == "rectangle" else width * height / 2
    area_step = f"Area = {width} x {height} = {_number(area)}." if kind == "rectangle" else f"Area = {width} x {height} / 2 = {_number(area)}."
    name = "rectangle" if kind == "rectangle" else "right triangle"
    dims = f"Width {width}, height {height}." if kind == "rectangle" else f"Legs {width} and {height}."
    if question_kind == "perimeter":
        question = "What is the perimeter of the shaded rectangle in grid units?"
        answer = _number(2 * (width + height))
        steps = [dims, f"Perimeter = 2 x ({width} + {height}) = {answer}."]
    elif question_kind == "area":
        question = f"What is the area of the shaded {name} in grid squares?"
        answer = _number(area)
        steps = [dims, area_step]
    else:
        question = f"How many grid squares of area are not covered by the shaded {name}?"
        answer = _number(grid * grid - area)
        steps = [dims, area_step, f"The grid has {grid} x {grid} = {grid * grid}.", f"{grid * grid} - {_number(area)} = {answer}."]
    image = _draw_figure(kind, top, left, width, height, cfg)
    return Drawn(image, question, answer, ("integer" if answer.isdigit() else "number"), None, bullets, steps)


def _composite(rng, cfg):
    objects = _random_scene(rng, cfg)
    grid = cfg.grid
    c1, c2 = (str(c) for c in rng.choice(cfg.colours, size=2, replace=False))
    first = [o for o in objects if o.colour == c1]
    second = [o for o in objects if o.colour == c2]
    steps = [
        f"{c1.capitalize()} shapes: {_list_objects(first, grid, show_colour=False)}, so {len(first)}.",
        f"{c2.capitalize()} shapes: {_list_objects(second, grid, show_colour=False)}, so {len(second)}.",
    ]
    if rng.random() < 0.5:
        question = f"How many {c1} and {c2} shapes are there together?"
        answer = len(first) + len(second)
        steps.append(f"{len(first)} + {len(second)} = {answer}.")
    else:
        question = f"What is the difference between the number of {c1} shapes and {c2} shapes?"
        answer = abs(len(first) - len(second))
        big, small = max(len(first), len(second)), min(len(first), len(second))
        steps.append(f"{big} - {small} = {answer}.")
    return Drawn(_draw_grid_scene(objects, cfg), question, str(answer), "integer", None,
                 _grid_bullets(objects, grid), steps, objects)


def _multichoice(rng, cfg):
    grid = cfg.grid
    letters = "ABCD"
    if rng.random() < 0.5:
        objects = _random_scene(rng, cfg)
        target = objects[int(rng.integers(len(objects)))]
        where = _position_name(target.row, target.col, grid)
        options = (list(cfg.shapes) + ["no shape"])[:4]
        question_text = f"Which shape is at {where}?"
        right = target.shape
        steps = [f"At {where} there is a {target.colour} {target.shape}."]
    else:
        for _ in range(100):  # a unique most frequent colour keeps the question well posed
            objects = _random_scene(rng, cfg)
            counts = {c: sum(o.colour == c for o in objects) for c in cfg.colours}
            top = max(counts.values())
            if list(counts.values()).count(top) == 1:
                break
        right = max(counts, key=counts.get)
        others = [c for c in cfg.colours if c != right]
        options = [right] + [str(c) for c in rng.choice(others, size=min(3, len(others)), replace=False)]
        question_text = "Which colour appears most often?"
        steps = [", ".join(f"{c} {counts[c]}" for c in cfg.colours if counts[c]) + ".", f"Most often: {right}."]
    if cfg.shuffle_options:
        options = [options[i] for i in rng.permutation(len(options))]
    else:  # the list's own order: circle, square, triangle, no shape; or the palette's
        options = [o for o in (*cfg.shapes, "no shape", *cfg.colours) if o in options]
    choices = dict(zip(letters, options))
    answer = next(k for k, v in choices.items() if v == right)
    steps.append(f"{right.capitalize()} is option {answer}.")
    question = question_text + " Options: " + " ".join(f"({k}) {v}" for k, v in choices.items()) + ". Answer with the letter."
    return Drawn(_draw_grid_scene(objects, cfg), question, answer, "letter", choices, _grid_bullets(objects, grid),
                 steps, objects)


_FAMILY_FUNCTIONS: dict[str, Callable] = {
    "counting": _counting,
    "chart": _chart,
    "geometry": _geometry,
    "composite": _composite,
    "multichoice": _multichoice,
}


# --- demonstrations and the base corpus ----------------------------------------------------------


def _wrong_answer(rng: np.random.Generator, answer: str, answer_type: str, choices: dict | None) -> str:
    if answer_type == "yes_no":
        return "no" if answer == "yes" else "yes"
    if answer_type == "letter":
        return str(rng.choice([k for k in choices if k != answer]))
    value = float(answer)
    delta = int(rng.choice([-2, -1, 1, 2]))
    wrong = value + delta if value + delta >= 0 else value + abs(delta)
    return str(int(wrong)) if float(wrong).is_integer() else str(wrong)


def _public_demo(rng, cfg: WorldConfig, family: str, drawn: Drawn) -> Demonstration:
    """A lower-fidelity demonstrator: drops and shortens bullets, skips steps, is sometimes wrong."""
    bullets, steps, answer = drawn.bullets, drawn.steps, drawn.answer
    terse = rng.random() < cfg.terse_caption_rate
    kept = [b.split(" at ")[0] if terse else b for b in bullets if rng.random() >= cfg.caption_drop_rate]
    if not kept:
        kept = [bullets[0].split(" at ")[0] if terse else bullets[0]]
    wrong = rng.random() < cfg.wrong_answer_rate
    final = _wrong_answer(rng, answer, drawn.answer_type, drawn.choices) if wrong else answer
    # the draw is taken whatever the rate, so a family's rate changes no other draw of the sample
    if rng.random() < cfg.skip_steps_by_family.get(family, cfg.skip_steps_rate) or wrong:
        public_steps = [f"The answer is {final}."]
    else:
        public_steps = list(steps)
    return Demonstration(tuple(kept), tuple(public_steps), final)


def _lookup_pair(rng, objects: list[GridObject], grid: int) -> tuple[str, str]:
    """List the objects of one colour (or one shape), then those of that colour and one shape, copied from the list.
    Colour and shape are each drawn from the scene's objects, so the pair is sometimes absent ("none")."""
    colour = objects[int(rng.integers(len(objects)))].colour
    shape = objects[int(rng.integers(len(objects)))].shape
    both = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
    lookup = f"{colour.capitalize()} {_plural(shape)}: {_list_objects(both, grid, show_colour=False)}."
    if rng.random() < 0.5:
        listed = _list_objects([o for o in objects if o.colour == colour], grid, show_colour=False)
        return (f"List the {colour} shapes, then the {colour} {_plural(shape)}.",
                f"{colour.capitalize()} shapes: {listed}. {lookup}")
    listed = _list_objects([o for o in objects if o.shape == shape], grid)
    return (f"List the {_plural(shape)}, then the {colour} {_plural(shape)}.",
            f"{_plural(shape).capitalize()}: {listed}. {lookup}")


def _base_pair(rng, cfg: WorldConfig, drawn: Drawn) -> tuple[str, str]:
    """Generic untagged instruction data on the same scene: what a base 'instruct' model knows. A direct answer
    names no steps and no tags (the format and the reasoning are what SFT teaches)."""
    bullets, question, answer = drawn.bullets, drawn.question, drawn.answer
    # drawn only where the rate is set, so the default world's base split keeps its draws
    if cfg.base_lookup_rate and drawn.objects is not None and rng.random() < cfg.base_lookup_rate:
        return _lookup_pair(rng, drawn.objects, cfg.grid)
    if rng.random() < cfg.base_answer_rate:
        short = answer.capitalize() if answer in ("yes", "no") else answer
        return question, f"{short}."
    if rng.random() < 0.8:  # mostly full descriptions: perception is what a base model brings
        text = "; ".join(bullets)
        return "Describe the image.", text[0].upper() + text[1:] + "."
    index = int(rng.integers(len(bullets)))
    if drawn.objects is not None:  # a grid scene: one bullet per object, in order
        obj = drawn.objects[index]
        where = _position_name(obj.row, obj.col, cfg.grid)
        return f"What is at {where}?", f"A {_object_phrase(obj, cfg.grid, with_position=False)}."
    bullet = bullets[index]
    return "What does the image show?", bullet[0].upper() + bullet[1:] + "."


# ---------------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------------


def _rng(cfg: WorldConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, _SPLIT_CODE[split], index]))


def family_of(cfg: WorldConfig, split: str, index: int) -> str:
    """Training splits cycle through the families (`WorldConfig.family_cycle`); the benchmark holds `bench_size` per
    family."""
    if split == "bench":
        return cfg.families[index // cfg.bench_size]
    # Pairs of consecutive indices share a family so presence questions come in yes/no pairs.
    cycle = cfg.family_cycle(split)
    return cycle[(index // 2) % len(cycle)]


def make_sample(cfg: WorldConfig, split: str, index: int) -> Sample:
    """The sample at `index` of `split`: deterministic in (cfg, split, index)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    family = family_of(cfg, split, index)
    pair_id = None
    if family == "presence":
        # Both questions of a pair draw the same scene from the pair's own stream.
        pair = index // 2
        rng = _rng(cfg, split, 2 * pair)
        drawn = _presence(rng, cfg, want_yes=index % 2 == 0)
        pair_id = f"{split}-{pair:06d}"
        rng = _rng(cfg, split, index)  # the demonstrations differ per question
    else:
        rng = _rng(cfg, split, index)
        drawn = _FAMILY_FUNCTIONS[family](rng, cfg)
    teacher = Demonstration(tuple(drawn.bullets), tuple(drawn.steps), drawn.answer)
    public = _public_demo(rng, cfg, family, drawn)
    base_prompt, base_response = _base_pair(rng, cfg, drawn)
    base_system_prompt = bool(rng.random() < cfg.base_system_prompt_rate)
    return Sample(
        id=f"{split}-{index:06d}",
        split=split,
        family=family,
        image=drawn.image,
        question=drawn.question,
        answer=drawn.answer,
        answer_type=drawn.answer_type,
        choices=drawn.choices,
        teacher=teacher,
        public=public,
        base_prompt=base_prompt,
        base_response=base_response,
        base_system_prompt=base_system_prompt,
        pair_id=pair_id,
    )


def iter_split(cfg: WorldConfig, split: str, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
    stop = cfg.split_size(split) if stop is None else min(stop, cfg.split_size(split))
    for index in range(start, stop):
        yield make_sample(cfg, split, index)
