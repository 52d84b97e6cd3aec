"""A quantized weight that the loss reads directly (not through its layer's Ŵ): found, said once, and with
MetaQuant its gradient applied at the commit, against torch.optim."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.direct_uses import direct_uses

LOGGER = "metaquant.direct_uses"


class TiedLM(nn.Module):
    """A GPT-style output layer: logits from the quantized embedding's weight, or from its Ŵ."""

    def __init__(self, through_w_hat=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.through_w_hat = through_w_hat

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens)))
        weight = self.emb.forward_params()[0] if self.through_w_hat else self.emb.weight
        return F.linear(h, weight)


def _lm(through_w_hat=False, tie_to_full_precision=False):
    model = TiedLM(through_w_hat)
    if tie_to_full_precision:
        model.head = nn.Linear(4, 7, bias=False)
        model.head.weight = model.emb.weight
    return mq.quantize_(model, filter_fn=lambda module, name: name in ("emb", "mix"))


def _tokens(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (5,), generator=g), torch.randint(0, 7, (5,), generator=g)


def test_direct_uses_finds_the_weights_read_other_than_through_fake_quantize():
    w, v = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    q = mq.quantizers.DoReFa()
    x = torch.randn(2, 4)
    quantized = mq.estimators.fake_quantize_many([w, v], [q, q])
    only_w_hat = (x @ quantized[0][0].T).sum() + (x @ quantized[1][0].T).sum()
    assert direct_uses(only_w_hat, [w, v]) == []
    assert direct_uses(only_w_hat + 1e-3 * v.square().sum(), [w, v]) == [1]  # a penalty on v
    assert direct_uses((x @ w.T).sum() + (x @ mq.fake_quantize(v, q).T).sum(), [w, v]) == [0]


def test_a_compiled_region_is_opaque_and_a_direct_use_outside_it_is_still_found():
    w, v = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    q, x = mq.quantizers.DoReFa(), torch.randn(2, 4)
    through_w_hat = torch.compile(lambda x, w: (x @ mq.fake_quantize(w, q).T).sum(), backend="aot_eager")
    loss = through_w_hat(x, w)
    assert type(loss.grad_fn).__name__ == "CompiledFunctionBackward"  # fake_quantize's node is fused away
    assert direct_uses(loss, [w, v]) == []  # not mistaken for a direct use
    assert direct_uses(loss + 1e-3 * v.square().sum(), [w, v]) == [1]


def test_trainer_warns_once_about_a_direct_use_and_names_the_weight(caplog):
    model = _lm()
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _tokens()
    with caplog.at_level("WARNING", logger=LOGGER):
        for _ in range(3):
            trainer.step(lambda: F.cross_entropy(model(x), y))
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "emb.weight" in message and "mix.weight" not in message and "forward_params()[0]" in message


@pytest.mark.parametrize("kind", ["through_w_hat", "tied_to_a_full_precision_layer"])
def test_no_warning_where_every_use_is_what_the_exports_compute(kind, caplog):
    model = _lm(through_w_hat=True) if kind == "through_w_hat" else _lm(tie_to_full_precision=True)
    x, y = _tokens()
    trainers = [mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))]
    if kind == "through_w_hat":
        trainers.append(mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4)))
    with caplog.at_level("WARNING", logger=LOGGER):
        for trainer in trainers:
            for _ in range(3):
                trainer.step(lambda: F.cross_entropy(model(x), y))
    assert [r for r in caplog.records if r.name == LOGGER] == []


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_metaquant_applies_an_l2_penalty_on_a_quantized_weight_as_torch_optim_would(momentum, caplog):
    """Oracle: torch.optim.SGD's step from the same weights and state with the gradient g_W + 2λW, where g_W is
    what the meta quantizer gave the same step of a run without the penalty (the penalty does not depend on φ)."""
    torch.set_default_dtype(torch.float64)
    try:
        lam, lr = 0.05, 0.1
        x, y = _tokens()
        runs = {}
        for penalised in (True, False):
            model = _lm(through_w_hat=True)
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            torch.manual_seed(3)
            trainer = mq.MetaQuant(model, opt, mq.MultiFC(hidden=4))
            for _ in range(2):
                trainer.step(lambda model=model: F.cross_entropy(model(x), y))
            runs[penalised] = (model, opt, trainer)
        model, opt, trainer = runs[True]
        oracle = copy.deepcopy(model)
        oracle_opt = torch.optim.SGD(oracle.parameters(), lr=lr, momentum=momentum)
        oracle_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its buffers, not the live ones
        g_w = {}
        plain_model, _, plain = runs[False]
        plain.step(
            lambda: F.cross_entropy(plain_model(x), y),
            before_update=lambda t: g_w.update({name: q.weight.grad.clone() for name, q in t.layers.items()}),
        )
        with caplog.at_level("WARNING", logger=LOGGER):
            trainer.step(lambda: F.cross_entropy(model(x), y) + lam * model.emb.weight.square().sum())
        for name, twin in mq.quantized_layers(oracle).items():
            twin.weight.grad = g_w[name] + (2 * lam * twin.weight.detach() if name == "emb" else 0)
        for p in oracle.parameters():
            if all(p is not layer.weight for layer in mq.quantized_layers(oracle).values()):
                p.grad = None  # only the quantized weights are compared
        oracle_opt.step()
        for name, layer in trainer.layers.items():
            torch.testing.assert_close(layer.weight, mq.quantized_layers(oracle)[name].weight, rtol=0, atol=1e-12)
        assert not torch.equal(model.emb.weight, plain_model.emb.weight)  # the penalty moved it
        torch.testing.assert_close(model.mix.weight, plain_model.mix.weight, rtol=0, atol=1e-12)
        assert "emb.weight" in caplog.text and "MetaQuant adds that use's gradient" in caplog.text
    finally:
        torch.set_default_dtype(torch.float32)
