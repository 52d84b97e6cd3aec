"""Batch image augmentations as pure functions on tensors.

Each augmentation runs on the whole batch at once on the device of its input
(no per-image Python loop), so training on a GPU is not bottlenecked by CPU
data augmentation. Randomness comes from an explicit CPU
:class:`torch.Generator`: the draws are made on the CPU and moved to the
device, so the result for a given generator state is the same on every device
and independent of the device's own RNG.

The draws are exposed separately (:func:`crop_offsets`, :func:`flip_mask`) from
their application (:func:`crop_at`, :func:`hflip_where`) so that callers and
tests can see which offsets/flips were used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_at", "crop_offsets", "flip_mask", "hflip_where", "random_crop", "random_hflip"]


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a batch of images [N, C, H, W], got shape {tuple(x.shape)}")


def crop_offsets(n: int, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` crop offsets ``(top, left)``, each uniform in ``0..2*padding``, as int64 ``[n, 2]`` on CPU.

    The random half of :func:`random_crop`; apply the offsets with :func:`crop_at`.

    Args:
        n: number of images.
        padding: zero padding on each side; ``(padding, padding)`` is the uncropped position.
        generator: CPU generator to draw from (default: torch's global one).

    Raises:
        ValueError: ``padding`` is negative.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mq.data.crop_offsets(4, 2, g).tolist()
        [[4, 4], [3, 0], [3, 4], [2, 3]]
        >>> mq.data.crop_offsets(3, 0).tolist()
        [[0, 0], [0, 0], [0, 0]]
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    return torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)


def crop_at(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``x`` by ``padding`` on every side, then crop each image back to its size at ``offsets[i]``.

    ``offsets[i] = (top, left)`` in the padded image, each in ``0..2*padding``;
    ``(padding, padding)`` gives the image back unchanged. All images are cropped
    in one gather on ``x``'s device.

    Args:
        x: images ``[N, C, H, W]``, any dtype.
        padding: zero padding on each side.
        offsets: integer ``[N, 2]``, e.g. from :func:`crop_offsets`.

    Returns:
        A tensor of the shape, dtype and device of ``x``.

    Raises:
        ValueError: ``x`` is not 4-d, ``offsets`` is not ``[N, 2]``,
            ``padding`` is negative, or an offset lies outside ``0..2*padding``.

    Example:
        Offset ``(0, 0)`` shifts the image down and right, bringing in black pixels:

        >>> x = torch.arange(16).reshape(1, 1, 4, 4)
        >>> mq.data.crop_at(x, 1, torch.tensor([[0, 0]]))[0, 0].tolist()
        [[0, 0, 0, 0], [0, 0, 1, 2], [0, 4, 5, 6], [0, 8, 9, 10]]
        >>> torch.equal(mq.data.crop_at(x, 1, torch.tensor([[1, 1]])), x)
        True
    """
    _check_images(x)
    n, c, h, w = x.shape
    if offsets.shape != (n, 2):
        raise ValueError(f"offsets must have shape ({n}, 2), got {tuple(offsets.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if n and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * padding):
        raise ValueError(f"crop offsets must lie in 0..{2 * padding} for padding {padding}")
    padded = F.pad(x, (padding, padding, padding, padding))  # contiguous
    offsets = offsets.to(device=x.device, dtype=torch.long)
    # A strided view of all (2p+1)^2 windows of every image (no copy): window
    # (t, l) of image i is windows[i, :, t, l]. One advanced-indexing gather then
    # picks each image's own window, with no Python loop over images.
    sn, sc, sh, sw = padded.stride()
    windows = padded.as_strided((n, c, 2 * padding + 1, 2 * padding + 1, h, w), (sn, sc, sh, sw, sh, sw))
    return windows[torch.arange(n, device=x.device), :, offsets[:, 0], offsets[:, 1]]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` pixels, then randomly crop back to the input size, independently per image.

    Equivalent to ``crop_at(x, padding, crop_offsets(len(x), padding, generator))``.
    Shape, dtype and device are preserved. This is the crop of the ``"crop_flip"``
    augmentation (with ``padding=4``).

    Args:
        x: images ``[N, C, H, W]``.
        padding: zero padding on each side (the largest shift).
        generator: CPU generator to draw the offsets from (default: torch's global one).

    Raises:
        ValueError: ``x`` is not 4-d or ``padding`` is negative.

    Example:
        >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> y = mq.data.random_crop(x, 4, torch.Generator().manual_seed(1))
        >>> y.shape, y.dtype
        (torch.Size([8, 3, 32, 32]), torch.uint8)
        >>> offsets = mq.data.crop_offsets(8, 4, torch.Generator().manual_seed(1))
        >>> torch.equal(y, mq.data.crop_at(x, 4, offsets))
        True
    """
    _check_images(x)
    return crop_at(x, padding, crop_offsets(x.shape[0], padding, generator))


def flip_mask(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` fair coins as a bool ``[n]`` CPU tensor (True → flip).

    The random half of :func:`random_hflip`; apply the mask with :func:`hflip_where`.

    Args:
        n: number of images.
        generator: CPU generator to draw from (default: torch's global one).

    Example:
        >>> mq.data.flip_mask(6, torch.Generator().manual_seed(0)).tolist()
        [True, False, True, True, True, False]
    """
    return torch.rand(n, generator=generator) < 0.5


def hflip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images of ``x`` whose ``mask`` entry is True.

    Args:
        x: images ``[N, C, H, W]``.
        mask: bool ``[N]`` (any device), e.g. from :func:`flip_mask`.

    Returns:
        A new tensor of the shape, dtype and device of ``x``.

    Raises:
        ValueError: ``x`` is not 4-d or ``mask`` is not of shape ``[N]``.

    Example:
        >>> x = torch.arange(6).reshape(2, 1, 1, 3)
        >>> mq.data.hflip_where(x, torch.tensor([True, False])).flatten(1).tolist()
        [[2, 1, 0], [3, 4, 5]]
    """
    _check_images(x)
    if mask.shape != (x.shape[0],):
        raise ValueError(f"mask must have shape ({x.shape[0]},), got {tuple(mask.shape)}")
    mask = mask.to(device=x.device, dtype=torch.bool)[:, None, None, None]
    return torch.where(mask, x.flip(-1), x)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (independent coin per image).

    Equivalent to ``hflip_where(x, flip_mask(len(x), generator))``: the flip of
    the ``"crop_flip"`` augmentation.

    Args:
        x: images ``[N, C, H, W]``.
        generator: CPU generator to draw the coins from (default: torch's global one).

    Raises:
        ValueError: ``x`` is not 4-d.

    Example:
        >>> x = torch.arange(24).reshape(4, 1, 2, 3)
        >>> y = mq.data.random_hflip(x, torch.Generator().manual_seed(0))
        >>> [torch.equal(a, b.flip(-1)) for a, b in zip(y, x)]
        [True, False, True, True]
        >>> mq.data.flip_mask(4, torch.Generator().manual_seed(0)).tolist()
        [True, False, True, True]
    """
    _check_images(x)
    return hflip_where(x, flip_mask(x.shape[0], generator))
