"""The main job, ``metaquant demo``: its runs, its table, and a second call that only reprints it."""

import dataclasses
import json

import pytest

from metaquant.experiments.cli import main
from metaquant.experiments.demo import DemoConfig
from metaquant.experiments.runs import RunDir

TINY = ["--train-size", "256", "--test-size", "100", "--pretrain-epochs", "1", "--quantize-epochs", "1"]


def test_ste_and_metaquant_share_one_recipe_from_the_pretrained_model(tmp_path):
    stages = DemoConfig(run_dir=str(tmp_path)).stages()
    assert list(stages) == ["full precision", "full precision, tuned", "STE", "MetaQuant (MultiFC)"]
    (fp_dir, fp), (_, tuned), (ste_dir, ste), (_, meta) = stages.values()
    assert fp.task == "pretrain" and ste.task == meta.task == "quantize"
    assert ste.init == meta.init == str(fp_dir) and (ste.quantizer, ste.bits) == ("dorefa", 1)
    # "same recipe": the two quantization runs differ only in the backward method and its own settings
    differ = {f.name for f in dataclasses.fields(ste) if getattr(ste, f.name) != getattr(meta, f.name)}
    assert differ <= {"estimator", "hidden_size", "num_fc", "meta_lr"} and "estimator" in differ
    assert (fp.train_size, fp.test_size, fp.seed) == (ste.train_size, ste.test_size, ste.seed) == (10_000, 2_000, 0)
    assert ste_dir.parent == fp_dir.parent == tmp_path
    # the reference: float weights with the 1-bit runs' start, epochs and recipe, and nothing else different
    assert {f.name for f in dataclasses.fields(ste) if getattr(ste, f.name) != getattr(tuned, f.name)} == {"task"}
    assert tuned.task == "pretrain" and tuned.epochs == ste.epochs != fp.epochs


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("train_size", 0, "train_size must be an integer > 0, got 0"),
        ("quantize_epochs", -1, "epochs must be an integer > 0, got -1"),
        ("device", "tpu", "device 'tpu' is not supported; allowed: auto, cpu, cuda, cuda:N"),
    ],
)
def test_bad_sizes_are_refused_when_the_config_is_made(field, value, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**{field: value})
    option = "--" + field.replace("_", "-")
    assert main(["demo", "--run-dir", str(tmp_path), option, str(value)]) == 2
    err = capsys.readouterr().err
    assert f"metaquant demo: error: {message}" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_demo_runs_three_runs_prints_them_and_reuses_them(tmp_path, capsys, fashion_mnist_available):
    argv = ["demo", "--run-dir", str(tmp_path), *TINY, "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    names = {
        "full precision": "pretrain",
        "full precision, tuned": "pretrain-tuned",
        "STE": "quantize-ste",
        "MetaQuant (MultiFC)": "quantize-multifc",
    }
    finals = {}
    for name, folder in names.items():
        run = RunDir(tmp_path / folder)
        assert run.is_done() and len(run.metrics()) == 1
        finals[name] = run.metrics()[-1]["test_acc"]
        (row,) = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert f"{finals[name]:.2f}%" in row and str(tmp_path / folder) in row
    # the 1-bit models are measured against the float model of the same training, not against their start
    best = max(("STE", "MetaQuant (MultiFC)"), key=finals.__getitem__)
    gap = finals[best] - finals["full precision, tuned"]
    said = f"{abs(gap):.2f} points {'above' if gap > 0 else 'under'}" if gap else "level with"
    assert f"The better 1-bit model ({best}) is {said} the float model trained as long" in out
    assert "metaquant sweep fashion-mnist-full" in out  # where the paper-protocol comparison lives
    assert json.loads((tmp_path / "quantize-ste" / "config.json").read_text())["init"] == str(tmp_path / "pretrain")
    # a second call trains nothing and prints the same table
    before = {p: p.read_bytes() for p in tmp_path.rglob("metrics.jsonl")}
    assert main(argv) == 0
    assert capsys.readouterr().out == out
    assert {p: p.read_bytes() for p in tmp_path.rglob("metrics.jsonl")} == before
    # a stage's run made with other settings (an earlier demo's, with the paper's start) is not shown as this one
    stored = tmp_path / "quantize-multifc" / "config.json"
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "meta_init_scheme": "paper"}))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'quantize-multifc'} holds a run of another configuration (meta_init_scheme differ" in err
    assert "Traceback" not in err
