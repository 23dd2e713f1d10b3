"""The body of one shard task: range-read its tensors, merge them, stream its output file.

No Ray here: ``run_shard`` is a plain function of a ``ShardSpec`` that returns a small
``ShardResult`` (names, offsets, checksums, timings), never tensors.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from workers import compiled, linear, selection, ties
from workers.buffers import Buffers
from workers.memory import PeakAnonMemory
from workers.methods import MethodOptions
from workers.selection import TrimRule
from workers.tensor_io import DTYPES, RangeReader, ShardWriter, TensorInfo, WrittenTensor, join_url, rows_of

LOG = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ShardSpec:
    """Everything one shard task needs; it knows its inputs and its output, not the coordinator."""

    index: int
    file_name: str
    output_url: str
    tensors: tuple[TensorTask, ...]
    method: MethodOptions
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials
    trim_rules: tuple[TrimRule, ...] | None = None  # global TIES: one rule per expert for the whole model
    zero_sign: float | None = None  # global TIES: the model-wide majority sign for γ = 0
    nan_policy: Literal["error", "allow"] = "error"  # NaN / Inf in an input: raise, or merge anyway
    memory_bytes: int = 0  # planned anonymous memory of the task's process (asked of Ray): reserve + largest chunk


@dataclass(frozen=True)
class ShardResult:
    """What a finished shard reports: its file, each tensor's location and sha256, and where time went."""

    index: int
    file_name: str
    file_sha256: str
    file_size: int
    tensors: tuple[WrittenTensor, ...]
    bytes_read: int
    timings: dict[str, float]
    device: str
    peak_rss_anon: int | None = None  # bytes of anonymous memory of the task's process at its peak
    start_rss_anon: int | None = None  # ... when the task started (the worker process itself)
    planned_bytes: int = 0  # the spec's memory_bytes, which peak_rss_anon should stay under

    def files(self) -> list[tuple[str, int]]:
        """(name relative to the output root, size) of every file the shard wrote."""
        return [(self.file_name, self.file_size)]


def pick_device() -> torch.device:
    """The task's GPU when Ray gave it one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class _Timer:
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


class _ChunkReader:
    """Reads row chunks of a tensor's inputs into reused buffers on the task's device, timing the
    read and the move. Inputs sharing one dtype are stacked raw ([T, N]); kernels upcast inside.

    Buffers come in two sets (``parity``), so the next tensor's first chunk can be read on a
    background thread (``prefetch``) while the kernels work on this one."""

    def __init__(self, reader: RangeReader, device: torch.device, timer: _Timer):
        self.reader, self.device, self.timer = reader, device, timer
        self.buffers = Buffers(pin_host=device.type == "cuda")  # the reads' buffers and the kernels' outputs
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending: dict[tuple, Future] = {}

    def raw(self, info: TensorInfo, rows: tuple[int, int]) -> torch.Tensor:
        """One input's rows, flat, in its stored dtype (a fresh tensor, on the CPU)."""
        with self.timer.track("read"):
            return self.reader.read_rows(info, *rows)

    def _read_host(self, infos: tuple[TensorInfo, ...], rows: tuple[int, int], slot: tuple) -> torch.Tensor:
        dtypes = {DTYPES[i.dtype] for i in infos}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        host = self.buffers.get(slot, (len(infos), _chunk_numel(infos[0], rows)), dtype, torch.device("cpu"))
        for row, info in zip(host, infos):
            if DTYPES[info.dtype] == dtype:
                with self.timer.track("read"):
                    self.reader.read_rows(info, *rows, out=row)
            else:
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


def _chunk_numel(info: TensorInfo, rows: tuple[int, int]) -> int:
    return (rows[1] - rows[0]) * math.prod(info.shape[1:]) if info.shape else 1


def row_ranges(task: TensorTask) -> list[tuple[int, int]]:
    """The row chunks a tensor is processed in."""
    n = rows_of(task.shape)
    step = max(1, task.chunk_rows)
    return [(r, min(n, r + step)) for r in range(0, n, step)] or [(0, 0)]


def _scalar(x: float, device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=device)


def _finite_rows(stacked: torch.Tensor) -> torch.Tensor:
    """Per input row: are all its values finite."""
    return torch.isfinite(stacked).all(dim=1)


class NonFiniteInputError(ValueError):
    """An input tensor holds NaN or Inf."""


