"""Full-precision networks used in the MetaQuant experiments, by name.

Plain ``nn.Conv2d``/``nn.Linear``/BatchNorm modules; quantization swaps the convolutions and linear layers
afterwards, so nothing here knows about it:

* CIFAR ResNets ``resnet8/20/32/44/56/110`` (He et al., CVPR 2016), with the original MetaQuant checkpoints'
  parameter names;
* ``resnet20-bireal``: ResNet20 with a real-valued shortcut around every convolution (Bi-Real Net, Liu et al.,
  ECCV 2018), for binary activations;
* ImageNet ``resnet18`` (He et al., CVPR 2016), with torchvision's names;
* ``lab``, the VGG-style network of Hou et al., ICLR 2017, in the MetaQuant paper's Table 4.

:func:`get_model` builds one by name, :func:`load_weights` fills it from a checkpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ._checks import check_positive_int
from .checkpoints import LoadResult, extract_state_dict, load_weights, read_checkpoint
from .lab import LabNet, lab
from .resnet_bireal import BiRealResNet, resnet20_bireal
from .resnet_cifar import CifarResNet, resnet8, resnet20, resnet32, resnet44, resnet56, resnet110
from .resnet_imagenet import ImageNetResNet, resnet18

__all__ = [
    "MODELS",
    "BiRealResNet",
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
    "resnet20_bireal",
]

# Name -> factory (looked up by canonical spelling: lower case, no "-" or "_").  Every factory takes the keyword
# arguments num_classes and in_channels; those that need the image size
# (fully-connected layers after the convolutions) also take image_size.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet20-bireal": resnet20_bireal,
    "resnet18": resnet18,
    "lab": lab,
}


def model_names() -> list[str]:
    """The canonical names :func:`get_model` accepts, in registry order."""
    return list(MODELS)


def _canonical(name: str) -> str:
    # "ResNet20" (the original code's spelling), "resnet-20", " RESNET_20 "
    # all mean "resnet20".
    return name.strip().lower().replace("-", "").replace("_", "")


def get_model(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A freshly initialised model (training mode, Kaiming-initialised convolutions) by name.

    ``name`` is case-insensitive and accepts the original spellings ("ResNet20", "resnet-20"); ``image_size`` is
    used only by models with fully-connected layers after the convolutions ("lab"): the ResNets pool adaptively.

    Raises:
        TypeError: ``name`` is not a str, or a size is not an int (``bool`` included).
        ValueError: unknown name (the message lists the allowed ones), or a size < 1.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {name!r} ({type(name).__name__}); allowed: {model_names()}")
    key = {_canonical(known): known for known in MODELS}.get(_canonical(name))
    if key is None:
        raise ValueError(f"unknown model {name!r}; allowed names (case-insensitive): {', '.join(model_names())}")
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    factory = MODELS[key]
    kwargs: dict[str, int] = {"num_classes": num_classes, "in_channels": in_channels}
    if "image_size" in inspect.signature(factory).parameters:
        kwargs["image_size"] = image_size
    return factory(**kwargs)
