"""Files and folders are written whole or not at all (models, adapters, exports)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from prefloop.atomic import atomic_path, temporary_prefix


def test_a_folder_appears_complete_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "v0001"
    with atomic_path(target, folder=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(temporary_prefix(target))
        (tmp / "a.txt").write_text("a")
        assert not target.exists()  # nothing to see while it is written
    assert (target / "a.txt").read_text() == "a"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0001"]


def test_a_failure_leaves_nothing(tmp_path: Path) -> None:
    for folder in (True, False):
        target = tmp_path / ("dir" if folder else "file.jsonl")
        with pytest.raises(RuntimeError), atomic_path(target, folder=folder) as tmp:
            if folder:
                (tmp / "half").write_text("x")
            else:
                tmp.write_text("half")
            raise RuntimeError("died while writing")
        assert list(tmp_path.iterdir()) == []


def test_replace_or_refuse_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_path(target, folder=True, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    with pytest.raises(FileExistsError), atomic_path(target, folder=True, replace=False) as tmp:
        (tmp / "newer").write_text("newer")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_file_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "export.jsonl"
    target.write_text("old\n")
    with atomic_path(target) as tmp:
        tmp.write_text("new\n")
        assert target.read_text() == "old\n"
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["export.jsonl"]
