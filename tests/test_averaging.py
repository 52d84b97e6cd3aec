"""The moving average of the weights: its update against a hand computation, fit's use of it (what is averaged,
what is evaluated, what is saved), exact resume, and the model that eval and export read from a run."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import metaquant as mq
from metaquant.averaging import check_ema_decay, ema_model
from metaquant.batchnorm import recompute_batchnorm_stats
from metaquant.experiments.config import RunConfig
from metaquant.experiments.runs import RunDir
from metaquant.files import load_checkpoint
from metaquant.guards import StopFlag, TrainingInterrupted
from metaquant.models import extract_state_dict, load_weights
from metaquant.training import restore_fit
from tests.data.toy import toy_loaders


def _toy_data():
    train, test, _, _ = toy_loaders()
    return train, test


def _fit(model, trainer, average, train, test, **options):
    """Two epochs, BatchNorm statistics recomputed from 2 batches before each test, unless ``options`` say otherwise."""
    options = {"epochs": 2, "schedule": None, "progress": False, "precise_bn_batches": 2, **options}
    return mq.fit(model, trainer, train, test, averaged=average, **options)


def _setup(decay=0.8, on_nonfinite="raise"):
    torch.manual_seed(1)
    model = mq.quantize_(mq.models.resnet8(num_classes=3, in_channels=1))
    trainer = mq.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), on_nonfinite=on_nonfinite)
    return model, trainer, ema_model(model, decay)


# --- the update rule --------------------------------------------------------------------------------------------


def test_the_average_follows_the_ema_recursion_computed_by_hand():
    """W̄_1 = W_1, W̄_t = d·W̄_{t-1} + (1 − d)·W_t, on a quantized layer's latent weight and its bias."""
    torch.manual_seed(0)
    layer = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    average = ema_model(layer, 0.75)
    snapshots = []
    for _ in range(5):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        snapshots.append([p.detach().clone().double() for p in layer.parameters()])
        average.update_parameters(layer)
    expected = snapshots[0]
    for weights in snapshots[1:]:
        expected = [0.75 * e + 0.25 * w for e, w in zip(expected, weights)]
    for got, want in zip(average.module.parameters(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert int(average.n_averaged) == 5
    # the average is quantized like the model: its forward pass computes with Q(W̄)
    x = torch.randn(2, 4)
    w_bar, b_bar = average.module[0].weight, average.module[0].bias
    w_hat = torch.sign(w_bar)  # 1-bit DoReFa: 2·round(tanh(W) / (2·max|tanh W|) + 1/2) − 1 = sign(W)
    torch.testing.assert_close(average.module(x), F.linear(x, w_hat, b_bar))


def test_the_average_is_a_copy_that_keeps_the_trained_model_untouched():
    model, _, average = _setup()
    assert average.module is not model
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(average.module.parameters(), model.parameters()))


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.5, 1.5, math.nan, math.inf, True, "0.9", None])
def test_a_decay_outside_the_open_interval_is_refused_with_its_value(bad):
    with pytest.raises(
        ValueError, match=r"ema_decay must be a number in \(0, 1\).*got " + repr(bad).replace(".", r"\.")
    ):
        ema_model(torch.nn.Linear(2, 2), bad)


def test_zero_means_no_average_where_allowed():
    assert check_ema_decay(0, allow_zero=True) == 0.0
    with pytest.raises(ValueError, match=r"in \[0, 1\).*got 1\.0"):
        check_ema_decay(1.0, allow_zero=True)


# --- fit -------------------------------------------------------------------------------------------------------


def test_fit_averages_every_step_and_evaluates_the_average(tmp_path):
    """Oracle: the same training by hand (the trainer's steps over the same batches) with the average kept by
    hand; fit's average equals it, and the recorded test metrics are the average's, with its statistics
    recomputed, beside the trained model's."""
    train, test = _toy_data()
    model, trainer, average = _setup()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    state = _fit(model, trainer, average, train, test, run=run)

    by_hand, hand_trainer, _ = _setup()
    hand_average = None
    for epoch in range(2):
        train.set_epoch(epoch)
        by_hand.train()
        for x, y in train:
            hand_trainer.step(lambda x=x, y=y: F.cross_entropy(by_hand(x), y))
            weights = [p.detach().clone() for p in by_hand.parameters()]
            hand_average = (
                weights if hand_average is None else [0.8 * a + 0.2 * w for a, w in zip(hand_average, weights)]
            )
    for (name, got), want in zip(average.module.named_parameters(), hand_average):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    for got, want in zip(model.parameters(), by_hand.parameters()):
        assert torch.equal(got, want)  # averaging changes nothing in the training
    assert int(average.n_averaged) == 10 == state.iteration

    train.set_epoch(1)
    reference = ema_model(by_hand, 0.8)
    reference.load_state_dict(average.state_dict())
    recompute_batchnorm_stats(reference.module, train, 2)
    averaged_result = mq.evaluate(reference.module, test)
    recompute_batchnorm_stats(by_hand, train, 2)
    trained_result = mq.evaluate(by_hand, test)
    last = json.loads(run.metrics_path.read_text().splitlines()[-1])
    assert (last["test_loss"], last["test_acc"]) == (averaged_result["loss"], averaged_result["top1"])
    assert (last["trained_test_loss"], last["trained_test_acc"]) == (trained_result["loss"], trained_result["top1"])
    assert state.last_acc == last["test_acc"]
    assert last["test_loss"] != last["trained_test_loss"]  # two different models were evaluated

    # the checkpoint keeps both; a model loaded from it (eval, export, --init) gets the average
    checkpoint = load_checkpoint(run.checkpoint_path)
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in model.state_dict().items())
    loaded = mq.quantize_(mq.models.resnet8(num_classes=3, in_channels=1))
    load_weights(loaded, checkpoint)
    for k, v in average.module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert mq.evaluate(loaded, test)["loss"] == last["test_loss"]


