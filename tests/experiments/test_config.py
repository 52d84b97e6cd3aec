"""RunConfig refuses every bad value with a message naming it and what is allowed."""

import pytest

from metaquant.experiments.config import TASK_DEFAULTS, RunConfig


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"model": "vgg7"}, "model 'vgg7' is not supported; allowed: .*resnet20"),
        ({"dataset": "svhn"}, "dataset 'svhn' is not supported; allowed: mnist, fashion-mnist"),
        ({"quantizer": "xnor"}, "unknown quantizer 'xnor'; allowed: dorefa, bwn"),
        ({"quantizer": "bwn", "bits": 2}, "bits=2; allowed: 1"),
        ({"estimator": "magic"}, "estimator 'magic' is not supported; allowed: ste, identity, ewgs"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not supported; allowed: sgd, adam, adamw"),
        ({"lr": 0.0}, "lr must be a number > 0, got 0.0"),
        ({"lr": -1e-3}, "lr must be a number > 0"),
        ({"epochs": 0}, "epochs must be an integer > 0, got 0"),
        ({"batch_size": -5}, "batch_size must be an integer > 0, got -5"),
        ({"train_size": 0}, "train_size must be an integer > 0"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\)"),
        ({"nesterov": True}, "nesterov needs optimizer 'sgd' with momentum > 0"),
        ({"weight_decay": -1.0}, "weight_decay must be a number >= 0"),
        ({"lr_schedule": "poly"}, "lr_schedule 'poly' is not supported; allowed: step, cosine, constant"),
        ({"device": "tpu"}, "device 'tpu' is not supported; allowed: auto, cpu, cuda, cuda:N"),
        ({"device": "cuda:x"}, "device 'cuda:x' is not supported; allowed: auto, cpu, cuda, cuda:N"),
        ({"seed": True}, "seed must be an integer >= 0, got True"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"task": "finetune"}, "task 'finetune' is not supported; allowed: pretrain, quantize"),
        ({"model": None}, "model must be a string, got None"),
        ({"device": 0}, "device must be a string, got 0"),
        ({"nesterov": "yes"}, "nesterov must be true or false, got 'yes'"),
        ({"augment": "mixup"}, "augment 'mixup' is not supported; allowed: auto, none, crop_flip"),
        ({"augment": "none", "dataset": "imagenet"}, "ImageNet's training transforms are fixed"),
        ({"group_size": 64}, "`group_size` 64 applies to `quantizer` 'uniform-group' only, not to 'dorefa'"),
        ({"quantizer": "uniform-group", "bits": 4, "group_size": 0}, "group_size must be an integer >= 1, got 0"),
        ({"quantizer": "uniform-group", "bits": 4, "group_size": True}, "group_size must be an integer >= 1, got True"),
        ({"quantizer": "uniform-channel", "bits": 1}, "'uniform-channel' does not support bits=1; allowed: 2..8"),
    ],
)
def test_bad_values_are_refused_with_the_allowed_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)


def test_round_trip_through_json(tmp_path):
    config = RunConfig(model="ResNet32", optimizer="adam", lr=1e-2, train_size=100)
    assert config.model == "resnet32"
    config.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == config
    config.save(str(tmp_path / "s.json"))  # a plain string path works as well
    assert RunConfig.load(str(tmp_path / "s.json")) == config


def test_names_are_case_insensitive_and_kept_in_one_spelling():
    config = RunConfig(
        model="ResNet20", dataset="Fashion-MNIST", optimizer="Adam", quantizer="DoReFa", estimator="MultiFC"
    )
    assert (config.model, config.dataset, config.optimizer, config.quantizer, config.estimator) == (
        "resnet20",
        "fashion-mnist",
        "adam",
        "dorefa",
        "multifc",
    )
    assert config == RunConfig(model="resnet20", dataset="fashion-mnist", optimizer="adam", estimator="multifc")


