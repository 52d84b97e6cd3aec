"""Reliability: no file is destroyed, no data silently substituted, and every bad input is answered in one line.

The table runs each bad input against a folder of prepared run directories and files, and checks the exit
status, the one-line message (naming the file or value), and that every file is byte-identical afterwards.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metaquant.experiments.cli import main
from tests.data.formats import write_idx

TINY = ["-d", "mnist", "--no-download", "-m", "resnet8", "-bs", "32", "--no-progress"]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _write_mnist(folder: Path, splits=(("train", 64), ("t10k", 40))) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in splits:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=False)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=False)


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor stored in a torch checkpoint (a zip archive)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _copy_run(src: Path, dst: Path, *, done: bool = True) -> Path:
    shutil.copytree(src, dst)
    if not done:
        (dst / "done").unlink()
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Finished runs, damaged and foreign copies of them, garbage files and data folders: every bad input."""
    root = tmp_path_factory.mktemp("reliability")
    _write_mnist(root / "mnist")
    data = ["--data-dir", str(root / "mnist")]
    assert main(["pretrain", *TINY, *data, "-n", "1", "--run-dir", str(root), "--name", "fp"]) == 0
    assert (
        main(
            [
                "quantize",
                *TINY,
                *data,
                "-n",
                "2",
                "-meta",
                "multifc",
                "-hidden",
                "4",
                "--run-dir",
                str(root),
                "--name",
                "q",
            ]
        )
        == 0
    )
    q = root / "q"
    flip_tensor_byte(_copy_run(q, root / "damaged", done=False) / "checkpoint.pt")
    (_copy_run(q, root / "nocfg") / "config.json").unlink()
    (root / "mine").mkdir()
    (root / "mine" / "metrics.jsonl").write_text('{"accuracy": 0.93, "note": "my own numbers"}\n')
    shutil.copy(root / "fp" / "checkpoint.pt", _copy_run(q, root / "foreign", done=False) / "checkpoint.pt")
    (_copy_run(q, root / "badcfg", done=False) / "config.json").write_text("{'epochs': 2,")
    (_copy_run(q, root / "badmetrics", done=False) / "metrics.jsonl").write_text("epoch 1: 12%\n")
    (_copy_run(q, root / "badloss", done=False) / "loss.csv").write_text("iteration,loss\n1;2.30\n")
    (_copy_run(q, root / "typed") / "metrics.jsonl").write_text('{"epoch": 0, "test_acc": "high", "train_loss": 1}\n')
    (_copy_run(q, root / "binary") / "metrics.jsonl").write_bytes(bytes(range(128, 256)))
    (_copy_run(q, root / "badtrace") / "trace.pt").write_bytes(b"PK\x03\x04 not a trace")
    (root / "existing.bin").write_bytes(b"somebody's file")
    torch.save({"model": {"w": torch.ones(3)}}, root / "other-checkpoint.pt")
    (root / "binary.toml").write_bytes(bytes(range(128, 256)))
    (root / "typo.toml").write_text('[[grid]]\nestimater = "ste"\n')
    (root / "empty-grid.toml").write_text("[[grid]]\nestimator = []\n")
    (root / "a-file").write_text("x")
    (root / "empty-data").mkdir()
    _write_mnist(root / "train-only", splits=(("train", 64),))
    return root


