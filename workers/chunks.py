"""Reading a shard's tensors in row chunks: the context every shard body runs in.

``ChunkReader`` reads row chunks of a tensor's inputs into reused buffers on the task's device
(timing the read and the move); ``MergeInputs`` presents one merged tensor as its chunks of
(base, experts), checking each for NaN / Inf the first time; ``ShardContext`` bundles the reader,
the task's kernel ``Compiler``, its timer and its diagnostics (workers/diagnostics.py) for the
method bodies.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from workers.buffers import Buffers
from workers.compiled import Compiler
from workers.diagnostics import TensorProbe
from workers.specs import TensorTask
from workers.tensor_io import DTYPES, RangeReader, ShardWriter, TensorInfo, rows_of

# Inputs of a row chunk read at once: ranged GETs in flight per task. On SeaweedFS (linear, 4 inputs, 2 tasks,
# interleaved runs at load 8-14) the tasks' read stage summed 14-15 s with 4 against 22-27 s with 1 in two rounds
# of three (24-30 s both in the first).
READ_CONCURRENCY = 4


class Timer:
    """Seconds per stage (read, convert, kernel, write, ...), summed over a task."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def track(self, stage: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[stage] += time.perf_counter() - self.t0

        return _Span()


class ChunkReader:
    """Reads row chunks of a tensor's inputs into reused buffers on the task's device, timing the
    read and the move. Inputs sharing one dtype are stacked raw ([T, N]); kernels upcast inside.

    Buffers come in two sets (``parity``), so the next tensor's first chunk can be read on a
    background thread (``prefetch``) while the kernels work on this one; the inputs of a chunk are
    read READ_CONCURRENCY at a time."""

    def __init__(self, reader: RangeReader, device: torch.device, timer: Timer):
        self.reader, self.device, self.timer = reader, device, timer
        self.buffers = Buffers(pin_host=device.type == "cuda")  # the reads' buffers and the kernels' outputs
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._readers = ThreadPoolExecutor(max_workers=READ_CONCURRENCY, thread_name_prefix="read")
        self._pending: dict[tuple, Future] = {}

    def raw(self, info: TensorInfo, rows: tuple[int, int]) -> torch.Tensor:
        """One input's rows, flat, in its stored dtype (a fresh tensor, on the CPU)."""
        with self.timer.track("read"):
            return self.reader.read_rows(info, *rows)

    def _read_host(self, infos: tuple[TensorInfo, ...], rows: tuple[int, int], slot: tuple) -> torch.Tensor:
        dtypes = {DTYPES[i.dtype] for i in infos}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        host = self.buffers.get(slot, (len(infos), chunk_numel(infos[0], rows)), dtype, torch.device("cpu"))
        with self.timer.track("read"):
            list(self._readers.map(lambda pair: self.reader.read_rows(pair[1], *rows, out=pair[0]),
                                   [(row, info) for row, info in zip(host, infos) if DTYPES[info.dtype] == dtype]))
        for row, info in zip(host, infos):
            if DTYPES[info.dtype] != dtype:
                raw = self.raw(info, rows)
                with self.timer.track("convert"):
                    row.copy_(raw)
        return host

    def prefetch(self, infos: tuple[TensorInfo, ...], rows: tuple[int, int], slot: tuple) -> None:
        """Start reading what ``stacked(infos, rows, slot)`` will ask for."""
        key = (infos, rows, slot)
        if key not in self._pending:
            self._pending[key] = self._background.submit(self._read_host, infos, rows, slot)

    def stacked(self, infos: tuple[TensorInfo, ...], rows: tuple[int, int], slot: tuple) -> torch.Tensor:
        """[len(infos), N] of the inputs' rows on the device; raw dtype when they share one, else float32."""
        pending = self._pending.pop((infos, rows, slot), None)
        host = pending.result() if pending is not None else self._read_host(infos, rows, slot)
        if self.device.type == "cpu":
            return host
        with self.timer.track("convert"):
            return self.buffers.get(slot, host.shape, host.dtype, self.device).copy_(host, non_blocking=True)

    def close(self) -> None:
        self._background.shutdown(wait=True)
        self._readers.shutdown(wait=True)


