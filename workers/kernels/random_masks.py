"""Reproducible random numbers for DARE / DELLA masks: a counter-based generator.

Each element's uniform number is a hash of (seed, tensor name, expert, flat element index), not a
draw from a stream, so it does not depend on which task, chunk or device computes it: a run is
byte-identical for any shard count, row-chunk size or worker, and the same seed gives the same
model again. The hash is murmur3's 32-bit finalizer applied twice (to the index's high and low
halves), computed in int64 with every product reduced mod 2³².
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def mask_key(seed: int, tensor: str, expert: int) -> int:
    """The 32-bit key of one expert's mask of one tensor."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{expert}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniforms(key, index: torch.Tensor) -> torch.Tensor:
    """float64 numbers in [0, 1), one per int64 flat element index, for this key (an int or a 0-d
    int64 tensor, so that a compiled kernel takes every key)."""
    hi = _fmix32(((index >> 32) ^ key) & _M32)
    return _fmix32((index & _M32) ^ hi).to(torch.float64) / 2.0**32


def keep_mask(key, index: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """Per element: kept with ``probability`` (a 0-d or per-element float64 tensor). Integer
    arithmetic and an exact division, so compiled and eager give the same mask."""
    return uniforms(key, index) < probability
