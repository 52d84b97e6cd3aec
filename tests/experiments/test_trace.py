"""The pictures of what a meta quantizer learned: snapshots taken at the right epochs, PNGs of the right size."""

import struct

import pytest
import torch
from torch import nn

import metaquant as mq
from metaquant.experiments.cli import main
from metaquant.experiments.trace import TRACE_FILE, MetaTrace, snapshot_epochs
from tests.conftest import save_as_from_a_gpu


def test_snapshot_epochs():
    assert snapshot_epochs(3) == {0, 1, 2, 3}
    assert snapshot_epochs(100) == {0, 1, 2, 5, 10, 20, 50, 100}
    assert snapshot_epochs(12) == {0, 1, 2, 5, 10, 12}


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("estimator", ["multifc", "fc-grad", "lstmfc"])
def test_plot_writes_the_learned_function_and_weight_distributions(tmp_path, tiny_mnist, estimator):
    args = [
        "quantize",
        *tiny_mnist,
        "-m",
        "resnet8",
        "-bs",
        "32",
        "-n",
        "2",
        "-meta",
        estimator,
        "-hidden",
        "4",
        "--no-progress",
        "--run-dir",
        str(tmp_path),
        "--name",
        "r",
    ]
    assert main(args) == 0
    trace = torch.load(tmp_path / "r" / TRACE_FILE, weights_only=True)
    assert sorted(trace["snapshots"]) == [0, 1, 2]
    assert main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "fig")]) == 0
    assert _png_size(tmp_path / "fig" / "learned-function.png") == (770, 495)
    assert _png_size(tmp_path / "fig" / "weights.png") == (1360, 960)  # 9 layers: 3 rows of 4
    for name in ("learned-function.png", "weights.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 20_000
    # The same trace as a run on a GPU writes it (its tensors tagged "cuda:0") draws the same pictures here.
    save_as_from_a_gpu(trace, tmp_path / "r" / TRACE_FILE)
    assert main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "gpu")]) == 0
    for name in ("learned-function.png", "weights.png"):
        assert (tmp_path / "gpu" / name).read_bytes() == (tmp_path / "fig" / name).read_bytes()


def test_plot_refuses_a_run_without_a_trace(tmp_path, tiny_mnist, capsys):
    assert (
        main(
            [
                "quantize",
                *tiny_mnist,
                "-m",
                "resnet8",
                "-bs",
                "32",
                "-n",
                "1",
                "--no-progress",
                "--run-dir",
                str(tmp_path),
                "--name",
                "ste",
            ]
        )
        == 0
    )
    assert main(["plot", str(tmp_path / "ste")]) == 1
    assert "only MetaQuant runs record what they learn" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["truncated", "another file"])
def test_a_damaged_trace_is_kept_aside_and_a_new_one_begins(tmp_path, caplog, content):
    import io

    import metaquant as mq
    from metaquant.experiments.trace import MetaTrace

    path = tmp_path / TRACE_FILE
    if content == "truncated":
        path.write_bytes(b"PK\x03\x04 truncated")
    else:
        buffer = io.BytesIO()
        torch.save({"weights": torch.zeros(2)}, buffer)
        path.write_bytes(buffer.getvalue())
    original = path.read_bytes()
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    with caplog.at_level("WARNING", logger="metaquant.experiments.trace"):
        trace = MetaTrace(path, epochs=2)
    assert "is not a readable trace" in caplog.text
    assert (tmp_path / "trace.damaged.pt").read_bytes() == original
    trace.snapshot(0, trainer, model)
    assert sorted(torch.load(path, weights_only=True)["snapshots"]) == [0]


def _multifc_trainer():
    import metaquant as mq

    torch.manual_seed(0)
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    return model, mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))


def test_a_trace_written_on_a_gpu_continues_on_a_cpu(tmp_path):
    """A run moved from a GPU machine to a CPU one resumes its trace (not set aside as damaged)."""
    from metaquant.experiments.trace import MetaTrace

    path = tmp_path / TRACE_FILE
    model, trainer = _multifc_trainer()
    MetaTrace(path, epochs=2).snapshot(0, trainer, model)
    written = torch.load(path, weights_only=True)
    save_as_from_a_gpu(written, path)
    with torch.no_grad():
        next(trainer.meta.parameters()).add_(1.0)  # the meta quantizer moves on: snapshot 1 differs from 0
    MetaTrace(path, epochs=2).snapshot(1, trainer, model)
    assert not (tmp_path / "trace.damaged.pt").exists()
    data = torch.load(path, weights_only=True)  # and it is written back with its tensors on the CPU
    assert sorted(data["snapshots"]) == [0, 1]
    torch.testing.assert_close(data["snapshots"][0], written["snapshots"][0])
    torch.testing.assert_close(data["snapshots"][1]["meta"], trainer.meta.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_run_on_a_gpu_writes_its_trace_and_meta_quantizer_on_the_cpu(tmp_path):
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.meta_files import save_meta
    from metaquant.experiments.trace import MetaTrace

    model, trainer = _multifc_trainer()
    model.cuda(), trainer.meta.cuda()
    MetaTrace(tmp_path / TRACE_FILE, epochs=1).snapshot(0, trainer, model)
    save_meta(tmp_path / "meta.pt", trainer.meta, RunConfig(estimator="multifc", hidden_size=4))
    for name in (TRACE_FILE, "meta.pt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        devices = {t.device.type for t in torch.utils._pytree.tree_leaves(saved) if isinstance(t, torch.Tensor)}
        assert devices == {"cpu"}, name


def test_fc_grad_is_drawn_on_the_scale_its_axes_state():
    import metaquant as mq
    from metaquant.experiments.plots import _fc_grad_curve

    torch.manual_seed(0)
    meta = mq.FCGrad(hidden=8)  # bias-free and linear: FCs(g) = k·g
    k = meta(torch.ones(1), torch.ones(1))[0].item()
    x, y = _fc_grad_curve(meta)
    assert (x.min().item(), x.max().item()) == (-1.0, 1.0)
    torch.testing.assert_close(y, k * x)


def test_snapshots_are_taken_at_snapshot_epochs_once_with_every_latent_weight_counted(tmp_path):
    model = mq.quantize_(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)))
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=8))
    trace = MetaTrace(tmp_path / TRACE_FILE, epochs=4)
    for epoch in range(4):
        trace.snapshot(epoch, trainer, model)  # 3 is not a snapshot epoch of a 4-epoch run
    resumed = MetaTrace(tmp_path / TRACE_FILE, epochs=4)  # a resumed run continues the trace
    resumed.snapshot(2, trainer, model)  # taken already: kept as it was
    resumed.snapshot(4, trainer, model)
    data = torch.load(tmp_path / TRACE_FILE, weights_only=True)
    assert sorted(data["snapshots"]) == [0, 1, 2, 4]
    for snapshot in data["snapshots"].values():
        assert [int(h.sum()) for h in snapshot["weights"].values()] == [6 * 4, 4 * 2]
        assert snapshot["meta"].keys() == trainer.meta.state_dict().keys()
