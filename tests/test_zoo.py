"""Every model of the zoo (tests/models/zoo.py): quantize_ converts what the guide's table says, every forward
pass computes with the quantized weights, Trainer and the meta quantizers train it, dequantize_ restores it, and
the packed and ONNX exports compute what it computes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.layers import QuantLayer, quantized_weight_keys
from tests.models.zoo import CLASSES, ZOO, Case

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quantized(case: Case) -> nn.Module:
    return mq.quantize_(case.build(), mq.QuantConfig(*case.quantizer), include=case.include)


def tolerance(case: Case) -> dict[str, float]:
    # fused and unfused kernels, another summation order: equal up to the dtype's rounding
    return {"rtol": 2e-2, "atol": 2e-2} if case.dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


def reference(case: Case, model: nn.Module) -> nn.Module:
    """The oracle: the plain model of the case holding ``Q(A(W))`` as ordinary Parameters, built independently of
    the quantized layers (only the quantizers and the state_dict keys come from the quantized model). A weight
    that a full-precision layer shares keeps its latent value there."""
    plain = case.build()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, layer in quantized_weight_keys(model).items():
        owner, _, attr = key.rpartition(".")
        setattr(plain.get_submodule(owner), attr, nn.Parameter(layer.quantizer(state.pop(key)), requires_grad=False))
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(quantized_weight_keys(model))
    return plain.eval()


def scale_groups(layer: QuantLayer, w_hat: torch.Tensor) -> list[torch.Tensor]:
    """``Ŵ`` cut into the groups that share one scale: the whole tensor, or one slice per output channel (along
    the axis the quantizer's scales run)."""
    encoded = layer.quantizer.encode(layer.weight.detach())
    if encoded.scale.numel() == 1:
        return [w_hat]
    axis = next(d for d, size in enumerate(encoded.scale.shape) if size > 1)
    return list(w_hat.unbind(axis))


@pytest.fixture
def record(monkeypatch):
    """``{layer: [Ŵ, ...]}``: what every quantized layer's forward computed with, call by call."""
    seen: dict[QuantLayer, list[torch.Tensor]] = {}
    original = QuantLayer.forward_params

    def spy(layer):
        w_hat, bias = original(layer)
        seen.setdefault(layer, []).append(w_hat.detach())
        return w_hat, bias

    monkeypatch.setattr(QuantLayer, "forward_params", spy)
    return seen


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_quantize_converts_the_supported_layers_and_names_what_it_leaves(case, caplog):
    model = case.build()
    params = dict(model.named_parameters(remove_duplicate=False))
    with caplog.at_level("INFO", logger="metaquant.layers"):
        mq.quantize_(model, mq.QuantConfig(*case.quantizer), include=case.include)
    assert set(mq.quantized_layers(model)) == case.quantized
    assert all(p is params[name] for name, p in model.named_parameters(remove_duplicate=False))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if case.warned:
        (message,) = warnings
        assert all(f"{name or '<root>'} (" in message for name in case.warned), message
    else:
        assert warnings == []
    assert any("quantize_:" in r.getMessage() and r.levelname == "INFO" for r in caplog.records)


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_every_forward_pass_computes_with_two_values_per_scale_group(case, record):
    model = quantized(case)
    x = case.batch(3)
    used = set(mq.quantized_layers(model).values()) - {model.get_submodule(n) for n in case.unused}
    outputs = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        for grad in (True, False):
            record.clear()
            with torch.set_grad_enabled(grad):
                outputs[mode, grad] = model(*x).detach()
            # every used layer computed with Ŵ = Q(A(W)), whatever path PyTorch would take for a plain model
            assert set(record) == used, (mode, grad)
            for layer, calls in record.items():
                for w_hat in calls:
                    assert torch.equal(w_hat, layer.quantizer(layer.weight.detach()))
                    # 1 bit: two values per layer, ±a within each scale group (a group whose latent weights all
                    # have one sign uses one of them)
                    assert w_hat.unique().numel() >= 2
                    assert all(group.abs().unique().numel() == 1 for group in scale_groups(layer, w_hat))
    # no fused path under no_grad: the same computation (PyTorch's attention kernels round differently when the
    # weights require grad, hence a tolerance at float rounding rather than equality)
    torch.testing.assert_close(outputs["eval", True], outputs["eval", False], **tolerance(case))
    with torch.no_grad():
        expected = reference(case, model)(*x)
    torch.testing.assert_close(outputs["eval", False], expected, **tolerance(case))
    # a model whose output did not depend on the quantization would prove nothing
    with torch.no_grad():
        assert not torch.allclose(case.build().eval()(*x), expected, **tolerance(case))


def closure(model, case, step):
    x, y = case.batch(4, seed=10 + step), torch.arange(4) % CLASSES
    if hasattr(model, "branch"):
        model.branch = ("left", "right", "left")[step]
    return lambda: F.cross_entropy(model(*x).float(), y)


@pytest.mark.parametrize("method", ["ste", "fcgrad", "multifc", "lstmfc"])
@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_trainer_and_meta_quantizers_train_three_steps(case, method):
    model = quantized(case)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if method == "ste":
        trainer = mq.Trainer(model, opt)
    else:
        meta = {"fcgrad": mq.FCGrad(hidden=4), "multifc": mq.MultiFC(hidden=4), "lstmfc": mq.LSTMFC(hidden=4)}[method]
        if case.metaquant_refuses:
            with pytest.raises(ValueError, match=case.metaquant_refuses):
                mq.MetaQuant(model, opt, meta)
            return
        trainer = mq.MetaQuant(model, opt, meta)
    losses = [trainer.step(closure(model, case, step)) for step in range(3)]
    assert all(math.isfinite(float(loss)) for loss in losses)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), name  # frozen Parameters stay
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(f"{key}" in moved for key in quantized_weight_keys(model)), "no quantized weight was trained"


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_dequantize_restores_the_state_dict_classes_and_fused_paths(case):
    model = case.build()
    types = {name: type(m) for name, m in model.named_modules()}
    attributes = {name: dict(vars(m)) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mq.quantize_(model, mq.QuantConfig(*case.quantizer), include=case.include)
    mq.dequantize_(model)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert {name: type(m) for name, m in model.named_modules()} == types
    for name, m in model.named_modules():  # nothing added or changed (e.g. the fused path's flags)
        own = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
        assert own == {k: v for k, v in attributes[name].items() if k in own}, name
        assert set(own) == {k for k in attributes[name] if k not in ("_parameters", "_buffers", "_modules")}, name


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_the_packed_export_and_materialize_compute_what_the_model_computes(case, tmp_path):
    from metaquant.export import export_packed, load_packed, materialize

    model = quantized(case).eval()
    x = case.batch(3)
    with torch.no_grad():
        expected = model(*x)  # evaluate-style inference
        export_packed(model, tmp_path / "m.safetensors")
        loaded = load_packed(tmp_path / "m.safetensors", case.build())
        inference = materialize(model)
        for exported in (loaded, inference):
            torch.testing.assert_close(exported(*x), expected, **tolerance(case))
            # a weight tied to a layer left in full precision keeps its latent value there
            for key, value in case.build().state_dict().items():
                if key not in quantized_weight_keys(model):
                    torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)
    if len(x) == 1 and isinstance(x[0], torch.Tensor) and x[0].is_floating_point():
        loader = [(x[0], torch.arange(3) % CLASSES)]
        # the same predictions; the mean loss to float32 rounding (the kernels, and so the order of the sums, can
        # differ between the quantized model and the plain one loaded from the file)
        assert mq.evaluate(loaded, loader) == pytest.approx(mq.evaluate(model, loader), rel=1e-5)


