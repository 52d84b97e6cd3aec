"""Every bad input gets one clear message and a non-zero exit, with no traceback and no file changed."""

import hashlib
from pathlib import Path

import pytest
import torch

from metaquant.experiments.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder holding a finished run, a truncated dataset, garbage files, and a checkpoint of another model."""
    import numpy as np

    from tests.data.formats import write_idx

    root = tmp_path_factory.mktemp("world")
    data = root / "mnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(data / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)).astype(np.uint8), gz=False)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8), gz=False)
    broken = root / "broken"
    broken.mkdir()
    for f in data.iterdir():
        (broken / f.name).write_bytes(f.read_bytes() if "labels" in f.name else f.read_bytes()[:5000])
    common = [
        "-d",
        "mnist",
        "--data-dir",
        str(data),
        "--no-download",
        "-m",
        "resnet8",
        "-bs",
        "20",
        "-n",
        "1",
        "--no-progress",
        "--run-dir",
        str(root / "runs"),
    ]
    assert main(["pretrain", *common, "--name", "fp"]) == 0
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"model": {"conv.weight": torch.zeros(3)}}, root / "other-architecture.pt")
    (root / "a-file").write_text("x")
    return root, common


CASES = [
    # (extra arguments, exit status, message)
    (["quantize", "-m", "vgg16"], 2, "argument -m/--model: invalid choice: 'vgg16' (choose from 'resnet8'"),
    (["quantize", "-d", "svhn"], 2, "argument -d/--dataset: invalid choice: 'svhn' (choose from 'mnist'"),
    (["quantize", "-q", "xnor"], 2, "argument -q/--quantizer: invalid choice: 'xnor'"),
    (["quantize", "-meta", "magic"], 2, "argument -meta/--estimator: invalid choice: 'magic'"),
    (
        ["quantize", "-o", "rmsprop"],
        2,
        "argument -o/--optimizer: invalid choice: 'rmsprop' (choose from 'sgd', 'adam', 'adamw')",
    ),
    (["quantize", "-q", "bwn", "-bw", "2"], 2, "quantizer 'bwn' does not support bits=2; allowed: 1"),
    (["quantize", "-q", "dorefa", "-bw", "9"], 2, "quantizer 'dorefa' does not support bits=9; allowed: 1..8"),
    (["quantize", "-meta", "lstmfc", "-hidden", "0"], 2, "hidden_size must be an integer > 0, got 0"),
    (["quantize", "-meta", "ste", "--fix-meta"], 2, "freeze_meta_epoch needs a meta quantizer estimator"),
    (["quantize", "--lr", "0"], 2, "lr must be a number > 0, got 0.0"),
    (["quantize", "--lr", "-0.1"], 2, "lr must be a number > 0, got -0.1"),
    (["quantize", "--meta-lr", "0"], 2, "meta_lr must be a number > 0, got 0.0"),
    (["quantize", "-n", "0"], 2, "epochs must be an integer > 0, got 0"),
    (["pretrain", "-bs", "-4"], 2, "batch_size must be an integer > 0, got -4"),
    (["quantize", "--train-size", "0"], 2, "train_size must be an integer > 0, got 0"),
    (["quantize", "--momentum", "1.2"], 2, "momentum must be in [0, 1), got 1.2"),
    (["quantize", "--nesterov"], 2, "nesterov needs optimizer 'sgd' with momentum > 0"),
    (
        ["quantize", "--train-size", "41"],
        1,
        "subset size must be an integer in 1..40 (the number of examples available) or None for all; got 41",
    ),
    (
        ["quantize", "--data-dir", "{root}/nowhere"],
        1,
        "mnist train split not found: looked for train-images-idx3-ubyte",
    ),
    (["quantize", "--data-dir", "{root}/broken"], 1, "broken/train-images-idx3-ubyte"),
    (["quantize", "--init", "{root}/missing.pt"], 1, "missing.pt: no such checkpoint file"),
    # named before the data set is read (here it is missing too)
    (["quantize", "--data-dir", "{root}/nowhere", "--init", "{root}/gone.pt"], 1, "gone.pt: no such checkpoint file"),
    (["quantize", "--init", "{root}/garbage.pt"], 1, "garbage.pt: not a torch checkpoint, or corrupt or truncated"),
    (["quantize", "--init", "{root}/other-architecture.pt"], 1, "does not fit CifarResNet"),
    (["quantize", "-m", "resnet20", "--init", "{root}/runs/fp"], 1, "does not fit CifarResNet"),
    (["pretrain", "--name", "fp"], 1, "already holds a run; choose another --name or --run-dir"),
    (["quantize", "--resume", "{root}/nowhere"], 1, "no run there (config.json is missing)"),
    (["quantize", "--resume", "{root}/runs/fp"], 2, "is a pretrain run; use 'metaquant pretrain --resume"),
    (["quantize", "--run-dir", "{root}/a-file"], 1, "Not a directory"),
    (["quantize", "-meta", "multifc", "--meta-init", "{root}/runs/fp"], 1, "holds no meta quantizer"),
]


@pytest.mark.parametrize("argv,status,message", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input(world, argv, status, message, capsys):
    root, common = world
    before = _snapshot(root)
    task, *rest = argv
    rest = [a.replace("{root}", str(root)) for a in rest]
    options = [] if "--resume" in rest else common  # a resumed run takes its options from its config.json
    assert main([task, *options, *rest]) == status
    err = capsys.readouterr().err
    assert message.replace("{root}", str(root)) in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("metaquant")
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing existing changed
    assert not [k for k in after if k not in before and "quantize-" not in k]


def test_corrupt_checkpoints_on_resume(world, capsys):
    root, common = world
    import shutil

    run = root / "copy"
    shutil.copytree(root / "runs" / "fp", run)
    (run / "done").unlink()
    (run / "checkpoint.pt").write_bytes(b"truncated")
    (run / "checkpoint.prev.pt").unlink(missing_ok=True)
    assert main(["pretrain", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoint.pt'} is corrupt or truncated" in err
    assert err.strip().endswith("there is no previous checkpoint") and err.count("\n") == 1
