"""Mixed precision: bf16 autocast trains with float32 weights; a GradScaler gives the unscaled update."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq


def net(seed=0):
    torch.manual_seed(seed)
    return mq.quantize_(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)))


def bn_net(seed=0):
    torch.manual_seed(seed)
    return mq.quantize_(
        nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3)
        )
    )


@pytest.mark.parametrize("kind", ["ste", "multifc"])
def test_bf16_autocast_trains_and_keeps_float32_weights(kind):
    model = bn_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    trainer = (
        mq.Trainer(model, opt) if kind == "ste" else mq.MetaQuant(model, opt, mq.MultiFC(hidden=100), meta_lr=1e-2)
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)

    def closure():
        with mq.precision.autocast("bf16", "cpu"):
            logits = model(x)
        assert logits.dtype == torch.bfloat16  # the forward pass did run in bf16
        return F.cross_entropy(logits.float(), y)

    losses = [trainer.step(closure).item() for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if kind == "multifc":
        assert all(p.dtype == torch.float32 for p in trainer.meta.parameters())
        assert trainer.state_dict()["records"]["0"]["grad_w_hat"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["ste", "multifc", "lstmfc"])
def test_grad_scaler_gives_the_unscaled_update_and_skips_overflowing_steps(kind):
    # Oracle: the same run without a scaler. A power-of-two scale is exact in float32, so the runs agree to the bit.
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(4)
        meta = {"multifc": mq.MultiFC(hidden=4), "lstmfc": mq.LSTMFC(hidden=4)}.get(kind)
        trainer = (
            mq.Trainer(model, opt, grad_scaler=scaler)
            if meta is None
            else mq.MetaQuant(model, opt, meta, grad_scaler=scaler)
        )

        def closure(model=model):
            return F.cross_entropy(model(x), y)

        for _ in range(5):
            trainer.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()])
        if scaler is not None:
            assert scaler.get_scale() == 2.0**14  # it grew twice (every 2 good steps)
            weights = [p.detach().clone() for p in model.parameters()]
            scaler.update(3e38)  # the next scaled loss overflows float32
            trainer.step(closure)
            assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # skipped
            assert scaler.get_scale() < 3e38 and trainer.skipped_steps == 0 and trainer.overflow_steps == 1
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_only_fp16_gets_a_grad_scaler_and_needs_cuda_and_none_is_no_autocast():
    assert mq.precision.make_grad_scaler("none", "cpu") is None
    assert mq.precision.make_grad_scaler("bf16", "cpu") is None
    mq.precision.check_amp("bf16", "cpu")
    with pytest.raises(ValueError, match="amp 'fp16' needs a CUDA device .*; on cpu use amp 'bf16'"):
        mq.precision.make_grad_scaler("fp16", "cpu")
    if torch.cuda.is_available():
        assert isinstance(mq.precision.make_grad_scaler("fp16", "cuda"), torch.amp.GradScaler)
    layer = nn.Linear(4, 2)
    with mq.precision.autocast("none", "cpu"):
        assert layer(torch.randn(3, 4)).dtype == torch.float32


def test_amp_modes_are_checked():
    with pytest.raises(ValueError, match="amp 'fp32' is not supported; allowed: none, bf16, fp16"):
        mq.precision.autocast("fp32", "cpu")
    from metaquant.experiments.config import RunConfig

    with pytest.raises(ValueError, match="amp 'fp16' needs a CUDA device"):
        RunConfig(amp="fp16", device="cpu")
    assert RunConfig(amp="bf16").amp == "bf16"


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_non_finite_meta_quantizer_output_under_a_grad_scaler_follows_on_nonfinite_not_the_overflow_path(policy):
    """The meta quantizer's output comes from the last step's unscaled records, not from the scaled loss: lowering
    the scale cannot cure it, so it is an error (or a counted skip), never an fp16 overflow."""
    from metaquant.guards import NonFiniteError

    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = mq.quantize_(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = mq.MetaQuant(model, optimizer, mq.MultiFC(hidden=4), grad_scaler=scaler, on_nonfinite=policy)

    def closure():
        return F.cross_entropy(model(x), y)

    trainer.step(closure)
    state = trainer.state_dict()
    state["records"]["0"]["grad_w_hat"][0, 0] = float("inf")  # MultiFC: g_W̃ = g_Ŵ ⊙ net(W̃) = inf there
    trainer.load_state_dict(state)
    weights = [p.detach().clone() for p in model.parameters()]
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="non-finite meta quantizer output"):
            trainer.step(closure)
    else:
        trainer.step(closure)
        assert trainer.skipped_steps == 1
    assert trainer.overflow_steps == 0 and scaler.get_scale() == 2.0**4
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


@pytest.mark.parametrize("kind", ["ste", "multifc", "lstmfc"])
def test_an_overflow_step_leaves_batchnorm_statistics_as_every_skipped_step_does(kind):
    # Oracle: the buffers as they were before the overflowing step (a skipped step changes nothing).
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    model = bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    metas = {"multifc": lambda: mq.MultiFC(hidden=4), "lstmfc": lambda: mq.LSTMFC(hidden=4)}
    trainer = (
        mq.Trainer(model, opt, grad_scaler=scaler)
        if kind == "ste"
        else mq.MetaQuant(model, opt, metas[kind](), grad_scaler=scaler)
    )
    for _ in range(2):
        trainer.step(lambda: F.cross_entropy(model(x), y))
    buffers = [b.detach().clone() for b in model.buffers()]
    scaler.update(3e38)  # the next scaled gradients overflow float32
    trainer.step(lambda: F.cross_entropy(model(x), y) * 1e4)
    assert trainer.overflow_steps == 1 and trainer.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    from metaquant.guards import NonFiniteError

    with pytest.raises(NonFiniteError, match="non-finite loss"):  # a scaler does not turn errors into skips
        trainer.step(lambda: F.cross_entropy(model(x), y) * float("nan"))
