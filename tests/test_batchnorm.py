"""Precise BatchNorm statistics against an independent computation: the layers' inputs gathered by hand."""

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.batchnorm import (
    batches_to_read,
    batchnorm_layers,
    recompute_batchnorm_stats,
    recompute_batchnorm_stats_counted,
)
from metaquant.experiments.runs import RunDir
from metaquant.export import materialize
from metaquant.training import precise_bn_metrics
from tests.data.toy import toy_loaders


def _batches(n=5, size=6, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, *shape, generator=g) * 3 + 1, torch.randint(0, 3, (size,), generator=g)) for _ in range(n)
    ]


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),  # off during the pass: the statistics are those of the evaluated network
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5),
        nn.Flatten(2),  # [B, 5, 16]: BatchNorm1d over a length dimension
        nn.BatchNorm1d(5),
        nn.Flatten(),
        nn.Linear(80, 3),
    )
    for m in net.modules():  # statistics and affine parameters away from their defaults
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net


def _oracle_stats(net, batches):
    """Each BatchNorm layer's input over all batches, the layers normalising with batch statistics, as F does."""
    inputs = {i: [] for i, m in enumerate(net) if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for x, _ in batches:
        h = x
        for i, m in enumerate(net):
            if i in inputs:
                inputs[i].append(h)
                h = F.batch_norm(h, None, None, m.weight, m.bias, training=True, eps=m.eps)
            elif isinstance(m, nn.Dropout):
                continue
            else:
                h = m(h)
    stats = {}
    for i, xs in inputs.items():
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], dim=1).double()  # [C, n]
        stats[i] = (x.mean(1), x.var(1, unbiased=True))
    return stats


def test_statistics_are_the_mean_and_unbiased_variance_of_each_layers_inputs():
    net, batches = _net(), _batches()
    with torch.no_grad():
        expected = _oracle_stats(copy.deepcopy(net), batches[:4])
    assert recompute_batchnorm_stats(net, batches, num_batches=4) == 24
    for i, (mean, var) in expected.items():
        torch.testing.assert_close(net[i].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net[i].running_var.double(), var, rtol=1e-5, atol=1e-6)


def _assert_restored(net, before):
    for (name, a), b in zip(net.named_parameters(), before.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(net.modules(), before.modules()):
        assert a.training == b.training and not a._forward_pre_hooks and not a._forward_hooks
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            assert a.momentum == b.momentum and torch.equal(a.num_batches_tracked, b.num_batches_tracked)


def test_nothing_but_the_running_statistics_changes_and_a_frozen_layer_keeps_its_own():
    net, batches = _net(), _batches()
    net.train()
    net[5].eval()  # frozen (as when fine-tuning): keeps its statistics and its mode
    net[1].momentum = None  # cumulative averaging, kept
    before = copy.deepcopy(net)
    recompute_batchnorm_stats(net, batches, num_batches=2)
    _assert_restored(net, before)
    for i in (1, 7):
        assert not torch.equal(net[i].running_mean, before[i].running_mean)
        assert not torch.equal(net[i].running_var, before[i].running_var)
    assert torch.equal(net[5].running_mean, before[5].running_mean)
    assert torch.equal(net[5].running_var, before[5].running_var)


def test_in_a_model_in_eval_mode_every_layer_is_recomputed():
    net, batches = _net(), _batches()
    net.eval()
    before = copy.deepcopy(net)
    recompute_batchnorm_stats(net, batches, num_batches=2)
    _assert_restored(net, before)
    assert all(not torch.equal(net[i].running_mean, before[i].running_mean) for i in (1, 5, 7))


def test_a_failing_forward_pass_leaves_the_model_as_it_was():
    net, batches = _net(), _batches()
    net.train()
    before = copy.deepcopy(net)
    bad = [*batches[:2], (torch.randn(6, 2, 8, 8), None)]  # two channels: the first convolution refuses it
    with pytest.raises(RuntimeError):
        recompute_batchnorm_stats(net, bad, num_batches=3)
    _assert_restored(net, before)
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), before.buffers()))


def test_only_the_batches_used_are_read():
    read = []

    def batches():
        for i, batch in enumerate(_batches(n=5)):
            read.append(i)
            yield batch

    recompute_batchnorm_stats(_net(), batches(), num_batches=2)
    assert read == [0, 1]


def test_a_quantized_model_is_measured_with_its_quantized_weights():
    torch.manual_seed(0)
    model = mq.quantize_(mq.models.resnet8(num_classes=3, in_channels=1))
    plain = materialize(copy.deepcopy(model))  # ordinary layers holding Ŵ
    batches = _batches(n=3, size=8)
    recompute_batchnorm_stats(model, batches, num_batches=3)
    recompute_batchnorm_stats(plain, batches, num_batches=3)
    quantized, reference = batchnorm_layers(model), batchnorm_layers(plain)
    assert len(quantized) == len(reference) > 0
    for a, b in zip(quantized, reference):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)


