"""safetensors over fsspec: header parsing, ranged tensor reads and streamed shard writes.

Everything here goes through fsspec, so a local directory, ``file://``, ``s3://`` and ``gs://``
behave the same; Hugging Face Hub references (``hf://org/name@rev``) resolve to a local snapshot
(workers/hub.py). Checkpoints are never unpickled: only safetensors files are read.

Remote reads retry transient errors (timeouts, dropped connections, 5xx) with bounded exponential
backoff and fetch large ranges in bounded GETs; missing files, denied access and corrupt data fail
at once with a CheckpointError naming the URL and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import torch

from workers.results import WrittenTensor
from workers.storage import (
    STORAGE_FIX,
    CheckpointError,
    is_local,
    join_url,
    open_fs,
    storage_errors,
    with_retries,
)

LOG = logging.getLogger(__name__)

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses headers above 100 MB; so do we
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".gguf", *PICKLE_SUFFIXES)  # weights, or an index of them
# Largest single ranged GET; bigger reads are split. A task keeps up to workers.chunks.READ_CONCURRENCY in
# flight, each held whole until copied: 4 × 16 MiB, what one 64 MiB GET held before. bench/s3_throughput.py
# --sweep (SeaweedFS, 2 tasks): 8, 16 and 64 MiB GETs served the same within noise (0.20-0.35 GB/s), at the same
# CPU per GB (3.1-3.4 s).
REMOTE_CHUNK_BYTES = 16 * 1024 * 1024
# Multipart part size of a streamed output (S3's smallest but the last is 5 MiB). BackgroundUpload holds at most
# 3 parts (24 MiB, below s3fs's default 50 MiB buffer) and uploads each while the task reads and merges on. On
# SeaweedFS (linear, 4 inputs, 8 shards, interleaved runs): the tasks' write stage summed 7.6-9.2 s against
# 12.7-17.9 s with s3fs's 50 MiB buffer uploaded in line; --sweep: the store's write rate and CPU per GB do not
# depend on the part size (5-50 MiB).
REMOTE_PART_BYTES = 8 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# config / mergekit spellings -> safetensors names
DTYPE_ALIASES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
}


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    file_url: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FileHeader:
    """A parsed safetensors header: tensors by name, metadata, and a hash of the raw header."""

    url: str
    size: int
    header_sha256: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(url: str, *, storage_options: dict[str, Any] | None = None) -> FileHeader:
    """Read only the 8-byte length and JSON header of a safetensors file and validate it."""
    fs, path = open_fs(url, storage_options)
    with storage_errors(url, "the safetensors header"):
        try:
            size = with_retries(url, fs.size, path)
        except FileNotFoundError as exc:
            _raise_if_local(url, fs, path, "not found", exc)
            raise
        if size >= 8:
            (header_len,) = struct.unpack("<Q", with_retries(url, fs.cat_file, path, start=0, end=8))
    if size < 8:
        raise CheckpointError(f"{url}: {size} bytes is too short for a safetensors file; the file is truncated, download it again")
    if header_len > HEADER_LIMIT or 8 + header_len > size:
        raise CheckpointError(
            f"{url}: safetensors header claims {header_len} bytes but the file has {size}; "
            "the file is truncated or not safetensors, download or convert it again"
        )
    with storage_errors(url, "the safetensors header"):
        raw = with_retries(url, fs.cat_file, path, start=8, end=8 + header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{url}: safetensors header is not valid JSON ({exc}); the file is corrupt, download it again") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{url}: safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{url}: safetensors __metadata__ is not a JSON object; the file is corrupt")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if escapes_prefix(name):
            raise CheckpointError(
                f"{url}: tensor {name!r} has a name that would escape the output prefix if used as a path "
                "(absolute, a '..' segment or a NUL byte); rename it in the checkpoint "
                "(tensor names are dotted module paths such as model.layers.0.mlp.up_proj.weight)"
            )
        try:
            dtype, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (isinstance(dtype, str) and isinstance(shape, list) and _is_int(lo) and _is_int(hi)):
                raise TypeError("dtype must be a string, shape a list and data_offsets integers")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{url}: tensor {name!r} has a malformed header entry {entry!r}; the file is corrupt") from exc
        if dtype not in DTYPES:
            raise CheckpointError(f"{url}: tensor {name!r} has dtype {dtype!r}, which mergefleet cannot read")
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{url}: tensor {name!r} has shape {shape!r}, but dimensions are non-negative integers; "
                                  "the file is corrupt, re-export or download it again")
        info = TensorInfo(url, dtype, tuple(shape), data_start + lo, data_start + hi)
        if not 0 <= lo <= hi or info.end > size:
            raise CheckpointError(
                f"{url}: tensor {name!r} has data offsets {lo}..{hi} beyond the file's {size - data_start} data bytes; "
                "the file is truncated or corrupt, download it again"
            )
        if info.nbytes != info.numel * itemsize(dtype):
            raise CheckpointError(
                f"{url}: tensor {name!r} spans {info.nbytes} bytes but {dtype}{list(shape)} needs "
                f"{info.numel * itemsize(dtype)}; the file is corrupt"
            )
        tensors[name] = info
    _check_layout(url, tensors, data_start, size)
    return FileHeader(url, size, hashlib.sha256(raw).hexdigest(), tensors, dict(metadata))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layout(url: str, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Refuse what safetensors refuses to load: taken in order of their offsets, the tensors must tile
    the data section exactly, the first beginning at 0, each where the previous one ended, the last at
    the end of the file: no gap, no overlap (not even an identical range), no trailing bytes. Zero-size
    tensors (begin == end) may sit at any tensor boundary."""
    def span(info: TensorInfo) -> str:
        return f"{info.start - data_start}..{info.end - data_start}"

    fix = "the file is corrupt (safetensors refuses to load it); re-export it with safetensors or download it again"
    pos, prev = data_start, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end, item[0])):
        if info.start != pos:
            if prev is None:
                problem = (f"tensor {name!r} begins at data offset {info.start - data_start}, not 0: "
                           "the bytes before it belong to no tensor")
            elif (info.start, info.end) == (tensors[prev].start, tensors[prev].end):
                problem = (f"tensors {prev!r} and {name!r} have the same data offsets {span(info)}, but safetensors "
                           "lets no two names share bytes (store a tied weight once, or as a copy)")
            elif info.start < pos:
                problem = f"tensor {name!r} (data offsets {span(info)}) overlaps tensor {prev!r} ({span(tensors[prev])})"
            else:
                problem = (f"{info.start - pos} bytes between tensor {prev!r} ({span(tensors[prev])}) and tensor {name!r} "
                           f"({span(info)}) belong to no tensor")
            raise CheckpointError(f"{url}: {problem}; {fix}")
        pos, prev = info.end, name
    if pos != size:
        after = (f"after the last tensor {prev!r} (data offsets {span(tensors[prev])})" if prev
                 else "after a header that lists no tensors")
        raise CheckpointError(f"{url}: {size - pos} trailing bytes {after} belong to no tensor; {fix}")


