"""The body of one Twin-Merging shard task: the shared expert θ* and every expert's exclusive factors.

For each tensor of its shard, in plan order, the task

1. merges θ* in row chunks with the shard's merge kernels (``shard_task._merge_chunks``), casts
   each chunk to the output dtype and streams it into ``shared/model-0000k-of-0000N.safetensors``;
2. keeps θ* *as stored* (the cast chunk, back in float32) in memory, so that
   v_t = θ_t − θ* is exactly what a reader of the shared model must add (θ* is never written and
   read back);
3. per expert, reads θ_t (again from storage, or from the reads the merge just made when they fit
   the memory budget), forms v_t and writes ``experts/<name>/factors-0000k-of-0000N.safetensors``:
   ``<tensor>.B`` (m×r) and ``<tensor>.A`` (r×n) for a 2-D tensor (``workers.twin.factorize``),
   the dense ``<tensor>`` for any other float tensor. Factors are stored in the tensor's output dtype.

Copied tensors (excluded by pattern, or not floating point) go to the shared file only: they have
no exclusive part. The result is small: names, offsets, sha256, and per expert and tensor the rank,
stored bytes and relative error.

Memory (see ``tensor_memory``): a 1-D (or 3-D+) tensor is streamed in row chunks. A 2-D tensor's
SVD needs the whole matrix, so its θ* and one v_t are held whole next to the SVD's own workspace:
``TWIN_MATRIX_COPIES`` float32 copies of the matrix plus LAPACK's min(m, n)² square. The planner
refuses a run whose budget cannot hold that for its largest matrix; the merge chunks get what is left.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass

import torch

from workers import compiled
from workers.memory import PeakAnonMemory
from workers.methods import bytes_per_element
from workers.shard_task import (
    ShardResult,
    ShardSpec,
    TensorTask,
    _ChunkReader,
    _merge_chunks,
    _Timer,
    copy_tensor,
    pick_device,
    row_ranges,
)
from workers.tensor_io import DTYPES, RangeReader, ShardWriter, TensorInfo, WrittenTensor, itemsize, join_url
from workers.twin import factorize

LOG = logging.getLogger(__name__)

TWIN_MATRIX_COPIES = 6  # θ*, v_t, the SVD's copy of v_t, U, Vᵀ and the factors: float32 copies of an m×n matrix
SPOOL_MEMORY = 64 * 1024 * 1024  # factor bytes a task keeps in memory before spooling to local disk
_COPY_BLOCK = 64 * 1024 * 1024  # bytes moved from the spool to the output per write


@dataclass(frozen=True)
class TwinOptions:
    """What a twin shard task needs beyond its ShardSpec (the shared merge): experts and compression."""

    experts: tuple[str, ...]  # path-safe expert names, in config order
    n_shards: int  # for the factor file names (same numbering as the shared files)
    rank: int | None  # exactly one of rank, rank_ratio, energy (workers.twin.choose_rank)
    rank_ratio: float | None
    energy: float | None
    svd: str  # auto | exact | randomized
    chunk_budget: int  # bytes for tensors (memory_budget less process_reserve); decides whether
    #                    the merge's reads of the experts are kept for v_t

    def factor_file(self, expert: str, shard_index: int) -> str:
        """Path of an expert's factor file for one shard, relative to the output root."""
        return f"experts/{expert}/factors-{shard_index + 1:05d}-of-{self.n_shards:05d}.safetensors"


@dataclass(frozen=True)
class FactorRecord:
    """One expert's exclusive part of one tensor, as the manifest records it."""

    expert: str
    tensor: str
    kind: str  # "factors" (B, A) or "dense"
    rank: int | None  # r of the factors; None when dense
    stored_bytes: int  # bytes written for it (B + A, or the dense tensor)
    dense_bytes: int  # bytes of v_t stored dense in the same dtype
    rel_error: float  # ‖v − BA‖_F / ‖v‖_F before the cast to the stored dtype (0 when dense)
    svd: str | None  # "exact", "randomized", "zero" (v was 0), None when dense


@dataclass(frozen=True)
class FactorFileResult:
    """One expert's factor file of one shard."""

    expert: str
    file_name: str  # relative to the output root
    file_sha256: str
    file_size: int
    tensors: tuple[WrittenTensor, ...]


