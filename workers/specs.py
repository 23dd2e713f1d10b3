"""The plan's data as a shard task receives it: each tensor to make, and each shard's spec."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from workers.storage import Location
from workers.tensor_io import TensorInfo

if TYPE_CHECKING:
    from workers.methods.base import MethodOptions


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: how to make it, from which inputs, in chunks of how many rows."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    action: Literal["merge", "copy"]
    inputs: tuple[TensorInfo, ...]  # merge: base first when the method uses one, then experts; copy: the source
    chunk_rows: int
    tied_to: str | None = None  # another name for the same weight (counted once in a global trim)
    options: MethodOptions | None = None  # this tensor's own options (gradients, filters); None: the shard's


@dataclass(frozen=True)
class ShardSpec:
    """Everything one shard task needs; it knows its inputs and its output, not the coordinator."""

    index: int
    n_shards: int
    file_name: str  # relative to the output root
    output: Location  # the output root (its storage options also open the inputs)
    tensors: tuple[TensorTask, ...]
    method: MethodOptions  # the resolved method; its registered object (workers.methods) runs the shard
    nan_policy: Literal["error", "allow"] = "error"  # NaN / Inf in an input: raise, or merge anyway
    memory_bytes: int = 0  # planned anonymous memory of the task's process (asked of Ray): reserve + largest chunk
    chunk_budget: int = 0  # bytes the task's tensors may hold at once (memory_budget less process_reserve)
    compile_kernels: str = "where_it_pays"  # torch.compile large chunks: never | always | where_it_pays (workers.compiled.compiles)
    input_checksums: bool = True  # sha256 every input tensor as it is read (the manifest's read_sha256)
    diagnostics: bool = True  # per-tensor merge diagnostics into the result (workers/diagnostics.py)
    prepass: Any = None  # what the method's model-wide pre-pass found (TIES global trim: thresholds, zero sign)
    run_id: str = ""  # the run that holds the output's claim; a task whose run lost it writes nothing

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.output.storage_options

    @property
    def merged_elements(self) -> int:
        """Output elements the task merges (copies excluded)."""
        return sum(math.prod(t.shape) for t in self.tensors if t.action == "merge")
