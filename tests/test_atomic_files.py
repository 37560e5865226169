"""Atomic writes (util.atomic_files): rename on success, old file kept on failure, recognisable temporaries."""
import os

import pytest

from util.atomic_files import TMP_MARK, atomic_path, atomic_write_text, stale_temporaries, temporary_path


def test_success_renames_the_temporary_onto_the_path(tmp_path):
    target = tmp_path / "new" / "out.json"  # the folder does not exist yet
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()  # nothing visible under the final name while writing
        tmp.write_text("complete")
    assert target.read_text() == "complete"
    assert os.listdir(target.parent) == ["out.json"]


def test_an_exception_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "results.json", "old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_the_temporary_keeps_every_suffix_and_carries_mark_and_pid(tmp_path):
    with atomic_path(tmp_path / "superpix-MIDDLE_3.nii.gz") as tmp:
        assert tmp.name == f".superpix-MIDDLE_3{TMP_MARK}{os.getpid()}.nii.gz"
        tmp.write_bytes(b"x")
    assert temporary_path(tmp_path / "step_0000002.pth").name == f".step_0000002{TMP_MARK}{os.getpid()}.pth"


def test_atomic_write_text_replaces_and_returns_the_path(tmp_path):
    path = tmp_path / "a.txt"
    assert atomic_write_text(str(path), "one") == path
    atomic_write_text(path, "two \u00e9")
    assert path.read_text(encoding="utf-8") == "two \u00e9"


def test_stale_temporaries_are_those_of_gone_processes(tmp_path):
    dead = tmp_path / f".superpix-MIDDLE_1{TMP_MARK}999999999.nii.gz"  # no such pid: its writer was killed
    no_pid = tmp_path / f".superpix-MIDDLE_2{TMP_MARK}x.nii.gz"
    live = temporary_path(tmp_path / "superpix-MIDDLE_3.nii.gz")  # this process is writing it right now
    other = tmp_path / f".step_0000001{TMP_MARK}999999999.pth"  # does not match the names asked for
    for path in (dead, no_pid, live, other):
        path.write_bytes(b"partial")
    assert stale_temporaries(tmp_path, "superpix-MIDDLE_*.nii.gz") == [dead, no_pid]
    assert stale_temporaries(tmp_path) == sorted([dead, no_pid, other])