class _MergeInputs:
    """A merged tensor's chunks as (base [N], experts [T, N]); a tensor that fits in one chunk is
    read once and kept across the passes of a trim. With ``check_finite`` every chunk is checked
    for NaN / Inf the first time it is read."""

    def __init__(self, chunks: _ChunkReader, task: TensorTask, uses_base: bool, check_finite: bool = True,
                 parity: int = 0):
        self.chunks, self.task, self.uses_base, self.check_finite = chunks, task, uses_base, check_finite
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
            self.chunks.prefetch(infos, rows, slot)

    def _check(self, stacked: torch.Tensor, infos: tuple[TensorInfo, ...], rows) -> None:
        finite = compiled.run(_finite_rows, stacked, numel=stacked.numel())
        if not bool(finite.all()):
            bad = infos[int((~finite).nonzero()[0, 0])]
            raise NonFiniteInputError(
                f"tensor {self.task.name!r} (rows {rows[0]}..{rows[1]}) of {bad.file_url} holds NaN or Inf; "
                "fix or re-export that checkpoint, or set nan_policy: allow to merge it anyway")

    def load(self, rows):
        if len(self.ranges) == 1 and self._cached is not None:
            return self._cached
        split = 1 if self.uses_base else 0
        loaded_rows = [self.chunks.stacked(*read) for read in self._reads(rows)]
        base_rows, experts = (loaded_rows[0], loaded_rows[1]) if split else (None, loaded_rows[0])
        if self.check_finite and rows not in self._checked:
            self._checked.add(rows)
            with self.chunks.timer.track("kernel"):
                if base_rows is not None:
                    self._check(base_rows, self.task.inputs[:split], rows)
                self._check(experts, self.task.inputs[split:], rows)
        loaded = (base_rows[0] if base_rows is not None else None, experts)
        if len(self.ranges) == 1:
            self._cached = loaded
        return loaded


def _histograms(inputs: _MergeInputs, buckets: torch.Tensor | None, timer: _Timer) -> torch.Tensor:
    """[T, width] counts of |τ|'s high bits (``buckets`` None) or of its low bits inside each
    expert's bucket, over every chunk of the tensor."""
    total = None
    for rows in inputs.ranges:
        base, experts = inputs.load(rows)
        with timer.track("kernel"):
            if buckets is None:
                ids = inputs.chunks.buffers.get(("ids",), experts.shape, torch.int16, experts.device)
                compiled.run_into(selection.high_bucket_ids, ids, base, experts, numel=experts.numel())
                counts = selection.count_ids(ids, selection.HIGH_BUCKETS)
            else:
                ids = inputs.chunks.buffers.get(("ids",), experts.shape, torch.int32, experts.device)
                compiled.run_into(selection.low_bucket_ids, ids, base, experts, buckets, numel=experts.numel())
                counts = selection.count_ids(ids, selection.LOW_BUCKETS)
            total = counts if total is None else total + counts
    return total


def _per_tensor_rules(inputs: _MergeInputs, method: MethodOptions, timer: _Timer) -> list[TrimRule]:
    """Trim rules for one tensor: the exact n_keep largest |τ| per expert (two counting passes)."""
    numel = math.prod(inputs.task.shape)
    ks = [selection.top_n_k(numel, d) for d in method.densities]
    if all(k is None for k in ks):
        return [selection.trivial_top_n_rule(numel, d) for d in method.densities]
    highs = _histograms(inputs, None, timer).cpu()
    buckets = [selection.locate(h, k)[0] if k is not None else -1 for h, k in zip(highs, ks)]
    lows = _histograms(inputs, torch.tensor(buckets, dtype=torch.int32, device=inputs.chunks.device), timer).cpu()
    return [
        selection.top_n_rule(highs[t], buckets[t], lows[t], int(d * numel)) if ks[t] is not None
        else selection.trivial_top_n_rule(numel, d)
        for t, d in enumerate(method.densities)
    ]


class _TrimCuts:
    """Per-chunk ``thr`` / ``cut`` tensors for the kernels, carrying tie counts across chunks.

    Only rules with a tie quota look at the data; a quota at threshold 0 needs no cut either,
    since a zero τ contributes nothing whichever way it is trimmed."""

    def __init__(self, rules: list[TrimRule], device):
        self.rules, self.device = rules, device
        self.thr = torch.tensor([r.threshold for r in rules], dtype=torch.float32, device=device)
        self._quota = [r.tie_quota is not None and r.threshold > 0 for r in rules]
        self._ties_before = [0] * len(rules)

    def for_chunk(self, base, experts) -> torch.Tensor:
        cuts = [ties.ALL_TIES] * len(self.rules)
        if any(self._quota):
            counts = compiled.run(ties.tied_block_counts, base, experts, self.thr, numel=experts.numel())
            for t, rule in enumerate(self.rules):
                if self._quota[t]:
                    def block_mask(block: int, t=t) -> torch.Tensor:
                        span = slice(block * ties.TIE_BLOCK, (block + 1) * ties.TIE_BLOCK)
                        return ties.tied_mask(base[span], experts[t:t + 1, span], self.thr[t:t + 1])[0]

                    cuts[t], n_tied = ties.tie_cut(counts[t], rule, self._ties_before[t], block_mask)
                    self._ties_before[t] += n_tied
        return torch.tensor(cuts, dtype=torch.int64, device=self.device)


