"""iapt.io: writes are atomic (old or new, whole), leave no temporaries, and publish readable modes."""

from __future__ import annotations

import os
import stat

import pytest

from iapt.io import atomic_write, atomic_write_text, replace_dir


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "cfg.json"
    atomic_write_text(path, "old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"], "no temporary left behind"


def test_published_files_and_folders_get_the_plain_open_modes(tmp_path):
    old = os.umask(0o022)
    try:
        file = atomic_write_text(tmp_path / "deep" / "a.txt", "x")
        folder = replace_dir(lambda d: (d / "w").write_text("1"), tmp_path / "adapter")
    finally:
        os.umask(old)
    assert stat.S_IMODE(file.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_replace_dir_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    final = tmp_path / "adapter"
    replace_dir(lambda d: (d / "v").write_text("1"), final)
    with pytest.raises(RuntimeError):

        def half(d):
            (d / "v").write_text("2")
            raise RuntimeError("crash while saving")

        replace_dir(half, final)
    assert (final / "v").read_text() == "1"
    replace_dir(lambda d: (d / "u").write_text("3"), final)
    assert sorted(p.name for p in final.iterdir()) == ["u"], "the new folder replaces the old one whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temporary or .old folder left"
