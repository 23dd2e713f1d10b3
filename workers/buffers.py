"""Reusable flat buffers of one task, so that chunk after chunk lands in memory already touched.

A fresh allocation of hundreds of MB is returned to the OS when freed and page-faults again on
the next chunk (the kernel zeroes every page on first touch); on this kind of kernel that costs
more than the arithmetic. A task keeps one buffer per slot instead and only grows it.
"""

from __future__ import annotations

import math

import torch


class Buffers:
    """One growable flat buffer per (slot, dtype, device); ``get`` returns a view of the size asked."""

    def __init__(self, pin_host: bool = False):
        self.pin_host = pin_host  # page-locked host buffers, for fast copies to a GPU
        self._flat: dict[tuple, torch.Tensor] = {}

    def get(self, slot: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` view of slot's buffer; its contents are whatever was there."""
        numel = math.prod(shape)
        key = (slot, dtype, device.type)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < numel:
            self._flat.pop(key, None)  # free the smaller buffer before allocating the larger
            flat = torch.empty(numel, dtype=dtype, device=device, pin_memory=self.pin_host and device.type == "cpu")
            self._flat[key] = flat
        return flat[:numel].view(shape)
