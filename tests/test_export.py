"""Packed export: exact bit-packing round trips, identical logits, and the size of a 1-bit ResNet20."""

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

import metaquant as mq
from metaquant.export import export_packed, load_packed, pack_bits, unpack_bits
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


CONFIGS = [(name, bits) for name, cls in QUANTIZERS.items() for bits in sorted({cls.min_bits, cls.max_bits})]


@pytest.mark.parametrize("name,bits", CONFIGS)
def test_exported_model_gives_the_quantized_models_logits_exactly(tmp_path, name, bits):
    torch.manual_seed(0)
    model = mq.models.resnet8(num_classes=10, in_channels=1)
    mq.quantize_(model, mq.QuantConfig(name, bits), filter_fn=lambda m, n: n != "fc" and isinstance(m, torch.nn.Conv2d))
    model.train()
    model(torch.randn(16, 1, 28, 28))  # non-trivial BatchNorm statistics
    model.eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    arch = {"model": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28}
    export_packed(model, tmp_path / "m.mqpack", architecture=arch)
    loaded = load_packed(tmp_path / "m.mqpack")
    assert not mq.quantized_layers(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_one_bit_resnet20_file_is_over_20x_smaller_than_the_float_checkpoint(tmp_path):
    model = mq.quantize_(mq.models.resnet20(num_classes=10), mq.QuantConfig("dorefa", 1))
    size = export_packed(model, tmp_path / "m.mqpack")
    buffer = io.BytesIO()
    torch.save(mq.dequantize_(model).state_dict(), buffer)
    assert buffer.tell() / size >= 20, (buffer.tell(), size)


def test_bad_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a metaquant packed model file"):
        load_packed(tmp_path / "x.pt")
    model = mq.quantize_(mq.models.resnet8(), mq.QuantConfig("dorefa", 1))
    export_packed(model, tmp_path / "good.mqpack", architecture={"model": "resnet8", "num_classes": 10,
                                                                "in_channels": 3, "image_size": 32})
    raw = (tmp_path / "good.mqpack").read_bytes()
    (tmp_path / "cut.mqpack").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="is truncated"):
        load_packed(tmp_path / "cut.mqpack")
    import struct
    import zlib

    header = zlib.compress(json.dumps({"version": 1}).encode())
    (tmp_path / "bad.mqpack").write_bytes(b"MQPACK\0\0" + struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="damaged header"):
        load_packed(tmp_path / "bad.mqpack")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_packed(tmp_path / "good.mqpack", mq.models.resnet20())
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "z.pt")


def test_eval_of_a_packed_export_reproduces_the_runs_accuracy(tmp_path, capsys, fashion_mnist_available):
    import re

    from metaquant.cli import main

    args = ["quantize", "-m", "resnet8", "--train-size", "128", "--test-size", "300", "-bs", "32", "-n", "2",
            "-meta", "multifc", "-hidden", "8", "--no-progress", "--run-dir", str(tmp_path), "--name", "q"]
    assert main(args) == 0
    recorded = json.loads((tmp_path / "q" / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert main(["export", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    sizes = re.search(r"([\d,]+) bytes; float model ([\d,]+) bytes", out)
    assert int(sizes[2].replace(",", "")) > 10 * int(sizes[1].replace(",", ""))
    assert main(["eval", str(tmp_path / "q" / "model.mqpack"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {recorded:.2f}% top-1" in out and f"(the run recorded {recorded:.2f}%)" in out
    assert main(["eval", str(tmp_path / "q" / "model.mqpack.missing")]) == 1
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        assert main(["export", str(tmp_path / "q"), "--format", "onnx"]) == 0
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "q" / "model.onnx")]) == 0
        onnx_acc = float(re.search(r"test accuracy ([\d.]+)% top-1", capsys.readouterr().out)[1])
        assert abs(onnx_acc - recorded) <= 100 / 300  # logits equal to 1e-4: at most one of 300 images flips


def test_onnx_export_matches_the_quantized_model_and_folds_batchnorm(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from metaquant.export import export_onnx

    torch.manual_seed(1)
    model = mq.quantize_(mq.models.resnet8(num_classes=10, in_channels=1), mq.QuantConfig("bwn", 1))
    model.train()
    for _ in range(3):
        model(torch.randn(32, 1, 28, 28))  # realistic BatchNorm statistics
    model.eval()
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).numpy()
    export_onnx(model, tmp_path / "m.onnx", x[:1], metadata={"note": "test"})
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (logits,) = session.run(None, {"images": x.numpy()})  # a batch size other than the example's
    torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(expected), rtol=1e-4, atol=1e-4)
    assert session.get_modelmeta().custom_metadata_map == {"note": '"test"'}
    assert quantized_weights_unchanged(model)


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
    return any(not torch.equal(l.weight, l.quantizer(l.weight)) for l in mq.quantized_layers(model).values())


def test_eval_needs_only_the_test_files(tmp_path, tiny_mnist, capsys):
    import shutil

    from metaquant.cli import main

    assert main(["quantize", *tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "1", "--no-progress",
                 "--run-dir", str(tmp_path), "--name", "q"]) == 0
    recorded = json.loads((tmp_path / "q" / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert main(["export", str(tmp_path / "q")]) == 0
    source = Path(tiny_mnist[tiny_mnist.index("--data-dir") + 1])
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(source / name, only_test / name)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q" / "model.mqpack"), "--data-dir", str(only_test), "--device", "cpu"]) == 0
    assert f"test accuracy {recorded:.2f}% top-1" in capsys.readouterr().out
