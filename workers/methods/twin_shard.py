"""Twin-Merging's shard body: the shared expert θ* and every expert's exclusive factors.

For each merged tensor of its shard, in plan order, the body

1. merges θ* in row chunks with the shared merge's ``merge_tensor``, casts each chunk to the output
   dtype and streams it into ``shared/model-0000k-of-0000N.safetensors`` (the shard's own file);
2. keeps θ* *as stored* (the cast chunk, back in float32) in memory, so that
   v_t = θ_t − θ* is exactly what a reader of the shared model must add (θ* is never written and
   read back);
3. per expert, reads θ_t (again from storage, or from the reads the merge just made when they fit
   the memory budget), forms v_t and writes ``experts/<name>/factors-0000k-of-0000N.safetensors``:
   ``<tensor>.B`` (m×r) and ``<tensor>.A`` (r×n) for a 2-D tensor (``workers.kernels.twin.factorize``),
   the dense ``<tensor>`` for any other float tensor. Factors are stored in the tensor's output dtype.

Copied tensors (excluded by pattern, or not floating point) go to the shared file only: they have
no exclusive part. The shard's result carries the factor files (``extra_files``) and, per expert and
tensor, a ``FactorRecord`` (``records``): rank, stored bytes and relative error.

Memory (see ``tensor_memory``): a 1-D (or 3-D+) tensor is streamed in row chunks. A 2-D tensor's
SVD needs the whole matrix, so its θ* and one v_t are held whole next to the SVD's own workspace:
``TWIN_MATRIX_COPIES`` float32 copies of the matrix plus a 4·min(m, n)² float32 square. The planner
refuses a run whose budget cannot hold that for its largest matrix; the merge chunks get what is left.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass

import torch

from workers.chunks import ChunkReader, MergeInputs, ShardContext, row_ranges
from workers.kernels.twin import factorize
from workers.methods.base import task_bytes_per_element
from workers.results import WrittenFile, WrittenTensor
from workers.shard_body import ShardBody
from workers.specs import TensorTask
from workers.tensor_io import DTYPES, RangeReader, ShardWriter, TensorInfo, itemsize

LOG = logging.getLogger(__name__)

TWIN_MATRIX_COPIES = 6  # θ*, v_t, the SVD's copy of v_t, U, Vᵀ and the factors: float32 copies of an m×n matrix
SPOOL_MEMORY = 64 * 1024 * 1024  # factor bytes a task keeps in memory before spooling to local disk
_COPY_BLOCK = 64 * 1024 * 1024  # bytes moved from the spool to the output per write


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
    return task_bytes_per_element(task) + 4 + in_size + 4 + 4 + out_size


def tensor_memory(task: TensorTask, uses_base: bool, chunk_budget: int) -> tuple[int, bool]:
    """(peak bytes, keep_reads) of one merged tensor in a twin task. ``keep_reads``: the experts' raw
    reads made by the merge are kept and reused for v_t, because that still fits ``chunk_budget``."""
    chunk = stream_bytes_per_element(task) * task.chunk_rows * max(1, math.prod(task.shape[1:]))
    peak = held_matrix_bytes(task.shape) + chunk
    kept = sum(i.nbytes for i in expert_infos(task, uses_base))
    keep_reads = peak + kept <= chunk_budget
    return peak + (kept if keep_reads else 0), keep_reads


class KeptReads:
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

    @property
    def read_sha256(self) -> dict[tuple[str, int], str]:
        return self._reader.read_sha256

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


class FactorFile:
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
        self._spool.seek(0)
        with ShardWriter(self.url, self._entries, storage_options=self._storage_options) as writer:
            for name, dtype, shape in self._entries:
                size = itemsize(dtype)
                remaining = math.prod(shape) * size
                if remaining == 0:
                    writer.write(name, torch.empty(0, dtype=DTYPES[dtype]))
                while remaining:
                    block = self._spool.read(min(remaining, _COPY_BLOCK // size * size))
                    remaining -= len(block)
                    writer.write(name, torch.frombuffer(bytearray(block), dtype=DTYPES[dtype]))
            sha = writer.close()
        self._spool.close()
        return sha, writer.bytes_written, tuple(writer.results)


def _expert_rows(chunks: ChunkReader, info: TensorInfo, rows: tuple[int, int]) -> torch.Tensor:
    """θ_t's rows, flat on the task's device, in a dtype that subtracting float32 θ* upcasts exactly
    (stored float16/bfloat16/float32 as is: the subtraction converts as it goes, no float32 copy)."""
    raw = chunks.raw(info, rows)
    with chunks.timer.track("convert"):
        raw = raw.reshape(-1).to(chunks.device)
        return raw if itemsize(info.dtype) <= 4 else raw.to(torch.float32)


def exclusive_rows(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """v_t = θ_t − θ* for rows of an expert in its stored dtype and float32 θ* (one fused pass)."""
    return x.to(torch.float32) - theta


class TwinBody(ShardBody):
    """θ* into the shard's file, each expert's factors into its factor file of this shard."""

    prefetch = False  # θ* and one v_t are held whole: no second buffer set for a read-ahead

    def __init__(self, shared_method, spec):
        super().__init__(shared_method, spec)
        self.options = spec.method
        self.names = [self.options.factor_file(e, spec.index, spec.n_shards) for e in self.options.experts]
        self.files = [FactorFile(spec.output.join(name), spec.storage_options) for name in self.names]
        self.records: list[FactorRecord] = []
        self.reader: KeptReads | None = None

    def wrap_reader(self, reader: RangeReader) -> KeptReads:
        self.reader = KeptReads(reader)
        return self.reader

    def merged_chunks(self, ctx: ShardContext, inputs: MergeInputs, task: TensorTask, writer: ShardWriter):
        """Yield (rows, θ* chunk as stored) after writing each into the shared file."""
        out_dtype = DTYPES[task.out_dtype]
        for rows, out in self.method.merge_tensor(ctx, inputs, self.options.shared, self.spec.prepass, out_dtype):
            out = out.reshape(-1).to(out_dtype)
            with ctx.timer.track("write"):
                writer.write(task.name, out)
            yield rows, out

    def tensor(self, ctx: ShardContext, task: TensorTask, inputs: MergeInputs, writer: ShardWriter) -> None:
        uses_base = self.options.uses_base
        infos = expert_infos(task, uses_base)
        if len(infos) != len(self.options.experts):
            raise RuntimeError(f"tensor {task.name!r}: {len(infos)} expert inputs for {len(self.options.experts)} experts")
        self.reader.keep(infos if tensor_memory(task, uses_base, self.spec.chunk_budget)[1] else ())
        body = self._matrix if len(task.shape) == 2 else self._dense
        self.records += body(ctx, task, inputs, writer, infos)
        self.reader.keep(())

    def _matrix(self, ctx, task, inputs, writer, infos) -> list[FactorRecord]:
        """θ* of a 2-D tensor (streamed out, kept whole), then each expert's factors of v_t."""
        m, n = task.shape
        options = self.options
        theta = ctx.buffer(("theta",), (m * n,), torch.float32)
        for rows, out in self.merged_chunks(ctx, inputs, task, writer):
            theta[rows[0] * n:rows[1] * n] = out.to(torch.float32)
        records = []
        v = ctx.buffer(("exclusive",), (m * n,), torch.float32)
        for expert, info, file in zip(options.experts, infos, self.files):
            for rows in row_ranges(task):
                x = _expert_rows(ctx.chunks, info, rows)
                with ctx.timer.track("kernel"):
                    ctx.compiler.run_into(exclusive_rows, v[rows[0] * n:rows[1] * n], x,
                                          theta[rows[0] * n:rows[1] * n], numel=x.numel())
            with ctx.timer.track("svd"):
                f = factorize(v.view(m, n), rank=options.rank, rank_ratio=options.rank_ratio, energy=options.energy,
                              svd=options.svd)
            with ctx.timer.track("write"):
                stored = file.write(task.name + ".B", task.out_dtype, (m, f.rank), f.B)
                stored += file.write(task.name + ".A", task.out_dtype, (f.rank, n), f.A)
            records.append(FactorRecord(expert, task.name, "factors", f.rank, stored,
                                        m * n * itemsize(task.out_dtype), f.rel_error, f.method))
        return records

    def _dense(self, ctx, task, inputs, writer, infos) -> list[FactorRecord]:
        """θ* and every expert's dense v_t of a tensor that is not 2-D, chunk by chunk."""
        stored = [0] * len(self.files)
        for rows, out in self.merged_chunks(ctx, inputs, task, writer):
            theta = out.to(ctx.device).to(torch.float32)
            for t, (info, file) in enumerate(zip(infos, self.files)):
                x = _expert_rows(ctx.chunks, info, rows)
                with ctx.timer.track("kernel"):
                    v = x - theta
                with ctx.timer.track("write"):
                    stored[t] += file.write(task.name, task.out_dtype, task.shape, v)
        dense = math.prod(task.shape) * itemsize(task.out_dtype)
        return [FactorRecord(e, task.name, "dense", None, s, dense, 0.0, None)
                for e, s in zip(self.options.experts, stored)]

    def finish(self) -> tuple[tuple[WrittenFile, ...], tuple[dict, ...]]:
        written = [file.close() for file in self.files]
        files = tuple(WrittenFile(e, name, sha, size, tensors)
                      for e, name, (sha, size, tensors) in zip(self.options.experts, self.names, written))
        return files, tuple(dataclasses.asdict(r) for r in self.records)
