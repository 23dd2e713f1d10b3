"""Publish the manifest: the tensor table first, manifest.json last and atomically."""

from __future__ import annotations

import hashlib
import io
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import MANIFEST_JSON, MANIFEST_PARQUET, TENSOR_TABLE, Manifest
from workers.tensor_io import join_url, open_fs


def tensor_table_bytes(rows: list[dict]) -> bytes:
    """The manifest.parquet content for the given rows (sorted by name for determinism)."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["name"]), schema=TENSOR_TABLE)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def atomic_put(url: str, data: bytes, *, storage_options: dict | None = None) -> None:
    """Write ``data`` so a reader sees either nothing or all of it.

    Local files go to a temporary name and are renamed; object stores publish an object only when
    its upload completes.
    """
    fs, path = open_fs(url, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_manifest(output_url: str, manifest: Manifest, parquet: bytes, *, storage_options: dict | None = None) -> None:
    """Write manifest.parquet, then manifest.json (the commit point of the run)."""
    if hashlib.sha256(parquet).hexdigest() != manifest.tensors_table_sha256:
        raise RuntimeError("manifest.parquet does not match the checksum recorded in manifest.json")
    atomic_put(join_url(output_url, MANIFEST_PARQUET), parquet, storage_options=storage_options)
    atomic_put(join_url(output_url, MANIFEST_JSON), manifest.model_dump_json(indent=2).encode(),
               storage_options=storage_options)
