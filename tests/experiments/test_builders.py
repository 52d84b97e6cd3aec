"""What a run trains with, built from its configuration: device, optimizer, trainer and teacher."""

import pytest
import torch
from torch import nn

import metaquant as mq
from metaquant.experiments.builders import (
    KEPT_GATES_BYTES,
    build_optimizer,
    build_teacher,
    build_trainer,
    lstm_keep_share,
    quantized_numel,
    resolve_device,
)
from metaquant.experiments.config import RunConfig


def test_devices_are_resolved_auto_to_cuda_only_where_there_is_one():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "fields, cls, group",
    [
        (
            dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
            torch.optim.SGD,
            dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, dampening=0.0),
        ),
        (dict(optimizer="adam", lr=1e-3, weight_decay=5e-4), torch.optim.Adam, dict(lr=1e-3, weight_decay=5e-4)),
        (dict(optimizer="adamw", lr=1e-3, weight_decay=0.01), torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    ],
)
def test_the_optimizer_is_the_one_named_with_the_run_s_options(fields, cls, group):
    optimizer = build_optimizer(nn.Linear(4, 2).parameters(), RunConfig(**fields))
    assert type(optimizer) is cls
    assert {k: optimizer.param_groups[0][k] for k in group} == group


def test_classical_estimators_get_a_trainer_and_meta_quantizers_metaquant():
    model = mq.quantize_(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    assert type(build_trainer(RunConfig(estimator="ste"), model, opt)) is mq.Trainer
    trainer = build_trainer(RunConfig(estimator="multifc", hidden_size=8), model, opt)
    assert type(trainer) is mq.MetaQuant and type(trainer.meta) is mq.MultiFC


def test_lstmfc_keeps_the_gates_that_fit_its_budget_and_trains_to_the_bit_as_when_it_recomputes_them():
    n = KEPT_GATES_BYTES // (4 * 8 * 4)  # the gates of n weights, hidden 8, fill the budget exactly
    assert lstm_keep_share(n, 8, 1) == 1.0
    assert lstm_keep_share(4 * n, 8, 1) == 0.25 and lstm_keep_share(n, 8, 2) == 0.5
    assert lstm_keep_share(n, 8, 1, torch.float64) == 0.5

    def losses(keep):
        torch.manual_seed(0)
        model = mq.quantize_(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 3)))
        trainer = build_trainer(
            RunConfig(estimator="lstmfc", hidden_size=8), model, torch.optim.SGD(model.parameters(), lr=0.1)
        )
        assert quantized_numel(model) == 5 * 16 + 16 * 16 + 16 * 3
        assert isinstance(trainer, mq.MetaQuant) and trainer.meta.keep_gates == 1.0  # a small network: all kept
        trainer.meta.keep_gates, trainer.meta.chunk_size = keep, 50
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        return [trainer.step(lambda: nn.functional.cross_entropy(model(x), y)).item() for _ in range(4)]

    assert losses(1.0) == losses(0.0)


def test_a_tied_weight_is_counted_once():
    model = mq.quantize_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    model[1].weight = model[0].weight
    assert quantized_numel(model) == 16


def test_the_teacher_is_the_full_precision_init_model_and_is_needed(tmp_path):
    fp = mq.models.resnet8(num_classes=10, in_channels=1)
    torch.save({"model": fp.state_dict()}, tmp_path / "fp.pt")
    config = RunConfig(model="resnet8", init=str(tmp_path / "fp.pt"), distill_weight=0.9)
    teacher = build_teacher(config, 10, 1, 28)
    assert torch.equal(teacher.fc.weight, fp.fc.weight) and not mq.quantized_layers(teacher)
    with pytest.raises(ValueError, match="distill_weight 0.9 distils from a full-precision model: give teacher"):
        build_teacher(RunConfig(distill_weight=0.9), 10, 1, 28)
