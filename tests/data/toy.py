"""A tiny labelled image set (40 images, 1 x 8 x 8, 3 classes) as training and test loaders, for tests of the
training loop that need BatchNorm statistics and augmentation but no data files."""

import torch

import metaquant as mq


def toy_loaders():
    """Training loader (batches of 8, crops and flips, seed 5) and test loader (batches of 20) of the same 40 images;
    also the images and the ``DatasetInfo``: ``(train, test, data, info)``."""
    info = mq.data.DatasetInfo("toy", 3, 1, 8, (0.5,), (0.5,), "crop_flip")
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    data = mq.data.ImageTensors(images, torch.randint(0, 3, (40,), generator=g))
    train = mq.data.TensorLoader(data, info, batch_size=8, train=True, seed=5)
    return train, mq.data.TensorLoader(data, info, batch_size=20, train=False), data, info