def test_skipped_steps_are_not_averaged():
    train, test = _toy_data()
    model, trainer, average = _setup(on_nonfinite="skip")
    poisoned = list(train)
    x, y = poisoned[1]
    poisoned[1] = (torch.full_like(x, float("nan")), y)  # the second step's loss is NaN: skipped
    state = _fit(model, trainer, average, poisoned, test, epochs=1)
    assert state.skipped == 1 and state.iteration == 5
    assert int(average.n_averaged) == 4


@pytest.mark.parametrize("kind", ["ste", "multifc"])
def test_steps_the_fp16_loss_scaler_skipped_are_not_averaged(kind):
    """A step whose scaled gradients overflow makes no update; averaging its unchanged weights once more would pull
    the average towards them. Oracle: the EMA recursion by hand over the weights after the steps that updated."""
    torch.manual_seed(0)
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = (
        mq.Trainer(model, optimizer, grad_scaler=scaler)
        if kind == "ste"
        else mq.MetaQuant(model, optimizer, mq.MultiFC(hidden=4), grad_scaler=scaler)
    )
    average = ema_model(model, 0.5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 1, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
    seen = []  # the weights each step starts from, then the final ones

    def criterion(logits, y, x):
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = F.cross_entropy(logits, y)
        return loss * 1e37 if len(seen) == 3 else loss  # step 3: finite loss, its scaled gradients overflow

    state = mq.fit(
        model,
        trainer,
        batches,
        batches[:1],
        epochs=1,
        schedule=None,
        progress=False,
        averaged=average,
        criterion=criterion,
    )
    seen.append([p.detach().clone() for p in model.parameters()])
    assert trainer.overflow_steps == 1 and trainer.skipped_steps == 0 and state.skipped == 0
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))  # step 3 changed nothing
    assert int(average.n_averaged) == 3
    expected = seen[1]  # W̄ after step 1 is W_1; steps 2 and 4 update it; step 3 does not
    for weights in (seen[2], seen[4]):
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, weights)]
    for got, want in zip(average.module.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fit_refuses_an_average_that_is_not_an_averaged_model():
    train, test = _toy_data()
    model, trainer, _ = _setup()
    with pytest.raises(TypeError, match="averaged must be a torch.optim.swa_utils.AveragedModel, got Sequential"):
        _fit(model, trainer, torch.nn.Sequential(), train, test)


def test_a_stopped_fit_resumes_to_the_same_average(tmp_path):
    train, test = _toy_data()
    model, trainer, average = _setup()
    _fit(model, trainer, average, train, test)

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    model2, trainer2, average2 = _setup()
    stop = StopFlag()

    def stop_at_step_3(_epoch):  # on_epoch_end(0) runs before training; then the stop comes at step 3
        original_step, steps = trainer2.step, []

        def step(closure):
            steps.append(1)
            if len(steps) == 3:
                stop.request(15)
            return original_step(closure)

        trainer2.step = step

    with pytest.raises(TrainingInterrupted, match="epoch 1, step 3"):
        _fit(model2, trainer2, average2, train, test, run=run, stop=stop, on_epoch_end=stop_at_step_3)
    model3, trainer3, average3 = _setup()
    checkpoint = load_checkpoint(run.checkpoint_path)
    state = restore_fit(checkpoint, trainer3, model=model3, averaged=average3)
    assert int(average3.n_averaged) == 3
    _fit(model3, trainer3, average3, train, test, state=state)
    for k, v in average.state_dict().items():
        assert torch.equal(average3.state_dict()[k], v), k


def test_restore_fit_refuses_a_missing_or_unexpected_average(tmp_path):
    train, test = _toy_data()
    model, trainer, average = _setup()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    _fit(model, trainer, average, train, test, epochs=1, run=run)
    with pytest.raises(ValueError, match="the checkpoint holds a weight average: pass the averaged model"):
        restore_fit(load_checkpoint(run.checkpoint_path), _setup()[1])
    plain = RunDir(tmp_path / "plain")
    plain.path.mkdir()
    model, trainer, _ = _setup()
    _fit(model, trainer, None, train, test, epochs=1, run=plain)
    _, trainer, average = _setup()
    with pytest.raises(ValueError, match="an averaged model was given, but the checkpoint holds no weight average"):
        restore_fit(load_checkpoint(plain.checkpoint_path), trainer, averaged=average)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"module.w": torch.ones(1)}, "not an averaged model's state_dict"),
        ({"n_averaged": torch.tensor(1)}, "holds no 'module.' weights"),
        ({"n_averaged": torch.tensor(1), "w": torch.ones(1)}, "holds no 'module.' weights"),
        ("weights", "not an averaged model's state_dict"),
    ],
)
def test_a_malformed_average_in_a_checkpoint_is_named(entry, message):
    with pytest.raises(ValueError, match=message):
        extract_state_dict({"model": {"w": torch.zeros(1)}, "averaged": entry})


