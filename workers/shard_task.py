"""The body of one shard task: range-read its tensors, merge them, stream its output file.

No Ray here: ``run_shard`` is a plain function of a ``ShardSpec`` that returns a small
``ShardResult`` (names, offsets, checksums, timings), never tensors.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from workers import linear, selection, ties
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
    storage_options: dict[str, Any] = field(default_factory=dict)
    trim_rules: tuple[TrimRule, ...] | None = None  # global TIES: one rule per expert for the whole model
    zero_sign: float | None = None  # global TIES: the model-wide majority sign for γ = 0


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
    """Reads row chunks of a tensor's inputs as float32 on the device, timing read and conversion."""

    def __init__(self, reader: RangeReader, device: torch.device, timer: _Timer):
        self.reader, self.device, self.timer = reader, device, timer

    def raw(self, info: TensorInfo, rows: tuple[int, int]) -> torch.Tensor:
        with self.timer.track("read"):
            return self.reader.read_rows(info, *rows)

    def floats(self, infos: tuple[TensorInfo, ...], rows: tuple[int, int]) -> list[torch.Tensor]:
        out = []
        for info in infos:
            raw = self.raw(info, rows)
            with self.timer.track("convert"):
                out.append(raw.to(self.device, non_blocking=True).to(torch.float32))
        return out


def row_ranges(task: TensorTask) -> list[tuple[int, int]]:
    """The row chunks a tensor is processed in."""
    n = rows_of(task.shape)
    step = max(1, task.chunk_rows)
    return [(r, min(n, r + step)) for r in range(0, n, step)] or [(0, 0)]


def _inputs_as_taus(chunks: _ChunkReader, task: TensorTask, rows) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base, *experts = chunks.floats(task.inputs, rows)
    with chunks.timer.track("kernel"):
        for x in experts:
            x.sub_(base)
    return base, experts


def _per_tensor_rules(chunks: _ChunkReader, task: TensorTask, method: MethodOptions, ranges, cached) -> list[TrimRule]:
    """Trim rules for one tensor: the exact n_keep largest |τ| per expert (two counting passes)."""
    numel = 1
    for s in task.shape:
        numel *= s
    ks = [selection.top_n_k(numel, d) for d in method.densities]
    if all(k is None for k in ks):
        return [selection.trivial_top_n_rule(numel, d) for d in method.densities]
    n_experts = len(method.densities)
    highs = [torch.zeros(selection.HIGH_BUCKETS, dtype=torch.int64, device=chunks.device) for _ in range(n_experts)]
    lows = [torch.zeros(selection.LOW_BUCKETS, dtype=torch.int64, device=chunks.device) for _ in range(n_experts)]
    for rows in ranges:
        _, taus = cached(rows)
        with chunks.timer.track("kernel"):
            for t, tau in enumerate(taus):
                if ks[t] is not None:
                    highs[t] += selection.high_histogram(selection.magnitude_bits(tau))
    buckets = [selection.locate(h, k)[0] if k is not None else -1 for h, k in zip(highs, ks)]
    for rows in ranges:
        _, taus = cached(rows)
        with chunks.timer.track("kernel"):
            for t, tau in enumerate(taus):
                if ks[t] is not None:
                    lows[t] += selection.low_histogram(selection.magnitude_bits(tau), buckets[t])
    return [
        selection.top_n_rule(highs[t], buckets[t], lows[t], int(d * numel)) if ks[t] is not None
        else selection.trivial_top_n_rule(numel, d)
        for t, d in enumerate(method.densities)
    ]


def _merge_ties(chunks: _ChunkReader, task: TensorTask, spec: ShardSpec, ranges):
    method = spec.method
    single = len(ranges) == 1
    cache: dict = {}

    def cached(rows):
        # a tensor that fits in one chunk is read once and kept across the counting passes
        if single:
            if rows not in cache:
                cache[rows] = _inputs_as_taus(chunks, task, rows)
            return cache[rows]
        return _inputs_as_taus(chunks, task, rows)

    if spec.trim_rules is not None:  # global scope: rules and zero sign come from the whole model
        rules, zero_sign = list(spec.trim_rules), spec.zero_sign
    else:
        rules = _per_tensor_rules(chunks, task, method, ranges, cached)
        zero_sign = None if method.zero_sign == "majority" else 1.0
    options = dict(weights=list(method.weights), rules=rules, sign_method=method.sign_method)
    if zero_sign is None:  # per-tensor majority: Σγ over this tensor first
        ties_seen = [0] * len(rules)
        sign_sum = 0
        for rows in ranges:
            _, taus = cached(rows)
            with chunks.timer.track("kernel"):
                taus = [t.clone() for t in taus] if single else taus
                part, seen = ties.elected_sign_sum(taus, ties_before=ties_seen, **options)
            sign_sum += part
            ties_seen = [a + b for a, b in zip(ties_seen, seen)]
        zero_sign = ties.majority_sign(sign_sum)
    ties_seen = [0] * len(rules)
    for rows in ranges:
        base, taus = cached(rows)
        cache.clear()
        with chunks.timer.track("kernel"):
            out, seen = ties.ties_chunk(base, taus, ties_before=ties_seen, zero_sign=zero_sign,
                                        lam=method.lam, normalize=method.normalize, **options)
        ties_seen = [a + b for a, b in zip(ties_seen, seen)]
        yield rows, out


