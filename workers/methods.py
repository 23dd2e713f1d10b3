"""The resolved options of a merge method, as the shard tasks receive them, and its memory model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

MethodName = Literal["linear", "task_arithmetic", "ties"]
METHODS_WITH_BASE = ("task_arithmetic", "ties")


class MethodOptions(BaseModel):
    """Every parameter a kernel needs, resolved from the config (no defaults left to guess)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: MethodName
    weights: tuple[float, ...]  # one per input model, in config order (experts; linear: all models)
    densities: tuple[float, ...]  # TIES keep fraction per expert (1.0 for other methods)
    lam: float  # λ scaling of the merged task vector
    normalize: bool  # divide by the sum of (agreeing) weights
    trim_scope: Literal["tensor", "global"]  # TIES: threshold per tensor (mergekit) or per model (paper)
    sign_method: Literal["sum", "count"]  # TIES sign election
    zero_sign: Literal["positive", "majority"]  # TIES: sign where the vote is 0

    @property
    def uses_base(self) -> bool:
        return self.method in METHODS_WITH_BASE


def bytes_per_element(n_inputs: int, in_itemsize: int, out_itemsize: int) -> int:
    """Peak working-set bytes per tensor element while merging one chunk.

    Counts two sets of raw read buffers (this chunk and the next tensor's, read ahead), the bucket
    ids (int32) plus a byte per input, three float32 per-element temporaries and the cast output.
    The compiled kernels hold less (no temporaries); the eager ones, which run small chunks or
    everything where nothing compiles, about this much.
    """
    return 2 * n_inputs * in_itemsize + 5 * n_inputs + 3 * 4 + out_itemsize
