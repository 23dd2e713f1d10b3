"""Run a kernel compiled with torch.compile (fused C++ on CPU, Triton on GPU) or eagerly.

Kernels are written so that the eager and compiled forms compute the same float32 operations in
the same order and give the same bytes (tests check it). Small chunks run eagerly, so tests and tiny
tensors never pay compile time, and a task too small to earn its compile time back runs eagerly
(``COMPILE_MIN_TASK_ELEMENTS``). Whether to compile is decided once, at the edge (the plan carries
it per task: ``MERGEFLEET_COMPILE=0`` in the coordinator's environment turns it off, ``always``
compiles every task), and each shard task builds its own ``Compiler`` from that choice: a compile failure in one task runs that task's
kernels eagerly and leaves every later task free to try again.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

LOG = logging.getLogger(__name__)

COMPILE_MIN_ELEMENTS = 1 << 20  # below this, eager beats a (possibly cold) compiled kernel
# A task merging fewer elements than this runs eagerly: a worker's first compile costs ~5 s with a warm
# inductor cache and ~13 s with a cold one, while the fused TIES kernel saves ~0.26 µs per element
# over the eager one (2 cores; linear saves ~0.04 µs): compiling pays from ~17M elements (warm) to
# ~50M (cold, 2^26 leaves a margin) for TIES, so a model of MiniLM's size (22M) never compiles and a
# 1B one's shards do.
COMPILE_MIN_TASK_ELEMENTS = {"warm": 1 << 24, "cold": 1 << 26}


def compile_from_environment() -> str:
    """The edge's choice, ``MERGEFLEET_COMPILE``: "0" never compiles, "always" compiles every large
    chunk, anything else (the default) compiles the tasks where it pays (``compiles``)."""
    value = os.environ.get("MERGEFLEET_COMPILE", "1")
    return "never" if value == "0" else "always" if value == "always" else "where_it_pays"


def compiles(choice: str, merged_elements: int) -> bool:
    """Whether a task merging this many output elements compiles its kernels, given the edge's
    choice; "where_it_pays" asks this worker's node whether its inductor cache holds graphs."""
    if choice != "where_it_pays":
        return choice == "always"
    if merged_elements < min(COMPILE_MIN_TASK_ELEMENTS.values()):  # without asking: that imports inductor (~0.85 s)
        return False
    return merged_elements >= COMPILE_MIN_TASK_ELEMENTS["warm" if inductor_cache_is_warm() else "cold"]


def inductor_cache_is_warm() -> bool:
    """Whether torch inductor's on-disk cache (shared by the node's workers, kept between runs:
    ``TORCHINDUCTOR_CACHE_DIR``, by default /tmp/torchinductor_<user>) holds compiled graphs."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    graphs = os.path.join(cache_dir(), "fxgraph")
    return os.path.isdir(graphs) and any(os.scandir(graphs))


def trust_cpu_flags() -> None:
    """Let inductor take the CPU's vector ISA from /proc/cpuinfo instead of test-building a program
    with ATen's vector headers for each ISA (~6.5 s of a cold worker's first compile, 2 cores); the
    small probes that choose the extra flags (AVX-512 BF16 / VNNI, AMX) still run. A toolchain that
    cannot build for the CPU fails the first compile, and the task runs eagerly.
    ``TORCHINDUCTOR_VEC_ISA_OK`` in the environment decides instead."""
    if "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ:
        from torch._inductor import config

        config.cpp.vec_isa_ok = True


# Inductor options for every kernel. No vectorised tail loop: a chunk's last < 32 elements (a row's, for
# row_gram) run as scalar code with the same IEEE results (the kernels use no transcendental functions),
# and g++ builds each loop once instead of twice: TIES's bracket scan, counted merge and Gram sums compiled
# in 8.3 s against 10.7 s cold, at the same speed (2 cores).
COMPILE_OPTIONS = {"cpp.enable_loop_tail_vec": False}


def compile_options(kernel) -> dict:
    """COMPILE_OPTIONS, with the CPU's vectors narrowed to ``kernel.cpu_vector_bits`` where they are
    wider (a kernel that runs faster so, e.g. ``row_gram``'s float64 products on AVX-512)."""
    trust_cpu_flags()
    options = dict(COMPILE_OPTIONS)
    bits = getattr(kernel, "cpu_vector_bits", None)
    if bits is not None:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        if pick_vec_isa().bit_width() > bits:
            options["cpp.simdlen"] = bits
    return options


class Compiler:
    """Runs kernels for one task: compiled for chunks of at least ``min_elements``, else eagerly."""

    def __init__(self, enabled: bool = True, *, min_elements: int = COMPILE_MIN_ELEMENTS):
        self.enabled = enabled
        self.min_elements = min_elements
        self._compiled: dict = {}

    def run(self, kernel, *args, numel: int, **kwargs):
        """Call ``kernel`` compiled when the chunk is large and compilation works, else eagerly."""
        if self.enabled and numel >= self.min_elements:
            try:
                if kernel not in self._compiled:
                    self._compiled[kernel] = torch.compile(kernel, dynamic=True, options=compile_options(kernel))
                return self._compiled[kernel](*map(_plain, args), **kwargs)
            except Exception as exc:  # no C++ compiler or Triton on this node: same math, eagerly
                LOG.warning("torch.compile of %s failed (%s); this task runs its kernels eagerly", kernel.__name__, exc)
                self.enabled = False
        return kernel(*args, **kwargs)

    def run_into(self, kernel, out: torch.Tensor, *args, numel: int, **kwargs) -> torch.Tensor:
        """``run`` that writes the kernel's result into ``out`` (a reused buffer, see workers/buffers.py)
        instead of a fresh allocation; compiled, the result is computed straight into ``out``."""
        return self.run(into_kernel(kernel), out, *args, numel=numel, **kwargs)


@functools.cache
def into_kernel(kernel):
    """``out.copy_(kernel(...))`` as a kernel of its own, the same function object for the same
    kernel: dynamo keeps compiled graphs (and its recompile limit) per code object, so every task
    of a process reuses the graphs compiled for one kernel."""
    def into(out, *args, **kwargs):
        return out.copy_(kernel(*args, **kwargs))

    into.__code__ = into.__code__.replace(co_name=f"{kernel.__name__}_into")
    into.__name__ = into.__code__.co_name
    return into


def _plain(arg):
    """A view as a plain tensor over the same memory. Dynamo guards on a view's base (its size,
    which varies with the reused buffer behind it) and would recompile chunk after chunk; the
    kernels never mutate an input, and ``run_into``'s ``out`` never overlaps one."""
    if not isinstance(arg, torch.Tensor) or arg._base is None:
        return arg
    return arg.new_empty(0).set_(arg.untyped_storage(), arg.storage_offset(), arg.shape, arg.stride())
