"""Hugging Face Hub ids wherever a config names a model folder or data files, resolved to local paths.

A setting that names a checkpoint (`model.path`, `policy.path`, `discriminator.path`, `model.processor_path`,
`prism eval --checkpoint`) or data (`data_files`, `teacher_files`) takes either a local path or a Hub id:

    org/name                      the whole repository (a model folder; for data, its files of the stage's format)
    org/name:path/in/repo         one file inside the repository, or a folder inside it
    org/name:data/*.json          every file matching a glob (fnmatch, `*` crosses `/`, as huggingface_hub's
                                  allow_patterns); `org/name:folder/` is that folder
    org/name@revision[:path]      at a branch, tag or commit (pin a commit to make a stage reproducible)

Model settings look the id up among model repositories, data settings among dataset repositories.
Resolution, in order: an existing local path is used as it is (write `./org/name` to force a local path);
otherwise the id is looked up in the Hugging Face cache without the network (`snapshot_download(...,
local_files_only=True)`: `HF_HUB_CACHE`, else `$HF_HOME/hub`, read when the call is made); otherwise, when the
Hub may be used, it is downloaded into that cache (only the files asked for). Offline (`HF_HUB_OFFLINE=1`) or
unreachable with no complete cached copy is a `HubError`: one line naming the id, the `hf download` command
that fetches it, and the setting to point at a local copy instead. Nothing here runs code from a repository:
files are downloaded, and loading stays with the callers (safetensors only, `trust_remote_code` as configured).

Stages resolve their sources when they start, before anything is written to the stage directory
(prism.stages.common.start_stage); the stage's config and its hash keep the ids, so a stage directory is
the same on every machine. `prism matrix plan` only reports whether each id is cached (`cache_status`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prism.config import ConfigError
from prism.data.formats import DataError

RepoType = Literal["model", "dataset"]
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as true
_SPEC = re.compile(r"^(?P<repo>[^/@:\s]+/[^/@:\s]+)(?:@(?P<revision>[^:\s]+))?(?::(?P<path>\S.*))?$")
_GLOB = re.compile(r"[*?\[]")
# LLaMA-Factory's registry of a dataset folder's files: metadata, not demonstrations.
NOT_DATA = {"dataset_info.json"}


class HubError(ConfigError):
    """A Hub id that cannot be had (offline and not cached, unreachable, no such repository or file): one line
    naming the id, how to fetch it and which setting to point at a local copy."""


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub id: `repo_id[@revision][:path]`."""

    repo_id: str
    revision: str | None = None
    path: str | None = None  # a file, folder or glob inside the repository

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.path}" if self.path else "")

    @property
    def is_glob(self) -> bool:
        return self.path is not None and bool(_GLOB.search(self.path))

    @property
    def inner(self) -> str | None:
        """The path inside the repository without a trailing slash (a folder written `folder/`)."""
        return self.path.rstrip("/") if self.path else None

    def allow_patterns(self) -> list[str] | None:
        """What to fetch: everything, the glob, or the file and (if it is a folder) what lies under it."""
        if self.path is None:
            return None
        if self.is_glob:
            return [self.path]
        return [self.inner, f"{self.inner}/*"]


def parse_hub_ref(spec: object) -> HubRef | None:
    """The Hub id `spec` names, or None: not a string of the form org/name[@revision][:path], or an existing local
    path (which always wins), or a relative path written `./...`, `../...` or `~/...`."""
    if not isinstance(spec, str) or spec.startswith(("/", ".", "~")) or "\\" in spec:
        return None
    match = _SPEC.match(spec)
    if match is None or Path(spec).exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    path = match["path"]
    if path is not None and (path.startswith("/") or ".." in Path(path).parts):
        return None
    return HubRef(match["repo"], match["revision"], path)


# ----------------------------------------------------------------------------------------------------
# The cache and the network, as huggingface_hub reads them, but at call time (its constants are read at import)
# ----------------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub (default
    ~/.cache/huggingface/hub), as huggingface_hub.constants computes it."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def offline_setting() -> str | None:
    """`NAME=value` of the variable that keeps huggingface_hub off the network, or None when it may be used."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if (value := os.environ.get(name, "")).upper() in _TRUE:
            return f"{name}={value}"
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE=1 (when huggingface_hub was imported)" if constants.HF_HUB_OFFLINE else None


# ----------------------------------------------------------------------------------------------------
# What a resolved id must hold
# ----------------------------------------------------------------------------------------------------


def _files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of the files under `folder`, hidden parts (.cache, .gitattributes) left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _is_checkpoint(folder: Path) -> bool:
    """config.json and safetensors weights, every shard its index names."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return False
        return all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors"))


def _targets(snapshot: Path, ref: HubRef) -> list[Path]:
    """The paths `ref` names inside a snapshot folder (empty: not there)."""
    if ref.path is None:
        return [snapshot] if _files_under(snapshot) else []
    if ref.is_glob:
        from huggingface_hub.utils import filter_repo_objects

        return [snapshot / name for name in filter_repo_objects(_files_under(snapshot), allow_patterns=[ref.path])]
    target = snapshot / ref.inner
    return [target] if target.is_file() or (target.is_dir() and _files_under(target)) else []


def _complete(snapshot: Path, ref: HubRef, repo_type: RepoType) -> list[Path]:
    targets = _targets(snapshot, ref)
    if repo_type == "model" and not all(t.is_dir() and _is_checkpoint(t) for t in targets):
        return []
    return targets


