"""Meta quantizers against their formulas written out with plain tensor operations; LSTMFC's fused step against
``nn.LSTM`` itself (values and gradients)."""

import pickle
import pickletools

import pytest
import torch
from torch.func import functional_call

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
    fc = FCGrad(hidden=5, init_scheme="paper")
    torch.testing.assert_close(fc(g, w)[0], fc.net(g))
    mf = MultiFC(hidden=5, nonlinearity="tanh", init_scheme="paper")
    torch.testing.assert_close(mf(g, w)[0], g * mf.net(w))


def test_the_ste_start_forms_are_the_ste_plus_a_learned_correction():
    # The default start: g + FCs(g), g ⊙ (1 + FCs(W̃)), g ⊙ (1 + FC(LSTM(W̃))), here with trained (non-zero)
    # last layers, so the correction is not zero.
    torch.manual_seed(3)
    g, w = torch.randn(30, dtype=torch.float64), torch.rand(30, dtype=torch.float64)
    fc, mf, lstm = FCGrad(hidden=5).double(), MultiFC(hidden=5, nonlinearity="relu").double(), LSTMFC(hidden=4).double()
    assert fc.init_scheme == mf.init_scheme == lstm.init_scheme == "ste"
    with torch.no_grad():
        for last in (fc.net.layers[-1].weight, mf.net.layers[-1].weight, lstm.fc.weight):
            assert torch.count_nonzero(last) == 0  # where the STE starts
            last.normal_()
    torch.testing.assert_close(fc(g, w)[0], g + fc.net(g))
    torch.testing.assert_close(mf(g, w)[0], g * (1 + mf.net(w)))
    paper = LSTMFC(hidden=4, init_scheme="paper").double()
    paper.load_state_dict(lstm.state_dict())  # the same φ: the paper's form is the correction alone
    (h_ste, c_ste), (h_paper, c_paper) = lstm(g, w)[1], paper(g, w)[1]
    torch.testing.assert_close(lstm(g, w)[0], g + paper(g, w)[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(h_ste, h_paper) and torch.equal(c_ste, c_paper)


def test_lstmfc_runs_one_lstm_step_per_coordinate_from_the_given_state():
    torch.manual_seed(2)
    meta = LSTMFC(hidden=6, num_lstm=2, init_scheme="paper").double()
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
        (lambda: LSTMFC(chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
        (lambda: LSTMFC(keep_gates=1.5), r"keep_gates must be a number in \[0, 1\], got 1.5"),
        (lambda: LSTMFC(keep_gates=True), r"keep_gates must be a number in \[0, 1\], got True"),
    ],
)
def test_bad_options_are_refused(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


# --- LSTMFC's fused step against nn.LSTM -----------------------------------------------------------------------


def _nn_lstm_forward(meta, grad_w_hat, w_tilde, state):
    """The oracle: ``fc(act(nn.LSTM(w̃, state)))`` with the module's own parameters (its implementation before the
    fused cell)."""
    if state is None:
        state = meta.initial_state(w_tilde.numel(), w_tilde.device, w_tilde.dtype)
    out, new_state = meta.lstm(w_tilde.reshape(1, -1, 1), state)
    return grad_w_hat * meta.fc(meta.activation(out[0])).squeeze(1), new_state


def _inputs(n, hidden, num_lstm, dtype, zero_state=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen, dtype=dtype)
    w = torch.rand(n, generator=gen, dtype=dtype) * 2 - 1
    state = (
        None
        if zero_state
        else tuple(torch.randn(num_lstm, n, hidden, generator=gen, dtype=dtype) * 0.5 for _ in range(2))
    )
    return g, w, state


@pytest.mark.parametrize("keep_gates", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("nonlinearity", ["none", "relu", "tanh"])
@pytest.mark.parametrize("num_lstm", [1, 2])
def test_lstmfc_values_and_parameter_gradients_equal_nn_lstm(dtype, zero_state, nonlinearity, num_lstm, keep_gates):
    torch.manual_seed(3)
    n, hidden = 37, 6  # blocks of 8 rows: with keep_gates=0.5 the first 3 blocks are kept, the other 2 recomputed
    meta = LSTMFC(
        hidden=hidden,
        num_lstm=num_lstm,
        nonlinearity=nonlinearity,
        chunk_size=8,
        keep_gates=keep_gates,
        init_scheme="paper",
    ).to(dtype)
    g, w, state = _inputs(n, hidden, num_lstm, dtype, zero_state)
    out, (h, c) = meta(g, w, state)
    ref, (ref_h, ref_c) = _nn_lstm_forward(meta, g, w, state)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(h, ref_h, **tol)
    torch.testing.assert_close(c, ref_c, **tol)
    # ∂ℓ/∂φ through the current step only: a weighted sum of the output, the incoming state constant
    weights = torch.randn(n, dtype=dtype)
    names, params = zip(*meta.named_parameters())
    assert set(names) == {"fc.weight"} | {
        f"lstm.{kind}_l{layer}"
        for layer in range(num_lstm)
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    }
    fused = torch.autograd.grad((out * weights).sum(), params)
    oracle = torch.autograd.grad((ref * weights).sum(), params)
    for name, a, b in zip(names, fused, oracle):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("num_lstm", [1, 3])
def test_lstmfc_gradients_reach_the_inputs_and_the_state_like_nn_lstm(num_lstm):
    # Not what MetaQuant asks for (it detaches the state), but the step is a complete autograd function.
    torch.manual_seed(4)
    n, hidden = 19, 5
    meta = LSTMFC(
        hidden=hidden, num_lstm=num_lstm, nonlinearity="tanh", chunk_size=7, keep_gates=0.4, init_scheme="paper"
    ).double()
    g, w, state = _inputs(n, hidden, num_lstm, torch.float64)
    leaves = [g.requires_grad_(), w.requires_grad_(), *(s.requires_grad_() for s in state)]
    out, (h, c) = meta(g, w, state)
    ref, (ref_h, ref_c) = _nn_lstm_forward(meta, g, w, state)
    cotangents = [torch.randn_like(t) for t in (out, h, c)]
    inputs = leaves + list(meta.parameters())

    def vjp(outputs):
        return torch.autograd.grad(sum((o * t).sum() for o, t in zip(outputs, cotangents)), inputs)

    for a, b in zip(vjp((out, h, c)), vjp((ref, ref_h, ref_c))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nonlinearity", ["none", "tanh"])
def test_lstmfc_gradcheck(nonlinearity):
    torch.manual_seed(5)
    n, hidden, num_lstm = 5, 3, 2
    meta = LSTMFC(
        hidden=hidden, num_lstm=num_lstm, nonlinearity=nonlinearity, chunk_size=2, keep_gates=0.5, init_scheme="paper"
    ).double()
    g, w, state = _inputs(n, hidden, num_lstm, torch.float64)
    names = [name for name, _ in meta.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in meta.parameters()]

    def step(g, w, h0, c0, *params):
        out, (h, c) = functional_call(meta, dict(zip(names, params)), (g, w, (h0, c0)))
        return out, h, c

    inputs = (g.requires_grad_(), w.requires_grad_(), *(s.requires_grad_() for s in state), *params)
    assert torch.autograd.gradcheck(step, inputs)


def test_lstmfc_block_size_and_kept_gates_change_nothing_but_rounding():
    torch.manual_seed(6)
    meta = LSTMFC(hidden=4, num_lstm=2, init_scheme="paper").double()
    g, w, state = _inputs(23, 4, 2, torch.float64)
    results = []
    for rows, keep in ((1, 0.0), (5, 0.3), (5, 1.0), (23, 0.5), (1000, 0.0), (None, 0.5)):
        meta.chunk_size, meta.keep_gates = rows, keep
        meta.zero_grad(set_to_none=True)
        out, (h, c) = meta(g, w, state)
        out.sum().backward()
        results.append([out, h, c] + [p.grad for p in meta.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _graph_node(t, name):
    """The node called ``name`` in ``t``'s autograd graph (breadth first)."""
    queue, seen = [t.grad_fn], set()
    while queue:
        node = queue.pop(0)
        if node is None or id(node) in seen:
            continue
        if type(node).__name__ == name:
            return node
        seen.add(id(node))
        queue += [next_node for next_node, _ in node.next_functions]
    raise AssertionError(f"no {name} in the graph")


@pytest.mark.parametrize("keep_gates,kept_rows", [(0.0, 0), (0.5, 192), (1.0, 300)])
def test_lstmfc_keeps_only_the_gates_it_is_asked_to(keep_gates, kept_rows):
    torch.manual_seed(7)
    n, hidden = 300, 8
    meta = LSTMFC(hidden=hidden, chunk_size=64, keep_gates=keep_gates)
    g, w, state = _inputs(n, hidden, 1, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, (h, c) = meta(g, w, state)
    existing = {t.untyped_storage().data_ptr() for t in (g, w, *state, h, c, *meta.parameters())}
    new = [t for t in saved if t.untyped_storage().data_ptr() not in existing]
    assert sum(t.numel() * t.element_size() for t in new) <= n * 4  # at most one [N] tensor besides
    # the kept gates (whole blocks of 64 rows), held by the step's context until its backward pass uses them
    node = _graph_node(out, "_LSTMFCStepBackward")
    assert (0 if node.kept is None else node.kept.numel() * node.kept.element_size()) == kept_rows * 4 * hidden * 4
    out.sum().backward()
    assert node.kept is None
    # Frozen (no gradient needed): no graph, nothing saved.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out, (h, c) = meta(g, w, state)
        meta.requires_grad_(False)
        out2, (h2, c2) = meta(g, w, state)
    assert saved == []
    assert out.grad_fn is None and h.grad_fn is None and out2.grad_fn is None and c2.grad_fn is None
    torch.testing.assert_close(out, out2)


@pytest.mark.parametrize("keep_gates", [0.0, 0.5, 1.0])
def test_lstmfc_backward_can_run_twice_with_retain_graph(keep_gates):
    # The first pass turns the kept gates into their gradients in place; the second recomputes them all.
    torch.manual_seed(8)
    meta = LSTMFC(hidden=4, chunk_size=3, keep_gates=keep_gates)
    g, w, state = _inputs(10, 4, 1, torch.float32)
    g.requires_grad_(True)
    out, _ = meta(g, w, state)
    inputs = [g, *meta.parameters()]
    first = torch.autograd.grad(out.sum(), inputs, retain_graph=True)
    second = torch.autograd.grad(out.sum(), inputs, retain_graph=True)
    third = torch.autograd.grad(out.sum(), inputs)
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_lstmfc_state_dict_is_that_of_nn_lstm_and_fc():
    # Checkpoints made when LSTMFC ran nn.LSTM itself load as they are, and give the same function.
    torch.manual_seed(9)
    reference = torch.nn.ModuleDict({"lstm": torch.nn.LSTM(1, 6, 2), "fc": torch.nn.Linear(6, 1, bias=False)})
    meta = LSTMFC(hidden=6, num_lstm=2, init_scheme="paper")
    meta.load_state_dict(reference.state_dict())
    assert list(meta.state_dict()) == list(reference.state_dict())
    g, w, state = _inputs(9, 6, 2, torch.float32)
    out, _ = reference["lstm"](w.reshape(1, -1, 1), state)
    torch.testing.assert_close(meta(g, w, state)[0], g * reference["fc"](out[0]).squeeze(1))


@pytest.mark.parametrize("nonlinearity", ["none", "relu", "tanh"])
def test_lstmfc_pickles_whole_and_names_its_head_activation_by_the_public_module(nonlinearity):
    torch.manual_seed(10)
    meta = LSTMFC(hidden=4, nonlinearity=nonlinearity)
    data = pickle.dumps(meta)
    g, w, state = _inputs(7, 4, 1, torch.float32)
    torch.testing.assert_close(pickle.loads(data)(g, w, state)[0], meta(g, w, state)[0], rtol=0, atol=0)
    modules = {arg.split(" ")[0] for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    modules |= {arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str) and arg.startswith("metaquant")}
    assert {m for m in modules if m.startswith("metaquant")} == {"metaquant.meta"}, modules


def test_lstmfc_refuses_inputs_in_another_dtype_as_nn_lstm_does():
    meta = LSTMFC(hidden=4)
    g, w, state = _inputs(5, 4, 1, torch.float64)
    with pytest.raises(ValueError, match=r"LSTMFC input dtype \(torch.float64\) does not match weight dtype"):
        meta(g, w, state)
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.float64\) does not match weight dtype"):
        _nn_lstm_forward(meta, g, w, state)


def test_lstmfc_edge_cases_empty_input_and_autocast():
    meta = LSTMFC(hidden=4)
    out, (h, c) = meta(torch.empty(0), torch.empty(0))
    assert out.shape == (0,) and h.shape == c.shape == (1, 0, 4)
    g, w, state = _inputs(12, 4, 1, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the step itself stays in the parameters' dtype
        out_amp, (h_amp, _) = meta(g, w, state)
    assert out_amp.dtype == h_amp.dtype == torch.float32
    torch.testing.assert_close(out_amp, meta(g, w, state)[0])