def test_the_recomputed_statistics_make_evaluation_match_the_population_normalisation():
    """In eval mode the first layer's output is then standardised over the data it was measured on."""
    net, batches = _net(), _batches(n=4)
    recompute_batchnorm_stats(net, batches, num_batches=4)
    net.eval()
    with torch.no_grad():
        z = torch.cat([net[1](net[0](x)) for x, _ in batches])  # [24, 4, 6, 6]
    standardised = (z - net[1].bias[None, :, None, None]) / net[1].weight[None, :, None, None]
    torch.testing.assert_close(standardised.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardised.var((0, 2, 3)), torch.ones(4), atol=1e-3, rtol=0)


def test_fewer_batches_than_asked_uses_them_all_says_so_and_a_model_without_batchnorm_reads_nothing(caplog):
    net, batches = _net(), _batches(n=2)
    with caplog.at_level(logging.WARNING, logger="metaquant.batchnorm"):
        assert recompute_batchnorm_stats(net, batches, num_batches=100) == 12
    assert [r.getMessage() for r in caplog.records] == [
        "recompute_batchnorm_stats: num_batches is 100 but only 2 batches were available; the statistics are "
        "recomputed from those"
    ]
    assert recompute_batchnorm_stats_counted(_net(), batches, num_batches=100) == (2, 12)
    caplog.clear()
    assert recompute_batchnorm_stats_counted(_net(), _batches(n=5), num_batches=3) == (3, 18)
    assert recompute_batchnorm_stats_counted(_net(), batches, num_batches=2) == (2, 12)
    assert not caplog.records  # as many batches as asked, or more: nothing to say

    def never():
        raise AssertionError("iterated")
        yield

    assert recompute_batchnorm_stats(nn.Linear(3, 2), never(), num_batches=5) == 0
    assert recompute_batchnorm_stats_counted(nn.Linear(3, 2), never(), num_batches=5) == (0, 0)
    no_stats = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False))
    assert recompute_batchnorm_stats(no_stats, never(), num_batches=5) == 0


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None, "4"])
def test_a_bad_number_of_batches_is_named(bad):
    with pytest.raises(ValueError, match=f"num_batches must be an integer >= 1, got {bad!r}"):
        recompute_batchnorm_stats(_net(), _batches(), num_batches=bad)


