"""Bit packing: integer codes of ``k`` bits, ``k`` bits each in a byte stream, least significant bit first."""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import check_int


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer codes ``< 2**bits`` into a flat ``uint8`` tensor, ``bits`` bits per code.

    Code ``i`` (in row-major order) occupies bits ``i·k … i·k + k − 1`` of the stream, least significant bit
    first; the last byte is zero-padded. This is the layout of a packed file's ``"codes"`` tensors.

    Args:
        codes: integer tensor of any shape, values in ``[0, 2**bits)``.
        bits: 1..8.

    Returns:
        ``uint8 [ceil(codes.numel() · bits / 8)]``.

    Raises:
        ValueError: ``bits`` outside 1..8, or a code outside ``[0, 2**bits)``.

    Example:
        >>> from metaquant.export import pack_bits, unpack_bits
        >>> codes = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1])
        >>> pack_bits(codes, 1).tolist()  # 1 + 4 + 8 + 128 = 141, then the ninth code alone
        [141, 1]
        >>> pack_bits(torch.tensor([[3, 0], [1, 2]]), 2).tolist()  # 3 + 0·4 + 1·16 + 2·64 = 147
        [147]
        >>> torch.equal(unpack_bits(pack_bits(codes, 1), 1, codes.numel()), codes)
        True
    """
    check_int("bits", bits, minimum=1, maximum=8)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) to pack in {bits} bits")
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # [numel·bits], LSB first
    padded = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = 1 << torch.arange(8, device=flat.device)
    return (padded.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` codes, as ``int64 [numel]``.

    Args:
        packed: the ``uint8`` bytes made by ``pack_bits``.
        bits: the bits per code used to pack them, 1..8.
        numel: how many codes to read (the padding bits of the last byte are ignored).

    Returns:
        ``int64 [numel]``; reshape to the codes' original shape.

    Raises:
        ValueError: ``bits`` outside 1..8, or ``packed`` too short for ``numel`` codes.

    Example:
        >>> from metaquant.export import pack_bits, unpack_bits
        >>> codes = torch.randint(0, 8, (5, 7))  # 35 codes of 3 bits: ceil(105 / 8) = 14 bytes
        >>> packed = pack_bits(codes, 3)
        >>> packed.numel(), torch.equal(unpack_bits(packed, 3, codes.numel()).reshape(5, 7), codes)
        (14, True)
    """
    check_int("bits", bits, minimum=1, maximum=8)
    if packed.numel() * 8 < numel * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)
