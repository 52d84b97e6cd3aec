"""How runs are named: directory names and the backward method's label in tables and figures."""

import dataclasses

import pytest

from metaquant.experiments.config import RunConfig
from metaquant.experiments.naming import backward_label, default_run_name


@pytest.mark.parametrize(
    "fields, label",
    [
        (dict(estimator="multifc", step_order="original"), "MultiFC (STE start) (original order)"),
        (dict(estimator="multifc", step_order="original", meta_init_scheme="paper"), "MultiFC (original order)"),
        (dict(estimator="ste", step_order="original"), "STE"),  # the step order is a meta quantizer's
        (dict(estimator="ste", momentum=0.9), "STE + momentum 0.9"),
        (dict(estimator="identity"), "STE (unclipped)"),
        (dict(estimator="ste", distill_weight=0.9, distill_temperature=4.0), "STE + distillation (0.9, T 4)"),
        (
            dict(estimator="multifc", meta_init_scheme="paper", precise_bn_batches=100, ema_decay=0.999),
            "MultiFC + precise BN + EMA 0.999",
        ),
        (dict(estimator="multifc"), "MultiFC (STE start)"),  # the default start, named: names do not follow defaults
        (dict(estimator="ste", meta_init_scheme="paper"), "STE"),  # the start is a meta quantizer's
    ],
)
def test_the_backward_label_names_the_estimator_and_what_sets_the_run_apart(fields, label):
    assert backward_label(RunConfig(**fields)) == label


def test_run_names_hold_what_tells_runs_apart():
    config = RunConfig(model="resnet20", dataset="cifar10", estimator="multifc", seed=2)
    assert default_run_name(config) == "quantize-resnet20-cifar10-dorefa1-multifc-ste-start-sgd-seed2"
    paper = dataclasses.replace(config, meta_init_scheme="paper")
    assert default_run_name(paper) == "quantize-resnet20-cifar10-dorefa1-multifc-sgd-seed2"
    original = dataclasses.replace(paper, step_order="original", seed=0)
    assert default_run_name(original) == "quantize-resnet20-cifar10-dorefa1-multifc-original-order-sgd-seed0"
    pretrain = RunConfig(task="pretrain", dataset="cifar10", optimizer="adam")
    assert default_run_name(pretrain) == "pretrain-resnet20-cifar10-adam-seed0"
