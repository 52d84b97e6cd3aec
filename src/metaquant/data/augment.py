"""Batch image augmentations as pure functions on tensors.

Each runs on the whole batch at once on its input's device (no per-image loop). Random draws come from an
explicit CPU :class:`torch.Generator` and are moved to the device, so a generator state gives the same result on
every device. The draws (:func:`crop_offsets`, :func:`flip_mask`) are separate from their application
(:func:`crop_at`, :func:`hflip_where`) so that callers and tests can see them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_at", "crop_offsets", "flip_mask", "hflip_where", "random_crop", "random_hflip"]


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a batch of images [N, C, H, W], got shape {tuple(x.shape)}")


def crop_offsets(n: int, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` crop offsets ``(top, left)``, each uniform in ``0..2*padding``, as int64 ``[n, 2]`` on the CPU.

    Raises:
        ValueError: ``padding`` is negative.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    return torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)


def crop_at(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad images ``[N, C, H, W]`` by ``padding``, then crop each back to its size at ``offsets[i] = (top, left)``.

    ``(padding, padding)`` gives the image back; all images are cropped in one gather on ``x``'s device.

    Raises:
        ValueError: ``x`` is not 4-d, ``offsets`` is not ``[N, 2]``, ``padding`` is negative, or an offset lies
            outside ``0..2*padding``.
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
    """``crop_at(x, padding, crop_offsets(len(x), padding, generator))``: the crop of ``"crop_flip"`` (padding 4).

    Raises:
        ValueError: ``x`` is not 4-d or ``padding`` is negative.
    """
    _check_images(x)
    return crop_at(x, padding, crop_offsets(x.shape[0], padding, generator))


def flip_mask(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` fair coins as a bool ``[n]`` CPU tensor (True: flip)."""
    return torch.rand(n, generator=generator) < 0.5


def hflip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images ``[N, C, H, W]`` whose ``mask`` entry is True (a new tensor).

    Raises:
        ValueError: ``x`` is not 4-d or ``mask`` is not of shape ``[N]``.
    """
    _check_images(x)
    if mask.shape != (x.shape[0],):
        raise ValueError(f"mask must have shape ({x.shape[0]},), got {tuple(mask.shape)}")
    mask = mask.to(device=x.device, dtype=torch.bool)[:, None, None, None]
    return torch.where(mask, x.flip(-1), x)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``hflip_where(x, flip_mask(len(x), generator))``: the flip of ``"crop_flip"``.

    Raises:
        ValueError: ``x`` is not 4-d.
    """
    _check_images(x)
    return hflip_where(x, flip_mask(x.shape[0], generator))
