"""Exact resume after SIGKILL (including during a checkpoint write), SIGINT, and non-finite steps."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaquant.experiments.cli import main
from metaquant.experiments.config import RunConfig
from metaquant.experiments.lifecycle import execute, resume
from metaquant.files import TEMPORARY_SUFFIX
from metaquant.guards import StopFlag, TrainingInterrupted


@pytest.fixture
def TINY(tiny_mnist):
    # -ad 2: the learning rates drop after epoch 2, so resumed runs cross a change of the schedule
    return [*tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "4", "-ad", "2", "--no-progress", "--seed", "3"]


ESTIMATORS = {
    "ste": ["-meta", "ste"],
    "lstmfc": ["-meta", "lstmfc", "-hidden", "4"],
    # BatchNorm statistics recomputed before each evaluation: part of each checkpoint, and no randomness used
    "ste-precise-bn": ["-meta", "ste", "--precise-bn", "2"],
    # a moving average of the weights: part of each checkpoint
    "ste-ema": ["-meta", "ste", "--precise-bn", "2", "--ema-decay", "0.7"],
}

# Runs the CLI with os.replace slowed down at the N-th write of checkpoint.pt, after writing a marker file,
# so that the test can SIGKILL the process while that checkpoint is being written.
WRAPPER = """
import os, sys, time
marker, pause_at = sys.argv[1], int(sys.argv[2])
real_replace, count = os.replace, [0]
def replace(src, dst):
    if str(dst).endswith("checkpoint.pt"):
        count[0] += 1
        if count[0] == pause_at:
            open(marker, "w").close()
            time.sleep(120)
    return real_replace(src, dst)
