"""Callbacks of the training loop: the order of the hooks, what they add to records and checkpoints, the
checkpoints they ask for, and fit's keywords against the same built-in callbacks given as objects."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import metaquant as mq
from metaquant.callbacks import (
    CheckpointExtras,
    EpochEndHook,
    ExtraMetrics,
    LearningRateSchedule,
    MidEpochCheckpoints,
    PreciseBatchNorm,
    SkipLimit,
    WeightAverage,
)
from metaquant.experiments.config import RunConfig
from metaquant.experiments.runs import RunDir
from metaquant.experiments.trace import MetaTrace
from metaquant.files import load_checkpoint
from metaquant.guards import StopFlag, TrainingInterrupted
from metaquant.loop import Callback
from metaquant.training import keyword_callbacks, precise_bn_metrics


def _data(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def _model(bn=False):
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(8)] if bn else []
    return mq.quantize_(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), *norm, nn.ReLU(), nn.Linear(8, 3)))


def _batches(n=8):
    return list(DataLoader(_data(n), batch_size=4))


class Recorder(Callback):
    """Writes down every hook call, with where the loop stands."""

    def __init__(self):
        self.events = []

    def on_fit_start(self, loop):
        self.events.append(("fit_start", loop.state.epoch))

    def on_epoch_start(self, loop):
        self.events.append(("epoch_start", loop.state.epoch))

    def on_step_end(self, loop, step):
        self.events.append(("step_end", loop.state.iteration, step.updated))

    def before_evaluation(self, loop, network):
        self.events.append(("before_evaluation", network is loop.model))

    def on_evaluate(self, loop, test):
        self.events.append(("evaluate", loop.state.epoch))
        return {"seen_steps": float(loop.state.iteration)}

    def on_epoch_end(self, loop, record):
        self.events.append(("epoch_end", loop.state.epoch, record["epoch"]))


def test_a_callback_sees_every_step_and_epoch_in_order():
    model = _model()
    recorder = Recorder()
    state = mq.fit(
        model,
        mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)),
        _batches(),
        _batches(),
        epochs=2,
        schedule=None,
        progress=False,
        callbacks=[recorder],
    )
    assert state.iteration == 4
    epoch = [("before_evaluation", True), ("evaluate", 0), ("epoch_end", 1, 0)]
    assert recorder.events == [
        ("fit_start", 0),
        ("epoch_start", 0),
        ("step_end", 1, True),
        ("step_end", 2, True),
        *epoch,
        ("epoch_start", 1),
        ("step_end", 3, True),
        ("step_end", 4, True),
        ("before_evaluation", True),
        ("evaluate", 1),
        ("epoch_end", 2, 1),
    ]


def test_a_callbacks_metrics_land_in_the_record_after_the_built_in_fields(tmp_path):
    model = _model(bn=True)
    batches = _batches()
    run = RunDir.create(tmp_path / "run", RunConfig())
    records = []

    class Metrics(Callback):
        def on_evaluate(self, loop, test):
            return {"test_error": 100.0 - test["top1"]}

        def on_epoch_end(self, loop, record):
            records.append(record)

    mq.fit(
        model,
        mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)),
        batches,
        batches,
        epochs=2,
        schedule=None,
        run=run,
        progress=False,
        extra_metrics=precise_bn_metrics(batches, batches, 1),
        callbacks=[Metrics()],
    )
    written = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert written == records
    assert list(written[0])[-3:] == ["test_loss_precise_bn", "test_acc_precise_bn", "test_error"]
    assert [r["test_error"] for r in written] == [100.0 - r["test_acc"] for r in written]


class Counter(Callback):
    """A callback with a state of its own in each checkpoint: the number of steps it saw."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, loop, step):
        self.steps += 1

    def checkpoint_state(self):
        return {"counter": self.steps}

    def load_checkpoint_state(self, checkpoint):
        self.steps = checkpoint["counter"]


def test_a_stop_checkpoint_holds_the_callbacks_state_after_its_step_and_resumes_it(tmp_path):
    model = _model()
    batches = _batches(16)
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    run = RunDir.create(tmp_path / "run", RunConfig())
    stop, counter = StopFlag(), Counter()

    class StopAtStep3(Callback):
        def on_step_end(self, loop, step):
            if loop.state.iteration == 3:
                stop.request(15)

    options = {"epochs": 2, "schedule": None, "run": run, "progress": False}
    with pytest.raises(TrainingInterrupted, match="at epoch 1, step 3"):
        mq.fit(model, trainer, batches, batches, stop=stop, callbacks=[StopAtStep3(), counter], **options)
    checkpoint = load_checkpoint(run.checkpoint_path)
    assert checkpoint["counter"] == 3 and checkpoint["fit"]["batch"] == 3
    resumed = Counter()
    state = mq.restore_fit(checkpoint, trainer, model=model)
    resumed.load_checkpoint_state(checkpoint)
    mq.fit(model, trainer, batches, batches, state=state, callbacks=[resumed], **options)
    assert resumed.steps == 8 and load_checkpoint(run.checkpoint_path)["counter"] == 8


