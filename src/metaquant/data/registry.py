"""The data sets metaquant knows, and the constants a model needs about each.

The one place for image size, channels, classes, normalisation and augmentation, so that models, loaders and
the command line cannot disagree about them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["AUGMENTATIONS", "DATASETS", "DatasetInfo", "dataset_info"]

#: Training augmentations a data set can use, as ``DatasetInfo.augment`` and ``--augment`` spell them.
AUGMENTATIONS = ("none", "crop_flip")


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one data set, looked up with :func:`dataset_info`.

    ``mean`` and ``std`` are per channel of the pixels scaled to [0, 1] (a loader computes
    ``(x / 255 − mean) / std``); ``augment`` is the training augmentation, ``"crop_flip"`` (pad 4, random crop,
    random horizontal flip) or ``"none"``. Models take ``num_classes``, ``in_channels`` and ``image_size``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str


_INFOS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), "none"),
        "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "none"),
        "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip"),
        "cifar100": DatasetInfo(
            "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip"
        ),
        # ImageNet is augmented by torchvision transforms in its own loader, so the
        # tensor-level augmentation policy does not apply to it.
        "imagenet": DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "none"),
    }
)

# Derived from the table so the public tuple and the registry cannot drift apart.
DATASETS: tuple[str, ...] = tuple(_INFOS)


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` registered under ``name``; ValueError unless ``name`` is one of :data:`DATASETS`."""
    try:
        return _INFOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None