os.replace = replace
from metaquant.experiments.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _cli(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "metaquant", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _result(run: Path):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("train_seconds")  # wall time, the only field allowed to differ
    return {**state["model"], **state.get("averaged", {})}, state["trainer"], metrics, (run / "loss.csv").read_text()


def _assert_same(a, b):
    model_a, trainer_a, metrics_a, loss_a = a
    model_b, trainer_b, metrics_b, loss_b = b
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert metrics_a == metrics_b
    assert loss_a == loss_b
    if trainer_a:
        assert all(torch.equal(trainer_a["meta"][k], trainer_b["meta"][k]) for k in trainer_a["meta"])


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_sigkill_at_several_points_then_resume_is_bit_exact(tmp_path, estimator, TINY):
    args = ["quantize", *TINY, *ESTIMATORS[estimator], "--run-dir", str(tmp_path)]
    assert (
        subprocess.run([sys.executable, "-m", "metaquant", *args, "--name", "straight"], capture_output=True).returncode
        == 0
    )
    run = tmp_path / "killed"
    cmd = [*args, "--name", "killed"]

    # 1. killed before its first checkpoint: the resumed run starts from the beginning
    proc = _cli(cmd)
    _wait_for(lambda: (run / "config.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2. killed while the second checkpoint is being written (the temporary file is complete, not renamed)
    marker = tmp_path / "writing"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(marker), "2", "quantize", "--resume", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(run.glob(".checkpoint.pt.*.tmp")), "the kill should have left a half-written checkpoint"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the previous one, intact
    # 3. killed after an epoch's metrics were recorded
    proc = _cli(["quantize", "--resume", str(run)])
    _wait_for(lambda: len((run / "metrics.jsonl").read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 4. resumed to the end
    done = subprocess.run(
        [sys.executable, "-m", "metaquant", "quantize", "--resume", str(run)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not list(run.glob(".*.tmp"))
    _assert_same(_result(tmp_path / "straight"), _result(run))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_writes_a_checkpoint_and_the_run_resumes_exactly(tmp_path, signum, TINY):
    args = ["quantize", *TINY, *ESTIMATORS["lstmfc"], "--run-dir", str(tmp_path)]
    assert main([*args, "--name", "straight"]) == 0
    run = tmp_path / "interrupted"
    proc = _cli([*args, "--name", "interrupted", "-n", "4"])
    _wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"continue with: metaquant quantize --resume {run}" in err and "Traceback" not in err
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["fit"]["batch"] in (0, 1, 2)
    assert main(["quantize", "--resume", str(run)]) == 0
    _assert_same(_result(tmp_path / "straight"), _result(run))


@pytest.fixture
def nan_after(monkeypatch):
    """Make the training loss NaN from the n-th training step on (evaluation is left alone)."""
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0, "from": None}

    def cross_entropy(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":
            calls["n"] += 1
            if calls["from"] is not None and calls["n"] >= calls["from"]:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    return calls


@pytest.mark.parametrize("estimator", ["ste", "multifc"])
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, nan_after, estimator, TINY):
    nan_after["from"] = 4  # epoch 2, step 2 (two steps per epoch)
    args = ["quantize", *TINY, "-meta", estimator, "-hidden", "4", "--run-dir", str(tmp_path), "--name", "r"]
    assert main(args) == 1
    err = capsys.readouterr().err
    checkpoint = tmp_path / "r" / "checkpoint.pt"
    assert (
        f"non-finite loss at epoch 2, step 2 (iteration 4); nothing was updated; last good checkpoint: {checkpoint}"
        in err
    )
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )


def test_skip_nonfinite_finishes_the_run(tmp_path, nan_after, TINY):
    nan_after["from"] = 3
    args = [
        "quantize",
        *TINY,
        "-meta",
        "multifc",
        "-hidden",
        "4",
        "--skip-nonfinite",
        "--run-dir",
        str(tmp_path),
        "--name",
        "r",
    ]
    assert main(args) == 0
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert nan_after["n"] >= 8  # every step of the four epochs ran


def test_full_disk_while_saving_keeps_what_was_written_and_the_run_resumes(tmp_path, capsys, monkeypatch, TINY):
    run = tmp_path / "r"
    real_fsync = os.fsync

    def full_after_first_checkpoint(fd):
        if (run / "checkpoint.pt").exists():
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_first_checkpoint)
    assert main(["pretrain", *TINY, "-n", "2", "--run-dir", str(tmp_path), "--name", "r"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list(run.glob(".*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_from_an_epoch_checkpoint_without_a_mid_epoch_position(tmp_path, TINY):
    """Checkpoints written at an epoch's end by earlier versions hold no 'fit' entry; they resume the same."""
    args = ["quantize", *TINY, "-n", "2", "--run-dir", str(tmp_path)]
    assert main([*args, "--name", "straight"]) == 0
    assert main([*args, "--name", "old", "-n", "1"]) == 0
    run = tmp_path / "old"
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 2  # as if the run had been killed after its first epoch
    (run / "config.json").write_text(json.dumps(config))
    (run / "done").unlink()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["fit"]
    torch.save(state, run / "checkpoint.pt")
    assert main(["quantize", "--resume", str(run)]) == 0
    straight, resumed = _result(tmp_path / "straight"), _result(run)
    assert all(torch.equal(straight[0][k], resumed[0][k]) for k in straight[0])


class _StopAtStep(StopFlag):
    """A stop requested at the ``step``-th step of the run, as a Ctrl-C there would."""

    def __init__(self, step):
        super().__init__()
        self.left = step

    def __bool__(self):
        self.left -= 1
        if self.left == 0:
            self.request(signal.SIGINT)
        return super().__bool__()


def _stopped_run(path, tiny_mnist, step, **fields):
    """A run of 4 epochs of 2 steps, stopped after its ``step``-th step (a checkpoint there)."""
    config = RunConfig(
        **{"model": "resnet8", "dataset": "mnist", "data_dir": tiny_mnist[3], "download": False, "batch_size": 32},
        **{"epochs": 4, "lr_step": 2, "seed": 3, "device": "cpu", **fields},
    )
    with pytest.raises(TrainingInterrupted):
        execute(config, path, progress=False, stop=_StopAtStep(step))
    return config


def _edit(run, **fields):
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **fields}))


def test_an_edited_config_is_refused_or_taken_knowingly_and_recorded(tmp_path, tiny_mnist, caplog):
    run = tmp_path / "edited"
    config = _stopped_run(run, tiny_mnist, 5)  # at epoch 3, step 1
    checkpoint = (run / "checkpoint.pt").read_bytes()
    for field, value in (("lr", 0.01), ("batch_size", 16), ("train_size", 32), ("seed", 4), ("amp", "bf16")):
        _edit(run, **{field: value})
        with pytest.raises(ValueError) as refused:
            resume(run, progress=False)
        message = str(refused.value)
        assert f"{field} {getattr(config, field)!r} -> {value!r}" in message and "Put the old values back" in message
        assert (run / "checkpoint.pt").read_bytes() == checkpoint and not (run / "done").exists()
        _edit(run, **{field: getattr(config, field)})
    _edit(run, epochs=2)  # the run is within its third epoch
    with pytest.raises(ValueError, match="sets epochs 2, but checkpoint .* is at epoch 3, step 1: .* set epochs to 3"):
        resume(run, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    # shortened to the epoch it is in: the same run as one of 3 epochs (the step schedule does not depend on them)
    _edit(run, epochs=3, device="auto", checkpoint_every=1)
    with caplog.at_level(logging.WARNING, logger="metaquant"):
        resumed = resume(run, progress=False)
    straight = execute(dataclasses.replace(config, epochs=3), tmp_path / "straight", progress=False)
    assert resumed.epochs == 3 and resumed.final_acc == straight.final_acc
    assert _result(run)[2] == _result(tmp_path / "straight")[2]
    edits = torch.load(run / "checkpoint.pt", weights_only=True)["config_edits"]
    assert edits == [
        {"field": "epochs", "old": 4, "new": 3, "at": "at epoch 3, step 1"},
        {"field": "device", "old": "cpu", "new": "auto", "at": "at epoch 3, step 1"},
        {"field": "checkpoint_every", "old": 0, "new": 1, "at": "at epoch 3, step 1"},
    ]
    assert sum("epochs changed from 4 to 3 (at epoch 3, step 1)" in r.getMessage() for r in caplog.records) == 1


def test_edits_are_kept_across_later_resumes(tmp_path, tiny_mnist):
    run = tmp_path / "r"
    _stopped_run(run, tiny_mnist, 1)
    _edit(run, epochs=5)  # extended
    with pytest.raises(TrainingInterrupted):
        resume(run, progress=False, stop=_StopAtStep(2))
    resume(run, progress=False)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["config_edits"] == [{"field": "epochs", "old": 4, "new": 5, "at": "at epoch 1, step 1"}]
    assert saved["epoch"] == 5 and len((run / "metrics.jsonl").read_text().splitlines()) == 5


def test_resume_removes_only_the_temporary_files_of_its_own_writes(tmp_path, tiny_mnist):
    run = tmp_path / "r"
    _stopped_run(run, tiny_mnist, 3)
    mine = [run / ".notes.tmp", run / ".checkpoint.pt.mine.tmp", run / "notes.metaquant.tmp"]
    for path in mine:
        path.write_text("a user's file")
    interrupted = [run / f".checkpoint.pt.0123456789ab{TEMPORARY_SUFFIX}", run / f".metrics.jsonl.ab{TEMPORARY_SUFFIX}"]
    for path in interrupted:
        path.write_bytes(b"half a write")
    resume(run, progress=False)
    assert (run / "done").exists()
    assert all(p.read_text() == "a user's file" for p in mine)
    assert not any(p.exists() for p in interrupted)
