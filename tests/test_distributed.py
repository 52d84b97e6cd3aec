"""Data-parallel training: 2 processes (gloo, CPU) on halves of each batch equal 1 process on whole batches."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant import distributed
from metaquant.guards import NonFiniteError

STEPS = 4


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


def _train(estimator: str, rank: int, world: int, weights: str = "dorefa") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # no BatchNorm: the result must not depend on how a batch is split
    config = mq.QuantConfig(weights, 1 if weights == "dorefa" else 4)
    model = mq.quantize_(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), config)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=estimator != "ste")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if estimator == "ste":
        trainer = mq.Trainer(net, opt)
    else:
        trainer = mq.MetaQuant(net, opt, mq.MultiFC(hidden=4, nonlinearity="tanh"), meta_lr=1e-2)
    average = mq.ema_model(net, 0.5)  # of the model inside DistributedDataParallel
    half = 8 // world
    for x, y in _data():
        xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        trainer.step(lambda xs=xs, ys=ys: F.cross_entropy(net(xs), ys))
        average.update_parameters(net.module if world > 1 else net)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state |= {f"average.{k}": v.clone() for k, v in average.module.state_dict().items()}
    if estimator != "ste":
        state |= {f"meta.{k}": v.clone() for k, v in trainer.meta.state_dict().items()}
    return state


def _worker(rank: int, world: int, init_file: str, estimator: str, out_dir: str, weights: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _train(estimator, rank, world, weights)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# (lsq: each layer's learned weight step is a Parameter that the processes average like the others)
@pytest.mark.parametrize("estimator,weights", [("ste", "dorefa"), ("multifc", "dorefa"), ("multifc", "lsq")])
def test_two_processes_on_half_batches_equal_one_process_on_whole_batches(tmp_path, estimator, weights):
    reference = _train(estimator, 0, 1, weights)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), estimator, str(tmp_path), weights), nprocs=2, join=True)
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(state[k], reference[k], rtol=1e-5, atol=1e-5, msg=k)
    assert not torch.equal(reference["model.0.weight"], _initial_conv_weight())
    assert not torch.equal(reference["average.0.weight"], reference["model.0.weight"])  # an average, not a copy


class _PoisonStatistics(mq.Callback):
    """Running variances that overflow after the epoch's last step was checked (the step guard passes)."""

    def on_evaluate(self, loop, test):
        loop.model[2].running_var.fill_(float("inf"))
        return test


def _save_worker(rank: int, world: int, init_file: str, out_dir: str, writer: bool) -> None:
    from metaquant.data import DatasetInfo, ImageTensors, TensorLoader
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.runs import RunDir

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        data = ImageTensors(torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8), torch.tensor([0, 1] * 4))
        loader = TensorLoader(data, DatasetInfo("toy", 2, 1, 4, (0.5,), (0.5,), "none"), 4, train=True)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.BatchNorm1d(2))
        trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        run = RunDir.create(os.path.join(out_dir, "run"), RunConfig()) if writer and rank == 0 else None
        try:
            mq.fit(
                model,
                trainer,
                loader,
                loader,
                epochs=1,
                schedule=lambda e: 1.0,
                progress=False,
                run=run,
                callbacks=[_PoisonStatistics()],
            )
            outcome = "finished"
        except NonFiniteError as err:
            outcome = str(err)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("writer", [True, False])
