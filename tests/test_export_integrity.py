"""Exported files carry a content digest, checked on every load: a packed or ONNX file whose bytes changed after
it was written is refused with a message that says so (read as it is, it would give other logits without a
word); files written before the digest existed load, with a log line."""

import importlib.util
import json
import logging
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import metaquant as mq
from metaquant.export import export_onnx, export_packed, load_packed, read_onnx, read_packed
from metaquant.integrity import DIGEST_PLACEHOLDER, seal, verify_seal
from tests.test_export import LEGACY


def small_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3)
    )
    return mq.quantize_(net, mq.QuantConfig("bwn", 1)).eval()


def plain():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3)
    )
    return net


def flipped(data: bytes, *offsets: int) -> bytes:
    damaged = bytearray(data)
    for offset in offsets:
        damaged[offset] ^= 0x10
    return bytes(damaged)


def test_seal_and_verify_seal_round_trip_and_refuse_any_changed_byte():
    data = b"head " + DIGEST_PLACEHOLDER.encode() + b" tail: the payload"
    sealed = seal(data)
    digest = sealed[5:76].decode()
    assert len(sealed) == len(data) and digest.startswith("sha256:") and digest != DIGEST_PLACEHOLDER
    verify_seal(sealed, digest, "f")
    for offset in (0, 4, 80, len(sealed) - 1):  # before, after the digest, in the payload
        with pytest.raises(ValueError, match="f is damaged: its content digest does not match its data"):
            verify_seal(flipped(sealed, offset), digest, "f")
    with pytest.raises(ValueError, match="is not one this file holds"):
        verify_seal(flipped(sealed, 10), digest, "f")  # inside the digest itself
    with pytest.raises(ValueError, match="exactly once"):
        seal(b"no placeholder")


def _data_start(raw: bytes) -> int:
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + length


def test_a_packed_file_with_flipped_bytes_in_its_tensors_or_header_is_refused(tmp_path, caplog):
    model = small_model()
    path = tmp_path / "m.safetensors"
    export_packed(model, path, metadata={"test_acc": 50.0})
    raw = path.read_bytes()
    x = torch.randn(2, 1, 6, 6)
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            assert torch.equal(load_packed(path, plain())(x), model(x))  # intact: loads, without a word
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    start = _data_start(raw)
    header = raw[8:start]
    damages = {
        "tensor data": (start + 3, start + 40),
        "a header value": (8 + header.index(b"test_acc") + 1,),
        "a tensor's offsets": (8 + header.index(b"data_offsets") + 16,),
    }
    for where, offsets in damages.items():
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(flipped(raw, *offsets))
        for read in (read_packed, lambda p: load_packed(p, plain())):
            with pytest.raises(ValueError, match="is damaged") as err:
                read(bad)
            assert str(bad) in str(err.value), where
    # the oracle that the check is needed: the same flip in the tensor data, read by safetensors alone, loads
    # quietly with changed weights
    from safetensors.torch import load

    quiet = load(flipped(raw, start + 3, start + 40))
    assert any(not torch.equal(v, load(raw)[k]) for k, v in quiet.items())


def test_a_packed_file_written_before_the_digest_existed_loads_with_a_log_line(tmp_path, caplog):
    model = small_model()
    export_packed(model, tmp_path / "m.safetensors")
    header, _ = read_packed(tmp_path / "m.safetensors")
    assert header["digest"].startswith("sha256:")
    # the same file as an earlier metaquant wrote it: the header without digest and decode rule
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        info = {k: v for k, v in f.metadata().items() if k not in ("digest", "decode", "input_normalization")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "old.safetensors", metadata=info)
    with caplog.at_level(logging.WARNING, logger="metaquant.export"):
        loaded = load_packed(tmp_path / "old.safetensors", plain())
    assert "old.safetensors has no content digest (written by an earlier metaquant)" in caplog.text
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaquant.export"):
        load_packed(LEGACY / "packed-v1-resnet8-dorefa1.mqpack")
    assert "has no content digest (format version 1)" in caplog.text


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    pytest.importorskip("onnxscript")
    model = small_model()
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(model, path, torch.zeros(2, 1, 6, 6), metadata={"note": "n"})
    return model, path


