"""Tests for metaquant.models.checkpoints against the original MetaQuant checkpoint."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from metaquant.models import extract_state_dict, load_weights, read_checkpoint, resnet20, resnet32

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def small_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in resnet20(num_classes=3, in_channels=1).state_dict().items()}


# --- the original code's pretrained ResNet20 -----------------------------------------------


def test_original_checkpoint_loads_strictly_into_resnet20(original_resnet20_path: Path) -> None:
    file_sd = torch.load(original_resnet20_path, map_location="cpu", weights_only=True)
    model = resnet20()
    result = load_weights(model, original_resnet20_path, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    # Also with torch's own strict check, straight from the file.
    resnet20().load_state_dict(file_sd, strict=True)

    model_sd = model.state_dict()
    assert list(model_sd) == list(file_sd)
    for key, tensor in file_sd.items():
        assert torch.equal(model_sd[key], tensor), key
    # The file's learnable tensors are exactly the model's parameters.
    file_params = sum(v.numel() for k, v in file_sd.items() if not k.endswith(BUFFER_SUFFIXES))
    assert file_params == sum(p.numel() for p in model.parameters()) == 272_474

    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model(torch.randn(8, 3, 32, 32))
    assert logits.shape == (8, 10)
    assert torch.isfinite(logits).all()
    # A trained network does not answer the same for every input.
    assert logits.std(dim=0).min() > 0


def test_original_checkpoint_does_not_fit_other_shapes(original_resnet20_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_weights(resnet20(in_channels=1), original_resnet20_path)
    message = str(info.value)
    assert "conv1.weight: checkpoint (16, 3, 3, 3) vs model (16, 1, 3, 3)" in message
    assert str(original_resnet20_path) in message

    with pytest.raises(ValueError, match=r"fc\.weight: checkpoint \(10, 64\) vs model \(100, 64\)"):
        load_weights(resnet20(num_classes=100), original_resnet20_path)


def test_resnet20_checkpoint_into_resnet32_names_missing_keys(original_resnet20_path: Path) -> None:
    model = resnet32()
    before = model.conv1.weight.clone()
    with pytest.raises(ValueError) as info:
        load_weights(model, original_resnet20_path)
    message = str(info.value)
    assert "72 missing keys" in message  # blocks 3 and 4 of each stage: 3 * 2 * 12 entries
    assert "layer1.3.conv1.weight" in message
    assert "unexpected" not in message
    assert len(message) < 1000  # one short message, not torch's full listing
    assert torch.equal(model.conv1.weight, before)  # nothing was loaded


# --- accepted layouts ---------------------------------------------------------------------


def test_plain_state_dict_roundtrip(tmp_path: Path) -> None:
    sd = small_state_dict()
    path = tmp_path / "plain.pth"
    torch.save(sd, path)
    model = resnet20(num_classes=3, in_channels=1)
    load_weights(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_library_checkpoint_with_model_key(tmp_path: Path) -> None:
    sd = small_state_dict()
    optimizer_state = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    ckpt = {"model": sd, "optimizer": optimizer_state, "epoch": 7, "config": {"model": "resnet20", "lr": 0.1}}
    path = tmp_path / "train.pth"
    torch.save(ckpt, path)
    assert extract_state_dict(read_checkpoint(path)).keys() == sd.keys()
    model = resnet20(num_classes=3, in_channels=1)
    load_weights(model, path)
    assert torch.equal(model.fc.weight, sd["fc.weight"])
    # An already loaded object works too.
    model2 = resnet20(num_classes=3, in_channels=1)
    load_weights(model2, ckpt)
    assert torch.equal(model2.layer3[2].bn2.running_var, sd["layer3.2.bn2.running_var"])


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd}])
def test_dataparallel_prefix_is_stripped(wrap, tmp_path: Path) -> None:
    sd = small_state_dict()
    prefixed = OrderedDict(("module." + k, v) for k, v in sd.items())
    assert list(extract_state_dict(wrap(prefixed))) == list(sd)
    path = tmp_path / "ddp.pth"
    torch.save(wrap(prefixed), path)
    model = resnet20(num_classes=3, in_channels=1)
    load_weights(model, path)
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])


def test_prefix_kept_unless_every_key_has_it() -> None:
    sd = {"module.weight": torch.zeros(1), "bias": torch.zeros(1)}
    assert list(extract_state_dict(sd)) == ["module.weight", "bias"]


def test_extract_returns_same_tensors_for_plain_state_dict() -> None:
    sd = small_state_dict()
    out = extract_state_dict(sd)
    assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)


# --- rejected inputs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "found"),
    [
        ([torch.zeros(1)], "list"),
        ({}, "empty dict"),
        ({"epoch": 3, "optimizer": {}}, "'epoch': int"),
        ({"model": {"conv1.weight": [1, 2]}}, "'model' entry"),
        ({"state_dict": {"w": torch.zeros(1)}}, "'state_dict': dict"),
        (torch.nn.Linear(2, 2), "nn.Module"),
    ],
)
def test_extract_rejects_other_objects(obj: object, found: str) -> None:
    with pytest.raises(ValueError) as info:
        extract_state_dict(obj)
    message = str(info.value)
    assert found in message
    assert "accepted" in message


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(resnet20(), path)


def test_file_with_other_content_names_path(tmp_path: Path) -> None:
    path = tmp_path / "metrics.pth"
    torch.save({"epoch": 3, "accuracy": 0.9}, path)
    with pytest.raises(ValueError, match=r"metrics\.pth: not a model checkpoint: found a dict \{'epoch': int"):
        load_weights(resnet20(), path)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a file"):
        load_weights(resnet20(), tmp_path)


@pytest.mark.parametrize(
    ("content", "phrase"),
    [(b"this is not a checkpoint\x00\x01\x02" * 10, "not a torch checkpoint"), (b"", "empty")],
)
def test_garbage_file_names_path(tmp_path: Path, content: bytes, phrase: str) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_weights(resnet20(), str(path))
    assert str(path) in str(info.value)
    assert phrase in str(info.value)


def test_truncated_checkpoint_names_path(tmp_path: Path, original_resnet20_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    data = original_resnet20_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth: not a torch checkpoint, or corrupt or truncated"):
        load_weights(resnet20(), path)


class _Opaque:
    """A pickled object that weights_only loading must refuse."""


def test_pickled_object_is_refused_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "object.pth"
    torch.save({"model": small_state_dict(), "extra": _Opaque()}, path)
    with pytest.raises(ValueError) as info:
        load_weights(resnet20(num_classes=3, in_channels=1), path)
    message = str(info.value)
    assert str(path) in message and "weights_only=False" in message
    assert "_Opaque" in message  # names the object that was refused


def test_non_strict_reports_missing_but_still_checks_shapes() -> None:
    sd = small_state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    model = resnet20(num_classes=3, in_channels=1)
    result = load_weights(model, partial, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])
    with pytest.raises(ValueError, match="missing keys"):
        load_weights(resnet20(num_classes=3, in_channels=1), partial, strict=True)
    with pytest.raises(ValueError, match=r"conv1\.weight: checkpoint \(16, 1, 3, 3\) vs model \(16, 3, 3, 3\)"):
        load_weights(resnet20(num_classes=3, in_channels=3), partial, strict=False)
