"""Publish the manifest: the tensor table first, manifest.json last and atomically."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import MANIFEST_JSON, MANIFEST_PARQUET, MANIFEST_SHA256, TENSOR_TABLE, Manifest
from workers.storage import Location


def tensor_table_bytes(rows: list[dict]) -> bytes:
    """The manifest.parquet content for the given rows (sorted by name for determinism)."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["name"]), schema=TENSOR_TABLE)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_manifest(output: Location, manifest: Manifest, parquet: bytes) -> None:
    """Write manifest.parquet and manifest.sha256, then manifest.json (the commit point of the run).
    The parquet and manifest.json are conditional puts: a second run publishing to the same output
    fails instead of replacing what the first published (--overwrite removes the old ones first)."""
    if hashlib.sha256(parquet).hexdigest() != manifest.tensors_table_sha256:
        raise RuntimeError("manifest.parquet does not match the checksum recorded in manifest.json")
    data = manifest.model_dump_json(indent=2).encode()
    output.put(MANIFEST_PARQUET, parquet, exclusive=True)
    output.put(MANIFEST_SHA256, (hashlib.sha256(data).hexdigest() + "\n").encode())
    output.put(MANIFEST_JSON, data, exclusive=True)
