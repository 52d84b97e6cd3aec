"""The command line: tiny real runs, and bad options that exit non-zero with one line and no traceback."""

import json
import subprocess
import sys

import pytest

from metaquant.experiments.cli import main

TINY = ["-m", "resnet8", "--train-size", "64", "--test-size", "50", "-bs", "32", "--no-progress", "-n", "1"]


def test_pretrain_then_quantize_writes_run_directories(tmp_path, capsys, fashion_mnist_available):
    assert main(["pretrain", *TINY, "--augment", "crop_flip", "--run-dir", str(tmp_path), "--name", "fp"]) == 0
    fp = tmp_path / "fp"
    assert {p.name for p in fp.iterdir()} >= {"config.json", "metrics.jsonl", "loss.csv", "checkpoint.pt", "done"}
    written = json.loads((fp / "config.json").read_text())
    assert (written["task"], written["augment"]) == ("pretrain", "crop_flip")
    rc = main(["quantize", *TINY, "--init", str(fp), "-q", "bwn", "--run-dir", str(tmp_path), "--name", "q"])
    assert rc == 0
    metrics = [json.loads(line) for line in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and 0 <= metrics[0]["test_acc"] <= 100
    assert "quantize finished: final test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("estimator", ["identity", "ewgs"])
def test_quantize_with_other_classical_estimators(tmp_path, estimator, fashion_mnist_available):
    assert main(["quantize", *TINY, "-meta", estimator, "--run-dir", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["quantize", "--estimator", "magic"], "invalid choice: 'magic' (choose from 'ste'"),
        (["quantize", "--model", "vgg"], "invalid choice: 'vgg'"),
        (["quantize", "-q", "bwn", "-bw", "2"], "bits=2; allowed: 1"),
        (["quantize", "--lr", "0"], "lr must be a number > 0, got 0.0"),
        (["quantize", "-n", "-1"], "epochs must be an integer > 0, got -1"),
        (["quantize", "-bs", "0"], "batch_size must be an integer > 0, got 0"),
        (["pretrain", "--optimizer", "lion"], "invalid choice: 'lion'"),
        (["quantize", "--lr", "abc"], "invalid float value: 'abc'"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_init_and_existing_run_dir_fail_cleanly(tmp_path, capsys, fashion_mnist_available):
    assert main(["quantize", *TINY, "--init", str(tmp_path / "nope.pt"), "--run-dir", str(tmp_path)]) == 1
    assert "nope.pt: no such checkpoint" in capsys.readouterr().err
    assert main(["pretrain", *TINY, "--run-dir", str(tmp_path), "--name", "r"]) == 0
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    assert main(["pretrain", *TINY, "--run-dir", str(tmp_path), "--name", "r"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before


def test_original_checkpoint_into_a_one_channel_model_is_a_clear_error(
    tmp_path, capsys, fashion_mnist_available, original_resnet20_path
):
    argv = ["quantize", *TINY, "-m", "resnet20", "--init", str(original_resnet20_path), "--run-dir", str(tmp_path)]
    assert main(argv) == 1
    assert "conv1.weight: checkpoint (16, 3, 3, 3) vs model (16, 1, 3, 3)" in capsys.readouterr().err


def test_module_entry_point_and_no_traceback_in_a_subprocess():
    ok = subprocess.run([sys.executable, "-m", "metaquant", "quantize", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--estimator" in ok.stdout and "--init" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "metaquant", "quantize", "-q", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "invalid choice: 'nope'" in bad.stderr


@pytest.mark.parametrize("estimator", ["fc-grad", "multifc", "lstmfc", "MLPFC"])
def test_quantize_with_each_meta_quantizer(tmp_path, estimator, fashion_mnist_available):
    argv = ["quantize", *TINY, "-meta", estimator, "-hidden", "8", "--run-dir", str(tmp_path), "--name", "m"]
    assert main(argv) == 0
    assert (tmp_path / "m" / "meta.pt").exists()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["estimator"] == {"MLPFC": "multifc"}.get(estimator, estimator)


def test_meta_quantizer_reuse_and_freezing(tmp_path, capsys, fashion_mnist_available):
    import torch

    common = [*TINY, "-meta", "multifc", "-hidden", "8", "--run-dir", str(tmp_path)]
    assert main(["quantize", *common, "--name", "first"]) == 0
    trained = torch.load(tmp_path / "first" / "meta.pt", weights_only=True)["meta"]
    assert (
        main(
            [
                "quantize",
                *common,
                "--name",
                "reuse",
                "--meta-init",
                str(tmp_path / "first"),
                "--fix-meta",
                "--step-order",
                "original",
            ]
        )
        == 0
    )
    reused = torch.load(tmp_path / "reuse" / "meta.pt", weights_only=True)["meta"]
    assert all(torch.equal(trained[k], reused[k]) for k in trained)  # loaded, then frozen from epoch 0
    assert (
        main(
            [
                "quantize",
                *TINY,
                "-meta",
                "lstmfc",
                "--meta-init",
                str(tmp_path / "first"),
                "--run-dir",
                str(tmp_path),
                "--name",
                "wrong",
            ]
        )
        == 1
    )
    assert "holds a meta quantizer {'estimator': 'multifc'" in capsys.readouterr().err
    assert main(["quantize", *TINY, "--fix-meta", "--run-dir", str(tmp_path)]) == 2
    assert "needs a meta quantizer estimator" in capsys.readouterr().err


def test_a_reader_that_stops_reading_ends_the_command_quietly_with_status_141():
    """`metaquant ... | head`: the closed pipe is not reported as an error, and nothing is printed after it."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "metaquant", "sweep", "paper-cifar10", "--dry-run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert err == ""


def test_a_meta_quantizer_started_at_the_ste_with_recorded_precise_bn(tmp_path, capsys, fashion_mnist_available):
    import torch

    common = [*TINY, "-meta", "fc-grad", "-hidden", "8", "--run-dir", str(tmp_path)]
    assert main(["quantize", *common, "--meta-init-scheme", "ste", "--record-precise-bn", "2", "--name", "s"]) == 0
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["meta_init_scheme"], config["record_precise_bn"]) == ("ste", 2)
    (record,) = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= record["test_acc_precise_bn"] <= 100 and record["test_loss_precise_bn"] > 0
    snapshots = torch.load(tmp_path / "s" / "trace.pt", weights_only=True)["snapshots"]
    assert torch.count_nonzero(snapshots[0]["meta"]["net.layers.1.weight"]) == 0  # it started at the STE
    # the same weights under the paper's form are another function: reusing them across the two is refused
    assert main(["quantize", *common, "--meta-init", str(tmp_path / "s"), "--name", "p"]) == 1
    assert "'init_scheme': 'ste'" in capsys.readouterr().err
    assert main(["quantize", *common, "--meta-init-scheme", "zero"]) == 2
    assert "invalid choice: 'zero'" in capsys.readouterr().err
