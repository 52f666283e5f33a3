"""`EvalConfig`: decoding and suite settings of `prism eval`, loaded like every stage config.

    prism eval --checkpoint DIR --suite embedded [--config eval.yaml] [key=value ...]

Defaults follow docs/METHOD.md, "Evaluation (published)": sampling at temperature 1.0 and top_p 0.7 for
both suites. The per-task token budgets of the published suite are not given in the paper; the defaults
are the RLVR stage's published maximum response length (8192) and can be changed per task
(`paper.max_new_tokens.mmmu_val=2048`).

Secrets never live in a config: the judge's API key is read from the environment variable *named* by
`judge.api_key_env` at call time, so it never reaches a resolved config, a manifest or a log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from prism.config import check, check_choice, check_nonempty, check_range, check_types
from prism.data.families import FAMILIES  # one task per family of the world

# The seven published benchmarks (lmms-eval's names) and the task of evaluation/tasks/published that
# stands in for each: our overrides read the answer from <answer> and score with prism.rewards.
PUBLISHED_TASKS: dict[str, str] = {
    "mathvista_testmini": "prism_mathvista_testmini",
    "mathverse_testmini": "prism_mathverse_testmini",
    "mathvision_testmini": "prism_mathvision_testmini",
    "wemath_testmini_reasoning": "prism_wemath_testmini_reasoning",
    "mmmu_val": "prism_mmmu_val",
    "mmmu_pro": "prism_mmmu_pro",  # a group: standard (10 options) + vision
    "hallusion_bench_image": "prism_hallusion_bench_image",
}
# Benchmarks whose official protocol needs a model judge; ours report the judge's verdict as
# `judge_accuracy` beside the rule-based `accuracy` (paper.judge_metrics=false drops it).
JUDGE_METRICS: dict[str, tuple[str, ...]] = {
    "mathvista_testmini": ("judge_accuracy",),
    "mathverse_testmini": ("judge_accuracy",),
    "hallusion_bench_image": ("judge_accuracy",),
}
EMBEDDED_GROUP = "prism_embedded"
EMBEDDED_TASKS = {family: f"prism_embedded_{family}" for family in FAMILIES}

JUDGE_BASE_URL_ENV = "PRISM_JUDGE_BASE_URL"
JUDGE_MODEL_ENV = "PRISM_JUDGE_MODEL"


class EvalError(ValueError):
    """A user mistake in an evaluation request (missing checkpoint or world, no judge, no vLLM): one line."""


@dataclass
class DecodingConfig:
    """Sampling settings of one suite."""

    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 = greedy (published 1.0)."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling mass in (0, 1] (published 0.7)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Most response tokens per sample (count)."})

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self, "temperature", low=0)
        check_range(self, "top_p", low=0, high=1, low_inclusive=False)
        check_range(self, "max_new_tokens", low=1)


def _default_paper_tokens() -> dict[str, int]:
    return {name: 8192 for name in PUBLISHED_TASKS}


@dataclass
class PaperConfig:
    """The seven published benchmarks (docs/METHOD.md, "Evaluation (published)")."""

    tasks: list[str] = field(
        default_factory=lambda: list(PUBLISHED_TASKS),
        metadata={"help": f"Benchmarks to run, lmms-eval names: {', '.join(PUBLISHED_TASKS)}."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (published 1.0)."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling mass (published 0.7)."})
    max_new_tokens: dict[str, int] = field(
        default_factory=_default_paper_tokens,
        metadata={"help": "Most response tokens per benchmark (count); unpublished, default 8192 = RLVR max response."},
    )
    judge_metrics: bool = field(
        default=True,
        metadata={"help": "Report the judge-dependent metrics (need an OpenAI-compatible judge); false = rule-based only."},
    )
    dataset_paths: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Benchmark -> local dataset path (a datasets folder or hub mirror) instead of the hub name."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_choice(self, "tasks", list(PUBLISHED_TASKS))
        check_nonempty(self, "tasks")
        check_range(self, "temperature", low=0)
        check_range(self, "top_p", low=0, high=1, low_inclusive=False)
        for name, tokens in self.max_new_tokens.items():
            check(name in PUBLISHED_TASKS, f"max_new_tokens.{name}", f"a benchmark name ({', '.join(PUBLISHED_TASKS)})", name)
            check(tokens >= 1, f"max_new_tokens.{name}", "an int >= 1", tokens)
        for name in PUBLISHED_TASKS:  # a partial mapping keeps the defaults of the others
            self.max_new_tokens.setdefault(name, 8192)
        for name, path in self.dataset_paths.items():
            check(name in PUBLISHED_TASKS, f"dataset_paths.{name}", f"a benchmark name ({', '.join(PUBLISHED_TASKS)})", name)
            check(bool(path), f"dataset_paths.{name}", "a non-empty path", path)


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat-completions endpoint for judge-dependent metrics (never its key)."""

    base_url: str | None = field(
        default=None,
        metadata={"hash": False, "help": f"Endpoint base URL, e.g. http://host:8000/v1; null = ${JUDGE_BASE_URL_ENV}."},
    )
    model: str | None = field(
        default=None, metadata={"help": f"Judge model name; null = ${JUDGE_MODEL_ENV}, else gpt-4o-mini."},
    )
    api_key_env: str = field(
        default="PRISM_JUDGE_API_KEY",
        metadata={"hash": False, "help": "NAME of the environment variable holding the API key (the key itself never goes in a config)."},
    )
    timeout_s: float = field(default=60.0, metadata={"hash": False, "help": "Per-request timeout (seconds)."})

    def __post_init__(self) -> None:
        check_types(self)
        check_nonempty(self, "base_url")
        check_nonempty(self, "model")
        check_nonempty(self, "api_key_env")
        check_range(self, "timeout_s", low=0, low_inclusive=False)
        if self.base_url is not None:
            parts = urlsplit(self.base_url)
            check(parts.scheme in ("http", "https") and bool(parts.netloc), "base_url", "an http(s) URL", redact_url(self.base_url))
            check(parts.username is None and parts.password is None, "base_url",
                  f"a URL without credentials (put the key in ${self.api_key_env})", redact_url(self.base_url))