def _merge_ties(inputs: _MergeInputs, spec: ShardSpec, out_dtype: torch.dtype, timer: _Timer):
    method, device = spec.method, inputs.chunks.device
    if spec.trim_rules is not None:  # global scope: rules and zero sign come from the whole model
        rules, zero_sign = list(spec.trim_rules), spec.zero_sign
    else:
        rules = _per_tensor_rules(inputs, method, timer)
        zero_sign = None if method.zero_sign == "majority" else 1.0
    weights = torch.tensor(method.weights, dtype=torch.float32, device=device)
    sign_by_count = method.sign_method == "count"
    if zero_sign is None:  # per-tensor majority: Σγ over this tensor first
        cuts, sign_sum = _TrimCuts(rules, device), 0
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with timer.track("kernel"):
                positive, negative = compiled.run(ties.ties_vote_counts, base, experts, cuts.thr,
                                                  cuts.for_chunk(base, experts), weights,
                                                  sign_by_count=sign_by_count, numel=experts.numel())
                sign_sum += int(positive) - int(negative)
        zero_sign = ties.majority_sign(sign_sum)
    cuts = _TrimCuts(rules, device)
    lam, zero = _scalar(method.lam, device), _scalar(zero_sign, device)
    for rows in inputs.ranges:
        base, experts = inputs.load(rows)
        with timer.track("kernel"):
            out = compiled.run_into(ties.ties_merge, _merged_buffer(inputs.chunks, experts, out_dtype), base, experts,
                                    cuts.thr, cuts.for_chunk(base, experts), weights, lam, zero,
                                    sign_by_count=sign_by_count, normalize=method.normalize, out_dtype=out_dtype,
                                    numel=experts.numel())
        yield rows, out