# ----------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------


def fetch_command(ref: HubRef, repo_type: RepoType, local_dir: bool = False) -> str:
    """The `hf download` command that puts `ref` into the cache (or, with local_dir, into a folder DIR)."""
    words = ["hf", "download", ref.repo_id]
    if ref.path is not None and not ref.is_glob and not ref.path.endswith("/"):
        words.append(ref.path)
    elif ref.path is not None:
        words += ["--include", ref.allow_patterns()[0] if ref.is_glob else f"{ref.inner}/*"]
    if repo_type != "model":
        words += ["--repo-type", repo_type]
    if ref.revision:
        words += ["--revision", ref.revision]
    command = shlex.join(words)
    return f"{command} --local-dir DIR" if local_dir else command


def _cached(ref: HubRef, repo_type: RepoType, cache: Path) -> list[Path]:
    """The targets of `ref` in the cache, without the network ([] when not there or incomplete)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(ref.repo_id, repo_type=repo_type, revision=ref.revision, cache_dir=cache,
                                   allow_patterns=ref.allow_patterns(), local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached, incomplete (IncompleteSnapshotError)
        return []
    return _complete(Path(folder), ref, repo_type)


def _unavailable(setting: str, ref: HubRef, repo_type: RepoType, cache: Path, reason: str) -> HubError:
    target = "DIR" if ref.path is None or ref.is_glob else f"DIR/{ref.inner}"
    return HubError(
        f"{setting}={ref}: no such local path, and the Hugging Face Hub is {reason} with no complete copy of "
        f"{repo_type} {ref.repo_id} in the cache {cache}. Fetch it into that cache with `{fetch_command(ref, repo_type)}`, "
        f"or download a local copy with `{fetch_command(ref, repo_type, local_dir=True)}` and set {setting}={target}"
    )


def resolve_ref(ref: HubRef, repo_type: RepoType, setting: str) -> list[Path]:
    """The local paths `ref` names: from the cache, else downloaded into it when the Hub may be used. HubError
    (one line) when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cache = hub_cache_dir()
    found = _cached(ref, repo_type, cache)
    if found:
        return found
    offline = offline_setting()
    if offline:
        raise _unavailable(setting, ref, repo_type, cache, f"offline ({offline})")
    try:
        folder = snapshot_download(ref.repo_id, repo_type=repo_type, revision=ref.revision, cache_dir=cache,
                                   allow_patterns=ref.allow_patterns())
    except RevisionNotFoundError:
        raise HubError(f"{setting}={ref}: {repo_type} {ref.repo_id} has no revision {ref.revision!r}") from None
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise HubError(
            f"{setting}={ref}: the Hub has no {repo_type} repository {ref.repo_id} that this account may read "
            f"({type(error).__name__}): check the id (and that it is a {repo_type}), or log in with `hf auth login` "
            "for a gated one") from None
    except Exception as error:  # no network, DNS, timeout, Hub down: LocalEntryNotFoundError, HfHubHTTPError,
        # OSError or the transport's own exception types
        raise _unavailable(setting, ref, repo_type, cache, f"unreachable ({type(error).__name__})") from None
    found = _complete(Path(folder), ref, repo_type)
    if not found:
        what = "a checkpoint folder (config.json and *.safetensors)" if repo_type == "model" else "a file"
        raise HubError(f"{setting}={ref}: downloaded {repo_type} {ref.repo_id}, but {ref.path or '(the repository)'} "
                       f"is not {what} there")
    return found


def resolve_model_path(spec: str | None, setting: str) -> str | None:
    """A checkpoint folder setting made local: None and local paths as they are, a Hub id to its snapshot folder
    (`org/name:sub/folder` to that folder inside it)."""
    ref = parse_hub_ref(spec)
    if ref is None:
        return spec
    if ref.is_glob:
        raise HubError(f"{setting}={spec}: a checkpoint is one folder, not a glob")
    return str(resolve_ref(ref, "model", setting)[0])


def _expand_folder(folder: Path, suffix: str, setting: str, shown: str) -> list[str]:
    files = [str(folder / name) for name in _files_under(folder)
             if name.endswith(suffix) and Path(name).name not in NOT_DATA]
    if not files:
        raise DataError(f"{setting}={shown}: the folder {folder} holds no {suffix} file")
    return files


def resolve_data_files(specs: list[str], setting: str, suffix: str) -> list[str]:
    """Data file settings made local, in order: a local file as it is; a local folder, or a Hub id naming a
    repository or a folder in one, expands to its `suffix` files (sorted, recursive); a Hub glob to the files it
    matches; a Hub file to its cached path. Missing local files are left for the reader to report."""
    out: list[str] = []
    for index, spec in enumerate(specs):
        where = f"{setting}[{index}]"
        ref = parse_hub_ref(spec)
        if ref is None:
            out.extend(_expand_folder(Path(spec), suffix, where, spec) if Path(spec).is_dir() else [spec])
            continue
        for target in resolve_ref(ref, "dataset", where):
            out.extend(_expand_folder(target, suffix, where, spec) if target.is_dir() else [str(target)])
    return out


def cache_status(spec: object, repo_type: RepoType) -> str | None:
    """For plans, without the network: None when `spec` is not a Hub id, else `cached` or `not cached`."""
    ref = parse_hub_ref(spec)
    if ref is None:
        return None
    return "cached" if _cached(ref, repo_type, hub_cache_dir()) else "not cached"
