"""Crash-safe files: written files follow the umask, and only the library's own temporary files are found."""

import os
import stat
from pathlib import Path

import pytest
import torch

from metaquant.files import (
    atomic_write_bytes,
    load_checkpoint,
    previous_checkpoint_path,
    save_checkpoint,
    temporary_files,
)

STATE = {"model": {"w": torch.ones(2)}, "optimizer": {}, "trainer": {}, "rng": {}, "epoch": 1}


@pytest.fixture
def umask():
    def set_to(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_to
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask_as_open_does(tmp_path, umask, mask):
    umask(mask)
    reference = tmp_path / "by-open.txt"
    reference.write_text("x")  # the oracle: what any program's open() makes
    atomic_write_bytes(tmp_path / "atomic.txt", b"x")
    save_checkpoint(tmp_path / "checkpoint.pt", STATE)
    save_checkpoint(tmp_path / "checkpoint.pt", {**STATE, "epoch": 2})  # also the copy to checkpoint.prev.pt
    expected = stat.S_IMODE(reference.stat().st_mode)
    assert expected == 0o666 & ~mask
    for name in ("atomic.txt", "checkpoint.pt", "checkpoint.prev.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_a_replaced_file_takes_the_umask_not_its_old_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "metrics.jsonl"
    target.write_text("old")
    os.chmod(target, 0o600)
    atomic_write_bytes(target, b"new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_bytes() == b"new"


def test_only_the_library_s_own_temporary_files_are_found(tmp_path):
    target = tmp_path / "checkpoint.pt"
    users = [tmp_path / ".notes.tmp", tmp_path / ".checkpoint.pt.mine.tmp", tmp_path / "checkpoint.pt.tmp"]
    for path in users:
        path.write_text("a user's file")
    left = tmp_path / f".checkpoint.pt.0123456789ab{'.metaquant.tmp'}"
    left.write_bytes(b"half a checkpoint")  # what a kill during a write leaves
    other = tmp_path / ".loss.csv.0123456789ab.metaquant.tmp"
    other.write_bytes(b"")
    assert temporary_files(target) == [left]
    assert temporary_files(tmp_path / "loss.csv") == [other]
    # a failed write removes its own temporary file and leaves the target and every other file as they were
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert temporary_files(target) == [left] and not target.exists()
    assert all(p.read_text() == "a user's file" for p in users)


def test_a_name_with_glob_characters_finds_only_its_own_temporary_files(tmp_path):
    odd = tmp_path / "run[1]*.json"
    atomic_write_bytes(odd, b"{}")
    (tmp_path / ".run1x.json.000000000000.metaquant.tmp").write_text("")  # matches the name as a glob
    assert temporary_files(odd) == [] and odd.read_bytes() == b"{}"


def test_an_atomic_write_replaces_the_file_and_leaves_nothing_else_and_an_exclusive_one_never_replaces(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"third", exclusive=True)
    atomic_write_bytes(tmp_path / "new.txt", b"made", exclusive=True)
    assert target.read_bytes() == b"second" and (tmp_path / "new.txt").read_bytes() == b"made"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "notes.txt"]


def test_the_previous_checkpoint_sits_beside_the_checkpoint_with_prev_before_the_suffix(tmp_path):
    assert previous_checkpoint_path("runs/r/checkpoint.pt") == Path("runs/r/checkpoint.prev.pt")
    save_checkpoint(tmp_path / "last.pth", STATE)
    save_checkpoint(tmp_path / "last.pth", {**STATE, "epoch": 2})
    assert load_checkpoint(previous_checkpoint_path(tmp_path / "last.pth"))["epoch"] == 1
    assert (tmp_path / "last.prev.pth").is_file()
