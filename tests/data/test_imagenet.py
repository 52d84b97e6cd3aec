"""ImageNet: layout checks, the optional torchvision import, and the folder loader's sampling."""

from __future__ import annotations

import sys

import pytest
import torch

from metaquant.data import imagenet
from metaquant.data.errors import DatasetFormatError, DatasetNotFoundError
from metaquant.data.imagenet import ImageFolderLoader, check_imagenet_layout, imagenet_loaders, imagenet_val_loader
from metaquant.data.loader import BatchLoader
from metaquant.data.tensors import subset_indices


def make_tree(root, train=("n01", "n02"), val=("n01", "n02"), files=("a.JPEG",)):
    for split, classes in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for wnid in classes:
            (root / split / wnid).mkdir()
            for f in files:
                (root / split / wnid / f).write_bytes(b"")
    return root


def test_good_layout(tmp_path):
    assert check_imagenet_layout(make_tree(tmp_path, train=("n02", "n01"), val=("n01", "n02"))) == ["n01", "n02"]


def test_missing_root(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"nowhere.*train/<wnid>"):
        check_imagenet_layout(tmp_path / "nowhere")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tmp_path, split):
    (tmp_path / ("val" if split == "train" else "train") / "n01").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as err:
        check_imagenet_layout(tmp_path)
    assert str(tmp_path / split) in str(err.value)


def test_no_class_folders(tmp_path):
    make_tree(tmp_path, train=())
    with pytest.raises(DatasetFormatError, match="train has no class folders"):
        check_imagenet_layout(tmp_path)


def test_flat_val_gets_hint(tmp_path):
    make_tree(tmp_path, val=())
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(DatasetFormatError, match="one folder per class"):
        check_imagenet_layout(tmp_path)


def test_class_mismatch(tmp_path):
    make_tree(tmp_path, train=("n01", "n02", "n03"), val=("n01", "n04"))
    with pytest.raises(DatasetFormatError) as err:
        check_imagenet_layout(tmp_path)
    msg = str(err.value)
    assert "['n02', 'n03']" in msg and "['n04']" in msg


def test_missing_torchvision_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(ImportError, match=r"needs torchvision \(the vision extra\), .*: pip install torchvision$"):
        imagenet_loaders(make_tree(tmp_path), batch_size=2, test_batch_size=2)