class Zoo(nn.Module):
    """Every zoo model in one module, so that one ONNX export (seconds each) covers them all: the input is a
    dict of each model's arguments (tensors, a dict, several), the output their logits side by side in float32."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleDict(models)

    def forward(self, inputs):
        return torch.cat([model(*inputs[name]).float() for name, model in self.models.items()], 1)


def test_the_onnx_export_of_every_zoo_model_computes_what_it_computes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from metaquant.export import export_onnx, materialize

    cases = [case for case in ZOO if case.onnx]
    key = {case.name: f"net{i}" for i, case in enumerate(cases)}  # names that no Module attribute has
    zoo = Zoo({key[case.name]: quantized(case) for case in cases}).eval()
    x = {key[case.name]: case.batch(3) for case in cases}
    export_onnx(zoo, tmp_path / "zoo.onnx", ({key[case.name]: case.batch(2, seed=5) for case in cases},))
    session = ort.InferenceSession(str(tmp_path / "zoo.onnx"), providers=["CPUExecutionProvider"])
    leaves = torch.utils._pytree.tree_leaves(x)
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(leaves) and f"inputs.{key['dict-input']}.0.image" in names
    feeds = {n: (t.float() if t.is_floating_point() else t).numpy() for n, t in zip(names, leaves)}
    (logits,) = session.run(None, feeds)
    logits = torch.from_numpy(logits)
    with torch.no_grad():
        expected = zoo(x)  # evaluate-style inference, each model in its own dtype
        float32 = materialize(zoo).float()(
            torch.utils._pytree.tree_map(lambda t: t.float() if t.is_floating_point() else t, x)
        )
    torch.testing.assert_close(logits, float32, rtol=1e-4, atol=1e-5)
    for i, case in enumerate(cases):  # bfloat16 and float64 models exported in float32
        columns = slice(i * CLASSES, (i + 1) * CLASSES)
        torch.testing.assert_close(logits[:, columns], expected[:, columns], **tolerance(case), msg=case.name)
