"""Quantized activations in the application: the options and their checks, names and labels, the report's column,
the preset, and a tiny run that trains, resumes exactly and exports."""

import json
import re
import signal

import pytest
import torch

import metaquant as mq
from metaquant.experiments.builders import build_model, prepare_session
from metaquant.experiments.cli import main
from metaquant.experiments.config import RunConfig
from metaquant.experiments.lifecycle import execute
from metaquant.experiments.naming import backward_label, default_run_name
from metaquant.experiments.presets import resolve_preset
from metaquant.experiments.report import collect, summarize
from metaquant.experiments.runs import RunDir
from metaquant.experiments.sweep import load_sweep, plan, pretrain_config, pretrain_path
from metaquant.experiments.tables import write_table
from metaquant.guards import StopFlag, TrainingInterrupted
from tests.conftest import REPO

RESULTS = REPO / "docs" / "results"


@pytest.mark.parametrize("quantizer,bits", [("sign", 1), ("lsq", 4), ("pact", 4)])
def test_an_activation_quantizer_without_a_width_gets_its_own_and_stores_it(quantizer, bits):
    config = RunConfig.for_task("quantize", act_quantizer=quantizer.upper())
    assert (config.act_quantizer, config.act_bits) == (quantizer, bits)
    assert RunConfig.from_dict(config.to_dict()) == config
    assert config.activations() is not None and config.activations().bits == bits


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"act_bits": 4}, r"^`act_bits` 4 needs `act_quantizer` \(sign, lsq, pact\); without it the activations"),
        ({"act_backward": "approxsign"}, "^`act_backward` 'approxsign' needs `act_quantizer`"),
        ({"act_first_layer_bits": None}, "^`act_first_layer_bits` None needs `act_quantizer`"),
        ({"act_quantizer": "xnor"}, "^`act_quantizer` 'xnor' is not supported; allowed: sign, lsq, pact"),
        (
            {"act_quantizer": "sign", "act_bits": 2},
            "^`act_bits` 2 is not supported by `act_quantizer` 'sign'; allowed: 1$",
        ),
        (
            {"act_quantizer": "lsq", "act_bits": 9},
            r"^`act_bits` 9 is not supported by `act_quantizer` 'lsq'; allowed: 2\.\.8",
        ),
        ({"act_quantizer": "pact", "act_bits": True}, "^`act_bits` True is not supported"),
        (
            {"act_quantizer": "sign", "act_backward": "magic"},
            "^`act_backward` 'magic' is not supported; allowed: ste, app",
        ),
        ({"act_quantizer": "lsq", "act_backward": "approxsign"}, "^`act_backward` 'approxsign' is a gradient of sign"),
        (
            {"act_quantizer": "lsq", "act_first_layer_bits": 1},
            r"^`act_first_layer_bits` 1 is not supported .*2\.\.8, or none",
        ),
        ({"act_quantizer": 4}, "^act_quantizer must be a string, got 4"),
        (
            {"task": "pretrain", "act_quantizer": "lsq"},
            "^`act_quantizer` 'lsq' applies to quantize runs, not to task 'pre",
        ),
    ],
)
def test_bad_activation_settings_are_refused_naming_the_field_and_what_is_allowed(fields, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**fields)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--act-bits", "4"], "error: --act-bits 4 needs --act-quantizer (sign, lsq, pact)"),
        (
            ["--act-quantizer", "lsq", "--act-bits", "9"],
            "--act-bits 9 is not supported by --act-quantizer 'lsq'; allowed",
        ),
        (["--act-quantizer", "lsq", "--act-backward", "approxsign"], "--act-backward 'approxsign' is a gradient of"),
        (["--act-quantizer", "xnor"], "argument --act-quantizer: invalid choice: 'xnor'"),
        (["--act-quantizer", "sign", "--act-first-layer-bits", "eight"], "expected a bit width or none, got 'eight'"),
        (["--act-quantizer", "sign", "--act-first-layer-bits", "16"], "--act-first-layer-bits 16 is not supported"),
    ],
)
def test_bad_activation_options_exit_2_with_one_line_naming_the_flag(argv, message, tmp_path, capsys):
    assert main(["quantize", *argv, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_pretrain_has_no_activation_options(capsys):
    assert main(["pretrain", "--act-quantizer", "lsq"]) == 2
    assert "unrecognized arguments: --act-quantizer lsq" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "activation quantization: --act-quantizer {sign,lsq,pact}" in help_text
    assert "--act-first-layer-bits N|none" in help_text and "(default: 8)" in help_text


def test_every_stored_run_configuration_reads_back_unchanged_with_float_activations():
    paths = sorted(RESULTS.glob("**/config.json"))
    assert len(paths) > 30
    for path in paths:
        stored = json.loads(path.read_text())
        config = RunConfig.load(path)
        assert {k: v for k, v in config.to_dict().items() if k in stored} == stored, path
        assert (config.act_quantizer, config.act_bits, config.activations()) == (None, None, None)
        assert not re.search(r"-a\d", default_run_name(config)), path


def test_names_and_labels_gain_the_activations_only_when_they_are_quantized():
    fields = {"model": "resnet20", "dataset": "cifar10", "bits": 2}
    assert default_run_name(RunConfig(**fields)) == "quantize-resnet20-cifar10-dorefa2-ste-sgd-seed0"
    assert backward_label(RunConfig(**fields)) == "STE"
    lsq = RunConfig(**fields, act_quantizer="lsq", act_bits=2)
    assert default_run_name(lsq) == "quantize-resnet20-cifar10-dorefa2-a2lsq-ste-sgd-seed0"
    assert backward_label(lsq) == "STE + A2 LSQ"
    sign = RunConfig(
        model="resnet20", estimator="multifc", optimizer="adam", act_quantizer="sign", act_backward="approxsign"
    )
    assert (
        default_run_name(sign)
        == "quantize-resnet20-fashion-mnist-dorefa1-a1sign-approxsign-multifc-ste-start-adam-seed0"
    )
    assert backward_label(sign) == "MultiFC (STE start) + A1 sign (ApproxSign)"
    pact = RunConfig(act_quantizer="pact", act_first_layer_bits=None, momentum=0.9)
    assert backward_label(pact) == "STE + A4 PACT (first layer float) + momentum 0.9"


def _finished_run(path, accuracies, **fields):
    run = RunDir.create(path, RunConfig(model="resnet20", dataset="cifar10", **fields))
    for epoch, acc in enumerate(accuracies):
        run.record_epoch({"epoch": epoch, "test_acc": acc, "train_loss": 0.5}, [])
    run.mark_done()


def _table(tmp_path, *runs):
    for name, accuracies, fields in runs:
        _finished_run(tmp_path / "runs" / name, accuracies, **fields)
    md, csv_path = write_table(summarize(collect([tmp_path / "runs"])), tmp_path / "table")
    return md.read_text().splitlines(), csv_path.read_text().splitlines()


def test_the_table_shows_the_activations_width_only_when_a_run_quantizes_them(tmp_path):
    float_only, csv_float = _table(tmp_path / "a", ("ste-trial-1", [80.0], {}))
    assert float_only[0] == (
        "| Source | Model | Dataset | Forward | Bits | Backward | Optimizer | Best Acc | Last 10 Acc | FP Acc "
        "| Trials |"
    )
    assert float_only[2].startswith("| metaquant | ResNet20 | CIFAR10 | dorefa | 1 | STE | SGD |")
    assert csv_float[0].startswith("source,model,dataset,forward,bits,backward,optimizer,")
    assert "Act Bits" not in float_only[-1]
    both, csv_both = _table(
        tmp_path / "b",
        ("ste-trial-1", [80.0], {}),
        ("lsq-trial-1", [70.0], {"bits": 2, "act_quantizer": "lsq", "act_bits": 2}),
    )
    assert both[0].startswith("| Source | Model | Dataset | Forward | Bits | Act Bits | Backward | Optimizer |")
    assert both[2].startswith("| metaquant | ResNet20 | CIFAR10 | dorefa | 1 | 32 | STE | SGD | 80.000")
    assert both[3].startswith("| metaquant | ResNet20 | CIFAR10 | dorefa | 2 | 2 | STE + A2 LSQ | SGD | 70.000")
    assert both[-1].endswith("Act Bits: the activations' bit width (32: float).")
    assert csv_both[0].startswith("source,model,dataset,forward,bits,act_bits,backward,optimizer,")
    assert csv_both[2].startswith("metaquant,ResNet20,CIFAR10,dorefa,2,2,STE + A2 LSQ,SGD,70.0000")


def test_runs_that_differ_only_in_their_activations_are_told_apart(tmp_path):
    lines, _ = _table(
        tmp_path,
        ("a-trial-1", [80.0], {"label": "STE"}),
        ("b-trial-1", [70.0], {"label": "STE", "act_quantizer": "lsq"}),
        ("c-trial-1", [60.0], {"label": "STE", "act_quantizer": "lsq", "act_first_layer_bits": None}),
    )
    assert [line.split(" | ")[5:7] for line in lines[2:5]] == [
        ["32", "STE [act_quantizer=none, act_bits=none, act_first_layer_bits=8]"],
        ["4", "STE [act_quantizer=lsq, act_bits=4, act_first_layer_bits=8]"],
        ["4", "STE [act_quantizer=lsq, act_bits=4, act_first_layer_bits=none]"],
    ]


def test_the_study_report_is_byte_identical(tmp_path, capsys):
    study = RESULTS / "fashion-mnist-full"
    assert main(["report", str(study / "runs"), "--out", str(tmp_path), "--no-figures"]) == 0
    for name in ("results.md", "results.csv"):
        assert (tmp_path / name).read_bytes() == (study / name).read_bytes(), name


def test_the_preset_lists_its_runs(tmp_path, capsys):
    spec = load_sweep(resolve_preset("fashion-mnist-act"))
    runs = plan(spec, tmp_path)
    assert main(["sweep", "fashion-mnist-act", "--run-dir", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[{i}] {run.path} (to run)" for i, run in enumerate(runs, 1)]
    found = {}
    for run in runs:
        c = run.config
        assert (c.dataset, c.epochs, c.optimizer, c.lr, c.weight_decay, c.lr_step) == (
            "fashion-mnist",
            12,
            "adam",
            1e-3,
            5e-4,
            4,
        )
        assert c.init == str(pretrain_path(tmp_path, c.model, c.dataset))
        found.setdefault((c.model, c.quantizer, c.bits, c.act_quantizer, c.act_bits, c.act_backward), set()).add(
            (c.estimator, run.trial)
        )
    every = {(e, t) for e in ("ste", "multifc") for t in (1, 2, 3)}
    assert found == {
        ("resnet20-bireal", "dorefa", 1, "sign", 1, "approxsign"): every,
        ("resnet20-bireal", "dorefa", 1, None, None, "ste"): every,
        ("resnet20", "lsq", 2, "lsq", 2, "ste"): every,
        ("resnet20", "lsq", 4, "lsq", 4, "ste"): every,
    }
    study = load_sweep(resolve_preset("fashion-mnist-full"))
    for model in ("resnet20", "resnet20-bireal"):  # the study's pre-training recipe, for each model
        ours, theirs = (
            pretrain_config(spec, model, "fashion-mnist"),
            pretrain_config(study, "resnet20", "fashion-mnist"),
        )
        assert ours.to_dict() == {**theirs.to_dict(), "model": model}
    assert any("a1-sign-approxsign" in run.path.name for run in runs)


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


def _state(run):
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("train_seconds")  # wall time, the only field allowed to differ
    return checkpoint["model"], metrics


@pytest.mark.parametrize("weights", [[], ["--quantizer", "lsq", "--bits", "4"]], ids=["dorefa1", "lsq4"])
def test_a_tiny_run_with_lsq_activations_trains_resumes_exactly_and_exports(tmp_path, tiny_mnist, capsys, weights):
    tiny = [*tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "2", "--seed", "3", "--no-progress", *weights]
    argv = ["quantize", *tiny, "--act-quantizer", "lsq", "--act-bits", "4", "--run-dir", str(tmp_path)]
    assert main([*argv, "--name", "straight"]) == 0
    straight = tmp_path / "straight"
    config = RunConfig.load(straight / "config.json")
    assert (config.act_quantizer, config.act_bits, config.act_first_layer_bits) == ("lsq", 4, 8)
    model, metrics = _state(straight)
    steps = {k: v for k, v in model.items() if k.endswith("input_quantizer.step")}
    assert len(steps) > 5 and all(model[k.replace(".step", ".initialized")] for k in steps)
    weight_steps = [k for k in model if k.endswith(".weight_step")]
    assert len(weight_steps) == (len(steps) if weights else 0)  # one per quantized layer, as the input quantizers

    # the optimizer is built once the quantizers are there: it trains their steps
    session = prepare_session(config)
    trained = {id(p) for group in session.trainer.optimizer.param_groups for p in group["params"]}
    quantizers = [m for n, m in session.model.named_modules() if n.endswith("input_quantizer")]
    assert quantizers and all(id(q.step) in trained for q in quantizers)
    assert all(id(p) in trained for p in mq.layers.learned_weight_parameters(session.model).values())

    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted):
        execute(config, stopped, progress=False, stop=_StopAtStep(3))  # within the second epoch
    assert main(["quantize", "--resume", str(stopped)]) == 0
    resumed_model, resumed_metrics = _state(stopped)
    assert resumed_model.keys() == model.keys() and all(torch.equal(model[k], resumed_model[k]) for k in model)
    assert resumed_metrics == metrics

    # fine-tuning it: its learned steps are loaded with its weights
    tuned = RunConfig.from_dict({**config.to_dict(), "init": str(straight)})
    tuned_model = build_model(tuned, num_classes=10, in_channels=1, image_size=28).state_dict()
    assert all(torch.equal(tuned_model[k], model[k]) for k in [*steps, *weight_steps])
    assert main([*argv, "--init", str(straight), "-n", "1", "--name", "tuned"]) == 0

    # the exported file holds the activation quantizers: it scores what the run recorded
    assert main(["export", str(straight)]) == 0
    capsys.readouterr()
    assert main(["eval", str(straight / "model.safetensors"), "--device", "cpu"]) == 0
    final = metrics[-1]["test_acc"]
    assert f"test accuracy {final:.2f}% top-1" in capsys.readouterr().out


def test_the_bireal_w1a1_model_has_sign_activations_but_on_its_input():
    config = RunConfig(model="resnet20-bireal", act_quantizer="sign", act_backward="approxsign")
    model = build_model(config, num_classes=10, in_channels=1, image_size=28)
    quantizers = [m for n, m in model.named_modules() if n.endswith("input_quantizer")]
    assert [q.spec() for q in quantizers[:2]] == [
        {"kind": "lsq", "bits": 8, "signed": None},
        {"kind": "sign", "bits": 1, "backward": "approxsign"},
    ]
    assert len({repr(q.spec()) for q in quantizers[1:]}) == 1