@dataclass(frozen=True)
class TwinShardResult(ShardResult):
    """What a finished twin shard reports (never tensors): its shard of θ* (the ShardResult fields,
    with the task's reads, timings and memory) and every expert's factor file of the same tensors."""

    factor_files: tuple[FactorFileResult, ...] = ()  # one per expert, in expert order
    records: tuple[FactorRecord, ...] = ()

    def files(self) -> list[tuple[str, int]]:
        """(name relative to the output root, size) of every file the shard wrote."""
        return super().files() + [(f.file_name, f.file_size) for f in self.factor_files]


def expert_infos(task: TensorTask, uses_base: bool) -> tuple[TensorInfo, ...]:
    """The experts' inputs of a merged tensor (the base, when the shared merge reads one, comes first)."""
    return task.inputs[1:] if uses_base else task.inputs


def held_matrix_bytes(shape: tuple[int, ...]) -> int:
    """Bytes held whole while one 2-D tensor is factorized (0 for tensors that are streamed)."""
    if len(shape) != 2:
        return 0
    m, n = shape
    return 4 * (TWIN_MATRIX_COPIES * m * n + 4 * min(m, n) ** 2)


def stream_bytes_per_element(task: TensorTask) -> int:
    """Working-set bytes per element of one merged chunk: the merge itself plus θ* (float32), one
    expert's raw and float32 rows, v_t and its cast."""
    in_size = max(itemsize(i.dtype) for i in task.inputs)
    out_size = itemsize(task.out_dtype)
    return bytes_per_element(len(task.inputs), in_size, out_size) + 4 + in_size + 4 + 4 + out_size


def tensor_memory(task: TensorTask, uses_base: bool, chunk_budget: int) -> tuple[int, bool]:
    """(peak bytes, keep_reads) of one merged tensor in a twin task. ``keep_reads``: the experts' raw
    reads made by the merge are kept and reused for v_t, because that still fits ``chunk_budget``."""
    chunk = stream_bytes_per_element(task) * task.chunk_rows * max(1, math.prod(task.shape[1:]))
    peak = held_matrix_bytes(task.shape) + chunk
    kept = sum(i.nbytes for i in expert_infos(task, uses_base))
    keep_reads = peak + kept <= chunk_budget
    return peak + (kept if keep_reads else 0), keep_reads


def twin_shard_memory(spec: ShardSpec, options: TwinOptions) -> int:
    """The most bytes of tensors one twin shard task holds at once (its process's own memory aside)."""
    peak = 0
    for task in spec.tensors:
        if task.action == "merge":
            peak = max(peak, tensor_memory(task, spec.method.uses_base, options.chunk_budget)[0])
        else:
            peak = max(peak, itemsize(task.inputs[0].dtype) * task.chunk_rows * max(1, math.prod(task.shape[1:])) * 2)
    return peak


def expert_names(urls: list[str]) -> tuple[str, ...]:
    """Stable, path-safe names from the models' URLs: the last path component (the directory of a
    ``.safetensors`` URL), characters outside [A-Za-z0-9._-] replaced by '_'. Names that collide get
    ``-<index in the config>`` appended."""
    names = []
    for url in urls:
        parts = [p for p in re.split(r"[/\\]", url.split("://", 1)[-1]) if p]
        if parts and parts[-1].endswith(".safetensors") and len(parts) > 1:
            parts.pop()
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", parts[-1] if parts else "").strip("._-") or "expert"
        names.append(name)
    counts = {n: names.count(n) for n in names}
    unique = [f"{n}-{i}" if counts[n] > 1 else n for i, n in enumerate(names)]
    taken = set()
    for i, n in enumerate(unique):  # a suffixed name may still equal another model's plain name
        while n in taken:
            n = f"{n}-{i}"
        unique[i] = n
        taken.add(n)
    return tuple(unique)


