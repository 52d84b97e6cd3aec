"""Full-precision networks used in the MetaQuant experiments, by name.

The models are ordinary ``nn.Module`` s built from plain ``nn.Conv2d``,
``nn.Linear`` and BatchNorm layers; quantization swaps the convolutions and
linear layers afterwards, so nothing here knows about quantization.

* CIFAR ResNets ``resnet8/20/32/44/56/110`` (He et al., CVPR 2016), with the
  parameter names of the original MetaQuant checkpoints;
* ImageNet ``resnet18`` (He et al., CVPR 2016), with torchvision's names;
* ``lab``, the VGG-style network of Hou et al., ICLR 2017, used in the
  MetaQuant paper (Chen, Wang, Pan, NeurIPS 2019), Table 4.

Use :func:`get_model` to build one by name, and :func:`load_weights` to fill
it from a checkpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ._checks import check_positive_int
from .checkpoints import LoadResult, extract_state_dict, load_weights, read_checkpoint
from .lab import LabNet, lab
from .resnet_cifar import CifarResNet, resnet8, resnet20, resnet32, resnet44, resnet56, resnet110
from .resnet_imagenet import ImageNetResNet, resnet18

__all__ = [
    "MODELS",
    "CifarResNet",
    "ImageNetResNet",
    "LabNet",
    "LoadResult",
    "extract_state_dict",
    "get_model",
    "lab",
    "load_weights",
    "model_names",
    "read_checkpoint",
    "resnet18",
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

# Canonical (lower-case) name -> factory.  Every factory takes the keyword
# arguments num_classes and in_channels; those that need the image size
# (fully-connected layers after the convolutions) also take image_size.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18": resnet18,
    "lab": lab,
}


def model_names() -> list[str]:
    """The canonical names :func:`get_model` accepts, in registry order.

    Example:
        >>> mq.models.model_names()
        ['resnet8', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'resnet18', 'lab']
    """
    return list(MODELS)


def _canonical(name: str) -> str:
    # "ResNet20" (the original code's spelling), "resnet-20", " RESNET_20 "
    # all mean "resnet20".
    return name.strip().lower().replace("-", "").replace("_", "")


def get_model(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: one of :func:`model_names`, case-insensitive; the original
            MetaQuant spellings ("ResNet20", "ResNet18", ...) are accepted.
        num_classes: size of the output logits.
        in_channels: channels of the input images (1 for Fashion-MNIST).
        image_size: side of the square input images; only models with
            fully-connected layers after the convolutions ("lab") use it,
            the ResNets pool adaptively and accept any size.

    Returns:
        The model, in training mode, with Kaiming-initialised convolutions.

    Raises:
        TypeError: ``name`` is not a str, or ``num_classes`` / ``in_channels`` /
            ``image_size`` is not an int (``bool`` included).
        ValueError: unknown name (the message lists the allowed ones), or
            ``num_classes`` / ``in_channels`` / ``image_size`` < 1.

    Example:
        >>> net = mq.models.get_model("ResNet-20", num_classes=100, in_channels=1)
        >>> type(net).__name__, net.depth, net.fc.out_features, net.conv1.in_channels
        ('CifarResNet', 20, 100, 1)
        >>> try:
        ...     mq.models.get_model("vgg16")
        ... except ValueError as err:
        ...     print(err)
        unknown model 'vgg16'; allowed names (case-insensitive): resnet8, resnet20, ..., resnet18, lab
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {name!r} ({type(name).__name__}); allowed: {model_names()}")
    key = _canonical(name)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed names (case-insensitive): {', '.join(model_names())}")
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    factory = MODELS[key]
    kwargs: dict[str, int] = {"num_classes": num_classes, "in_channels": in_channels}
    if "image_size" in inspect.signature(factory).parameters:
        kwargs["image_size"] = image_size
    return factory(**kwargs)
