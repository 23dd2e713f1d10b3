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
_INTO: dict = {}


def compile_enabled() -> bool:
    return os.environ.get("MERGEFLEET_COMPILE", "1") != "0"


def run(kernel, *args, numel: int, **kwargs):
    """Call ``kernel`` compiled when the chunk is large and compilation works, else eagerly."""
    if compile_enabled() and numel >= COMPILE_MIN_ELEMENTS:
        try:
            if kernel not in _COMPILED:
                _COMPILED[kernel] = torch.compile(kernel, dynamic=True)
            return _COMPILED[kernel](*map(_plain, args), **kwargs)
        except Exception as exc:  # no C++ compiler or Triton on this node: same math, eagerly
            LOG.warning("torch.compile of %s failed (%s); running eagerly", kernel.__name__, exc)
            os.environ["MERGEFLEET_COMPILE"] = "0"
    return kernel(*args, **kwargs)


def _plain(arg):
    """A view as a plain tensor over the same memory. Dynamo guards on a view's base (its size,
    which varies with the reused buffer behind it) and would recompile chunk after chunk; the
    kernels never mutate an input, and ``run_into``'s ``out`` never overlaps one."""
    if not isinstance(arg, torch.Tensor) or arg._base is None:
        return arg
    return arg.new_empty(0).set_(arg.untyped_storage(), arg.storage_offset(), arg.shape, arg.stride())


def run_into(kernel, out: torch.Tensor, *args, numel: int, **kwargs) -> torch.Tensor:
    """``run`` that writes the kernel's result into ``out`` (a reused buffer, see workers/buffers.py)
    instead of a fresh allocation; compiled, the result is computed straight into ``out``."""
    if kernel not in _INTO:
        def into(out, *args, **kwargs):
            return out.copy_(kernel(*args, **kwargs))

        # dynamo keeps compiled graphs (and its recompile limit) per code object: one per kernel
        into.__code__ = into.__code__.replace(co_name=f"{kernel.__name__}_into")
        into.__name__ = into.__code__.co_name
        _INTO[kernel] = into
    return run(_INTO[kernel], out, *args, numel=numel, **kwargs)