def _merged_buffer(chunks: _ChunkReader, experts: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Where a merged chunk is written: reused, so valid only until the next chunk is merged."""
    return chunks.buffers.get(("merged",), experts.shape[1:], out_dtype, experts.device)


def merge_inputs(chunks: _ChunkReader, task: TensorTask, spec: ShardSpec, parity: int = 0) -> _MergeInputs:
    """The chunked inputs of one merged tensor of this shard (``parity``: which buffer set)."""
    return _MergeInputs(chunks, task, spec.method.uses_base, spec.nan_policy == "error", parity)


def _merge_chunks(chunks: _ChunkReader, task: TensorTask, spec: ShardSpec, out_dtype: torch.dtype = torch.float32,
                  inputs: _MergeInputs | None = None):
    """Yield (rows, merged flat chunk in ``out_dtype``) for one merged tensor; a chunk's tensor is
    reused for the next chunk, so consume it (write or copy it) before asking for the next."""
    method, device = spec.method, chunks.device
    inputs = inputs or merge_inputs(chunks, task, spec)
    if method.method == "ties":
        yield from _merge_ties(inputs, spec, out_dtype, chunks.timer)
        return
    weights = torch.tensor(method.weights, dtype=torch.float32, device=device)
    divisor = _scalar(sum(method.weights) if method.normalize else 1.0, device)
    for rows in inputs.ranges:
        base, experts = inputs.load(rows)
        with chunks.timer.track("kernel"):
            out = _merged_buffer(chunks, experts, out_dtype)
            if method.method == "linear":
                compiled.run_into(linear.linear_merge, out, experts, weights, divisor, out_dtype=out_dtype,
                                  numel=experts.numel())
            else:
                compiled.run_into(linear.task_arithmetic_merge, out, base, experts, weights,
                                  _scalar(method.lam, device), divisor, out_dtype=out_dtype, numel=experts.numel())
        yield rows, out


def _scan_inputs(spec: ShardSpec, chunks: _ChunkReader):
    """The _MergeInputs of every merged tensor of the shard, tied copies skipped."""
    for task in spec.tensors:
        if task.action == "merge" and task.tied_to is None:
            yield merge_inputs(chunks, task, spec)


@dataclass(frozen=True)
class ScanResult:
    """Per-expert statistics of one shard for a global trim (small arrays, never tensors)."""

    index: int
    values: list  # per expert: a numpy histogram, or one int
    bytes_read: int
    timings: dict[str, float]


def _scan(spec: ShardSpec, accumulate, initial: list) -> ScanResult:
    """Run ``accumulate(inputs, totals)`` over every merged tensor of the shard."""
    timer = _Timer()
    t0 = time.perf_counter()
    reader = RangeReader(spec.storage_options)
    chunks = _ChunkReader(reader, pick_device(), timer)
    totals = initial
    try:
        for inputs in _scan_inputs(spec, chunks):
            totals = accumulate(inputs, totals, timer)
    finally:
        chunks.close()
        reader.close()
    timer.seconds["total"] = time.perf_counter() - t0
    values = [v.cpu().numpy() if isinstance(v, torch.Tensor) else v for v in totals]
    return ScanResult(spec.index, values, reader.bytes_read, dict(timer.seconds))


def scan_high_histograms(spec: ShardSpec) -> ScanResult:
    """Pass 1 of a global trim: per expert, the high-16-bit histogram of |τ| over the shard."""
    return _scan(spec, lambda inputs, totals, timer: [totals[0] + _histograms(inputs, None, timer).cpu()],
                 [torch.zeros(len(spec.method.weights), selection.HIGH_BUCKETS, dtype=torch.int64)])


def scan_low_histograms(spec: ShardSpec, buckets: tuple[int, ...]) -> ScanResult:
    """Pass 2: per expert, the low-16-bit histogram of |τ| inside that expert's threshold bucket."""
    def accumulate(inputs, totals, timer):
        ids = torch.tensor(buckets, dtype=torch.int32, device=inputs.chunks.device)
        return [totals[0] + _histograms(inputs, ids, timer).cpu()]

    return _scan(spec, accumulate, [torch.zeros(len(buckets), selection.LOW_BUCKETS, dtype=torch.int64)])


def scan_sign_sum(spec: ShardSpec, rules: tuple[TrimRule, ...]) -> ScanResult:
    """Pass 3 (zero_sign majority): Σγ over the shard's elements, an exact integer."""
    method = spec.method

    def accumulate(inputs, totals, timer):
        device = inputs.chunks.device
        weights = torch.tensor(method.weights, dtype=torch.float32, device=device)
        cuts = _TrimCuts(list(rules), device)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with timer.track("kernel"):
                positive, negative = compiled.run(ties.ties_vote_counts, base, experts, cuts.thr,
                                                  cuts.for_chunk(base, experts), weights,
                                                  sign_by_count=method.sign_method == "count", numel=experts.numel())
                totals = [totals[0] + int(positive) - int(negative)]
        return totals

    return _scan(spec, accumulate, [0])


def copy_tensor(chunks: _ChunkReader, task: TensorTask, writer: ShardWriter) -> None:
    """Stream a tensor taken unmerged from its source into ``writer``, cast to its output dtype."""
    for rows in row_ranges(task):
        raw = chunks.raw(task.inputs[0], rows)
        with chunks.timer.track("write"):
            writer.write(task.name, raw.to(DTYPES[task.out_dtype]))


def run_shard(spec: ShardSpec) -> ShardResult:
    """Read, merge and write every tensor of one shard; returns its result (no tensors)."""
    t_start = time.perf_counter()
    device = pick_device()
    timer = _Timer()
    reader = RangeReader(spec.storage_options)
    chunks = _ChunkReader(reader, device, timer)
    url = join_url(spec.output_url, spec.file_name)
    writer = ShardWriter(url, [(t.name, t.out_dtype, t.shape) for t in spec.tensors],
                         storage_options=spec.storage_options)
    try:
        with PeakAnonMemory() as memory:
            merged = [t for t in spec.tensors if t.action == "merge"]
            inputs = {t.name: merge_inputs(chunks, t, spec, parity=i % 2) for i, t in enumerate(merged)}
            following = dict(zip([t.name for t in merged], [t.name for t in merged[1:]]))
            for task in spec.tensors:
                if task.action == "copy":
                    copy_tensor(chunks, task, writer)
                    continue
                if task.name in following:  # read the next merged tensor while this one computes
                    inputs[following[task.name]].prefetch()
                for _, out in _merge_chunks(chunks, task, spec, DTYPES[task.out_dtype], inputs.pop(task.name)):
                    with timer.track("write"):
                        writer.write(task.name, out)
            with timer.track("write"):
                file_sha = writer.close()
    except BaseException:
        LOG.exception("shard %d (%s) failed", spec.index, spec.file_name)
        raise
    finally:
        chunks.close()
        reader.close()
    timer.seconds["total"] = time.perf_counter() - t_start
    LOG.info("shard %d: %d tensors, %.1f MB read in %.2fs", spec.index, len(spec.tensors), reader.bytes_read / 1e6,
             timer.seconds["total"])
    return ShardResult(spec.index, spec.file_name, file_sha, writer.bytes_written, tuple(writer.results),
                       reader.bytes_read, dict(timer.seconds), str(device), memory.peak, memory.start, spec.memory_bytes)
