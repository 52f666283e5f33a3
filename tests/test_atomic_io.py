import os
import stat

import pytest

from prism.atomic_io import atomic_directory, atomic_path, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_get_the_mode_an_ordinary_write_gives(tmp_path, umask_022):
    atomic_write_text(tmp_path / "result.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    mode = stat.S_IMODE((tmp_path / "result.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o644
    with atomic_directory(tmp_path / "folder") as folder:
        (folder / "a.txt").write_text("a")
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise OSError(28, "disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_library_write_error_on_a_full_disk_names_the_target(tmp_path, monkeypatch):
    import collections
    import errno
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 100, 0))
    final = tmp_path / "model"
    with pytest.raises(OSError) as caught, atomic_directory(final):
        raise RuntimeError("file write failed")  # what torch.save says on a full disk
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(final)
    assert list(tmp_path.iterdir()) == []  # the temporary folder went with it
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 40))
    with pytest.raises(RuntimeError, match="file write failed"), atomic_directory(final):  # space left: not a full disk
        raise RuntimeError("file write failed")