def test_a_callback_asks_for_a_mid_epoch_checkpoint(tmp_path):
    model = _model()
    batches = _batches(16)
    run = RunDir.create(tmp_path / "run", RunConfig())
    positions = []

    class AfterStep2(Callback):
        def on_step_end(self, loop, step):
            if loop.state.batch == 2:
                loop.request_checkpoint()

    class Watch(Callback):
        def on_step_end(self, loop, step):
            if run.checkpoint_path.exists():
                positions.append(load_checkpoint(run.checkpoint_path)["fit"]["batch"])

    mq.fit(
        model,
        mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)),
        batches,
        batches,
        epochs=1,
        schedule=None,
        run=run,
        progress=False,
        callbacks=[AfterStep2(), Watch()],
    )
    # written after step 2, once every callback's hook ran (Watch saw none at step 2)
    assert positions == [2, 2]


def test_meta_trace_snapshots_a_run_as_a_callback(tmp_path):
    model = _model()
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    trace = MetaTrace(tmp_path / "trace.pt", epochs=3)
    batches = _batches()
    mq.fit(model, trainer, batches, batches, epochs=3, schedule=None, progress=False, callbacks=[trace])
    assert sorted(torch.load(tmp_path / "trace.pt")["snapshots"]) == [0, 1, 2, 3]


def test_mid_epoch_checkpoints_need_a_positive_interval():
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1, got 0"):
        MidEpochCheckpoints(0)


def _run_everything(tmp_path, name, as_objects):
    """Three epochs using every built-in callback, from fit's keywords or as the same objects."""
    model = _model(bn=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = mq.MetaQuant(model, optimizer, mq.MultiFC(hidden=4), meta_lr=1e-3, on_nonfinite="skip")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    average = mq.ema_model(model, 0.7)
    loader = DataLoader(_data(24), batch_size=4, shuffle=True)  # draws from the global generator
    test = _batches()
    run = RunDir.create(tmp_path / name, RunConfig())
    done = []
    options = {
        "schedule": lambda epoch: 0.9**epoch,
        "scheduler": scheduler,
        "scheduler_interval": "step",
        "precise_bn_batches": 2,
        "averaged": average,
        "extra_metrics": precise_bn_metrics(loader, test, 1),
        "max_skipped": 5,
        "checkpoint_every": 4,
        "extra_checkpoint": lambda: {"config": {"name": "everything"}},
        "on_epoch_end": done.append,
    }
    if as_objects:
        callbacks = [
            SkipLimit(5),
            PreciseBatchNorm(2),
            ExtraMetrics(options["extra_metrics"]),
            LearningRateSchedule(options["schedule"], scheduler, "step"),
            WeightAverage(average),
            MidEpochCheckpoints(4),
            CheckpointExtras(options["extra_checkpoint"]),
            EpochEndHook(done.append),
        ]
        assert [type(c) for c in callbacks] == [type(c) for c in keyword_callbacks(**options)]
        options = {"schedule": None, "callbacks": callbacks}
    torch.manual_seed(3)
    writes = []
    original = run.__class__.record_epoch

    def record_epoch(self, record, losses):
        writes.append(load_checkpoint(self.checkpoint_path) if self.checkpoint_path.exists() else None)
        original(self, record, losses)

    run.record_epoch = record_epoch.__get__(run)
    state = mq.fit(model, trainer, loader, test, epochs=3, run=run, progress=False, **options)
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    for record in metrics:
        record.pop("train_seconds")
    return state, metrics, run.loss_path.read_text(), load_checkpoint(run.checkpoint_path), writes, done, model


def _assert_same(a, b, where="checkpoint"):
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


def test_fits_keywords_equal_the_same_built_in_callbacks_given_as_objects(tmp_path):
    keywords = _run_everything(tmp_path, "keywords", as_objects=False)
    objects = _run_everything(tmp_path, "objects", as_objects=True)
    state, metrics, losses, checkpoint, mid_epoch, done, model = keywords
    assert state == objects[0] and metrics == objects[1] and losses == objects[2]
    _assert_same(checkpoint, objects[3])
    _assert_same(mid_epoch, objects[4], "mid-epoch checkpoints")
    assert done == objects[5] == [0, 1, 2, 3]
    _assert_same(model.state_dict(), objects[6].state_dict(), "model")
    assert {"scheduler", "averaged", "config"} <= set(checkpoint) and "trained_test_acc" in metrics[0]
    assert list(checkpoint)[-3:] == ["scheduler", "averaged", "config"]
