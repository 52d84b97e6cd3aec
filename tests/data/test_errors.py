"""The data errors: one base class to catch every data problem, and the builtin meaning where there is one."""

import pytest

from metaquant.data import (
    ChecksumError,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    DownloadError,
    load_split,
    read_cifar,
)


def test_every_data_error_is_a_dataset_error_and_missing_data_is_also_file_not_found():
    assert issubclass(DatasetNotFoundError, FileNotFoundError)
    assert issubclass(ChecksumError, DownloadError)
    for error in (DatasetNotFoundError, DatasetFormatError, DownloadError, ChecksumError):
        assert issubclass(error, DatasetError)


def test_missing_files_are_caught_as_a_dataset_error_or_as_file_not_found(tmp_path):
    with pytest.raises(DatasetError, match="allow downloading") as err:
        load_split("mnist", "test", data_dir=tmp_path / "no-such-dir", download=False)
    assert type(err.value) is DatasetNotFoundError
    with pytest.raises(FileNotFoundError, match=r"missing.tar.gz does not exist \(expected cifar-10-python.tar.gz"):
        read_cifar(tmp_path / "missing.tar.gz", "cifar10", "test")