# (id, argv, exit status, message fragments); {root} is the world folder, {tiny} the tiny-run options
CASES = [
    (
        "run dir without config.json",
        ["quantize", "{tiny}", "--run-dir", "{root}", "--name", "nocfg"],
        1,
        ["{root}/nocfg is not empty and is not a run (no config.json; it holds checkpoint.prev.pt, checkpoint.pt"],
    ),
    (
        "folder of the user's own files",
        ["quantize", "{tiny}", "--run-dir", "{root}", "--name", "mine"],
        1,
        ["{root}/mine is not empty and is not a run (no config.json; it holds metrics.jsonl)"],
    ),
    (
        "export over the run's checkpoint",
        ["export", "{root}/q", "--out", "{root}/q/checkpoint.pt"],
        1,
        ["--out {root}/q/checkpoint.pt is a file of the run in {root}/q; an export never replaces one"],
    ),
    (
        "export over a checkpoint, even with --overwrite",
        ["export", "{root}/q", "--out", "{root}/other-checkpoint.pt", "--overwrite"],
        1,
        ["--out {root}/other-checkpoint.pt is a torch checkpoint; an export never replaces one"],
    ),
    (
        "export over an existing file",
        ["export", "{root}/q", "--out", "{root}/existing.bin"],
        1,
        ["--out {root}/existing.bin already exists; choose another --out, or replace it with --overwrite"],
    ),
    (
        "export of a damaged checkpoint",
        ["export", "{root}/damaged", "--out", "{root}/new.safetensors"],
        1,
        [
            "checkpoint {root}/damaged/checkpoint.pt is damaged: Bad CRC-32",
            "the previous checkpoint {root}/damaged/checkpoint.prev.pt (after epoch 1) is intact: use it with "
            "--from-previous",
        ],
    ),
    (
        "eval of a damaged checkpoint",
        ["eval", "{root}/damaged", "--device", "cpu"],
        1,
        [
            "checkpoint {root}/damaged/checkpoint.pt is damaged: Bad CRC-32",
            "{root}/damaged/checkpoint.prev.pt (after epoch 1) is intact: use it with --from-previous",
        ],
    ),
    (
        "resume of a damaged checkpoint",
        ["quantize", "--resume", "{root}/damaged"],
        1,
        [
            "checkpoint {root}/damaged/checkpoint.pt is damaged: Bad CRC-32",
            "{root}/damaged/checkpoint.prev.pt (after epoch 1) is intact: use it with --from-previous",
        ],
    ),
    (
        "pretrain checkpoint resumed as a quantize run",
        ["quantize", "--resume", "{root}/foreign"],
        1,
        ["checkpoint {root}/foreign/checkpoint.pt was written by another run (task='pretrain'"],
    ),
    (
        "report on wrongly typed metrics",
        ["report", "{root}/typed", "--out", "{root}/report", "--no-figures"],
        1,
        ["{root}/typed/metrics.jsonl, line 1: 'test_acc' must be a number, got 'high'"],
    ),
    ("plot of a garbage trace", ["plot", "{root}/badtrace"], 1, ["{root}/badtrace/trace.pt is not a readable trace"]),
    ("plot of a missing run", ["plot", "{root}/nowhere"], 1, ["{root}/nowhere does not exist"]),
    ("plot of a file", ["plot", "{root}/a-file"], 1, ["{root}/a-file is not a directory"]),
    (
        "garbage config.json",
        ["quantize", "--resume", "{root}/badcfg"],
        1,
        ["{root}/badcfg/config.json is not a valid configuration (not JSON"],
    ),
    (
        "garbage metrics.jsonl",
        ["quantize", "--resume", "{root}/badmetrics"],
        1,
        ["{root}/badmetrics/metrics.jsonl, line 1 is not JSON"],
    ),
    (
        "garbage loss.csv",
        ["quantize", "--resume", "{root}/badloss"],
        1,
        ["{root}/badloss/loss.csv, line 2: expected 'iteration,loss', got '1;2.30'"],
    ),
    (
        "binary sweep file",
        ["sweep", "{root}/binary.toml", "--dry-run"],
        2,
        ["sweep file {root}/binary.toml is not a text (TOML) file"],
    ),
    (
        "binary file in a report",
        ["report", "{root}/binary", "--out", "{root}/report", "--no-figures"],
        1,
        ["{root}/binary/metrics.jsonl is not a text file"],
    ),
    (
        "--epochs with --resume",
        ["quantize", "--resume", "{root}/q", "--epochs", "5"],
        2,
        ["--epochs cannot be given with --resume: a resumed run takes its options from {root}/q/config.json"],
    ),
    (
        "missing --data-dir",
        ["quantize", "-d", "fashion-mnist", "--data-dir", "{root}/nowhere", "--no-download", "--run-dir", "{root}/new"],
        1,
        ["fashion-mnist train split not found: looked for", "in {root}/nowhere, {root}/nowhere/fashion-mnist."],
    ),
    (
        "empty --data-dir",
        [
            "quantize",
            "-d",
            "fashion-mnist",
            "--data-dir",
            "{root}/empty-data",
            "--no-download",
            "--run-dir",
            "{root}/new",
        ],
        1,
        ["fashion-mnist train split not found", "in {root}/empty-data, {root}/empty-data/fashion-mnist."],
    ),
    (
        "--data-dir is a file",
        ["quantize", "--data-dir", "{root}/a-file", "--no-download", "--run-dir", "{root}/new"],
        1,
        ["--data-dir {root}/a-file is not a directory"],
    ),
    (
        "partial --data-dir",
        [
            "quantize",
            "-d",
            "fashion-mnist",
            "--data-dir",
            "{root}/train-only",
            "--no-download",
            "-m",
            "resnet8",
            "--run-dir",
            "{root}/new",
        ],
        1,
        [
            "fashion-mnist test split not found: looked for t10k-images-idx3-ubyte.gz (or t10k-images-idx3-ubyte) and "
            "t10k-labels-idx1-ubyte.gz (or t10k-labels-idx1-ubyte) in {root}/train-only."
        ],
    ),
    (
        "--fix-meta-epoch without --fix-meta",
        ["quantize", "{tiny}", "-meta", "multifc", "--fix-meta-epoch", "3", "--run-dir", "{root}/new"],
        2,
        ["--fix-meta-epoch needs --fix-meta"],
    ),
    (
        "--name outside --run-dir",
        ["quantize", "{tiny}", "--run-dir", "{root}/new", "--name", "../escape"],
        2,
        ["--name '../escape' must be a plain directory name"],
    ),
    (
        "--lr inf",
        ["quantize", "{tiny}", "--lr", "inf", "--run-dir", "{root}/new"],
        2,
        ["lr must be a finite number > 0, got inf"],
    ),
    (
        "--train-size larger than the data set",
        ["quantize", "{tiny}", "--train-size", "100000"],
        2,
        ["train_size 100000 is more than the 60000 training examples of mnist; allowed: 1..60000"],
    ),
    (
        "--test-size larger than the data set",
        ["quantize", "{tiny}", "--test-size", "20000"],
        2,
        ["test_size 20000 is more than the 10000 test examples of mnist"],
    ),
    (
        "--seed 2**70",
        ["quantize", "{tiny}", "--seed", str(2**70)],
        2,
        [f"seed must be an integer in 0..4294967295, got {2**70}"],
    ),
    (
        "--max-skipped -1",
        ["quantize", "{tiny}", "--skip-nonfinite", "--max-skipped", "-1"],
        2,
        ["max_skipped must be an integer >= 0, got -1"],
    ),
    (
        "--max-skipped without --skip-nonfinite",
        ["quantize", "{tiny}", "--max-skipped", "5"],
        2,
        ["--max-skipped needs --skip-nonfinite"],
    ),
    (
        "--max-skipped on resuming a run that does not skip",
        ["quantize", "--resume", "{root}/q", "--max-skipped", "5"],
        2,
        ["--max-skipped needs --skip-nonfinite (the run in {root}/q stops at the first non-finite step)"],
    ),
    (
        "--from-previous without --resume",
        ["quantize", "{tiny}", "--from-previous"],
        2,
        ["--from-previous needs --resume RUN_DIR"],
    ),
    ("sweep file error", ["sweep", "{root}/typo.toml", "--dry-run"], 2, ["unknown configuration keys ['estimater']"]),
    (
        "empty sweep grid",
        ["sweep", "{root}/empty-grid.toml", "--dry-run"],
        2,
        ["sweep file {root}/empty-grid.toml defines no run"],
    ),
]


