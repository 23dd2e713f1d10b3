"""Reusable flat buffers of one task, so that chunk after chunk lands in memory already touched.

A fresh allocation of hundreds of MB is returned to the OS when freed and page-faults again on
the next chunk (the kernel zeroes every page on first touch); on this kind of kernel that costs
more than the arithmetic. A task keeps one buffer per slot instead and only grows it.
"""

from __future__ import annotations

import math

import torch


class Buffers:
    """One growable byte buffer per (slot, device); ``get`` views its start as the shape and dtype
    asked, so a slot serves passes of different dtypes (int16 and int32 bucket ids) in one buffer."""

    def __init__(self, pin_host: bool = False):
        self.pin_host = pin_host  # page-locked host buffers, for fast copies to a GPU
        self._bytes: dict[tuple, torch.Tensor] = {}

    def get(self, slot: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` view of slot's buffer; its contents are whatever was there."""
        nbytes = math.prod(shape) * dtype.itemsize
        key = (slot, device.type)
        flat = self._bytes.get(key)
        if flat is None or flat.numel() < nbytes:
            self._bytes.pop(key, None)  # free the smaller buffer before allocating the larger
            flat = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=self.pin_host and device.type == "cpu")
            self._bytes[key] = flat
        return flat[:nbytes].view(dtype).view(shape)
