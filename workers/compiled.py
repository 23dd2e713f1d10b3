"""Run a kernel compiled with torch.compile (fused C++ on CPU, Triton on GPU) or eagerly.

Kernels are written so that the eager and compiled forms compute the same float32 operations in
the same order and give the same bytes (tests check it). Small chunks run eagerly, so tests and tiny
tensors never pay compile time. ``MERGEFLEET_COMPILE=0`` turns compilation off.
"""

from __future__ import annotations

import logging
import os

import torch

LOG = logging.getLogger(__name__)

COMPILE_MIN_ELEMENTS = 1 << 20  # below this, eager beats a (possibly cold) compiled kernel
_COMPILED: dict = {}


def compile_enabled() -> bool:
    return os.environ.get("MERGEFLEET_COMPILE", "1") != "0"


def run(kernel, *args, numel: int, **kwargs):
    """Call ``kernel`` compiled when the chunk is large and compilation works, else eagerly."""
    if compile_enabled() and numel >= COMPILE_MIN_ELEMENTS:
        try:
            if kernel not in _COMPILED:
                _COMPILED[kernel] = torch.compile(kernel, dynamic=True)
            return _COMPILED[kernel](*args, **kwargs)
        except Exception as exc:  # no C++ compiler or Triton on this node: same math, eagerly
            LOG.warning("torch.compile of %s failed (%s); running eagerly", kernel.__name__, exc)
            os.environ["MERGEFLEET_COMPILE"] = "0"
    return kernel(*args, **kwargs)