def _merge_chunks(chunks: _ChunkReader, task: TensorTask, spec: ShardSpec):
    """Yield (rows, float32 merged chunk) for one merged tensor."""
    ranges = row_ranges(task)
    method = spec.method
    if method.method == "ties":
        yield from _merge_ties(chunks, task, spec, ranges)
        return
    for rows in ranges:
        if method.method == "linear":
            models = chunks.floats(task.inputs, rows)
            with chunks.timer.track("kernel"):
                out = linear.linear_chunk(models, weights=list(method.weights), normalize=method.normalize)
        else:
            base, taus = _inputs_as_taus(chunks, task, rows)
            with chunks.timer.track("kernel"):
                out = linear.task_arithmetic_chunk(base, taus, weights=list(method.weights), lam=method.lam,
                                                   normalize=method.normalize)
        yield rows, out


def _scan_taus(spec: ShardSpec, chunks: _ChunkReader):
    """Every (expert index, τ chunk) of the shard's merged tensors, tied copies skipped."""
    for task in spec.tensors:
        if task.action != "merge" or task.tied_to is not None:
            continue
        for rows in row_ranges(task):
            _, taus = _inputs_as_taus(chunks, task, rows)
            yield taus


def _scan(spec: ShardSpec, accumulate) -> tuple[list, dict[str, float], int]:
    timer = _Timer()
    t0 = time.perf_counter()
    reader = RangeReader(spec.storage_options)
    chunks = _ChunkReader(reader, pick_device(), timer)
    totals = None
    for taus in _scan_taus(spec, chunks):
        with timer.track("kernel"):
            parts = accumulate(taus)
        totals = parts if totals is None else [a + b for a, b in zip(totals, parts)]
    timer.seconds["total"] = time.perf_counter() - t0
    return totals, dict(timer.seconds), reader.bytes_read


@dataclass(frozen=True)
class ScanResult:
    """Per-expert statistics of one shard for a global trim (small arrays, never tensors)."""

    index: int
    values: list  # per expert: a numpy histogram, or an int
    bytes_read: int
    timings: dict[str, float]


def scan_high_histograms(spec: ShardSpec) -> ScanResult:
    """Pass 1 of a global trim: per expert, the high-16-bit histogram of |τ| over the shard."""
    n = len(spec.method.weights)
    totals, timings, nbytes = _scan(spec, lambda taus: [selection.high_histogram(selection.magnitude_bits(t)) for t in taus])
    totals = totals or [torch.zeros(selection.HIGH_BUCKETS, dtype=torch.int64)] * n
    return ScanResult(spec.index, [h.cpu().numpy() for h in totals], nbytes, timings)


def scan_low_histograms(spec: ShardSpec, buckets: tuple[int, ...]) -> ScanResult:
    """Pass 2: per expert, the low-16-bit histogram of |τ| inside that expert's threshold bucket."""
    def accumulate(taus):
        return [selection.low_histogram(selection.magnitude_bits(t), b) if b >= 0
                else torch.zeros(selection.LOW_BUCKETS, dtype=torch.int64, device=t.device) for t, b in zip(taus, buckets)]

    totals, timings, nbytes = _scan(spec, accumulate)
    totals = totals or [torch.zeros(selection.LOW_BUCKETS, dtype=torch.int64)] * len(buckets)
    return ScanResult(spec.index, [h.cpu().numpy() for h in totals], nbytes, timings)


def scan_sign_sum(spec: ShardSpec, rules: tuple[TrimRule, ...]) -> ScanResult:
    """Pass 3 (zero_sign majority): Σγ over the shard's elements, an exact integer."""
    method = spec.method
    n = len(rules)

    def accumulate(taus):
        total, _ = ties.elected_sign_sum(taus, weights=list(method.weights), rules=list(rules),
                                         ties_before=[0] * n, sign_method=method.sign_method)
        return [total]

    totals, timings, nbytes = _scan(spec, accumulate)
    return ScanResult(spec.index, totals or [0], nbytes, timings)


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
        for task in spec.tensors:
            out_dtype = DTYPES[task.out_dtype]
            if task.action == "copy":
                for rows in row_ranges(task):
                    raw = chunks.raw(task.inputs[0], rows)
                    with timer.track("write"):
                        writer.write(task.name, raw.to(out_dtype))
                continue
            for _, out in _merge_chunks(chunks, task, spec):
                with timer.track("convert"):
                    out = out.to(out_dtype).cpu()
                with timer.track("write"):
                    writer.write(task.name, out)
        with timer.track("write"):
            file_sha = writer.close()
    except BaseException:
        LOG.exception("shard %d (%s) failed", spec.index, spec.file_name)
        raise
    timer.seconds["total"] = time.perf_counter() - t_start
    LOG.info("shard %d: %d tensors, %.1f MB read in %.2fs", spec.index, len(spec.tensors), reader.bytes_read / 1e6,
             timer.seconds["total"])
    return ShardResult(spec.index, spec.file_name, file_sha, writer.bytes_written, tuple(writer.results),
                       reader.bytes_read, dict(timer.seconds), str(device))