class _KeptReads:
    """A RangeReader that keeps the row reads of chosen tensors and serves them again (the kept
    tensor itself, which callers only read), so the experts read by the merge are not fetched
    twice. ``bytes_read`` counts storage reads."""

    def __init__(self, reader: RangeReader):
        self._reader = reader
        self._keep: frozenset[TensorInfo] = frozenset()
        self._kept: dict[tuple, torch.Tensor] = {}

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    def keep(self, infos: tuple[TensorInfo, ...]) -> None:
        """Keep the reads of ``infos`` from now on, and drop what was kept before."""
        self._keep = frozenset(infos)
        self._kept.clear()

    def read_rows(self, info: TensorInfo, row_start: int, row_end: int, **kwargs) -> torch.Tensor:
        key = (info, row_start, row_end)
        kept = self._kept.get(key)
        out = kwargs.get("out")
        if kept is None:
            data = self._reader.read_rows(info, row_start, row_end, **kwargs)
            if info in self._keep:
                self._kept[key] = data.clone()
            return data
        if out is None:
            return kept
        return out.copy_(kept.view(out.shape))

    def close(self) -> None:
        self._kept.clear()
        if hasattr(self._reader, "close"):
            self._reader.close()


class _FactorFile:
    """One expert's factor file of a shard. Ranks are known only after each SVD, so the tensors are
    spooled (memory, then local disk) as they come and streamed to the output behind their header
    on ``close``."""

    def __init__(self, url: str, storage_options: dict):
        self.url, self._storage_options = url, storage_options
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        self._entries: list[tuple[str, str, tuple[int, ...]]] = []

    def write(self, name: str, dtype: str, shape: tuple[int, ...], chunk: torch.Tensor) -> int:
        """Append (the next chunk of) tensor ``name``; returns the bytes appended."""
        if not self._entries or self._entries[-1][0] != name:
            self._entries.append((name, dtype, tuple(shape)))
        data = chunk.detach().to(DTYPES[dtype]).cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._spool.write(memoryview(data))
        return data.nbytes

    def close(self) -> tuple[str, int, tuple[WrittenTensor, ...]]:
        """Write the safetensors file; returns (sha256, size, tensors)."""
        writer = ShardWriter(self.url, self._entries, storage_options=self._storage_options)
        self._spool.seek(0)
        for name, dtype, shape in self._entries:
            size = itemsize(dtype)
            remaining = math.prod(shape) * size
            if remaining == 0:
                writer.write(name, torch.empty(0, dtype=DTYPES[dtype]))
            while remaining:
                block = self._spool.read(min(remaining, _COPY_BLOCK // size * size))
                remaining -= len(block)
                writer.write(name, torch.frombuffer(bytearray(block), dtype=DTYPES[dtype]))
        self._spool.close()
        return writer.close(), writer.bytes_written, tuple(writer.results)


def _expert_rows(chunks: _ChunkReader, info: TensorInfo, rows: tuple[int, int]) -> torch.Tensor:
    """θ_t's rows, flat on the task's device, in a dtype that subtracting float32 θ* upcasts exactly
    (stored float16/bfloat16/float32 as is: the subtraction converts as it goes, no float32 copy)."""
    raw = chunks.raw(info, rows)
    with chunks.timer.track("convert"):
        raw = raw.reshape(-1).to(chunks.device)
        return raw if itemsize(info.dtype) <= 4 else raw.to(torch.float32)


def exclusive_rows(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """v_t = θ_t − θ* for rows of an expert in its stored dtype and float32 θ* (one fused pass)."""
    return x.to(torch.float32) - theta


def _twin_matrix(chunks, task, spec, options, writer, files, infos) -> list[FactorRecord]:
    """θ* of a 2-D tensor (streamed out, kept whole), then each expert's factors of v_t."""
    timer, device = chunks.timer, chunks.device
    m, n = task.shape
    out_dtype = DTYPES[task.out_dtype]
    theta = chunks.buffers.get(("theta",), (m * n,), torch.float32, device)
    for rows, out in _merge_chunks(chunks, task, spec, out_dtype):
        out = out.reshape(-1).to(out_dtype)
        with timer.track("write"):
            writer.write(task.name, out)
        theta[rows[0] * n:rows[1] * n] = out.to(torch.float32)
    records = []
    v = chunks.buffers.get(("exclusive",), (m * n,), torch.float32, device)
    for expert, info, file in zip(options.experts, infos, files):
        for rows in row_ranges(task):
            x = _expert_rows(chunks, info, rows)
            with timer.track("kernel"):
                compiled.run_into(exclusive_rows, v[rows[0] * n:rows[1] * n], x, theta[rows[0] * n:rows[1] * n],
                                  numel=x.numel())
        with timer.track("svd"):
            f = factorize(v.view(m, n), rank=options.rank, rank_ratio=options.rank_ratio, energy=options.energy,
                          svd=options.svd)
        with timer.track("write"):
            stored = file.write(task.name + ".B", task.out_dtype, (m, f.rank), f.B)
            stored += file.write(task.name + ".A", task.out_dtype, (f.rank, n), f.A)
        records.append(FactorRecord(expert, task.name, "factors", f.rank, stored, m * n * itemsize(task.out_dtype),
                                    f.rel_error, f.method))
    return records


def _twin_dense(chunks, task, spec, options, writer, files, infos) -> list[FactorRecord]:
    """θ* and every expert's dense v_t of a tensor that is not 2-D, chunk by chunk."""
    timer = chunks.timer
    out_dtype = DTYPES[task.out_dtype]
    stored = [0] * len(files)
    for rows, out in _merge_chunks(chunks, task, spec, out_dtype):
        out = out.reshape(-1).to(out_dtype)
        with timer.track("write"):
            writer.write(task.name, out)
        theta = out.to(chunks.device).to(torch.float32)
        for t, (info, file) in enumerate(zip(infos, files)):
            x = _expert_rows(chunks, info, rows)
            with timer.track("kernel"):
                v = x - theta
            with timer.track("write"):
                stored[t] += file.write(task.name, task.out_dtype, task.shape, v)
    dense = math.prod(task.shape) * itemsize(task.out_dtype)
    return [FactorRecord(e, task.name, "dense", None, s, dense, 0.0, None) for e, s in zip(options.experts, stored)]


def run_twin_shard(spec: ShardSpec, options: TwinOptions) -> TwinShardResult:
    """Write the shard of θ* and, per expert, the factor file of the same tensors; returns the result."""
    t_start = time.perf_counter()
    device = pick_device()
    timer = _Timer()
    reader = _KeptReads(RangeReader(spec.storage_options))
    chunks = _ChunkReader(reader, device, timer)
    writer = ShardWriter(join_url(spec.output_url, spec.file_name), [(t.name, t.out_dtype, t.shape) for t in spec.tensors],
                         storage_options=spec.storage_options)
    names = [options.factor_file(e, spec.index) for e in options.experts]
    files = [_FactorFile(join_url(spec.output_url, name), spec.storage_options) for name in names]
    uses_base = spec.method.uses_base
    records: list[FactorRecord] = []
    try:
        with PeakAnonMemory() as memory:
            for task in spec.tensors:
                if task.action == "copy":
                    copy_tensor(chunks, task, writer)
                    continue
                infos = expert_infos(task, uses_base)
                if len(infos) != len(options.experts):
                    raise RuntimeError(f"tensor {task.name!r}: {len(infos)} expert inputs for {len(options.experts)} experts")
                reader.keep(infos if tensor_memory(task, uses_base, options.chunk_budget)[1] else ())
                body = _twin_matrix if len(task.shape) == 2 else _twin_dense
                records += body(chunks, task, spec, options, writer, files, infos)
                reader.keep(())
            with timer.track("write"):
                shared_sha = writer.close()
                written = [file.close() for file in files]
    except BaseException:
        LOG.exception("twin shard %d (%s) failed", spec.index, spec.file_name)
        raise
    finally:
        chunks.close()
        reader.close()
    timer.seconds["total"] = time.perf_counter() - t_start
    LOG.info("twin shard %d: %d tensors x %d experts, %.1f MB read in %.2fs (svd %.2fs)", spec.index,
             len(spec.tensors), len(options.experts), reader.bytes_read / 1e6, timer.seconds["total"],
             timer.seconds.get("svd", 0.0))
    factor_files = tuple(FactorFileResult(e, name, sha, size, tensors)
                         for e, name, (sha, size, tensors) in zip(options.experts, names, written))
    return TwinShardResult(spec.index, spec.file_name, shared_sha, writer.bytes_written, tuple(writer.results),
                           reader.bytes_read, dict(timer.seconds), str(device), memory.peak, memory.start,
                           spec.memory_bytes, factor_files, tuple(records))