@pytest.mark.parametrize("argv,status,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, argv, status, fragments, capsys):
    tiny = [*TINY, "--data-dir", str(world / "mnist"), "-n", "1"]
    args = [a for arg in argv for a in (tiny if arg == "{tiny}" else [arg.replace("{root}", str(world))])]
    before = _snapshot(world)
    capsys.readouterr()
    assert main(args) == status
    err = capsys.readouterr().err
    assert err.startswith("metaquant") and err.count("\n") == 1, err  # one line, no traceback
    for fragment in fragments:
        assert fragment.replace("{root}", str(world)) in err
    assert _snapshot(world) == before  # every file byte-identical, none added
    assert not (world / "new").exists() and not (world / "escape").exists()


def test_previous_checkpoint_is_used_only_when_asked(world, tmp_path, capsys):
    run = _copy_run(world / "damaged", tmp_path / "damaged")
    damaged = (run / "checkpoint.pt").read_bytes()
    # export and eval of the previous checkpoint, on request
    assert main(["export", str(run), "--from-previous", "--out", str(tmp_path / "prev.safetensors")]) == 0
    assert main(["eval", str(run), "--from-previous", "--device", "cpu"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    # resume from it: the damaged file is kept aside, the run finishes, and its checkpoints are intact and distinct
    assert main(["quantize", "--resume", str(run), "--from-previous", "--no-progress"]) == 0
    assert (run / "checkpoint.damaged.pt").read_bytes() == damaged and (run / "done").exists()
    from metaquant.files import load_checkpoint

    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
    assert load_checkpoint(run / "checkpoint.prev.pt")["epoch"] == 1
    assert not os.path.samefile(run / "checkpoint.pt", run / "checkpoint.prev.pt")
    # the run ends where the undamaged one ended: the same weights
    straight = torch.load(world / "q" / "checkpoint.pt", weights_only=True)["model"]
    resumed = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_from_previous_refuses_an_intact_latest_checkpoint(world, tmp_path, capsys):
    run = _copy_run(world / "q", tmp_path / "q", done=False)
    before = _snapshot(run)
    assert main(["quantize", "--resume", str(run), "--from-previous"]) == 1
    assert f"--from-previous: {run / 'checkpoint.pt'} is intact" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_a_flipped_byte_that_keeps_the_crcs_is_caught_by_the_digest(world, tmp_path):
    from metaquant.files import load_checkpoint
    from metaquant.integrity import CheckpointDamagedError, verify_checkpoint_bytes

    # rebuild the archive with one tensor changed and every CRC recomputed: only the digest can tell
    source = world / "q" / "checkpoint.pt"
    forged = tmp_path / "forged.pt"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as new:
        target = max((i for i in old.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        for info in old.infolist():
            data = bytearray(old.read(info))
            if info.filename == target.filename:
                data[len(data) // 2] ^= 0x40
            new.writestr(info, bytes(data))
    assert verify_checkpoint_bytes(source.read_bytes(), source) == "digest"
    with pytest.raises(CheckpointDamagedError, match="its content digest does not match its data"):
        load_checkpoint(forged)


def _slow_cli(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "metaquant", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kwargs,
    )


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_live_run_directory_is_refused_and_resumes_after_its_owner_is_killed(world, tmp_path, capsys):
    run = tmp_path / "live"
    proc = _slow_cli(
        [
            "quantize",
            *TINY,
            "--data-dir",
            str(world / "mnist"),
            "-n",
            "40",
            "--run-dir",
            str(tmp_path),
            "--name",
            "live",
        ]
    )
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
        capsys.readouterr()
        assert main(["quantize", "--resume", str(run)]) == 1
        err = capsys.readouterr().err
        assert f"run directory {run} is in use by another process (pid {proc.pid})" in err and err.count("\n") == 1
        # a new run in the same directory is refused too
        assert (
            main(["quantize", *TINY, "--data-dir", str(world / "mnist"), "--run-dir", str(tmp_path), "--name", "live"])
            == 1
        )
        assert "already holds a run" in capsys.readouterr().err
        assert proc.poll() is None  # the owner was not disturbed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 2  # finish quickly
    (run / "config.json").write_text(json.dumps(config))
    assert main(["quantize", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "done").exists() and not list(run.glob(".*.tmp"))


def test_a_kill_while_a_checkpoint_is_written_leaves_two_distinct_complete_ones(world, tmp_path):
    from metaquant.files import load_checkpoint
    from tests.experiments.test_resume import WRAPPER as wrapper  # pauses the N-th write of checkpoint.pt

    marker, run = tmp_path / "writing", tmp_path / "r"
    args = ["quantize", *TINY, "--data-dir", str(world / "mnist"), "-n", "3", "--run-dir", str(tmp_path), "--name", "r"]
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, str(marker), "3", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    current, previous = run / "checkpoint.pt", run / "checkpoint.prev.pt"
    assert not os.path.samefile(current, previous)
    assert load_checkpoint(current)["epoch"] == 2 and load_checkpoint(previous)["epoch"] == 2
    assert main(["quantize", "--resume", str(run), "--no-progress"]) == 0
    assert load_checkpoint(current)["epoch"] == 3 and load_checkpoint(previous)["epoch"] == 2


def test_a_second_ctrl_c_during_shutdown_gives_one_line_and_no_traceback(world, tmp_path):
    run = tmp_path / "r"
    proc = _slow_cli(
        ["quantize", *TINY, "--data-dir", str(world / "mnist"), "-n", "40", "--run-dir", str(tmp_path), "--name", "r"]
    )
    _wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
    while proc.poll() is None:  # Ctrl-C, again and again, until the process has ended
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    out, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("metaquant: stopped by signal 2") and f"--resume {run}" in last


@pytest.fixture
def nan_between(monkeypatch):
    """Make the training loss NaN for the training steps from..to of this process, counted across runs
    (evaluation is left alone)."""
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0, "from": None, "to": None}

    def cross_entropy(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":
            calls["n"] += 1
            if calls["from"] is not None and calls["from"] <= calls["n"] <= calls["to"]:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    return calls


def _strict_json(line):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_resume_with_skip_nonfinite_applies_and_counts_the_skipped_steps(world, tmp_path, capsys, nan_between):
    nan_between.update({"from": 4, "to": 7})  # the 4th to the 7th step this process takes
    args = ["quantize", *TINY, "--data-dir", str(world / "mnist"), "-n", "3", "--run-dir", str(tmp_path), "--name", "r"]
    assert main(args) == 1
    run = tmp_path / "r"
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 2, step 2 (iteration 4)" in err
    assert f"to skip such steps, continue with: metaquant quantize --resume {run} --skip-nonfinite" in err
    config = (run / "config.json").read_bytes()
    # resumed from the end of epoch 1 with skipping: epoch 2's two steps (5th, 6th) are skipped, then the 7th,
    # epoch 3's first, exceeds a limit of 2: the run stops as failed, naming where
    assert main(["quantize", "--resume", str(run), "--skip-nonfinite", "--max-skipped", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "3 steps skipped for non-finite values, more than the limit of 2, at epoch 3, step 1 (iteration 5)" in err
    assert f"continue with: metaquant quantize --resume {run} --max-skipped N" in err
    assert not (run / "done").exists()
    # from the end of epoch 2 (2 skipped so far) the last epoch trains normally
    assert main(["quantize", "--resume", str(run), "--skip-nonfinite", "--no-progress"]) == 0
    assert (run / "done").exists() and (run / "config.json").read_bytes() == config  # the run's own options stay
    records = [_strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 2, 0]
    assert records[1]["train_loss"] is None and records[1]["train_acc"] is None  # every step of epoch 2 skipped
    assert records[2]["train_loss"] > 0


def _toy(policy, lr, weight_decay=0.0):
    from metaquant.data import DatasetInfo, ImageTensors, TensorLoader

    data = ImageTensors(torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8), torch.tensor([0, 1] * 4))
    loader = TensorLoader(data, DatasetInfo("toy", 2, 1, 4, (0.5,), (0.5,), "none"), 4, train=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2), torch.nn.BatchNorm1d(2))
    import metaquant as mq

    trainer = mq.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay), on_nonfinite=policy
    )
    return model, trainer, loader


def test_an_update_that_overflows_the_weights_is_skipped_and_undone(tmp_path):
    import metaquant as mq
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.runs import RunDir

    torch.manual_seed(0)
    model, trainer, loader = _toy("skip", 10.0, weight_decay=1e38)  # finite rates; 10·1e38·w overflows float32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = RunDir.create(tmp_path / "r", RunConfig())
    state = mq.fit(
        model, trainer, loader, loader, epochs=2, schedule=lambda e: 1.0, progress=False, run=run, max_skipped=10
    )
    # every update overflowed: each was undone, weights, BatchNorm statistics and momentum as before the step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(trainer.optimizer.state) == 0 and trainer.skipped_steps == state.skipped == 4
    text = run.metrics_path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    records = [_strict_json(line) for line in text.splitlines()]
    assert [(r["skipped_steps"], r["train_loss"], r["train_acc"]) for r in records] == [(2, None, None)] * 2


def test_non_finite_batchnorm_statistics_are_not_saved_over_the_last_good_checkpoint(tmp_path):
    import metaquant as mq
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.runs import RunDir
    from metaquant.guards import NonFiniteError
    from metaquant.loop import Callback

    class PoisonStatistics(Callback):  # statistics that overflow after the epoch's last step was checked
        def on_evaluate(self, loop, test):
            if loop.state.epoch == 1:
                loop.model[2].running_var.fill_(float("inf"))
            return test

    torch.manual_seed(0)
    model, trainer, loader = _toy("raise", 0.1)
    run = RunDir.create(tmp_path / "r", RunConfig())
    last_good = re.escape(str(run.checkpoint_path))
    expected = (
        rf"^non-finite weights at the end of epoch 2 \(iteration 4\); not saved \(last good checkpoint: {last_good}\)$"
    )
    with pytest.raises(NonFiniteError, match=expected):
        mq.fit(
            model,
            trainer,
            loader,
            loader,
            epochs=2,
            schedule=lambda e: 1.0,
            progress=False,
            run=run,
            callbacks=[PoisonStatistics()],
        )
    saved = torch.load(run.checkpoint_path, weights_only=False)
    assert saved["epoch"] == 1 and torch.isfinite(saved["model"]["2.running_var"]).all()


def test_without_skipping_an_overflowing_update_stops_the_run_naming_the_step():
    import metaquant as mq
    from metaquant.guards import NonFiniteError

    torch.manual_seed(0)
    model, trainer, loader = _toy("raise", 10.0, weight_decay=1e38)  # finite rates; 10·1e38·w overflows float32
    expected = (
        r"^non-finite weights after the update at epoch 1, step 1 \(iteration 1\); last good checkpoint: none yet$"
    )
    with pytest.raises(NonFiniteError, match=expected):
        mq.fit(model, trainer, loader, loader, epochs=1, schedule=lambda e: 1.0, progress=False)


def test_a_huge_learning_rate_with_skipping_stops_as_failed(world, tmp_path, capsys):
    run = tmp_path / "r"
    args = [
        "quantize",
        *TINY,
        "--data-dir",
        str(world / "mnist"),
        "-n",
        "4",
        "--lr",
        "1e30",
        "--skip-nonfinite",
        "--max-skipped",
        "3",
        "--run-dir",
        str(tmp_path),
        "--name",
        "r",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "4 steps skipped for non-finite values, more than the limit of 3, at epoch" in err
    assert "finished" not in capsys.readouterr().out and not (run / "done").exists()
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        _strict_json(line)


def test_full_disk_names_the_file_and_the_intact_checkpoint(world, tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    real_fsync = os.fsync

    def full_after_first_checkpoint(fd):
        if (run / "checkpoint.pt").exists():
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_first_checkpoint)
    assert (
        main(
            [
                "pretrain",
                *TINY,
                "--data-dir",
                str(world / "mnist"),
                "-n",
                "2",
                "--run-dir",
                str(tmp_path),
                "--name",
                "r",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"metaquant: error: cannot write {run}/")
    assert (
        f"No space left on device; the checkpoint {run / 'checkpoint.pt'} (after epoch 1) is intact: free some "
        f"space, then continue with: metaquant pretrain --resume {run}"
    ) in err
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["pretrain", "--resume", str(run), "--no-progress"]) == 0
