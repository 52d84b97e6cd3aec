"""download_url with file:// URLs: verified files appear, failed ones leave nothing behind."""

from __future__ import annotations

import hashlib
import os

import pytest

from metaquant.data import download as download_mod
from metaquant.data.download import download_url, md5_file
from metaquant.data.errors import ChecksumError, DownloadError


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(1000))
    return src


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_good_checksum(tmp_path, source):
    dest = tmp_path / "out" / "blob.bin"
    result = download_url(source.as_uri(), dest, md5(source.read_bytes()))
    assert result == dest
    assert dest.read_bytes() == source.read_bytes()
    assert os.listdir(dest.parent) == ["blob.bin"]  # no temporary file left
    assert md5_file(dest) == md5(source.read_bytes())


def test_checksum_is_case_insensitive_and_optional(tmp_path, source):
    download_url(source.as_uri(), tmp_path / "a", md5(source.read_bytes()).upper())
    download_url(source.as_uri(), tmp_path / "b", None)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == source.read_bytes()


def test_bad_checksum_leaves_nothing(tmp_path, source):
    out = tmp_path / "out"
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as err:
        download_url(source.as_uri(), out / "blob.bin", wrong)
    msg = str(err.value)
    assert source.as_uri() in msg and wrong in msg and md5(source.read_bytes()) in msg
    assert os.listdir(out) == []


def test_bad_checksum_keeps_previous_file(tmp_path, source):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(ChecksumError):
        download_url(source.as_uri(), dest, "0" * 32)
    assert dest.read_bytes() == b"previous good copy"
    assert sorted(os.listdir(tmp_path)) == ["blob.bin", "src"]


@pytest.mark.parametrize("error", [ConnectionResetError("connection reset"), KeyboardInterrupt()])
def test_interrupted_mid_copy_leaves_nothing(tmp_path, source, monkeypatch, error):
    real_urlopen = download_mod.urlopen
    reads = []

    class Flaky:
        """Wraps the real response; fails on the second chunk, after bytes were written."""

        def __init__(self, response):
            self.response = response

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.response.close()

        def read(self, n=-1):
            reads.append(n)
            if len(reads) == 2:
                raise error
            return self.response.read(n)

    monkeypatch.setattr(download_mod, "_CHUNK", 100)
    monkeypatch.setattr(download_mod, "urlopen", lambda url, timeout: Flaky(real_urlopen(url, timeout=timeout)))
    out = tmp_path / "out"
    out.mkdir()
    expected = DownloadError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as err:
        download_url(source.as_uri(), out / "blob.bin", md5(source.read_bytes()))
    assert len(reads) == 2
    assert os.listdir(out) == []
    if expected is DownloadError:
        assert source.as_uri() in str(err.value)


def test_missing_url(tmp_path):
    url = (tmp_path / "absent.bin").as_uri()
    with pytest.raises(DownloadError, match="absent.bin"):
        download_url(url, tmp_path / "out" / "x", None)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("url", ["ftp//typo/file.gz", "gopher2://host/file"])
def test_a_url_without_a_known_scheme_is_a_download_error(tmp_path, url):
    with pytest.raises(DownloadError, match="unknown url type"):
        download_url(url, tmp_path / "out" / "x", None)
    assert os.listdir(tmp_path / "out") == []