def test_no_batches_is_an_error_and_leaves_the_statistics():
    net = _net()
    before = copy.deepcopy(net)
    with pytest.raises(ValueError, match="yielded no examples"):
        recompute_batchnorm_stats(net, [], num_batches=3)
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), before.buffers()))


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = _net()
        batches = _batches()[rank::world]  # each process its own batches
        examples = recompute_batchnorm_stats(net, batches, num_batches=2)
        torch.save({"examples": examples, "state": net.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_under_data_parallelism_the_statistics_are_over_every_process_batches(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    batches = _batches()
    union = [batches[0], batches[2], batches[1], batches[3]]  # rank 0: 0, 2; rank 1: 1, 3
    reference = _net()
    recompute_batchnorm_stats(reference, union, num_batches=4)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["examples"] == 24
        for k, v in reference.state_dict().items():
            torch.testing.assert_close(saved["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def _fit(precise_bn_batches, train=None, run_dir=None, epochs=2, extra_metrics=None):
    torch.manual_seed(1)
    model = mq.quantize_(mq.models.resnet8(num_classes=3, in_channels=1))
    default_train, test, _, _ = toy_loaders()
    trainer = mq.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    run = RunDir(run_dir) if run_dir is not None else None
    if run is not None:
        run.path.mkdir(parents=True)
    mq.fit(
        model,
        trainer,
        default_train if train is None else train,
        test,
        epochs=epochs,
        schedule=None,
        run=run,
        progress=False,
        precise_bn_batches=precise_bn_batches,
        extra_metrics=extra_metrics,
    )
    return model, test


def test_fit_with_precise_bn_trains_the_same_and_tests_with_the_recomputed_statistics(tmp_path):
    plain, test = _fit(0)
    precise, _ = _fit(3, run_dir=tmp_path / "run")
    for (name, a), b in zip(precise.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name  # the pass changes no weight and consumes no randomness of the run
    # the final statistics are those of the last epoch's first 3 batches, computed for the final weights
    train, _, _, _ = toy_loaders()
    train.set_epoch(1)
    with_running_averages = mq.evaluate(plain, test)
    recompute_batchnorm_stats(plain, train, num_batches=3)
    for a, b in zip(batchnorm_layers(precise), batchnorm_layers(plain)):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    # the epoch's recorded test metrics are those of the recomputed statistics, not of the running averages
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    expected = mq.evaluate(plain, test)
    assert (last["test_loss"], last["test_acc"]) == (expected["loss"], expected["top1"])
    assert last["test_loss"] != with_running_averages["loss"]


def test_fit_with_more_precise_bn_batches_than_the_loader_holds_says_so_once_and_uses_them_all(caplog, tmp_path):
    train, _, _, _ = toy_loaders()
    with caplog.at_level(logging.WARNING):
        short, _ = _fit(len(train) + 5, epochs=3)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        (
            "metaquant.batchnorm",
            f"precise_bn_batches is {len(train) + 5} but only {len(train)} batches are available; the statistics are "
            "recomputed from those",
        )
    ]
    exact, _ = _fit(len(train), epochs=3)  # the same statistics as asking for exactly the batches there are
    for a, b in zip(batchnorm_layers(short), batchnorm_layers(exact)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


@pytest.mark.parametrize(
    "kind, known",
    [("list", True), ("map-style DataLoader", True), ("iterable DataLoader", False), ("generator function", False)],
)
def test_batches_to_read_caps_at_a_known_length_and_tells_each_short_length_once(caplog, kind, known):
    pairs = [(torch.randn(2, 3), torch.zeros(2)) for _ in range(3)]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(pairs)

    class Reiterable:
        def __iter__(self):
            return iter(pairs)

    batches = {
        "list": pairs,
        "map-style DataLoader": torch.utils.data.DataLoader(pairs, batch_size=None),
        "iterable DataLoader": torch.utils.data.DataLoader(Stream(), batch_size=None),
        "generator function": Reiterable(),
    }[kind]
    told: set[int] = set()
    with caplog.at_level(logging.WARNING, logger="metaquant.batchnorm"):
        assert [batches_to_read(batches, n, told) for n in (2, 3, 5, 7)] == [2, 3, 3 if known else 5, 3 if known else 7]
    assert len(caplog.records) == (1 if known else 0) and told == ({3} if known else set())
    if known:
        pairs.pop()  # the loader got shorter: told again, for the new length
        with caplog.at_level(logging.WARNING, logger="metaquant.batchnorm"):
            assert batches_to_read(batches, 5, told) == 2 and batches_to_read(batches, 5, told) == 2
        assert len(caplog.records) == 2 and told == {2, 3}


def test_recorded_precise_bn_metrics_with_a_short_loader_say_so_once(caplog):
    train, test, _, _ = toy_loaders()
    metrics = precise_bn_metrics(train, test, len(train) + 1)
    model = mq.models.resnet8(num_classes=3, in_channels=1)
    with caplog.at_level(logging.WARNING):
        first, second = metrics(model), metrics(model)
    assert first == second and len(caplog.records) == 1


def test_recorded_precise_bn_metrics_leave_the_run_as_it_is_and_equal_a_recomputation(tmp_path):
    plain, test = _fit(0, run_dir=tmp_path / "plain")
    train, _, _, _ = toy_loaders()
    metrics = precise_bn_metrics(train, test, 3)  # over the loader fit trains with
    recorded, _ = _fit(0, train=train, run_dir=tmp_path / "recorded", extra_metrics=metrics)
    # the same weights and running statistics, the same records but for the two added fields
    for (name, a), b in zip(recorded.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    rows = [
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("plain", "recorded")
    ]
    for a, b in zip(*rows):
        extra = {k: b.pop(k) for k in ("test_acc_precise_bn", "test_loss_precise_bn")}
        a.pop("train_seconds"), b.pop("train_seconds")
        assert a == b
    # oracle: the last epoch's statistics recomputed on the final model, by hand
    train.set_epoch(1)
    recompute_batchnorm_stats(plain, train, num_batches=3)
    expected = mq.evaluate(plain, test)
    assert (extra["test_loss_precise_bn"], extra["test_acc_precise_bn"]) == (expected["loss"], expected["top1"])


def test_fit_with_a_shuffling_dataloader_trains_the_same_with_precise_bn():
    """A DataLoader draws its order and seeds from the global generator: fit gives them back after the pass."""
    _, _, data, info = toy_loaders()
    dataset = torch.utils.data.TensorDataset(data.images.float() / 255, data.labels)

    def train():
        torch.manual_seed(7)
        return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)

    plain, _ = _fit(0, train=train())
    precise, _ = _fit(3, train=train())
    for (name, a), b in zip(precise.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bad", [-1, 0, 1.5, True])
def test_precise_bn_metrics_refuses_a_bad_number_of_batches_when_called(bad):
    def untouched():
        raise AssertionError("iterated")
        yield

    with pytest.raises(ValueError, match=f"num_batches must be an integer >= 1, got {bad!r}"):
        precise_bn_metrics(untouched(), untouched(), bad)


def test_fit_refuses_precise_bn_with_a_one_shot_iterator():
    train, _, _, _ = toy_loaders()
    with pytest.raises(ValueError, match="precise_bn_batches 2 iterates train_loader again .* one-shot generator"):
        _fit(2, train=(batch for batch in train))


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_fit_refuses_a_bad_precise_bn_batches_before_training(bad):
    with pytest.raises(ValueError, match=f"precise_bn_batches must be an integer >= 0, got {bad!r}"):
        _fit(bad)


def test_the_cli_refuses_a_negative_precise_bn_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "metaquant", "quantize", "--precise-bn", "-3", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "precise_bn_batches must be an integer >= 0, got -3" in done.stderr and "Traceback" not in done.stderr


def test_only_batchnorm_layers_that_keep_running_statistics_are_found():
    tracked, sync = nn.BatchNorm2d(2), nn.SyncBatchNorm(2)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), tracked, nn.BatchNorm2d(2, track_running_stats=False), sync, nn.ReLU())
    assert batchnorm_layers(net) == [tracked, sync]
