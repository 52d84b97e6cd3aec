"""Run directories and atomic checkpoints."""

import concurrent.futures
import os
import threading

import pytest
import torch

from metaquant.experiments.config import RunConfig
from metaquant.experiments.runs import RunDir, RunExistsError
from metaquant.files import atomic_write_bytes, load_checkpoint, save_checkpoint


def test_create_refuses_an_existing_run_and_leaves_it_unchanged(tmp_path):
    run = RunDir.create(tmp_path / "r", RunConfig(epochs=3))
    before = run.config_path.read_bytes()
    with pytest.raises(RunExistsError, match="already holds a run"):
        RunDir.create(tmp_path / "r", RunConfig(epochs=5))
    assert run.config_path.read_bytes() == before
    assert run.config().epochs == 3


def test_records_replace_epochs_past_the_one_recorded(tmp_path):
    run = RunDir.create(tmp_path / "r", RunConfig())
    run.record_epoch({"epoch": 0, "test_acc": 1.0}, [(1, 0.5), (2, 0.4)])
    run.record_epoch({"epoch": 1, "test_acc": 2.0}, [(3, 0.3), (4, 0.2)])
    # a resumed run re-does epoch 1: its old records are replaced, not duplicated
    run.record_epoch({"epoch": 1, "test_acc": 3.0}, [(3, 0.31), (4, 0.21)])
    assert [m["test_acc"] for m in run.metrics()] == [1.0, 3.0]
    lines = run.loss_path.read_text().splitlines()
    assert lines == ["iteration,loss", "1,0.50000000", "2,0.40000000", "3,0.31000000", "4,0.21000000"]


def _state(epoch):
    return {"model": {"w": torch.full((2,), float(epoch))}, "optimizer": {}, "trainer": {}, "rng": {}, "epoch": epoch}


def test_save_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    assert load_checkpoint(path)["epoch"] == 2
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["epoch"] == 1


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {**_state(0), "model": {"w": torch.randn(1000)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated.pt is corrupt or truncated"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save([1, 2], other)
    with pytest.raises(ValueError, match="not a metaquant checkpoint"):
        load_checkpoint(other)
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match=r"not a metaquant checkpoint \(missing epoch, optimizer, rng, trainer\)"):
        load_checkpoint(other)


def test_of_runs_created_at_once_in_one_directory_exactly_one_gets_it(tmp_path):
    barrier = threading.Barrier(8)

    def create(epochs):
        barrier.wait()
        try:
            RunDir.create(tmp_path / "same", RunConfig(epochs=epochs))
            return epochs
        except RunExistsError:
            return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(1, 9)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert RunDir(tmp_path / "same").config().epochs == winners[0]
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["config.json"]  # no temporary left