def test_every_process_refuses_to_save_non_finite_statistics_where_rank_0_writes(tmp_path, writer):
    mp.spawn(_save_worker, args=(2, str(tmp_path / "init"), str(tmp_path), writer), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    if not writer:  # nothing would be saved: no process stops
        assert outcomes == ["finished", "finished"]
        return
    head = "non-finite weights at the end of epoch 1 (iteration 2); not saved (last good checkpoint: "
    assert outcomes == [head + "none yet)", head + "the one rank 0 keeps)"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _initial_conv_weight():
    torch.manual_seed(0)
    return nn.Conv2d(1, 4, 3).weight.detach()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_processes() -> list[str]:
    """torchrun for two local processes on a fresh port; the port is the last item, to be replaced for a rerun."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]


def test_torchrun_cli_run_completes_writes_once_and_resumes(tmp_path, fashion_mnist_available):
    torchrun = _torchrun_two_processes()
    args = [
        "-m",
        "metaquant",
        "quantize",
        "-m",
        "resnet8",
        "--train-size",
        "128",
        "--test-size",
        "100",
        "-bs",
        "16",
        "-n",
        "2",
        "-meta",
        "multifc",
        "-hidden",
        "8",
        "--no-progress",
        "--run-dir",
        str(tmp_path),
        "--name",
        "ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp"
    assert done.stdout.count("quantize finished") == 1  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # 128 images, 2 processes x 16 per batch: 4 steps per epoch
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 8
    # extend the finished run by one epoch and resume it under torchrun
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 3
    (run / "config.json").write_text(json.dumps(config))
    (run / "done").unlink()
    torchrun[-1] = str(_free_port())
    resumed = subprocess.run(
        [*torchrun, "-m", "metaquant", "quantize", "--resume", str(run), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 and (run / "done").exists()


def test_torchrun_failure_ends_every_rank_with_one_line_and_status_1(tmp_path, fashion_mnist_available):
    """A failure that every rank meets (here: more skipped steps than allowed) ends each process cleanly."""
    torchrun = _torchrun_two_processes()
    args = [
        "-m",
        "metaquant",
        "quantize",
        "-m",
        "resnet8",
        "--train-size",
        "128",
        "--test-size",
        "100",
        "-bs",
        "16",
        "-n",
        "3",
        "--lr",
        "1e30",
        "--skip-nonfinite",
        "--max-skipped",
        "1",
        "--no-progress",
        "--run-dir",
        str(tmp_path),
        "--name",
        "ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # each rank's output in its own files (on one shared stream, the two ranks' lines could interleave mid-line)
    logs = ["--log-dir", str(tmp_path / "logs"), "--redirects", "3"]
    failed = subprocess.run([*torchrun, *logs, *args], capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode == 1, failed.stderr[-3000:]
    ranks = sorted((tmp_path / "logs").rglob("stderr.log"))
    assert len(ranks) == 2, ranks
    for log in ranks:  # one message per rank, and no crash
        text = log.read_text()
        message = "metaquant: error: 2 steps skipped for non-finite values, more than the limit of 1"
        assert text.count(message) == 1, text[-3000:]
        assert "SIGABRT" not in text and "terminate called" not in text
    # torchrun's summary: a rank exited with status 1; once one has exited, torchrun stops the others (SIGTERM), so
    # whether the second is summarised as "exitcode 1" or as stopped depends on timing. Neither crashed.
    assert failed.stderr.count("exitcode  : 1") >= 1
    assert "exitcode  : -6" not in failed.stderr and "SIGABRT" not in failed.stderr
    assert "SIGABRT" not in failed.stderr and "terminate called" not in failed.stderr
    assert not (tmp_path / "ddp" / "done").exists()


def test_in_one_process_the_collectives_are_identities_and_there_is_no_group_to_join_or_leave():
    assert distributed.init_from_env("cpu") is None  # not started by torchrun
    assert not distributed.is_distributed() and distributed.is_main()
    grads = [torch.tensor([1.0, 2.0]), None, torch.tensor([[3.0]])]
    distributed.all_reduce_mean_(grads)
    assert grads[0].tolist() == [1.0, 2.0] and grads[1] is None and grads[2].tolist() == [[3.0]]
    assert distributed.all_reduce_sum([12.5, 3.0, 40.0]) == [12.5, 3.0, 40.0]
    assert distributed.any_process(True) and not distributed.any_process(False)
    model = nn.Linear(4, 2)
    assert distributed.unwrap(model) is model
    with pytest.raises(ValueError, match="process group has not been initialized"):
        distributed.wrap(model, distributed.DistInfo(rank=0, world_size=1, local_rank=0))
    assert distributed.shutdown() is False
