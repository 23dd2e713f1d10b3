"""What shard tasks report and manifests record: small, JSON-able fragments, never tensors.

Both ``workers`` (which produce them) and ``manifests`` (which store and read them back from
completion markers) import this module; it imports neither.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class WrittenTensor:
    """One tensor as written: where it sits in its file and the sha256 of its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class WrittenFile:
    """One safetensors file a shard task wrote beside its own (e.g. an expert's factor file)."""

    owner: str  # what the file belongs to (Twin: the expert's name)
    file_name: str  # relative to the output root
    file_sha256: str
    file_size: int
    tensors: tuple[WrittenTensor, ...]


@dataclass(frozen=True)
class ShardResult:
    """What a finished shard reports: its file, each tensor's location and sha256, the files its
    method wrote beside it, per-tensor records of the method and diagnostics of the merge, and
    where time and memory went."""

    index: int
    file_name: str  # relative to the output root
    file_sha256: str
    file_size: int
    tensors: tuple[WrittenTensor, ...]
    bytes_read: int
    timings: dict[str, float]
    device: str
    peak_rss_anon: int | None = None  # bytes of anonymous memory of the task's process at its peak
    start_rss_anon: int | None = None  # ... when the task started (the worker process itself)
    planned_bytes: int = 0  # the spec's memory_bytes, which peak_rss_anon should stay under
    extra_files: tuple[WrittenFile, ...] = ()  # the method's other outputs of this shard (Twin: factor files)
    records: tuple[dict[str, Any], ...] = ()  # the method's per-tensor records (Twin: rank, error, bytes)
    input_sha256: tuple[tuple[str, int, str], ...] = ()  # (input file URL, data start, sha256) of each tensor read whole
    started_at: float = 0.0  # wall clock (Unix seconds) when the task began
    first_tensor_at: float = 0.0  # ... when its first tensor was written (0: it has none)
    finished_at: float = 0.0  # ... when it ended
    diagnostics: tuple[dict[str, Any], ...] = ()  # per merged tensor, its diagnostics (workers/diagnostics.py)

    def files(self) -> list[tuple[str, int]]:
        """(name relative to the output root, size) of every file the shard wrote."""
        return [(self.file_name, self.file_size)] + [(f.file_name, f.file_size) for f in self.extra_files]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardResult:
        return cls(**{**data, "tensors": _tensors(data["tensors"]),
                      "extra_files": tuple(WrittenFile(**{**f, "tensors": _tensors(f["tensors"])})
                                           for f in data.get("extra_files", ())),
                      "records": tuple(data.get("records", ())),
                      "diagnostics": tuple(data.get("diagnostics", ())),
                      "input_sha256": tuple(tuple(x) for x in data.get("input_sha256", ()))})


def _tensors(rows: list[dict]) -> tuple[WrittenTensor, ...]:
    return tuple(WrittenTensor(**{**t, "shape": tuple(t["shape"])}) for t in rows)


@dataclass(frozen=True)
class ScanResult:
    """What a pre-pass scan of one shard reports (small arrays or numbers, never tensors)."""

    index: int
    values: list  # the scan's statistics (e.g. per expert: a numpy histogram, or one int)
    bytes_read: int
    timings: dict[str, float]


class OutputFile(BaseModel):
    """One published file with its size and checksum."""

    model_config = ConfigDict(frozen=True)

    name: str  # relative to the output root
    size: int
    sha256: str
