"""Meta quantizers against their formulas written out with plain tensor operations."""

import pytest
import torch

from metaquant.meta import LSTMFC, CoordinateMLP, FCGrad, MultiFC


@pytest.mark.parametrize("nonlinearity", ["none", "relu", "tanh"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_coordinate_mlp_is_a_stack_of_bias_free_layers(nonlinearity, num_layers):
    torch.manual_seed(0)
    mlp = CoordinateMLP(hidden=7, num_layers=num_layers, nonlinearity=nonlinearity).double()
    x = torch.randn(50, dtype=torch.float64)
    act = {"none": lambda t: t, "relu": torch.relu, "tanh": torch.tanh}[nonlinearity]
    h = x[:, None]
    for i, layer in enumerate(mlp.layers):
        assert layer.bias is None
        h = h @ layer.weight.T
        if i < num_layers - 1:
            h = act(h)
    torch.testing.assert_close(mlp(x), h[:, 0], rtol=1e-12, atol=1e-12)
    # and the gradients w.r.t. φ of the collapsed linear form equal those of the explicit stack
    if nonlinearity == "none":
        g = torch.randn(50, dtype=torch.float64)
        fast = torch.autograd.grad((mlp(x) * g).sum(), list(mlp.parameters()))
        slow_h = x[:, None]
        for layer in mlp.layers:
            slow_h = slow_h @ layer.weight.T
        slow = torch.autograd.grad((slow_h[:, 0] * g).sum(), list(mlp.parameters()))
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fcgrad_and_multifc_formulas():
    torch.manual_seed(1)
    g, w = torch.randn(30), torch.rand(30)
    fc = FCGrad(hidden=5)
    torch.testing.assert_close(fc(g, w)[0], fc.net(g))
    mf = MultiFC(hidden=5, nonlinearity="tanh")
    torch.testing.assert_close(mf(g, w)[0], g * mf.net(w))


def test_lstmfc_runs_one_lstm_step_per_coordinate_from_the_given_state():
    torch.manual_seed(2)
    meta = LSTMFC(hidden=6, num_lstm=2).double()
    n = 11
    g, w = torch.randn(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    state = (torch.randn(2, n, 6, dtype=torch.float64), torch.randn(2, n, 6, dtype=torch.float64))
    out, (h, c) = meta(g, w, state)
    assert h.shape == c.shape == (2, n, 6)
    # an explicit LSTM cell, coordinate by coordinate, layer by layer
    inp = w[:, None]
    hs, cs = [], []
    for layer in range(2):
        w_ih, w_hh = getattr(meta.lstm, f"weight_ih_l{layer}"), getattr(meta.lstm, f"weight_hh_l{layer}")
        b = getattr(meta.lstm, f"bias_ih_l{layer}") + getattr(meta.lstm, f"bias_hh_l{layer}")
        gates = inp @ w_ih.T + state[0][layer] @ w_hh.T + b
        i, f, gg, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * state[1][layer] + torch.sigmoid(i) * torch.tanh(gg)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        inp = h_new
    torch.testing.assert_close(h, torch.stack(hs), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, torch.stack(cs), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, g * (hs[-1] @ meta.fc.weight.T)[:, 0], rtol=1e-10, atol=1e-12)
    assert meta.initial_state(n, torch.device("cpu"), torch.float64)[0].shape == (2, n, 6)


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: LSTMFC(hidden=0), "hidden size must be an integer >= 1, got 0"),
        (lambda: MultiFC(num_layers=0), "number of FC layers must be an integer >= 1, got 0"),
        (lambda: FCGrad(nonlinearity="gelu"), "nonlinearity 'gelu' is not supported; allowed: none, relu, tanh"),
        (lambda: LSTMFC(num_lstm=0), "number of LSTM layers must be an integer >= 1"),
    ],
)
def test_bad_options_are_refused(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()
