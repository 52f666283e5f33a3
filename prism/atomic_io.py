"""Atomic writes: a reader sees the old file (or folder) or the new one whole, never half of one.

Everything is written to a temporary name beside its target and renamed into place with `os.replace`
(atomic on one file system); on error the temporary is removed and the target is left as it was. Files get the
mode an ordinary write gives (0666 less the umask), so results stay readable to a group on a shared cluster.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside `path` (same suffix, so writers that look at it still work); when
    the block ends without error it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    # Not mkstemp: its 0600 would survive the rename. os.open applies the umask to 0666, as open() does.
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        # Name the file the caller asked for: a failed write() (ENOSPC) names none, the others the temporary.
        if error.errno is not None and error.filename in (None, str(tmp)):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_output_folder(folder: str | os.PathLike, setting: str) -> None:
    """Refuse, before anything is computed or written, an output folder that a file stands in the way of (`folder`
    itself, or one of its parents, is a file): FileExistsError naming the setting and the file."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == folder else f"is under {blocker}, a file"
        raise FileExistsError(f"{setting} {folder} {where}, not a folder: choose another path or move the file")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


NEARLY_FULL = 64 << 20  # bytes free below which a library's failed write is taken for a full disk


@contextmanager
def full_disk_named(target: str | os.PathLike) -> Iterator[None]:
    """Libraries that write files themselves (safetensors, torch.save) report a full disk in their own error
    types, naming no file: re-raise such an error as OSError(ENOSPC) naming `target` when its file system has
    (almost) no space left; any other error passes through unchanged."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:
        try:
            full = shutil.disk_usage(Path(target).parent).free < NEARLY_FULL
        except OSError:
            full = False
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from error
        raise


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; when the block ends without error it replaces `final` whole
    (an existing folder is moved aside, then deleted), so a reader never sees half of one. On error the temp
    folder is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        with full_disk_named(final):
            yield tmp
        old = None
        if final.exists():
            old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
