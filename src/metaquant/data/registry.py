"""The data sets metaquant knows, and the constants a model needs about each.

The registry is the single place where image size, channel count, class count,
normalisation statistics and augmentation policy live, so models, loaders and
the CLI cannot disagree about them.
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
    """Static description of one data set.

    ``mean`` and ``std`` are per channel, in pixel units scaled to [0, 1]; a
    loader computes ``(x / 255 - mean) / std``. ``augment`` names the training
    augmentation: ``"crop_flip"`` (pad 4, random crop, random horizontal flip)
    or ``"none"``.

    Look one up with :func:`dataset_info`; models take ``num_classes``,
    ``in_channels`` and ``image_size`` from it.

    Attributes:
        name: registry name, one of :data:`DATASETS`.
        num_classes: number of classes (size of the logits).
        in_channels: channels of the images (1 for MNIST, 3 for CIFAR).
        image_size: side of the square images.
        mean: per-channel mean of the pixels scaled to [0, 1].
        std: per-channel standard deviation of the pixels scaled to [0, 1].
        augment: training augmentation, ``"crop_flip"`` or ``"none"``.

    Example:
        A white MNIST pixel after normalisation, ``(255 / 255 - mean) / std``:

        >>> info = mq.data.dataset_info("mnist")
        >>> info.in_channels, info.image_size, info.augment
        (1, 28, 'none')
        >>> round((1.0 - info.mean[0]) / info.std[0], 4)
        2.8215
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
    """Return the :class:`DatasetInfo` registered under ``name``.

    Args:
        name: one of :data:`DATASETS` (``"mnist"``, ``"fashion-mnist"``,
            ``"cifar10"``, ``"cifar100"``, ``"imagenet"``), exact spelling.

    Raises:
        ValueError: ``name`` is not one of :data:`DATASETS`.

    Example:
        >>> info = mq.data.dataset_info("cifar100")
        >>> info.num_classes, info.in_channels, info.image_size, info.augment
        (100, 3, 32, 'crop_flip')
        >>> try:
        ...     mq.data.dataset_info("svhn")
        ... except ValueError as err:
        ...     print(err)
        unknown dataset 'svhn'; expected one of mnist, fashion-mnist, cifar10, cifar100, imagenet
    """
    try:
        return _INFOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None
