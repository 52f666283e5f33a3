"""Which datasets the published tasks read, and whether they can be read when the Hub cannot be used.

lmms-eval loads a task's `dataset_path` with `datasets.load_dataset` and retries a failed load (tenacity) for
up to a minute before it ends in a `tenacity.RetryError`. Without the Hub (HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE set, or no network), `load_dataset("<org>/<name>")` can only reuse the datasets cache: the
Arrow files an earlier `load_dataset` wrote under the cache folder (datasets' `CachedDatasetModuleFactory`
and `Cache` builder). A downloaded Hub snapshot is not read that way, but its folder works as a local copy
(`paper.dataset_paths.<benchmark>=DIR`). `require_published_datasets` checks this before lmms-eval runs, so
a dataset that cannot be had stops the run with one line naming it and that setting.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import yaml

from evaluation.config import EvalError

_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub and datasets read as true
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TaskDataset:
    """The dataset one lmms-eval task loads: `load_dataset(path, name)[split]`."""

    task: str
    path: str
    name: str | None
    split: str

    def describe(self, path: str | None = None) -> str:
        config = f"config {self.name!r}, " if self.name else ""
        return f"{path or self.path} ({config}split {self.split})"


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lmms-eval task YAMLs without importing their `!function` hooks."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read_task_yaml(path: Path) -> dict:
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader) or {}
    includes = doc.get("include") or []
    merged: dict = {}
    for name in reversed([includes] if isinstance(includes, str) else includes):  # earlier includes win (lmms-eval)
        merged.update(_read_task_yaml(path.parent / name))
    merged.update(doc)
    return merged


@lru_cache(maxsize=None)
def _task_index(tasks_dir: str) -> dict[str, dict]:
    index = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        doc = _read_task_yaml(path)
        index[doc["group"] if "group" in doc else doc["task"]] = doc
    return index


def task_datasets(task: str, tasks_dir: Path) -> list[TaskDataset]:
    """The datasets of a task or group of `tasks_dir`, as its YAMLs name them (a group: each member's)."""
    doc = _task_index(str(tasks_dir))[task]
    if "group" in doc:
        return [d for member in doc["task"] for d in task_datasets(member, tasks_dir)]
    return [TaskDataset(task, doc["dataset_path"], doc.get("dataset_name"), doc["test_split"])]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a warning for every cache hit; the check should print nothing."""
    from datasets.utils import logging as datasets_logging

    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(level)


def in_datasets_cache(repo_id: str, name: str | None, split: str, cache_dir: Path) -> bool:
    """Whether `load_dataset(repo_id, name)` without the Hub finds `split` in `cache_dir`.

    Asks datasets' own `Cache` builder (version and hash "auto"), which is what `load_dataset` falls back
    to when the Hub cannot be reached, so "cached" here means what it means there.
    """
    try:
        from datasets.packaged_modules.cache.cache import Cache
    except ImportError:  # another datasets layout: leave the decision to lmms-eval
        return True
    try:
        with _quiet_datasets():
            builder = Cache(cache_dir=str(cache_dir), repo_id=repo_id, dataset_name=repo_id.split("/")[-1],
                            config_name=name, version="auto", hash="auto")
    except Exception:  # not cached (ValueError), or a cached copy datasets cannot open either
        return False
    return builder.info.splits is not None and split in builder.info.splits


def hub_offline_setting() -> str | None:
    """The variable that puts datasets offline (`NAME=value`), read as datasets reads it; None when online."""
    if (value := os.environ.get("HF_DATASETS_OFFLINE")) is not None:  # set, it decides (datasets.config)
        return f"HF_DATASETS_OFFLINE={value}" if value.upper() in _TRUE else None
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if (value := os.environ.get(name, "")).upper() in _TRUE:
            return f"{name}={value}"
    return None


def hub_unreachable(repo_id: str) -> str | None:
    """Why the Hub cannot serve `repo_id` right now (one quick request), or None when it answers."""
    from datasets import config as datasets_config
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi(endpoint=datasets_config.HF_ENDPOINT).dataset_info(repo_id, timeout=PROBE_TIMEOUT_S)
    except HfHubHTTPError:  # the Hub answered (a missing or gated dataset is lmms-eval's error to report)
        return None
    except Exception as error:  # no network, DNS, refused, timeout: the transport's own exception types
        return f"unreachable at {datasets_config.HF_ENDPOINT} ({type(error).__name__})"
    return None


def _is_hub_id(path: str) -> bool:
    """A missing path `load_dataset` would take for a Hub id (`org/name`), not a mistyped local path."""
    return not os.path.isabs(path) and not path.startswith((".", "~")) and path.count("/") <= 1


def require_published_datasets(
    needs: list[tuple[str, str]], dataset_paths: dict[str, str], cache_dir: Path, tasks_dir: Path
) -> None:
    """Stop with one line unless every dataset of `needs` ((benchmark, task) pairs) can be loaded.

    A benchmark in `dataset_paths` reads that path: an existing file or folder is a local copy; anything else
    must look like a Hub id (a mirror), which then has to be cached like the default ones. Datasets missing
    from `cache_dir` are fine while the Hub can be used (lmms-eval downloads them); without it they are an
    EvalError naming each dataset and `paper.dataset_paths.<benchmark>`.
    """
    missing: list[tuple[str, TaskDataset, str]] = []
    for benchmark, task in needs:
        local = dataset_paths.get(benchmark)
        if local is not None and Path(local).exists():
            continue
        if local is not None and not _is_hub_id(local):
            raise EvalError(
                f"paper.dataset_paths.{benchmark}={local}: no such file or folder "
                "(expected a local copy of the dataset, or a Hub id)"
            )
        for dataset in task_datasets(task, tasks_dir):
            repo_id = local or dataset.path
            if not in_datasets_cache(repo_id, dataset.name, dataset.split, cache_dir):
                missing.append((benchmark, dataset, repo_id))
    if not missing:
        return
    offline = hub_offline_setting()
    reason = f"offline ({offline})" if offline else hub_unreachable(missing[0][2])
    if reason is None:
        return  # the Hub answers: lmms-eval downloads them into the cache
    by_benchmark: dict[str, list[str]] = {}
    for benchmark, dataset, repo_id in missing:
        by_benchmark.setdefault(benchmark, []).append(dataset.describe(repo_id))
    items = "; ".join(f"{benchmark} needs {' and '.join(found)}" for benchmark, found in by_benchmark.items())
    raise EvalError(
        f"the Hugging Face Hub is {reason} and these published datasets are neither in the datasets cache "
        f"{cache_dir} nor given as a local copy: {items}. Point a benchmark at a local copy with "
        f"paper.dataset_paths.<benchmark>=DIR (e.g. paper.dataset_paths.{missing[0][0]}=DIR), or run once "
        "with Hub access to fill the cache"
    )
