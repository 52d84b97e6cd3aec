"""The command line: tiny real runs, and bad options that exit non-zero with one line and no traceback."""

import json
import subprocess
import sys

import pytest

from metaquant.experiments.cli import main

TINY = ["-m", "resnet8", "--train-size", "64", "--test-size", "50", "-bs", "32", "--no-progress", "-n", "1"]


@pytest.mark.parametrize("quantizer", [["-q", "uniform-channel"], ["-q", "uniform-group", "--group-size", "16"]])
def test_quantize_with_finer_weight_scales(tmp_path, quantizer, fashion_mnist_available):
    assert main(["quantize", *TINY, *quantizer, "-bw", "4", "--run-dir", str(tmp_path), "--name", "r"]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["quantizer"] == quantizer[1] and config["group_size"] == (16 if len(quantizer) > 2 else None)


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
        (
            ["quantize", "-q", "uniform", "-bw", "4", "--group-size", "8"],
            "--group-size 8 applies to --quantizer 'uniform-group' only",
        ),
        (["quantize", "-q", "uniform-group", "-bw", "4", "--group-size", "-1"], "group_size must be an integer >= 1"),
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
    paper = ["--meta-init-scheme", "paper", "--name", "p"]
    assert main(["quantize", *common, "--meta-init", str(tmp_path / "s"), *paper]) == 1
    assert "'init_scheme': 'ste'" in capsys.readouterr().err
    assert main(["quantize", *common, "--meta-init-scheme", "zero"]) == 2
    assert "invalid choice: 'zero'" in capsys.readouterr().err


# The command's options as RunConfig.for_task's fields: what each argument set must write to config.json.
SAME_AS_FOR_TASK = [
    (["pretrain"], {}),
    (["quantize"], {}),
    (
        ["pretrain", "-m", "ResNet8", "-d", "mnist", "-n", "3", "--lr", "0.05", "-bs", "64", "--no-download"],
        {"model": "resnet8", "dataset": "mnist", "epochs": 3, "lr": 0.05, "batch_size": 64, "download": False},
    ),
    (
        ["pretrain", "-o", "adam", "--momentum", "0", "--lr-schedule", "step", "-ad", "5", "--precise-bn", "4"],
        {"optimizer": "adam", "momentum": 0.0, "lr_schedule": "step", "lr_step": 5, "precise_bn_batches": 4},
    ),
    (
        ["quantize", "--init", "runs/fp", "-q", "bwn", "-meta", "MLPFC", "-hidden", "8", "--fix-meta"],
        {"init": "runs/fp", "quantizer": "bwn", "estimator": "multifc", "hidden_size": 8, "freeze_meta_epoch": 0},
    ),
    (
        [
            "quantize",
            "-meta",
            "lstmfc",
            "--fix-meta",
            "--fix-meta-epoch",
            "2",
            "--skip-nonfinite",
            "--max-skipped",
            "3",
        ],
        {"estimator": "lstmfc", "freeze_meta_epoch": 2, "on_nonfinite": "skip", "max_skipped": 3},
    ),
    (
        ["quantize", "-meta", "ewgs", "--distill-weight", "0.5", "--teacher", "runs/t", "--weight-decay", "5e-4"],
        {"estimator": "ewgs", "distill_weight": 0.5, "teacher": "runs/t", "weight_decay": 5e-4},
    ),
    (["quantize", "--act-quantizer", "lsq", "--act-bits", "4"], {"act_quantizer": "lsq", "act_bits": 4}),
    (
        ["quantize", "--act-quantizer", "Sign", "--act-backward", "approxsign", "--act-first-layer-bits", "none"],
        {"act_quantizer": "sign", "act_bits": 1, "act_backward": "approxsign", "act_first_layer_bits": None},
    ),
    (
        ["quantize", "--act-quantizer", "pact", "--act-first-layer-bits", "4"],
        {"act_quantizer": "pact", "act_first_layer_bits": 4},
    ),
]


@pytest.mark.parametrize("argv,fields", SAME_AS_FOR_TASK, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_the_command_writes_the_config_of_for_task(argv, fields, tmp_path, monkeypatch):
    """``metaquant pretrain|quantize ARGS`` runs ``RunConfig.for_task(task, **ARGS)``: the same config.json."""
    from metaquant.experiments import cli
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.lifecycle import RunResult
    from metaquant.experiments.runs import RunDir

    def write_config(config, run_dir, **_):  # the run's directory as execute() makes it, without training
        RunDir.create(run_dir, config)
        return RunResult(run_dir=run_dir, final_acc=0.0, best_acc=0.0, epochs=0)

    monkeypatch.setattr(cli, "execute", write_config)
    assert main([*argv, "--run-dir", str(tmp_path), "--name", "r", "--no-progress"]) == 0
    written = json.loads((tmp_path / "r" / "config.json").read_text())
    assert written == RunConfig.for_task(argv[0], **fields).to_dict()


def test_pretrain_has_no_quantization_options_and_help_shows_each_tasks_defaults(capsys):
    assert main(["pretrain", "--estimator", "ste"]) == 2
    assert "unrecognized arguments: --estimator ste" in capsys.readouterr().err
    helps = {}
    for task in ("pretrain", "quantize"):
        with pytest.raises(SystemExit):
            main([task, "--help"])
        helps[task] = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert (
        "--lr LR initial learning rate (default: 0.1)" in helps["pretrain"] and "--estimator" not in helps["pretrain"]
    )
    assert "--lr LR initial learning rate (default: 0.001)" in helps["quantize"]
    assert (
        "number of epochs (default: 100)" in helps["quantize"]
        and "meta quantizer (with --estimator" in helps["quantize"]
    )


def test_messages_name_parameters_and_the_command_prints_its_flags(tmp_path, capsys):
    from metaquant.experiments.builders import init_path
    from metaquant.experiments.cli import build_parser
    from metaquant.experiments.lifecycle import resume
    from metaquant.experiments.options import parameter_flags, to_flags

    with pytest.raises(FileNotFoundError, match=r"^`init` .*nope.pt: no such checkpoint file"):
        init_path(str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match=r"^`run_dir` .*nowhere: no run there"):
        resume(tmp_path / "nowhere")
    assert main(["quantize", "--resume", str(tmp_path / "nowhere")]) == 1
    assert f"metaquant: error: --resume {tmp_path / 'nowhere'}: no run there" in capsys.readouterr().err

    flags = parameter_flags(build_parser().commands.values())
    expected = {"out": "--out", "meta_init": "--meta-init", "batch_size": "--batch-size", "estimator": "--estimator"}
    assert {name: flags[name] for name in expected} == expected
    assert flags["precise_bn_batches"] == "--precise-bn" and flags["from_previous"] == "--from-previous"
    message = "`init` x: the init model; give `teacher` or `nothing_known`"
    assert to_flags(message, flags) == "--init x: the init model; give --teacher or `nothing_known`"


def test_eval_with_precise_bn_says_how_many_training_batches_it_used(tmp_path, tiny_mnist, capsys, caplog):
    # 64 training images in batches of 32: two batches, whatever --precise-bn asks for
    args = ["quantize", *tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "1", "--no-progress"]
    assert main([*args, "--run-dir", str(tmp_path), "--name", "q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q"), "--device", "cpu", "--precise-bn", "100"]) == 0
    assert (
        "BatchNorm statistics recomputed from 2 training batches (64 examples; --precise-bn asked for 100, the "
        "training set has no more)" in capsys.readouterr().out
    )
    assert "num_batches is 100 but only 2 batches were available" in caplog.text
    assert main(["eval", str(tmp_path / "q"), "--device", "cpu", "--precise-bn", "1"]) == 0
    assert "BatchNorm statistics recomputed from 1 training batches (32 examples)" in capsys.readouterr().out