@dataclass
class VLLMConfig:
    """vLLM settings for the full world (backend: vllm)."""

    tensor_parallel_size: int = field(default=1, metadata={"hash": False, "help": "GPUs per model replica (count)."})
    gpu_memory_utilization: float = field(default=0.85, metadata={"hash": False, "help": "Fraction of GPU memory vLLM may use."})
    max_model_len: int | None = field(default=None, metadata={"hash": False, "help": "Context length (tokens); null = the checkpoint's."})
    max_images_per_prompt: int = field(default=8, metadata={"hash": False, "help": "Images one prompt may carry (MMMU has up to 7)."})
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template file; null = the checkpoint's own (PRISM checkpoints ship theirs)."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self, "tensor_parallel_size", low=1)
        check_range(self, "gpu_memory_utilization", low=0, high=1, low_inclusive=False)
        check_range(self, "max_model_len", low=1)
        check_range(self, "max_images_per_prompt", low=1)
        check_nonempty(self, "chat_template")


@dataclass
class EvalConfig:
    """How `prism eval` generates and scores. Bookkeeping fields are left out of the evaluation key."""

    seed: int = field(default=0, metadata={"help": "Sampling seed; the same seed gives the same samples on CPU, in [0, 2**32)."})
    backend: Literal["hf", "vllm"] = field(
        default="hf", metadata={"help": "hf: in-process transformers generation (CPU, tests); vllm: the full world."},
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "Model dtype."})
    device: str = field(default="cpu", metadata={"hash": False, "help": "torch device of the hf backend."})
    batch_size: int = field(default=64, metadata={"hash": False, "help": "Prompts per generate call (hf) or per vLLM chat call."})
    embedded: DecodingConfig = field(
        default_factory=DecodingConfig, metadata={"help": "Decoding of the embedded suite (same sampling as the paper)."},
    )
    paper: PaperConfig = field(default_factory=PaperConfig, metadata={"help": "The published suite."})
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "Judge endpoint for judge-dependent metrics."})
    vllm: VLLMConfig = field(default_factory=VLLMConfig, metadata={"help": "vLLM engine settings."})
    bootstrap_iters: int = field(
        default=1000, metadata={"help": "lmms-eval bootstrap iterations for stderrs of non-mean metrics (0 = none)."},
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self, "seed", low=0, high=2**32, high_inclusive=False)
        check_nonempty(self, "device")
        check_range(self, "batch_size", low=1)
        check_range(self, "bootstrap_iters", low=0)


def redact_url(url: str | None) -> str | None:
    """`url` without user:password@ and without its query string (which may carry a key)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