def escapes_prefix(name: str) -> bool:
    """Whether a name (a tensor's, or a file's in an index), taken as a relative path, could leave the
    directory it is put under: absolute, a '..' segment, or a NUL byte."""
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or "\x00" in name


@dataclass(frozen=True)
class ModelFiles:
    """A Hugging Face style model directory: its safetensors headers and every tensor's location."""

    url: str
    files: tuple[FileHeader, ...]
    tensors: dict[str, TensorInfo]
    source: str | None = None  # a Hub model: the reference pinned to its commit (hf://org/name@<hash>); url is the local snapshot
    revision: str | None = None  # a Hub model: the commit hash its files come from


def _model_file_urls(url: str, fs: fsspec.AbstractFileSystem, root: str) -> list[str] | None:
    """The safetensors files a single file, an index or model.safetensors names; None to list the directory."""
    if root.endswith(".safetensors"):
        return [url]
    if with_retries(url, fs.exists, join_url(root, INDEX_NAME)):
        raw = with_retries(url, fs.cat_file, join_url(root, INDEX_NAME))
        try:
            weight_map = json.loads(raw).get("weight_map", {})
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"{url}: {INDEX_NAME} is not a valid index ({exc}); regenerate or download it again") from exc
        if not names:
            raise CheckpointError(f"{url}: {INDEX_NAME} has an empty weight_map")
        bad = [n for n in names if not isinstance(n, str) or not n or escapes_prefix(n)]
        if bad:
            raise CheckpointError(f"{url}: {INDEX_NAME} maps tensors to files outside the model directory {bad[:3]}; "
                                  "an index names files relative to its own directory")
        return [join_url(url, n) for n in names]
    if with_retries(url, fs.exists, join_url(root, SINGLE_NAME)):
        return [join_url(url, SINGLE_NAME)]
    return None