@dataclass
class ShardContext:
    """What a shard's method body works with: the chunk reader (device, buffers, timer), the
    compiler, and the shard's diagnostics records (None: diagnostics are off)."""

    chunks: ChunkReader
    compiler: Compiler
    diagnostics: list[dict] | None = None

    def probe(self, task: TensorTask, n_experts: int, *, elects_sign: bool) -> TensorProbe | None:
        """Where a task-vector merge puts one tensor's diagnostics (None when they are off)."""
        return None if self.diagnostics is None else TensorProbe(self.diagnostics, task, n_experts, elects_sign)

    def record(self, record: dict) -> None:
        """Add one tensor's diagnostics record (when diagnostics are on)."""
        if self.diagnostics is not None:
            self.diagnostics.append(record)

    @property
    def device(self) -> torch.device:
        return self.chunks.device

    @property
    def timer(self) -> Timer:
        return self.chunks.timer

    def buffer(self, slot: tuple, shape, dtype: torch.dtype) -> torch.Tensor:
        """A reused buffer on the task's device (valid until the same slot is asked for again)."""
        return self.chunks.buffers.get(slot, shape, dtype, self.device)

    def scalar(self, x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32, device=self.device)

    def vector(self, xs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(list(xs), dtype=dtype, device=self.device)


def chunk_numel(info: TensorInfo, rows: tuple[int, int]) -> int:
    return (rows[1] - rows[0]) * math.prod(info.shape[1:]) if info.shape else 1


def row_ranges(task: TensorTask) -> list[tuple[int, int]]:
    """The row chunks a tensor is processed in."""
    n = rows_of(task.shape)
    step = max(1, task.chunk_rows)
    return [(r, min(n, r + step)) for r in range(0, n, step)] or [(0, 0)]


def _all_finite(values: torch.Tensor) -> torch.Tensor:
    """Whether all of one input's values (1-D) are finite: Σ 0·x is 0 exactly then, NaN otherwise. A
    float sum compiles to a vectorised loop (``isfinite(...).all()`` ran 10x slower), and one graph
    serves every input: a graph over the stacked inputs compiled again for the base's one row."""
    return (values.float() * 0).sum() == 0


class NonFiniteInputError(ValueError):
    """An input tensor holds NaN or Inf."""


class MergeInputs:
    """A merged tensor's chunks as (base [N] or None, experts [T, N]); a tensor that fits in one
    chunk is read once and kept across the passes of a trim. With ``check_finite`` every chunk is
    checked for NaN / Inf the first time it is read."""

    def __init__(self, ctx: ShardContext, task: TensorTask, uses_base: bool, check_finite: bool = True,
                 parity: int = 0):
        self.ctx, self.task, self.uses_base, self.check_finite = ctx, task, uses_base, check_finite
        self.ranges = row_ranges(task)
        self.parity = parity
        self._cached = None
        self._checked: set[tuple[int, int]] = set()  # row chunks already checked (a trim reads each up to 4 times)

    def _reads(self, rows) -> list[tuple]:
        split = 1 if self.uses_base else 0
        reads = [(self.task.inputs[split:], rows, ("experts", self.parity))]
        return ([(self.task.inputs[:split], rows, ("base", self.parity))] if split else []) + reads

    def prefetch(self) -> None:
        """Read this tensor's first chunk in the background."""
        for infos, rows, slot in self._reads(self.ranges[0]):
            self.ctx.chunks.prefetch(infos, rows, slot)

    def _check(self, stacked: torch.Tensor, infos: tuple[TensorInfo, ...], rows) -> None:
        finite = [bool(self.ctx.compiler.run(_all_finite, row, numel=row.numel())) for row in stacked]
        if not all(finite):
            bad = infos[finite.index(False)]
            raise NonFiniteInputError(
                f"tensor {self.task.name!r} (rows {rows[0]}..{rows[1]}) of {bad.file_url} holds NaN or Inf; "
                "fix or re-export that checkpoint, or set nan_policy: allow to merge it anyway")

    def load(self, rows):
        """(base rows or None, experts [T, N]) of one row chunk, on the task's device."""
        if len(self.ranges) == 1 and self._cached is not None:
            return self._cached
        loaded = self.load_block(rows)
        if len(self.ranges) == 1:
            self._cached = loaded
        return loaded

    def load_block(self, rows):
        """``load`` for any row range (a sample's few rows): read afresh, never kept."""
        split = 1 if self.uses_base else 0
        loaded_rows = [self.ctx.chunks.stacked(*read) for read in self._reads(rows)]
        base_rows, experts = (loaded_rows[0], loaded_rows[1]) if split else (None, loaded_rows[0])
        if self.check_finite and rows not in self._checked:
            self._checked.add(rows)
            with self.ctx.timer.track("kernel"):
                if base_rows is not None:
                    self._check(base_rows, self.task.inputs[:split], rows)
                self._check(experts, self.task.inputs[split:], rows)
        return base_rows[0] if base_rows is not None else None, experts

    def merged_buffer(self, experts: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Where a merged chunk is written: reused, so valid only until the next chunk is merged."""
        return self.ctx.buffer(("merged",), experts.shape[1:], out_dtype)


def chunk_values(ctx: ShardContext, inputs: MergeInputs, compute):
    """A re-iterable pass over a tensor: calling the result yields ``compute(rows, base, experts)``
    for every row chunk in order (timed as kernel work); a tensor of one chunk is computed once and
    served again on later passes."""
    cached: list = []

    def values():
        if cached:
            yield cached[0]
            return
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                value = compute(rows, base, experts)
            if len(inputs.ranges) == 1:
                cached.append(value)
            yield value

    return values


def copy_tensor(chunks: ChunkReader, task: TensorTask, writer: ShardWriter) -> None:
    """Stream a tensor taken unmerged from its source into ``writer``, cast to its output dtype."""
    for rows in row_ranges(task):
        raw = chunks.raw(task.inputs[0], rows)
        with chunks.timer.track("write"):
            writer.write(task.name, raw.to(DTYPES[task.out_dtype]))
