"""The packed format is decodable from its documentation: numpy and ``safetensors`` alone, following the header's
documented fields, rebuild every quantized weight bit for bit as ``load_packed`` does."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

import metaquant as mq
import metaquant.export as export_package
from metaquant.export import DECODE_RULES, export_packed, load_packed

CONFIGS = [
    ("dorefa", 1),
    ("dorefa", 3),
    ("bwn", 1),
    ("bwn-channel", 1),
    ("ternary", 2),
    ("uniform", 4),
    ("uniform-channel", 3),
    ("uniform-group", 4),
]


def rebuild_with_numpy(path):
    """Every quantized weight of a packed file, by the rules of ``metaquant.export``'s docstring: no metaquant,
    no torch."""
    with safe_open(str(path), framework="np") as f:
        info = f.metadata()
        stored = {key: f.get_tensor(key) for key in f.keys()}
    bits = json.loads(info["quantizer"])["bits"]
    rule = json.loads(info["decode"])
    assert rule["rule"] == "(a * code + b) * scale + c"
    weights = {}
    for key, spec in json.loads(info["codes"]).items():
        n = int(np.prod(spec["shape"]))
        stream = np.unpackbits(stored[f"{key}.codes"], bitorder="little")[: n * bits].reshape(n, bits)
        code = (stream.astype(np.int64) << np.arange(bits)).sum(1) - spec["offset"]
        scale = stored[f"{key}.scale"]
        if "group_size" in rule:  # per group: each scale repeated over its group, the last one cut
            scale = np.repeat(scale, rule["group_size"], axis=-1)[:, : spec["shape"][-1]]
        w = (rule["a"] * code + rule["b"]).astype(scale.dtype).reshape(spec["shape"]) * scale
        weights[key] = w + scale.dtype.type(rule["c"]) if rule["c"] else w
    return weights


def _linear(module, name):
    return isinstance(module, torch.nn.Linear)


@pytest.mark.parametrize("name,bits", CONFIGS)
def test_numpy_and_safetensors_alone_rebuild_a_packed_resnet20_bit_for_bit(tmp_path, name, bits):
    torch.manual_seed(0)
    model = mq.models.resnet20(num_classes=10)
    if name == "uniform-group":  # groups of 6 over the 64 inputs of the linear layer: the last group holds 4
        model = mq.quantize_(model, mq.QuantConfig(name, bits, group_size=6), filter_fn=_linear).eval()
    else:
        model = mq.quantize_(model, mq.QuantConfig(name, bits)).eval()
    arch = {"model": "resnet20", "num_classes": 10, "in_channels": 3, "image_size": 32}
    export_packed(model, tmp_path / "m.safetensors", architecture=arch)
    rebuilt = rebuild_with_numpy(tmp_path / "m.safetensors")
    loaded = load_packed(tmp_path / "m.safetensors").state_dict()
    assert set(rebuilt) == set(mq.layers.quantized_weight_keys(model))
    for key, w in rebuilt.items():
        expected = loaded[key].numpy()
        assert w.dtype == expected.dtype and w.shape == expected.shape
        assert np.array_equal(w.view(np.uint32), expected.view(np.uint32)), key  # bit for bit
        layer = mq.layers.quantized_weight_keys(model)[key]
        with torch.no_grad():  # and both are the weights the quantized model computes with
            assert np.array_equal(w, layer.quantizer(layer.weight).numpy())
    if name == "dorefa" and bits == 1:  # the documented example: a 1-bit DoReFa weight is ±1
        assert all(set(np.unique(w)) == {-1.0, 1.0} for w in rebuilt.values())


def test_the_documented_decode_table_is_the_rule_the_files_carry():
    rows = re.findall(r"^``([a-z-]+)``(?: k)?\s+\((-?\d|−\d), (-?\d|−\d), (-?\d|−\d)\)", export_package.__doc__, re.M)
    documented = {name: tuple(int(v.replace("−", "-")) for v in abc) for name, *abc in rows}
    assert documented == DECODE_RULES
    assert set(DECODE_RULES) == set(mq.quantizers.QUANTIZERS)


def test_export_packed_refuses_a_quantizer_whose_decode_is_not_its_rule(tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Shifted(mq.quantizers.DoReFa):
        def decode(self, encoded):
            return super().decode(encoded) + 0.5

    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    model[0].quantizer = Shifted(bits=1)
    with pytest.raises(ValueError, match=r"the quantizer of 0.weight \(Shifted\) does not decode as its name's rule"):
        export_packed(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_export_packed_keeps_the_input_normalization_it_is_given(tmp_path):
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    normalization = {"rule": "(pixels / 255 - mean) / std", "mean": [0.5], "std": [0.25]}
    export_packed(model, tmp_path / "m.safetensors", input_normalization=normalization)
    with safe_open(str(tmp_path / "m.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["input_normalization"]) == normalization
    header, _ = mq.export.read_packed(tmp_path / "m.safetensors")
    assert header["input_normalization"] == normalization and header["decode"]["c"] == -1
