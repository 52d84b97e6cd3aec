"""Find, download if needed, and read one split of a small data set.

Lookup order for each data set:

1. with ``data_dir``: ``data_dir`` itself, or ``data_dir/<name>/`` when ``data_dir`` holds none of the data
   set's files; nowhere else, so both splits come from the folder named;
2. without ``data_dir``: the cache ``~/.cache/metaquant/<name>/``, then, for Fashion-MNIST only,
   :data:`FASHION_MNIST_SYSTEM_DIR` (Debian's ``dataset-fashion-mnist``);
3. with ``download=True``, the canonical location, md5-verified, saved into ``data_dir`` (or the cache).

Local files are validated structurally by the readers, not checksummed: repackaged copies (Debian
recompresses the gzip files) are valid data with other checksums.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .cifar import CIFAR_LAYOUTS, read_cifar
from .download import download_url
from .errors import DatasetFormatError, DatasetNotFoundError, DownloadError
from .idx import read_idx_pair
from .registry import dataset_info
from .tensors import ImageTensors

__all__ = ["CACHE_ROOT", "FASHION_MNIST_SYSTEM_DIR", "SPLITS", "load_split"]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")

# Where the Debian/Ubuntu package dataset-fashion-mnist puts the files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# Download folder when no data_dir is given (honours XDG_CACHE_HOME like other tools).
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metaquant"

_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Canonical download locations and md5 digests of the published .gz files.
_IDX_SOURCES: dict[str, tuple[str, dict[str, str]]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}
_CIFAR_SOURCES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


def _holds_any(directory: Path, name: str) -> bool:
    """Whether ``directory`` holds any file of data set ``name`` (either split)."""
    if name in CIFAR_LAYOUTS:
        layout = CIFAR_LAYOUTS[name]
        return (directory / layout.folder).exists() or (directory / layout.archive).exists()
    stems = [stem for split in _IDX_STEMS.values() for stem in split]
    return any(_find_idx(directory, stem) for stem in stems)


def _local_dirs(name: str, data_dir: Path | None) -> list[Path]:
    if data_dir is not None:
        # The folder the user named, and only it: falling back to another copy would silently train or test on
        # other data, or take the two splits from two places.
        if data_dir.exists() and not data_dir.is_dir():
            raise DatasetNotFoundError(f"`data_dir` {data_dir} is not a directory")
        if not _holds_any(data_dir, name) and _holds_any(data_dir / name, name):
            return [data_dir / name]
        return [data_dir, data_dir / name] if not _holds_any(data_dir, name) else [data_dir]
    dirs = [CACHE_ROOT / name]
    if name == "fashion-mnist":
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def _download_dir(name: str, data_dir: Path | None) -> Path:
    return data_dir if data_dir is not None else CACHE_ROOT / name


def _find_idx(directory: Path, stem: str) -> Path | None:
    # Either the published .gz or a decompressed copy; the reader detects which.
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _check_labels(data: ImageTensors, num_classes: int, source: object) -> ImageTensors:
    if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= num_classes):
        raise DatasetFormatError(
            f"{source}: labels must lie in 0..{num_classes - 1}, found "
            f"{int(data.labels.min())}..{int(data.labels.max())}"
        )
    return data


def _load_idx(name: str, split: str, data_dir: Path | None, download: bool) -> ImageTensors:
    stems = _IDX_STEMS[split]
    dirs = _local_dirs(name, data_dir)
    for directory in dirs:
        found = [_find_idx(directory, stem) for stem in stems]
        images, labels = found
        if images is not None and labels is not None:
            logger.info("%s %s: reading %s", name, split, directory)
            return read_idx_pair(images, labels)

    base_url, md5s = _IDX_SOURCES[name]
    target = _download_dir(name, data_dir)
    looked = ", ".join(str(d) for d in dirs)
    wanted = " and ".join(f"{s}.gz (or {s})" for s in stems)
    how = [
        f"download {', '.join(base_url + s + '.gz' for s in stems)} into {target}",
        "pass `data_dir` pointing at a folder that holds them",
    ]
    if name == "fashion-mnist":
        how.insert(0, f"`apt-get install dataset-fashion-mnist` (installs them to {FASHION_MNIST_SYSTEM_DIR})")
    missing = f"{name} {split} split not found: looked for {wanted} in {looked}"
    if not download:
        how.append("allow downloading (download=True)")
        raise DatasetNotFoundError(f"{missing}. To get it: {'; or '.join(how)}.")

    try:
        paths = [download_url(f"{base_url}{s}.gz", target / f"{s}.gz", md5s[s]) for s in stems]
    except DownloadError as exc:
        raise DatasetNotFoundError(f"{missing}, and the download failed: {exc}. Instead: {'; or '.join(how)}.") from exc
    return read_idx_pair(paths[0], paths[1])


def _load_cifar(name: str, split: str, data_dir: Path | None, download: bool) -> ImageTensors:
    layout = CIFAR_LAYOUTS[name]
    dirs = _local_dirs(name, data_dir)
    for directory in dirs:
        # The extracted folder reads faster than the compressed archive, so prefer it.
        for source in (directory / layout.folder, directory / layout.archive):
            if source.exists():
                logger.info("%s %s: reading %s", name, split, source)
                return read_cifar(source, name, split)

    url, md5 = _CIFAR_SOURCES[name]
    target = _download_dir(name, data_dir)
    looked = ", ".join(str(d) for d in dirs)
    missing = f"{name} {split} split not found: looked for {layout.folder}/ or {layout.archive} in {looked}"
    how = (
        f"download {url} (md5 {md5}) into {target} (extracting it is optional); or pass `data_dir` "
        "pointing at a folder that holds it"
    )
    if not download:
        raise DatasetNotFoundError(f"{missing}. To get it: {how}; or allow downloading (download=True).")
    try:
        archive = download_url(url, target / layout.archive, md5)
    except DownloadError as exc:
        raise DatasetNotFoundError(f"{missing}, and the download failed: {exc}. Instead: {how}.") from exc
    return read_cifar(archive, name, split)


def load_split(name: str, split: str, data_dir: str | Path | None = None, download: bool = True) -> ImageTensors:
    """Load one split (``"train"`` or ``"test"``) of ``mnist``, ``fashion-mnist``, ``cifar10`` or ``cifar100``.

    See the module docstring for where the files are looked for; the split comes as uint8 images and int64
    labels (:class:`ImageTensors`).

    Raises:
        ValueError: unknown ``name`` or ``split``, or ``name == "imagenet"``.
        DatasetNotFoundError: missing files and no (successful) download; the message says where they were
            looked for and how to get them.
        DatasetFormatError: a corrupt or truncated file, or a label not below the class count.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    directory = Path(data_dir).expanduser() if data_dir is not None else None
    if name in _IDX_SOURCES:
        data = _load_idx(name, split, directory, download)
    elif name in _CIFAR_SOURCES:
        data = _load_cifar(name, split, directory, download)
    else:
        raise ValueError(
            f"load_split cannot hold {name!r} in memory; use make_loaders({name!r}, data_dir=...) "
            "for a streaming loader"
        )
    # CIFAR labels are range-checked per batch by the reader; IDX has no class count.
    return _check_labels(data, info.num_classes, f"{name} {split}")
