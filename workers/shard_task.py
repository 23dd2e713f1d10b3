"""The body of every shard task, for every method: range-read → kernel → write → result.

No Ray here: ``run_shard`` is a plain function of a ``ShardSpec`` that returns a small
``ShardResult`` (names, offsets, checksums, timings), never tensors; ``run_scan`` runs one
pre-pass scan (e.g. TIES global trim's histograms) over a shard's merged tensors. What is computed
comes from the spec's registered method (workers/methods/): its ``ShardBody`` (workers/shard_body.py)
makes each merged tensor, and may write files of its own beside the shard (Twin's factor files).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import torch

from workers.chunks import ChunkReader, MergeInputs, ShardContext, Timer, copy_tensor
from workers.compiled import Compiler, compiles
from workers.memory import PeakAnonMemory
from workers.methods import method_of
from workers.results import ScanResult, ShardResult
from workers.specs import ShardSpec, TensorTask
from workers.tensor_io import RangeReader, ShardWriter

LOG = logging.getLogger(__name__)


def pick_device() -> torch.device:
    """The task's GPU when Ray gave it one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Scan(Protocol):
    """One model-wide pre-pass over a shard's merged tensors (tied copies skipped)."""

    def initial(self) -> list: ...

    def accumulate(self, ctx: ShardContext, inputs: MergeInputs, totals: list) -> list: ...


def _merge_inputs(ctx: ShardContext, spec: ShardSpec, task: TensorTask, parity: int = 0) -> MergeInputs:
    return MergeInputs(ctx, task, spec.method.uses_base, spec.nan_policy == "error", parity)


def run_shard(spec: ShardSpec) -> ShardResult:
    """Read, merge and write every tensor of one shard; returns its result (no tensors)."""
    t_start, started_at, first_tensor_at = time.perf_counter(), time.time(), 0.0
    device, timer = pick_device(), Timer()
    body = method_of(spec.method).shard_body(spec)
    reader = body.wrap_reader(RangeReader(spec.storage_options, checksums=spec.input_checksums))
    chunks = ChunkReader(reader, device, timer)
    ctx = ShardContext(chunks, Compiler(compiles(spec.compile_kernels, spec.merged_elements)),
                       [] if spec.diagnostics else None)
    writer = ShardWriter(spec.output.join(spec.file_name), [(t.name, t.out_dtype, t.shape) for t in spec.tensors],
                         storage_options=spec.storage_options)
    try:
        with PeakAnonMemory() as memory, writer:
            merged = [t for t in spec.tensors if t.action == "merge"]
            inputs = {t.name: _merge_inputs(ctx, spec, t, i % 2 if body.prefetch else 0) for i, t in enumerate(merged)}
            following = dict(zip([t.name for t in merged], [t.name for t in merged[1:]])) if body.prefetch else {}
            for task in spec.tensors:
                if task.action == "copy":
                    copy_tensor(chunks, task, writer)
                    continue
                if task.name in following:  # read the next merged tensor while this one computes
                    inputs[following[task.name]].prefetch()
                body.tensor(ctx, task, inputs.pop(task.name), writer)
                first_tensor_at = first_tensor_at or time.time()
            with timer.track("write"):
                file_sha = writer.close()
                extra_files, records = body.finish()
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
                       reader.bytes_read, dict(timer.seconds), str(device), memory.peak, memory.start,
                       spec.memory_bytes, extra_files, records,
                       tuple((url, start, sha) for (url, start), sha in sorted(reader.read_sha256.items())),
                       started_at, first_tensor_at, time.time(), tuple(ctx.diagnostics or ()))


def run_scan(spec: ShardSpec, scan: Scan) -> ScanResult:
    """Run ``scan`` over every merged tensor of the shard (tied copies skipped); small results only."""
    t0 = time.perf_counter()
    timer = Timer()
    reader = RangeReader(spec.storage_options)
    chunks = ChunkReader(reader, pick_device(), timer)
    ctx = ShardContext(chunks, Compiler(compiles(spec.compile_kernels, spec.merged_elements)))
    totals = scan.initial()
    try:
        for task in spec.tensors:
            if task.action == "merge" and task.tied_to is None:
                totals = scan.accumulate(ctx, _merge_inputs(ctx, spec, task), totals)
    finally:
        chunks.close()
        reader.close()
    timer.seconds["total"] = time.perf_counter() - t0
    values = [v.cpu().numpy() if isinstance(v, torch.Tensor) else v for v in totals]
    return ScanResult(spec.index, values, reader.bytes_read, dict(timer.seconds))
