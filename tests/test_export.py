"""Packed export (safetensors, and the earlier container): exact bit-packing round trips, identical logits, the
size of a 1-bit ResNet20; ONNX export with integer weights and DequantizeLinear, checked with onnxruntime."""

import importlib.util
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import metaquant as mq
from metaquant.export import export_packed, levels, load_packed, pack_bits, read_packed, unpack_bits
from metaquant.quantizers import QUANTIZERS


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 1000])
def test_pack_unpack_round_trip(bits, numel):
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_pack_layout_is_lsb_first():
    # codes 1, 0, 3 at 2 bits: stream 1 0 | 0 0 | 1 1 -> byte 0b00110001
    assert pack_bits(torch.tensor([1, 0, 3]), 2).tolist() == [0b110001]
    with pytest.raises(ValueError, match="codes must lie in \\[0, 4\\)"):
        pack_bits(torch.tensor([4]), 2)


LEGACY = Path(__file__).parent / "fixtures"
CONFIGS = [(name, bits) for name, cls in QUANTIZERS.items() for bits in sorted({cls.min_bits, cls.max_bits})]


@pytest.mark.parametrize("name,bits", CONFIGS)
def test_exported_model_gives_the_quantized_models_logits_exactly(tmp_path, name, bits):
    torch.manual_seed(0)
    model = mq.models.resnet8(num_classes=10, in_channels=1)
    if name == "uniform-group":  # 2-D weights only: the linear layer, groups of 5 of its 64 inputs
        mq.quantize_(model, mq.QuantConfig(name, bits, group_size=5), filter_fn=lambda m, n: n == "fc")
    else:
        convs = lambda m, n: n != "fc" and isinstance(m, torch.nn.Conv2d)  # noqa: E731
        mq.quantize_(model, mq.QuantConfig(name, bits), filter_fn=convs)
    model.train()
    model(torch.randn(16, 1, 28, 28))  # non-trivial BatchNorm statistics
    model.eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    arch = {"model": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28}
    export_packed(model, tmp_path / "m.safetensors", architecture=arch)
    loaded = load_packed(tmp_path / "m.safetensors")
    assert not mq.quantized_layers(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_one_bit_resnet20_file_is_over_18x_smaller_than_the_float_checkpoint(tmp_path):
    model = mq.quantize_(mq.models.resnet20(num_classes=10), mq.QuantConfig("dorefa", 1))
    size = export_packed(model, tmp_path / "m.safetensors")
    buffer = io.BytesIO()
    torch.save(mq.dequantize_(model).state_dict(), buffer)
    # The tensors' bytes: 1 bit per quantized weight, float BatchNorm and biases.
    (header_length,) = struct.unpack("<Q", (tmp_path / "m.safetensors").read_bytes()[:8])
    data = size - 8 - header_length
    assert buffer.tell() / data >= 24, (buffer.tell(), data)
    # The safetensors header (each tensor's name, dtype, shape and offsets as plain JSON) adds about 14 KB for
    # ResNet20's 150 tensors.
    assert buffer.tell() / size >= 18, (buffer.tell(), size)


def test_a_packed_file_is_a_safetensors_file_that_numpy_alone_decodes(tmp_path):
    """Read with ``safetensors`` and numpy only (no metaquant, no torch), the file gives the quantized weights
    and every other tensor of the model."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = mq.quantize_(mq.models.resnet8(num_classes=10, in_channels=1), mq.QuantConfig("bwn-channel", 1))
    model = _with_batchnorm_statistics(model)
    arch = {"model": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28}
    export_packed(model, tmp_path / "m.safetensors", architecture=arch, metadata={"test_acc": 12.5})
    with safe_open(str(tmp_path / "m.safetensors"), framework="np") as f:
        info = f.metadata()
        stored = {key: f.get_tensor(key) for key in f.keys()}
    assert info["format"] == "metaquant packed model" and info["format_version"] == "2"
    assert json.loads(info["architecture"]) == arch and json.loads(info["metadata"]) == {"test_acc": 12.5}
    assert json.loads(info["quantizer"]) == {"name": "bwn-channel", "bits": 1}
    codes = json.loads(info["codes"])
    layers = mq.quantized_layers(model)
    assert set(codes) == {f"{name}.weight" for name in layers}
    for name, layer in layers.items():
        spec = codes[f"{name}.weight"]
        n = int(np.prod(spec["shape"]))
        bits = np.unpackbits(stored[f"{name}.weight.codes"], bitorder="little")[:n]  # 1 bit per weight
        signs = 2.0 * bits.reshape(spec["shape"]) - 1  # BWN: code 1 is +a, code 0 is −a
        decoded = (signs * stored[f"{name}.weight.scale"]).astype(np.float32)
        with torch.no_grad():
            np.testing.assert_array_equal(decoded, layer.quantizer(layer.weight).numpy())
    for key, value in model.state_dict().items():
        if key.removesuffix(".weight") not in layers:
            np.testing.assert_array_equal(stored[key], value.numpy())


@pytest.mark.parametrize("fixture", ["packed-v1-resnet8-dorefa1.mqpack", "packed-v1-resnet8-ternary2.mqpack"])
def test_files_of_the_earlier_format_still_load(fixture):
    """Files written by the earlier container format (kept in tests/fixtures, with the input and the quantized
    model's logits in their metadata) load to the same logits: to float32 rounding, since the convolution
    kernel that computes them, and so the order of its sums, depends on the processor (a wrong weight would
    move these logits, which are in the thousands, by far more)."""
    header, _ = read_packed(LEGACY / fixture)
    assert header["version"] == 1
    net = load_packed(LEGACY / fixture)
    x, logits = (torch.tensor(header["metadata"][k]) for k in ("input", "logits"))
    with torch.no_grad():
        torch.testing.assert_close(net(x), logits, rtol=1e-5, atol=1e-5)


def test_bad_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a metaquant packed model file"):
        load_packed(tmp_path / "x.pt")
    model = mq.quantize_(mq.models.resnet8(), mq.QuantConfig("dorefa", 1))
    export_packed(
        model,
        tmp_path / "good.safetensors",
        architecture={"model": "resnet8", "num_classes": 10, "in_channels": 3, "image_size": 32},
    )
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="is damaged or truncated"):
        load_packed(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is a safetensors file but not a metaquant packed model"):
        load_packed(tmp_path / "other.safetensors")
    save_file(
        {"w": torch.ones(2)},
        tmp_path / "v9.safetensors",
        metadata={"format": "metaquant packed model", "format_version": "9"},
    )
    with pytest.raises(ValueError, match="has format version 9; this metaquant reads versions 1 and 2"):
        load_packed(tmp_path / "v9.safetensors")
    save_file(
        {"w": torch.ones(2)},
        tmp_path / "nohead.safetensors",
        metadata={"format": "metaquant packed model", "format_version": "2", "quantizer": "{"},
    )
    with pytest.raises(ValueError, match="damaged header"):
        load_packed(tmp_path / "nohead.safetensors")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_packed(tmp_path / "good.safetensors", mq.models.resnet20())
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "z.pt")
    # the earlier container's checks
    import zlib

    legacy = (LEGACY / "packed-v1-resnet8-dorefa1.mqpack").read_bytes()
    (tmp_path / "cut.mqpack").write_bytes(legacy[:-100])
    with pytest.raises(ValueError, match="is truncated"):
        load_packed(tmp_path / "cut.mqpack")
    header = zlib.compress(json.dumps({"version": 1}).encode())
    (tmp_path / "bad.mqpack").write_bytes(b"MQPACK\0\0" + struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="damaged header"):
        load_packed(tmp_path / "bad.mqpack")


def test_eval_of_a_packed_export_reproduces_the_runs_accuracy(tmp_path, capsys, fashion_mnist_available):
    import re

    from metaquant.experiments.cli import main

    args = [
        "quantize",
        "-m",
        "resnet8",
        "--train-size",
        "128",
        "--test-size",
        "300",
        "-bs",
        "32",
        "-n",
        "2",
        "-meta",
        "multifc",
        "-hidden",
        "8",
        "--no-progress",
        "--run-dir",
        str(tmp_path),
        "--name",
        "q",
    ]
    assert main(args) == 0
    recorded = json.loads((tmp_path / "q" / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert main(["export", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    sizes = re.search(r"([\d,]+) bytes; float model ([\d,]+) bytes", out)
    assert int(sizes[2].replace(",", "")) > 10 * int(sizes[1].replace(",", ""))
    assert main(["eval", str(tmp_path / "q" / "model.safetensors"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {recorded:.2f}% top-1" in out and f"(the run recorded {recorded:.2f}%)" in out
    assert main(["eval", str(tmp_path / "q" / "model.mqpack.missing")]) == 1
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        assert main(["export", str(tmp_path / "q"), "--format", "onnx"]) == 0
        capsys.readouterr()
        import onnxruntime

        sessions = []

        class Recording(onnxruntime.InferenceSession):  # the options eval gives onnxruntime
            def __init__(self, model, options=None, **kwargs):
                sessions.append(options)
                super().__init__(model, options, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(onnxruntime, "InferenceSession", Recording)
            assert main(["eval", str(tmp_path / "q" / "model.onnx")]) == 0
        (options,) = sessions  # those that fold the weights' DequantizeLinear once
        assert options.get_session_config_entry("session.disable_quant_qdq") == "1"
        onnx_acc = float(re.search(r"test accuracy ([\d.]+)% top-1", capsys.readouterr().out)[1])
        assert abs(onnx_acc - recorded) <= 100 / 300  # logits equal to 1e-4: at most one of 300 images flips


def _with_batchnorm_statistics(model):
    model.train()
    for _ in range(3):
        model(torch.randn(32, 1, 28, 28))  # realistic BatchNorm statistics
    return model.eval()


# (quantizer, bits, opset, the integer type its levels need): 1-bit and ternary levels fit INT2 from opset 25 on
ONNX_CASES = [("ternary", 2, 25, "INT2"), ("dorefa", 2, 21, "INT4"), ("uniform", 8, 21, "INT8")]


@pytest.mark.parametrize("name,bits,opset,int_type", ONNX_CASES)
def test_onnx_export_holds_integer_weights_and_matches_the_quantized_model(tmp_path, name, bits, opset, int_type):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from metaquant.export import export_onnx

    torch.manual_seed(1)
    model = _with_batchnorm_statistics(
        mq.quantize_(mq.models.resnet8(num_classes=10, in_channels=1), mq.QuantConfig(name, bits))
    )
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    export_onnx(model, tmp_path / "m.onnx", x[:1], metadata={"note": "test"}, opset=opset)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops
    initializers = {t.name: t for t in proto.graph.initializer}
    dequantize = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    layers = mq.quantized_layers(model)
    assert set(dequantize) == {f"{layer}.weight" for layer in layers}  # every quantized weight, nothing else
    for layer_name, layer in layers.items():
        node = dequantize[f"{layer_name}.weight"]
        stored = initializers[node.input[0]]
        assert onnx.TensorProto.DataType.Name(stored.data_type) == int_type
        assert f"{layer_name}.weight" not in initializers  # no float copy left
        q = numpy_helper.to_array(stored).astype(np.int64)
        expected_levels = levels(layer.quantizer.encode(layer.weight.detach()), bits).numpy()
        np.testing.assert_array_equal(q, expected_levels)
        scale = numpy_helper.to_array(initializers[node.input[1]])
        # Conv weights carry their folded BatchNorm: one scale per output channel, along axis 0
        if isinstance(layer, torch.nn.Conv2d):
            assert scale.shape == (layer.out_channels,)
            assert [(a.name, a.i) for a in node.attribute] == [("axis", 0)]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})  # a batch size other than the example's
    # Equal up to float rounding: BatchNorm folded into the weights and the scales, another summation order.
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    assert metadata.pop("metaquant.digest").startswith('"sha256:') and metadata == {"note": '"test"'}
    assert quantized_weights_unchanged(model)
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces or paths of this machine


def test_onnx_export_of_a_1bit_resnet20_is_several_times_smaller_than_float_onnx(tmp_path):
    """The float ONNX of the quantized network (what the exporter writes for ``materialize(model)``) against
    the integer export: at least 4x smaller with INT4 (opset 21), at least 8x with INT2 (opset 25)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    import contextlib
    import warnings

    from metaquant.export import export_onnx, materialize

    torch.manual_seed(0)
    model = mq.quantize_(mq.models.resnet20(num_classes=10), mq.QuantConfig("dorefa", 1)).eval()
    example = torch.zeros(1, 3, 32, 32)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            materialize(model), (example,), str(tmp_path / "float.onnx"), dynamo=True, external_data=False
        )
    float_size = (tmp_path / "float.onnx").stat().st_size
    int4 = export_onnx(model, tmp_path / "int4.onnx", example)
    int2 = export_onnx(model, tmp_path / "int2.onnx", example, opset=25)
    assert float_size > 1_000_000 and float_size / int4 >= 4 and float_size / int2 >= 8, (float_size, int4, int2)
    assert int2 == (tmp_path / "int2.onnx").stat().st_size
    assert onnx.load(str(tmp_path / "int2.onnx")).opset_import[0].version == 25


def test_onnx_export_of_a_model_whose_forward_argument_is_not_named_x(tmp_path):
    """nn.Sequential's forward takes ``input``: the batch dimension is declared by position, not by name."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from metaquant.export import export_onnx

    torch.manual_seed(0)
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), mq.QuantConfig("dorefa", 1))
    export_onnx(model.eval(), tmp_path / "seq.onnx", torch.randn(1, 3, 4))
    x = torch.randn(4, 3, 4)
    (logits,) = ort.InferenceSession(str(tmp_path / "seq.onnx")).run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-5, atol=1e-5)


def quantized_weights_unchanged(model):
    # exporting works on a copy: the latent weights W of the model stay latent
    return any(not torch.equal(q.weight, q.quantizer(q.weight)) for q in mq.quantized_layers(model).values())


def test_eval_needs_only_the_test_files(tmp_path, tiny_mnist, capsys):
    import shutil

    from metaquant.experiments.cli import main

    assert (
        main(
            [
                "quantize",
                *tiny_mnist,
                "-m",
                "resnet8",
                "-bs",
                "32",
                "-n",
                "1",
                "--no-progress",
                "--run-dir",
                str(tmp_path),
                "--name",
                "q",
            ]
        )
        == 0
    )
    recorded = json.loads((tmp_path / "q" / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert main(["export", str(tmp_path / "q")]) == 0
    source = Path(tiny_mnist[tiny_mnist.index("--data-dir") + 1])
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(source / name, only_test / name)
    capsys.readouterr()
    packed = str(tmp_path / "q" / "model.safetensors")
    assert main(["eval", packed, "--data-dir", str(only_test), "--device", "cpu"]) == 0
    assert f"test accuracy {recorded:.2f}% top-1" in capsys.readouterr().out


def test_eval_with_precise_bn_tests_the_model_with_statistics_recomputed_from_training_batches(
    tmp_path, tiny_mnist, capsys
):
    """``metaquant eval RUN --precise-bn N``: the accuracy of the run's model after its BatchNorm statistics are
    recomputed from N batches of its training set; oracle: the packed export of the same checkpoint, its
    statistics recomputed by hand from the same batches, then evaluated."""
    from metaquant.data import make_loaders, make_test_loader
    from metaquant.experiments.artifacts import evaluate_artifact
    from metaquant.experiments.cli import main
    from metaquant.experiments.config import RunConfig

    args = ["quantize", *tiny_mnist, "-m", "resnet8", "-bs", "16", "-n", "1", "--no-progress"]
    assert main([*args, "--run-dir", str(tmp_path), "--name", "q"]) == 0
    run = tmp_path / "q"
    assert main(["export", str(run)]) == 0
    config = RunConfig.load(run / "config.json")
    train, _, _ = make_loaders(
        config.dataset, data_dir=config.data_dir, batch_size=config.batch_size, seed=config.seed, download=False
    )
    test, _ = make_test_loader(
        config.dataset, data_dir=config.data_dir, batch_size=config.test_batch_size, seed=config.seed, download=False
    )
    plain = load_packed(run / "model.safetensors")
    before = [bn.running_mean.clone() for bn in mq.batchnorm.batchnorm_layers(plain)]
    mq.batchnorm.recompute_batchnorm_stats(plain, train, 3)
    assert any(not torch.equal(a, bn.running_mean) for a, bn in zip(before, mq.batchnorm.batchnorm_layers(plain)))
    expected = mq.evaluate(plain, test)
    for path in (run, run / "model.safetensors"):
        result = evaluate_artifact(path, device="cpu", precise_bn_batches=3)
        assert result["top1"] == expected["top1"] and result["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu", "--precise-bn", "3"]) == 0
    assert f"{expected['top1']:.2f}% top-1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="precise_bn_batches must be an integer >= 0, got -1"):
        evaluate_artifact(run, precise_bn_batches=-1)
    with pytest.raises(ValueError, match="not to the ONNX file"):
        evaluate_artifact(tmp_path / "model.onnx", precise_bn_batches=3)
    assert main(["eval", str(run), "--precise-bn", "-1"]) != 0
    assert "got -1" in capsys.readouterr().err


# --- quantized activations --------------------------------------------------------------------------------------
ACTIVATIONS = {
    "W1A1": mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("sign", 1, "approxsign")),
    "W4A4-lsq": mq.QuantConfig("uniform", 4, activations=mq.ActQuantConfig("lsq", 4)),
    "W2A4-pact": mq.QuantConfig("dorefa", 2, activations=mq.ActQuantConfig("pact", 4, first_layer_bits=None)),
    "W4A3-lsq": mq.QuantConfig("uniform", 4, activations=mq.ActQuantConfig("lsq", 3, first_layer_bits=4)),
    "W4A4-lsq-weights": mq.QuantConfig("lsq", 4, activations=mq.ActQuantConfig("lsq", 4)),
}


def _activation_model(config):
    torch.manual_seed(1)
    model = mq.quantize_(mq.models.resnet8(num_classes=10, in_channels=1), config)
    with torch.no_grad():  # learned weight steps as training leaves them: away from their first value
        for step in mq.layers.learned_weight_parameters(model).values():
            step.mul_(torch.empty_like(step).uniform_(0.5, 1.5))
    for q in mq.layers.input_quantizers(model).values():
        if q.name == "pact":
            torch.nn.init.constant_(q.alpha, 2.0)  # inputs reach α: both ends of the range are used
    return _with_batchnorm_statistics(model)  # the first training batch initialises the LSQ steps


@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_packed_file_records_the_input_quantizers_and_load_packed_gives_the_same_logits(tmp_path, case):
    model = _activation_model(ACTIVATIONS[case])
    export_packed(
        model,
        tmp_path / "m.safetensors",
        architecture={"model": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28},
    )
    header, _ = read_packed(tmp_path / "m.safetensors")
    quantizers = mq.layers.input_quantizers(model)
    assert header["activations"] == {name: q.spec() for name, q in quantizers.items()}
    loaded = load_packed(tmp_path / "m.safetensors")
    assert type(loaded.conv1).__name__ == "Conv2d"
    rebuilt = mq.layers.input_quantizers(loaded)
    assert list(rebuilt) == list(quantizers)
    for name, q in quantizers.items():
        assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), rebuilt[name].state_dict().values()))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_export_packed_refuses_an_lsq_input_quantizer_no_training_batch_initialised(tmp_path):
    config = mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("sign", 1, first_layer_bits=4))
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), config).eval()
    with pytest.raises(ValueError, match=r"^export_packed: the input quantizer of 0 \(LSQActivation\) was never init"):
        export_packed(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())
    model.train()(torch.randn(8, 4))  # one training-mode batch initialises the step
    export_packed(model.eval(), tmp_path / "m.safetensors")
    x = torch.randn(3, 4)
    loaded = load_packed(tmp_path / "m.safetensors", torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    assert torch.equal(loaded(x), model(x))


def test_a_packed_file_without_activations_has_no_activations_entry(tmp_path):
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 2))).eval()
    export_packed(model, tmp_path / "m.safetensors")
    header, _ = read_packed(tmp_path / "m.safetensors")
    assert header["activations"] is None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="np") as f:
        assert "activations" not in f.metadata()


@pytest.mark.parametrize(
    "case,opset",
    [("W1A1", 21), ("W4A4-lsq", 21), ("W2A4-pact", 21), ("W4A3-lsq", 21), ("W4A4-lsq", 17), ("W4A4-lsq-weights", 21)],
)
def test_onnx_export_quantizes_the_activations_with_qdq_and_matches_the_model(tmp_path, case, opset):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from metaquant.export import export_onnx, onnx_session_options
    from metaquant.export.onnx_activations import activation_type

    model = _activation_model(ACTIVATIONS[case])
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    export_onnx(model, tmp_path / "m.onnx", x[:2], opset=opset)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    quantizers = mq.layers.input_quantizers(model)
    qdq = [q for q in quantizers.values() if q.name != "sign"]
    # one QuantizeLinear per input quantizer (the exporter merges those of one input with equal steps, as a block's
    # convolution and its shortcut's after the same first batch), each with its integer type
    tensors = {t.name: t for t in proto.graph.initializer}
    tensors |= {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
    found = {(float(numpy_helper.to_array(tensors[n.input[1]])), tensors[n.input[2]].data_type) for n in quantize}
    wanted = set()
    for q in qdq:
        scale, low, high = q.integer_form()
        wanted.add((float(np.float32(scale)), getattr(onnx.TensorProto, activation_type(low, high, opset)[0])))
    assert found == wanted and len(quantize) <= len(qdq)
    if any(q.name == "sign" for q in quantizers.values()):
        assert "Where" in [n.op_type for n in proto.graph.node] and "Sign" not in [n.op_type for n in proto.graph.node]
    # onnxruntime with its QDQ transformations off (onnx_session_options) computes what the model computes; with
    # its default options it runs the activations' Q/DQ pairs through other kernels, which round otherwise
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), onnx_session_options(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


# --- per-channel and per-group scales ------------------------------------------------------------------------------
class _Small(torch.nn.Module):
    """A transposed convolution (output channels along axis 1) and two linear layers, the last one's 10 inputs not a
    multiple of the group size 4."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(2, 3, 2, stride=2)
        self.fc1 = torch.nn.Linear(3 * 4 * 4, 10)
        self.fc2 = torch.nn.Linear(10, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.up(x)).flatten(1))))