def test_an_onnx_file_with_a_flipped_byte_in_an_initializer_is_refused(onnx_file, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, path = onnx_file
    raw = path.read_bytes()
    assert read_onnx(path) == raw
    proto = onnx.load_from_string(raw)
    for name in ("4.bias", "0.weight_quantized", "0.weight_scale"):  # float, integer levels, the scales
        (tensor,) = [t for t in proto.graph.initializer if t.name == name]
        at = raw.index(tensor.raw_data) if tensor.raw_data else raw.index(np.float32(tensor.float_data[0]).tobytes())
        bad = flipped(raw, at)
        (tmp_path / "bad.onnx").write_bytes(bad)
        with pytest.raises(ValueError, match="bad.onnx is damaged: its content digest does not match its data"):
            read_onnx(tmp_path / "bad.onnx")
    # the oracle that the check is needed: onnxruntime runs the damaged file without a word, with other logits
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    good = ort.InferenceSession(raw).run(None, {"images": x})[0]
    quiet = ort.InferenceSession(bad).run(None, {"images": x})[0]
    assert not np.array_equal(good, quiet)


def test_an_onnx_file_without_digest_loads_with_a_log_line(onnx_file, tmp_path, caplog):
    onnx = pytest.importorskip("onnx")
    _, path = onnx_file
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != "metaquant.digest"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    (tmp_path / "old.onnx").write_bytes(proto.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="metaquant.export"):
        assert read_onnx(tmp_path / "old.onnx") == (tmp_path / "old.onnx").read_bytes()
    assert "old.onnx has no content digest" in caplog.text
    with pytest.raises(FileNotFoundError):
        read_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="the key 'metaquant.digest' is the file's own"):
        export_onnx(small_model(), tmp_path / "x.onnx", torch.zeros(2, 1, 6, 6), metadata={"metaquant.digest": 1})


def _train(tmp_path, tiny_mnist):
    from metaquant.experiments.cli import main

    args = ["quantize", *tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "1", "--no-progress"]
    assert main([*args, "--run-dir", str(tmp_path), "--name", "q"]) == 0
    return tmp_path / "q", main


def test_eval_refuses_a_damaged_export_and_exports_carry_no_path_of_the_training_machine(tmp_path, tiny_mnist, capsys):
    run, main = _train(tmp_path, tiny_mnist)
    data_dir = tiny_mnist[tiny_mnist.index("--data-dir") + 1]
    assert main(["export", str(run)]) == 0
    exports = [run / "model.safetensors"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        assert main(["export", str(run), "--format", "onnx", "--opset", "25"]) == 0
        exports.append(run / "model.onnx")
    capsys.readouterr()
    for path in exports:
        raw = path.read_bytes()
        # neither the data folder nor the run's folder (absolute paths of this machine) is in the file
        assert data_dir.encode() not in raw and str(tmp_path).encode() not in raw and b"/tmp" not in raw
        assert main(["eval", str(path), "--data-dir", data_dir, "--device", "cpu"]) == 0
        path.write_bytes(flipped(raw, len(raw) // 2, len(raw) // 2 + 1))
        assert main(["eval", str(path), "--data-dir", data_dir, "--device", "cpu"]) == 1
        assert f"{path} is damaged" in capsys.readouterr().err


def test_export_records_the_input_normalization_and_a_portable_run_configuration(tmp_path, tiny_mnist):
    from metaquant.data import dataset_info
    from metaquant.experiments.artifacts import MACHINE_FIELDS, evaluate_artifact, export_run
    from metaquant.experiments.config import RunConfig

    run, _ = _train(tmp_path, tiny_mnist)
    path, _, _ = export_run(run)
    header, _ = read_packed(path)
    info = dataset_info("mnist")
    assert header["input_normalization"] == {
        "rule": "(pixels / 255 - mean) / std",
        "mean": list(info.mean),
        "std": list(info.std),
    }
    recorded = header["metadata"]["run"]
    assert not set(MACHINE_FIELDS) & set(recorded)
    full = RunConfig.load(run / "config.json").to_dict()
    assert {k: v for k, v in full.items() if k not in MACHINE_FIELDS} == recorded
    data_dir = tiny_mnist[tiny_mnist.index("--data-dir") + 1]
    result = evaluate_artifact(path, data_dir=data_dir, device="cpu")  # what evaluation needs is all there
    assert result["top1"] == result["recorded"]
    with pytest.raises(ValueError, match="`opset` applies to the onnx format and must be an integer >= 13, got 21"):
        export_run(run, tmp_path / "x.safetensors", opset=21)
    with pytest.raises(ValueError, match="got 12"):
        export_run(run, tmp_path / "x.onnx", "onnx", opset=12)


def test_cli_export_takes_the_onnx_opset(tmp_path, tiny_mnist, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    run, main = _train(tmp_path, tiny_mnist)
    assert main(["export", str(run), "--format", "onnx", "--opset", "25", "--out", str(tmp_path / "a.onnx")]) == 0
    proto = onnx.load(str(tmp_path / "a.onnx"))
    assert proto.opset_import[0].version == 25
    types = {onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer if "_quantized" in t.name}
    assert types == {"INT2"}
    assert json.loads(dict((p.key, p.value) for p in proto.metadata_props)["epochs"]) == 1
    capsys.readouterr()
    assert main(["export", str(run), "--opset", "25", "--out", str(tmp_path / "b.safetensors")]) != 0
    assert "--opset applies to the onnx format" in capsys.readouterr().err