@pytest.mark.parametrize(
    "spelling, ours", [("mlpfc", "multifc"), ("fcgrad", "fc-grad"), ("fc_grad", "fc-grad"), ("LSTM-FC", "lstmfc")]
)
def test_the_original_code_s_estimator_spellings_become_ours(spelling, ours):
    config = RunConfig(estimator=spelling)
    assert config.estimator == ours and config.uses_meta and config == RunConfig(estimator=ours)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown configuration keys \['colour'\]"):
        RunConfig.from_dict({"colour": "red"})


def test_a_config_written_before_a_field_existed_reads_back_with_its_default(tmp_path):
    """Run directories keep their config.json: one without ``augment`` means the data set's own augmentation."""
    data = RunConfig().to_dict()
    del data["augment"]
    assert RunConfig.from_dict(data) == RunConfig() and RunConfig().augment == "auto"


def test_a_config_written_before_meta_init_scheme_existed_reads_back_as_the_paper_start():
    """Fields added after runs were made take the value those runs had, whatever the default is now."""
    data = RunConfig(estimator="multifc").to_dict()
    del data["meta_init_scheme"]
    assert RunConfig.from_dict(data).meta_init_scheme == "paper"
    data["meta_init_scheme"] = "ste"
    assert RunConfig.from_dict(data).meta_init_scheme == "ste"
    with pytest.raises(ValueError, match="meta_init_scheme 'zero' is not supported; allowed: paper, ste"):
        RunConfig(meta_init_scheme="zero")


def test_a_new_run_starts_its_meta_quantizer_at_the_ste_as_the_library_does():
    import metaquant as mq

    assert RunConfig().meta_init_scheme == RunConfig.from_fields({}).meta_init_scheme == "ste"
    assert RunConfig.for_task("quantize").meta_init_scheme == "ste"
    assert {cls().init_scheme for cls in (mq.FCGrad, mq.MultiFC, mq.LSTMFC)} == {"ste"}
    with pytest.raises(
        ValueError, match=r"unknown configuration keys \['meta_init_schem'\]; allowed: .*meta_init_scheme"
    ):
        RunConfig.from_fields({"meta_init_schem": "paper"})


@pytest.mark.parametrize("name", ["init", "teacher", "meta_init", "lr_gain_from"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_path_is_refused_rather_than_read_as_none(name, blank):
    with pytest.raises(ValueError, match=f"{name} must name a checkpoint or run directory, got {blank!r}"):
        RunConfig(**{name: blank})


def test_each_task_has_its_recipe_and_plain_configs_keep_their_defaults():
    pretrain, quantize = RunConfig.for_task("pretrain"), RunConfig.for_task("quantize")
    assert (pretrain.lr, pretrain.momentum, pretrain.weight_decay, pretrain.lr_schedule) == (0.1, 0.9, 5e-4, "cosine")
    assert (quantize.epochs, quantize.lr) == (100, 1e-3)
    assert RunConfig.for_task("quantize", epochs=2).epochs == 2
    assert RunConfig().epochs == 10 and RunConfig(task="pretrain").lr == 1e-3  # config.json files read back alike
    assert set(TASK_DEFAULTS) == {"pretrain", "quantize"}
    with pytest.raises(ValueError, match="task 'finetune' is not supported; allowed: pretrain, quantize"):
        RunConfig.for_task("finetune")


def test_a_per_group_run_stores_its_group_size_and_others_none(tmp_path):
    config = RunConfig(quantizer="Uniform-Group", bits=4)
    assert (config.quantizer, config.group_size) == ("uniform-group", 128)  # stored as it runs
    config.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == config
    assert RunConfig(quantizer="uniform-group", bits=4, group_size=32).group_size == 32
    assert RunConfig(quantizer="uniform-channel", bits=4).group_size is None
    data = RunConfig().to_dict()
    del data["group_size"]  # a config.json written before the field existed
    assert RunConfig.from_dict(data) == RunConfig()