def _small(name: str) -> torch.nn.Module:
    torch.manual_seed(3)
    model = _Small()
    if name == "uniform-group":
        config = mq.QuantConfig(name, 4, group_size=4)
        return mq.quantize_(model, config, filter_fn=lambda m, n: isinstance(m, torch.nn.Linear)).eval()
    model = mq.quantize_(model, mq.QuantConfig(name, 3))
    with torch.no_grad():  # learned steps as training leaves them, each channel its own
        for step in mq.layers.learned_weight_parameters(model).values():
            step.mul_(torch.empty_like(step).uniform_(0.5, 1.5))
    return model.eval()


@pytest.mark.parametrize("name", ["uniform-channel", "uniform-group", "lsq-channel"])
def test_per_channel_and_per_group_scales_round_trip_through_a_packed_file_exactly(tmp_path, name):
    model = _small(name)
    export_packed(model, tmp_path / "m.safetensors")
    header, tensors = read_packed(tmp_path / "m.safetensors")
    loaded = load_packed(tmp_path / "m.safetensors", _Small())
    for key, layer in mq.layers.quantized_weight_keys(model).items():
        encoded = layer.quantizer.encode(layer.weight.detach())
        assert torch.equal(tensors[f"{key}.scale"], encoded.scale)  # the scales themselves, bit for bit
        with torch.no_grad():
            assert torch.equal(loaded.state_dict()[key], layer.quantizer(layer.weight))
    if name == "uniform-group":
        assert header["decode"]["group_size"] == 4 and header["quantizer"] == {"name": name, "bits": 4, "group_size": 4}
        assert tensors["fc2.weight.scale"].shape == (4, 3)  # groups of 4, 4 and 2 inputs
    else:
        assert "group_size" not in header["decode"] and tensors["up.weight.scale"].shape == (1, 3, 1, 1)
    x = torch.randn(5, 2, 2, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_export_packed_refuses_two_group_sizes_in_one_model(tmp_path):
    model = _small("uniform-group")
    model.fc2.quantizer = mq.get_quantizer("uniform-group", 4, group_size=2)
    with pytest.raises(ValueError, match=r"one quantizer configuration per model, found \[\('uniform-group', 4, 2\), "):
        export_packed(model, tmp_path / "m.safetensors")


@pytest.mark.parametrize(
    "name,opset", [("uniform-channel", 13), ("uniform-channel", 21), ("uniform-group", 21), ("lsq-channel", 21)]
)
def test_onnx_export_of_per_channel_and_per_group_scales_matches_the_model(tmp_path, name, opset):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from metaquant.export import export_onnx

    model = _small(name)
    x = torch.randn(6, 2, 2, 2)
    export_onnx(model, tmp_path / "m.onnx", x[:2], opset=opset)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    nodes = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for key, layer in mq.layers.quantized_weight_keys(model).items():
        node = nodes[key]
        encoded = layer.quantizer.encode(layer.weight.detach())
        np.testing.assert_array_equal(initializers[node.input[0]], levels(encoded, layer.quantizer.bits).numpy())
        # the exporter reads the scales off Ŵ (a folded BatchNorm would change them): max|W|/L exactly, a learned
        # step to float rounding
        np.testing.assert_allclose(
            initializers[node.input[1]],
            encoded.scale.reshape(-1 if "channel" in name else encoded.scale.shape).numpy(),
            rtol=1e-6 if name.startswith("lsq") else 0,
        )
        attributes = {a.name: a.i for a in node.attribute}
        if name == "uniform-group":
            assert attributes == {"axis": 1, "block_size": 4}
        else:
            assert attributes == {"axis": 1 if key == "up.weight" else 0}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_onnx_export_of_per_group_scales_needs_opset_21(tmp_path):
    pytest.importorskip("onnxscript")
    from metaquant.export import export_onnx

    with pytest.raises(
        ValueError, match=r"fc1.weight has one scale per group of 4 weights, .* from opset 21 .*got opset 20"
    ):
        export_onnx(_small("uniform-group"), tmp_path / "m.onnx", torch.zeros(2, 2, 2, 2), opset=20)
    assert not (tmp_path / "m.onnx").exists()
