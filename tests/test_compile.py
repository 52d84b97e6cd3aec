"""torch.compile: a quantized model trains under Trainer and MetaQuant as one graph, with no recompilation.

The backend is ``aot_eager`` (dynamo's capture and AOTAutograd, without code generation): graph breaks and
recompilations are decided by dynamo, whatever the backend, and this keeps the test fast.
"""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import metaquant as mq


def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )
    return mq.layout.apply_memory_format(mq.quantize_(model), torch.channels_last)


@pytest.mark.parametrize(
    "method,step_order",
    [
        ("ste", None),
        ("ewgs", None),
        ("multifc", "paper"),
        ("multifc", "original"),
        ("lstmfc", "paper"),
    ],
)
def test_compiled_model_trains_as_one_graph_without_recompiling(method, step_order):
    torch._dynamo.reset()
    counters.clear()
    model = cnn()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if method == "ste":
        trainer = mq.Trainer(compiled, opt)
    elif method == "ewgs":
        trainer = mq.Trainer(compiled, opt, mq.EWGS(1e-3))
    else:
        meta = mq.MultiFC(hidden=4) if method == "multifc" else mq.LSTMFC(hidden=4)
        trainer = mq.MetaQuant(compiled, opt, meta, step_order=step_order)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    eager = cnn()  # oracle for the first, plain step: the compiled forward computes what the eager one does
    with torch.no_grad():
        expected = F.cross_entropy(eager(x), y)
    losses = []
    for step in range(6):
        losses.append(trainer.step(lambda: F.cross_entropy(compiled(x), y)))
        if step == 2:
            warm = dict(counters["stats"])
    assert dict(counters["graph_break"]) == {}
    # one graph; the original order adds one at t = 1, where the bias it computes with becomes b − α·B_{t−1}
    assert counters["stats"]["unique_graphs"] == warm["unique_graphs"] == (2 if step_order == "original" else 1)
    torch.testing.assert_close(losses[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(torch.stack(losses)).all() and not torch.equal(losses[0], losses[-1])


@pytest.mark.parametrize("weights", ["uniform", "lsq"])
def test_a_compiled_w4a4_model_computes_what_the_eager_one_does_without_graph_breaks(weights):
    config = mq.QuantConfig(weights, 4, activations=mq.ActQuantConfig("lsq", 4))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = mq.quantize_(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)), config
    )
    x = torch.randn(8, 3, 6, 6)
    model(x)  # the first training batch initialises the steps (eagerly)
    compiled = torch.compile(model, backend="aot_eager")
    for train in (True, False):
        model.train(train)
        eager = model(x)
        assert torch.equal(compiled(x), eager)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = mq.Trainer(compiled, opt)
    y = torch.randint(0, 5, (8,))
    steps = [p.clone() for p in mq.layers.learned_quantizer_parameters(model).values()]
    for _ in range(3):
        trainer.step(lambda: F.cross_entropy(compiled(x), y))
    assert dict(counters["graph_break"]) == {}
    learned = mq.layers.learned_quantizer_parameters(model).values()
    assert all(not torch.equal(a, b) for a, b in zip(steps, learned))  # every learned step trained