# --- runs: configuration, command line, eval ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_the_run_configuration_refuses_a_bad_decay(bad):
    with pytest.raises(ValueError, match=r"ema_decay must be a number in \[0, 1\)"):
        RunConfig(ema_decay=bad)


def test_the_cli_refuses_a_bad_decay_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "metaquant", "quantize", "--ema-decay", "1.5", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "ema_decay must be a number in [0, 1)" in done.stderr and "got 1.5" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_with_an_average_records_both_models_and_eval_reads_the_average(tmp_path, tiny_mnist):
    from metaquant.experiments.cli import main

    args = [*tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "2", "--no-progress", "--precise-bn", "1", "--lr", "0.05"]
    assert main(["quantize", *args, "--ema-decay", "0.5", "--run-dir", str(tmp_path), "--name", "ema"]) == 0
    run = RunDir(tmp_path / "ema")
    metrics = run.metrics()
    assert all("trained_test_acc" in m for m in metrics) and len(metrics) == 2
    assert metrics[-1]["test_loss"] != metrics[-1]["trained_test_loss"]  # two different models were measured
    checkpoint = load_checkpoint(run.checkpoint_path)
    assert int(checkpoint["averaged"]["n_averaged"]) == 4  # 64 images, batch 32, 2 epochs
    # `metaquant eval` on the run measures the delivered model, the average: the recorded accuracy again
    from metaquant.experiments.artifacts import evaluate_artifact, export_run

    result = evaluate_artifact(run.path, device="cpu")
    assert result["top1"] == result["recorded"] == metrics[-1]["test_acc"]
    assert result["loss"] == pytest.approx(metrics[-1]["test_loss"], rel=1e-6)
    # and so does the packed 1-bit export
    packed, _, _ = export_run(run.path)
    assert evaluate_artifact(packed, device="cpu")["loss"] == pytest.approx(metrics[-1]["test_loss"], rel=1e-5)


@pytest.mark.parametrize("before, after", [(0.5, 0.0), (0.0, 0.5)])
def test_resume_refuses_a_config_that_adds_or_drops_the_average_and_names_it(tmp_path, tiny_mnist, before, after):
    from metaquant.experiments.cli import main

    args = [*tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "2", "--no-progress", "--run-dir", str(tmp_path)]
    assert main(["quantize", *args, "--ema-decay", str(before), "--name", "run"]) == 0
    run = RunDir(tmp_path / "run")
    run.done_path.unlink()  # as if killed before it marked itself finished: resume reads the checkpoint
    checkpoint = load_checkpoint(run.checkpoint_path)
    config = json.loads(run.config_path.read_text())
    config["ema_decay"] = after
    run.config_path.write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "metaquant", "quantize", "--resume", str(run.path), "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"sets ema_decay={after!r}" in done.stderr and f"put ema_decay back to {before!r}" in done.stderr
    # nothing was changed: the checkpoint is the one the run left
    assert all(torch.equal(v, load_checkpoint(run.checkpoint_path)["model"][k]) for k, v in checkpoint["model"].items())


def test_an_average_evaluated_without_recomputed_statistics_is_warned_about(caplog):
    train, test = _toy_data()
    model, trainer, average = _setup()
    with caplog.at_level("WARNING", logger="metaquant.training"):
        _fit(model, trainer, average, train, test, epochs=1, precise_bn_batches=0)
    assert "evaluated with the trained model's BatchNorm statistics" in caplog.text
    caplog.clear()
    model, trainer, average = _setup()
    with caplog.at_level("WARNING", logger="metaquant.training"):
        _fit(model, trainer, average, train, test, epochs=1)
    assert "BatchNorm statistics" not in caplog.text
