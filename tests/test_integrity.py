"""Checkpoint integrity: the digest entry leaves what torch.load reads unchanged, and damage that torch.load
would not notice (a flipped byte in a tensor, a cut archive) is refused with a message naming the file."""

import io

import pytest
import torch

from metaquant.integrity import CheckpointDamagedError, read_verified, verify_checkpoint_bytes, with_digest


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_the_digest_entry_loads_as_before_and_verifies():
    plain = _saved({"w": torch.arange(4.0)})
    sealed = with_digest(plain)
    assert verify_checkpoint_bytes(sealed, "sealed.pt") == "digest"
    assert verify_checkpoint_bytes(plain, "plain.pt") == "crc"  # an archive written without a digest
    assert torch.load(io.BytesIO(sealed), weights_only=True)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert with_digest(b"not an archive") == b"not an archive"
    assert verify_checkpoint_bytes(b"not an archive", "legacy.pt") == "unchecked"  # left to torch.load


def test_a_flipped_byte_in_a_tensor_loads_silently_but_fails_the_crc():
    good = with_digest(_saved({"w": torch.zeros(256)}))
    bad = bytearray(good)
    bad[good.index(bytes(64)) + 10] ^= 0xFF
    assert torch.load(io.BytesIO(bytes(bad)), weights_only=True)["w"].abs().max() > 0  # a changed weight
    with pytest.raises(CheckpointDamagedError, match=r"^checkpoint checkpoint.pt is damaged: Bad CRC-32 for file "):
        verify_checkpoint_bytes(bytes(bad), "checkpoint.pt")


def test_a_cut_archive_is_reported_as_truncated():
    with pytest.raises(CheckpointDamagedError, match=r"^checkpoint half.pt is corrupt or truncated \(not a comp") as e:
        verify_checkpoint_bytes(b"PK\x03\x04 and then nothing", "half.pt")
    assert e.value.truncated and isinstance(e.value, ValueError)


def test_read_verified_returns_the_bytes_it_checked(tmp_path):
    path = tmp_path / "ok.pt"
    path.write_bytes(with_digest(_saved({"epoch": 3, "w": torch.zeros(64)})))
    assert torch.load(io.BytesIO(read_verified(path)), weights_only=True)["epoch"] == 3
    damaged = bytearray(path.read_bytes())
    damaged[damaged.index(bytes(64)) + 1] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointDamagedError, match="ok.pt"):
        read_verified(path)