def _raise_if_local(url: str, fs: fsspec.AbstractFileSystem, path: str, problem: str, exc: FileNotFoundError) -> None:
    """For a missing local path, a CheckpointError that says so plainly (STORAGE_FIX is about buckets)."""
    if is_local(fs):
        raise CheckpointError(f"{url}: {problem}: {path} does not exist on this machine; check the path") from exc


def resolve_model(url: str, *, storage_options: dict[str, Any] | None = None) -> ModelFiles:
    """Locate the safetensors files of a model directory (single file or sharded with an index).

    A Hugging Face Hub reference (``hf://org/name@rev``, or ``org/name`` when no such local path
    exists) is fetched into the local cache first; the result records its commit.
    """
    from workers import hub  # hub imports this module

    if hub.parse_reference(url) is not None:
        snapshot = hub.resolve(url)
        model = resolve_model(snapshot.local_dir)
        return replace(model, source=snapshot.pinned_url, revision=snapshot.commit)
    fs, root = open_fs(url, storage_options)
    with storage_errors(url, "the model directory"):
        file_urls = _model_file_urls(url, fs, root)
    if file_urls is None:
        with storage_errors(url, "the model directory"):
            try:
                listing = [p.rsplit("/", 1)[-1] for p in with_retries(url, fs.ls, root, detail=False)]
            except FileNotFoundError as exc:
                _raise_if_local(url, fs, root, "no such model directory", exc)
                raise CheckpointError(f"{url}: no such model directory ({exc}); {STORAGE_FIX}") from exc
        pickles = [n for n in listing if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            what = "is a pickle checkpoint" if root.endswith(PICKLE_SUFFIXES) else f"holds pickle checkpoints {pickles}"
            raise CheckpointError(
                f"{url}: {what} and no safetensors; mergefleet never unpickles. "
                "Convert once with: python -c \"import torch, safetensors.torch as st; "
                "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\""
            )
        shards = sorted(n for n in listing if n.endswith(".safetensors"))
        if not shards:
            raise CheckpointError(f"{url}: no {SINGLE_NAME} or {INDEX_NAME} found; point at a Hugging Face model directory")
        file_urls = [join_url(url, n) for n in shards]
    headers = tuple(read_header(f, storage_options=storage_options) for f in file_urls)
    tensors: dict[str, TensorInfo] = {}
    for header in headers:
        for name, info in header.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{url}: tensor {name!r} appears in both {tensors[name].file_url} and {info.file_url}")
            tensors[name] = info
    return ModelFiles(url, headers, tensors)


class RangeReader:
    """Ranged reads of tensors (whole or by rows), keeping one filesystem handle per file URL.

    Local files are read straight into the caller's buffer (``preadv``); object stores answer
    ranged GETs of at most REMOTE_CHUNK_BYTES each, copied into the buffer, each retried on
    transient errors. Reads may run on several threads at once.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, *, checksums: bool = False):
        self._storage_options = storage_options
        self._checksums = checksums  # sha256 every tensor read whole, in order (``read_sha256``)
        self._fs: dict[str, tuple[fsspec.AbstractFileSystem, str]] = {}
        self._local_files: dict[str, Any] = {}
        self._hashing: dict[TensorInfo, tuple[Any, int]] = {}  # tensor -> (sha256 so far, next row)
        self.read_sha256: dict[tuple[str, int], str] = {}  # (file URL, data start) -> sha256 of the tensor's bytes
        self.bytes_read = 0
        self._lock = threading.Lock()  # guards the file handles, the checksums and bytes_read

    def _open(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        if url not in self._fs:
            self._fs[url] = open_fs(url, self._storage_options)
        return self._fs[url]

    def _read_into(self, info: TensorInfo, start: int, out: memoryview) -> None:
        fs, path = self._open(info.file_url)
        if is_local(fs):
            with self._lock:
                if path not in self._local_files:
                    self._local_files[path] = os.open(path, os.O_RDONLY)
            got = 0
            while got < len(out):  # pread: no shared file position, so reads may run on several threads
                n = os.preadv(self._local_files[path], [out[got:]], info.start + start + got)
                if n == 0:
                    break
                got += n
        else:
            got = 0
            for lo, hi in remote_gets(info.start + start, len(out)):
                with storage_errors(info.file_url, f"bytes {lo}..{hi}"):
                    data = with_retries(info.file_url, fs.cat_file, path, start=lo, end=hi)
                out[got:got + len(data)] = data
                got += len(data)
                if len(data) < hi - lo:
                    break
        if got != len(out):
            raise CheckpointError(f"{info.file_url}: short read of {got} of {len(out)} bytes; the file changed or is truncated")
        with self._lock:
            self.bytes_read += got

    def read_rows(self, info: TensorInfo, row_start: int, row_end: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [row_start, row_end) along dim 0 in the stored dtype (bit-exact), flattened.

        With ``out`` (a contiguous buffer of the stored dtype and the right size) the bytes land
        there without a copy.
        """
        row_elements = _prod(info.shape[1:])
        numel = (row_end - row_start) * row_elements if info.shape else 1
        dtype = DTYPES[info.dtype]
        if out is None:
            out = torch.empty(numel, dtype=dtype)
        if out.dtype != dtype or out.numel() != numel or not out.is_contiguous():
            raise ValueError(f"buffer {out.dtype}[{out.numel()}] cannot hold {info.dtype}[{numel}] of {info.file_url}")
        if numel:
            view = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
            self._read_into(info, row_start * row_elements * itemsize(info.dtype), view)
            if self._checksums:
                with self._lock:
                    self._hash(info, row_start, row_end, view)
        return out

    def _hash(self, info: TensorInfo, row_start: int, row_end: int, data: memoryview) -> None:
        """Extend the tensor's sha256 with rows read in order (a re-read of rows already hashed, as
        the passes of a trim make, adds nothing): the checksum of what the run read, without a read more."""
        key = (info.file_url, info.start)
        if key in self.read_sha256:
            return
        hasher, next_row = self._hashing.get(info, (None, 0))
        if row_start != next_row:
            return
        hasher = hasher or hashlib.sha256()
        hasher.update(data)
        if row_end >= rows_of(info.shape):
            self.read_sha256[key] = hasher.hexdigest()
            self._hashing.pop(info, None)
        else:
            self._hashing[info] = (hasher, row_end)

    def close(self) -> None:
        for fd in self._local_files.values():
            os.close(fd)
        self._local_files.clear()


def remote_gets(start: int, nbytes: int, limit: int | None = None) -> list[tuple[int, int]]:
    """The ranged GETs (start, end) that read ``nbytes`` from ``start`` of an object: ``limit`` bytes
    at most each (None: REMOTE_CHUNK_BYTES)."""
    step = limit or REMOTE_CHUNK_BYTES
    return [(lo, min(lo + step, start + nbytes)) for lo in range(start, start + nbytes, step)]


class BackgroundUpload:
    """An object-store file filled in whole parts, each uploaded on a thread while the caller goes
    on (reading and merging the next tensor). Holds at most the part filling, the part uploading
    and the client's copy of it (3 × REMOTE_PART_BYTES); an upload's error is raised by the next
    ``write`` or by ``close``."""

    def __init__(self, file):
        self._file = file
        self._part = bytearray()
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            take = min(len(data), REMOTE_PART_BYTES - len(self._part))
            self._part += data[:take]
            data = data[take:]
            if len(self._part) == REMOTE_PART_BYTES:
                self._ship()

    def _ship(self) -> None:
        self._wait()
        part, self._part = self._part, bytearray()
        self._upload = threading.Thread(target=self._put, args=(part,), name="upload", daemon=True)
        self._upload.start()

    def _put(self, part: bytearray) -> None:
        try:
            self._file.write(part)  # a whole part: the client uploads it now
        except Exception as exc:  # raised on the caller's thread by _wait
            self._error = exc

    def _wait(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Upload the rest and complete the object."""
        self._wait()
        self._file.write(self._part)
        self._file.close()

    def discard(self) -> None:
        """Abort the upload: the object is never completed (an older one at its key stays as it was)."""
        if self._upload is not None:
            self._upload.join()
        self._file.discard()
        self._file.closed = True  # else the client's finaliser would complete the upload with what it has


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def is_weight_file(name: str) -> bool:
    """Whether a file name is weights (or their index) a loader would serve: never a side file."""
    return name.endswith(WEIGHT_SUFFIXES)


def rows_of(shape: tuple[int, ...]) -> int:
    """Number of rows a tensor is split along (dim 0; a 0-d tensor is one row)."""
    return shape[0] if shape else 1


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The serialized safetensors header (length prefix included) for tensors written in the given order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in entries:
        nbytes = _prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = (pos, pos + nbytes)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardWriter:
    """Streams one safetensors file: the header first, then each tensor's bytes in plan order.

    Tensors may arrive in row chunks, so a tensor never needs to be whole in memory.
    """

    def __init__(self, url: str, entries: list[tuple[str, str, tuple[int, ...]]], *,
                 storage_options: dict[str, Any] | None = None, metadata: dict[str, str] | None = None):
        self.url = url
        self._entries = entries
        head, self._offsets = build_header(entries, metadata)
        self._data_start = len(head)
        fs, path = open_fs(url, storage_options)
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        file = fs.open(path, "wb", block_size=REMOTE_PART_BYTES)  # object stores: a multipart upload
        self._fs, self._path, self._closed = fs, path, False
        self._file = file if is_local(fs) else BackgroundUpload(file)
        self._file_hash = hashlib.sha256(head)
        self._file.write(head)
        self._index = 0
        self._written = 0
        self._tensor_hash = hashlib.sha256()
        self.results: list[WrittenTensor] = []
        self.bytes_written = len(head)

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next chunk of tensor ``name`` (chunks must come in order, tensors in plan order)."""
        expected_name, dtype, shape = self._entries[self._index]
        if name != expected_name:
            raise RuntimeError(f"{self.url}: tensor {name!r} written out of order, expected {expected_name!r}")
        if chunk.dtype != DTYPES[dtype]:
            raise RuntimeError(f"{self.url}: tensor {name!r} chunk has dtype {chunk.dtype}, planned {dtype}")
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._file_hash.update(data)
        self._tensor_hash.update(data)
        self._written += data.nbytes
        self.bytes_written += data.nbytes
        lo, hi = self._offsets[name]
        if self._written > hi - lo:
            raise RuntimeError(f"{self.url}: tensor {name!r} got {self._written} bytes, planned {hi - lo}")
        if self._written == hi - lo:
            self.results.append(WrittenTensor(name, dtype, shape, self._data_start + lo, hi - lo, self._tensor_hash.hexdigest()))
            self._index += 1
            self._written = 0
            self._tensor_hash = hashlib.sha256()

    def close(self) -> str:
        """Finish the file; returns its sha256. Fails, publishing nothing, if any planned tensor is missing."""
        if self._index != len(self._entries):
            self.discard()
            raise RuntimeError(f"{self.url}: closed after {self._index} of {len(self._entries)} tensors")
        self._file.close()
        self._closed = True
        return self._file_hash.hexdigest()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:  # a failure before ``close``: publish nothing
            self.discard()

    def discard(self) -> None:
        """Give an unfinished file up (a failed task): nothing stays at its URL, neither a partial
        local file nor a completed partial object. After ``close`` it does nothing."""
        if self._closed:
            return
        self._closed = True
        if is_local(self._fs):
            self._file.close()
            self._fs.rm(self._path)
        else:
            self._file.discard()
