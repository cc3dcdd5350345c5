"""FlashInfer's custom masks (plan's custom_mask / packed_custom_mask) as the kernels read them.

A request's mask is its [q_len, kv_len] boolean matrix, row-major (True: the query sees the key); the
batch's masks are concatenated (custom_mask, bool, sum(q_len * kv_len) values) or packed (FlashInfer's
packed_custom_mask, uint8: each request's bits little-endian from a byte boundary, so
sum(ceil(q_len * kv_len / 8)) bytes; flashinfer.quantization.segment_packbits makes it). The kernel
(variant.cuh WithCustomMask) reads the packed bytes and each request's first byte offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass
class PackedMask:
    bits: torch.Tensor     # uint8, the packed masks and one guard byte
    offsets: torch.Tensor  # int64 [batch], each request's first byte

    def to(self, device: torch.device) -> "PackedMask":
        return PackedMask(self.bits.to(device).contiguous(), self.offsets.to(device).contiguous())


def segment_sizes(q_lens: list[int], kv_lens: list[int]) -> tuple[list[int], list[int]]:
    """(mask values, packed bytes) per request."""
    values = [q * k for q, k in zip(q_lens, kv_lens)]
    return values, [(n + 7) // 8 for n in values]


def pack(mask: torch.Tensor, q_lens: list[int], kv_lens: list[int], where: str) -> torch.Tensor:
    """Pack a flat boolean custom_mask per request (little-endian bits, each request from a byte)."""
    values, nbytes = segment_sizes(q_lens, kv_lens)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
        raise TypeError(f"{where}: custom_mask: expected a 1-D torch.bool tensor (the requests' [q_len, kv_len] "
                        f"masks, flattened and concatenated), got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}"
                        f"{' of shape ' + str(tuple(mask.shape)) if isinstance(mask, torch.Tensor) else ''}")
    if mask.numel() != sum(values):
        raise ValueError(f"{where}: custom_mask has {mask.numel()} values; the batch's masks need sum(q_len * kv_len) "
                         f"= {sum(values)}")
    pieces, start = [], 0
    weights = _WEIGHTS.to(mask.device)
    for n, b in zip(values, nbytes):
        segment = mask[start:start + n].to(torch.uint8)
        start += n
        padded = torch.zeros(b * 8, dtype=torch.uint8, device=mask.device)
        padded[:n] = segment
        pieces.append((padded.view(b, 8) * weights).sum(dim=1, dtype=torch.uint8) if b else padded[:0])
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8, device=mask.device)


def prepare(custom_mask: torch.Tensor | None, packed_custom_mask: torch.Tensor | None, q_lens: list[int],
            kv_lens: list[int], where: str) -> PackedMask:
    """The plan's mask in the kernel's form, on the mask's device (PackedMask.to moves it). Stricter than
    FlashInfer, which ignores custom_mask when packed_custom_mask is given: both at once is a
    ValueError; a packed mask of the wrong size too."""
    if custom_mask is not None and packed_custom_mask is not None:
        raise ValueError(f"{where}: give custom_mask or packed_custom_mask, not both (FlashInfer silently uses "
                         f"the packed one)")
    _, nbytes = segment_sizes(q_lens, kv_lens)
    if packed_custom_mask is not None:
        if not isinstance(packed_custom_mask, torch.Tensor) or packed_custom_mask.dtype != torch.uint8 \
                or packed_custom_mask.dim() != 1:
            raise TypeError(f"{where}: packed_custom_mask: expected a 1-D torch.uint8 tensor (segment_packbits' "
                            f"output), got {getattr(packed_custom_mask, 'dtype', type(packed_custom_mask).__name__)}")
        if packed_custom_mask.numel() != sum(nbytes):
            raise ValueError(f"{where}: packed_custom_mask has {packed_custom_mask.numel()} bytes; the batch's masks "
                             f"packed per request take sum(ceil(q_len * kv_len / 8)) = {sum(nbytes)}")
        bits = packed_custom_mask
    else:
        bits = pack(custom_mask, q_lens, kv_lens, where)
    starts = [0]
    for b in nbytes[:-1]:
        starts.append(starts[-1] + b)
    offsets = torch.tensor(starts[:len(nbytes)], dtype=torch.int64)
    # one byte past the end keeps an empty batch's pointer valid
    bits = torch.cat([bits, torch.zeros(1, dtype=torch.uint8, device=bits.device)])
    return PackedMask(bits.contiguous(), offsets)
