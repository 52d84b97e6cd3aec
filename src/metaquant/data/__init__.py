"""Data sets as tensors, with batch augmentation on the training device.

Small data sets (MNIST, Fashion-MNIST, CIFAR-10/100) are read from their official file formats into uint8
tensors (:func:`load_split`) and served by :class:`TensorLoader`, which shuffles, augments and normalises whole
batches on the device. ImageNet is streamed from an ImageFolder tree through torchvision (optional).
:func:`make_loaders` builds both loaders of a data set from its registry name (:data:`DATASETS`).
"""

from .augment import crop_at, crop_offsets, flip_mask, hflip_where, random_crop, random_hflip
from .cifar import read_cifar
from .download import download_url, md5_file
from .errors import ChecksumError, DatasetError, DatasetFormatError, DatasetNotFoundError, DownloadError
from .idx import read_idx_pair, write_idx
from .imagenet import ImageFolderLoader, check_imagenet_layout, imagenet_loaders, imagenet_val_loader
from .loader import BatchLoader, TensorLoader
from .make import make_loaders, make_test_loader
from .registry import AUGMENTATIONS, DATASETS, DatasetInfo, dataset_info
from .splits import load_split
from .tensors import ImageTensors, subset

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "BatchLoader",
    "ChecksumError",
    "DatasetError",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DownloadError",
    "ImageFolderLoader",
    "ImageTensors",
    "TensorLoader",
    "check_imagenet_layout",
    "crop_at",
    "crop_offsets",
    "dataset_info",
    "download_url",
    "flip_mask",
    "hflip_where",
    "imagenet_loaders",
    "imagenet_val_loader",
    "load_split",
    "make_loaders",
    "make_test_loader",
    "md5_file",
    "random_crop",
    "random_hflip",
    "read_cifar",
    "read_idx_pair",
    "write_idx",
    "subset",
]