def test_layout_checked_before_import(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(DatasetNotFoundError):
        imagenet_loaders(tmp_path / "missing", batch_size=2, test_batch_size=2)


def _pairs(n):
    return torch.utils.data.TensorDataset(torch.arange(n).float().view(n, 1), torch.arange(n))


def test_folder_loader_sampling_on_a_plain_dataset():
    # The loader is generic over map-style datasets; sampling needs no torchvision.
    ranks = [
        ImageFolderLoader(_pairs(23), 4, train=True, seed=3, rank=r, world_size=2, num_workers=0) for r in range(2)
    ]
    assert isinstance(ranks[0], BatchLoader)
    seen = [torch.cat([y for _, y in loader]).tolist() for loader in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(23)) and seen[0] != sorted(seen[0])
    assert [len(loader) for loader in ranks] == [3, 3]
    ranks[0].set_epoch(1)
    assert torch.cat([y for _, y in ranks[0]]).tolist() != seen[0]
    ranks[0].set_epoch(0)
    assert torch.cat([y for _, y in ranks[0]]).tolist() == seen[0]


def test_folder_loader_eval_order():
    loader = ImageFolderLoader(_pairs(7), 3, train=False, num_workers=0)
    batches = [y.tolist() for _, y in loader]
    assert batches == [[0, 1, 2], [3, 4, 5], [6]] and len(loader) == 3


def test_folder_loader_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        ImageFolderLoader(_pairs(3), 2, train=True, num_workers=-1)
    with pytest.raises(ValueError, match="rank"):
        ImageFolderLoader(_pairs(3), 2, train=True, rank=1)


class _FakeTorchvision:
    """Stands in for torchvision's ImageFolder and transforms: records which folders are read and which
    transforms each split composes; an image is a [3, 2, 2] tensor filled with its file's index."""

    def __init__(self):
        self.folders, self.pipelines = [], []
        fake = self

        class ImageFolder(torch.utils.data.Dataset):
            def __init__(self, root, transform):
                from pathlib import Path

                fake.folders.append(Path(root).name)
                fake.pipelines.append(transform)
                self.classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
                self.samples = [(f, c) for c, d in enumerate(self.classes) for f in sorted((Path(root) / d).iterdir())]

            def __len__(self):
                return len(self.samples)

            def __getitem__(self, i):
                return torch.full((3, 2, 2), float(i)), self.samples[i][1]

        def transform(name):
            return lambda *args, **kwargs: name

        self.datasets = type("datasets", (), {"ImageFolder": ImageFolder})
        self.transforms = type(
            "transforms",
            (),
            {
                n: staticmethod(transform(n))
                for n in ("RandomResizedCrop", "RandomHorizontalFlip", "Resize", "CenterCrop", "ToTensor", "Normalize")
            }
            | {"Compose": staticmethod(lambda steps: steps)},
        )


@pytest.fixture
def fake_torchvision(monkeypatch):
    fake = _FakeTorchvision()
    monkeypatch.setattr(imagenet, "_import_torchvision", lambda: (fake.datasets, fake.transforms))
    return fake


def test_loaders_build_each_split_with_its_transforms_and_subset(tmp_path, fake_torchvision):
    make_tree(tmp_path, train=("n01", "n02"), val=("n01", "n02"), files=("a.JPEG", "b.JPEG", "c.JPEG"))
    train, test = imagenet_loaders(tmp_path, batch_size=4, test_batch_size=10, num_workers=0, test_size=4)
    assert fake_torchvision.folders == ["train", "val"]
    assert fake_torchvision.pipelines == [
        ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"],
        ["Resize", "CenterCrop", "ToTensor", "Normalize"],
    ]
    assert sorted(torch.cat([y for _, y in train]).tolist()) == [0, 0, 0, 1, 1, 1]
    # The fake's image i is filled with i: the validation subset is the seeded one, in its order.
    assert [int(x[0, 0, 0]) for batch, _ in test for x in batch] == subset_indices(6, 4, 0).tolist()


def test_the_training_subset_follows_subset_seed(tmp_path, fake_torchvision):
    make_tree(tmp_path, files=[f"{i}.JPEG" for i in range(5)])

    def train_images(**kwargs):
        train, _ = imagenet_loaders(tmp_path, batch_size=20, test_batch_size=20, num_workers=0, train_size=4, **kwargs)
        return sorted(int(x[0, 0, 0]) for batch, _ in train for x in batch)

    assert train_images(seed=1) == sorted(subset_indices(10, 4, 1).tolist())
    assert train_images(seed=1, subset_seed=7) == sorted(subset_indices(10, 4, 7).tolist())


def test_the_validation_loader_alone_needs_no_training_folder(tmp_path, fake_torchvision):
    for wnid in ("n01", "n02"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid / "a.JPEG").write_bytes(b"")
    test = imagenet_val_loader(tmp_path, batch_size=8, num_workers=0)
    assert fake_torchvision.folders == ["val"]
    assert [y.tolist() for _, y in test] == [[0, 1]]
    with pytest.raises(DatasetNotFoundError, match="train is missing"):
        imagenet_loaders(tmp_path, batch_size=8, test_batch_size=8)
    with pytest.raises(DatasetFormatError, match="holds 2 class folders, expected 1000"):
        imagenet_val_loader(tmp_path, batch_size=8, num_classes=1000)


def test_real_torchvision_pipeline(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    make_tree(tmp_path, files=())
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            for i in range(3):
                Image.new("RGB", (300, 260), (i * 40, 100, 200)).save(tmp_path / split / wnid / f"{i}.JPEG")
    train, test = imagenet_loaders(tmp_path, batch_size=4, test_batch_size=5, num_workers=0, seed=1)
    xs, ys = zip(*train)
    assert [tuple(x.shape) for x in xs] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    assert sorted(torch.cat(ys).tolist()) == [0, 0, 0, 1, 1, 1]
    x, y = next(iter(test))
    assert x.dtype == torch.float32 and tuple(x.shape) == (5, 3, 224, 224) and y.tolist() == [0, 0, 0, 1, 1]
