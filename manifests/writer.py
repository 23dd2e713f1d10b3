"""Publish the manifest: the tensor table first, manifest.json last and atomically."""

from __future__ import annotations

import hashlib
import io
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import MANIFEST_JSON, MANIFEST_PARQUET, TENSOR_TABLE, Manifest
from workers.tensor_io import is_local, join_url, open_fs


def tensor_table_bytes(rows: list[dict]) -> bytes:
    """The manifest.parquet content for the given rows (sorted by name for determinism)."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["name"]), schema=TENSOR_TABLE)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class AlreadyPublishedError(FileExistsError):
    """A conditional put found the object already there: another run published first."""


def atomic_put(url: str, data: bytes, *, storage_options: dict | None = None, exclusive: bool = False) -> None:
    """Write ``data`` so a reader sees either nothing or all of it.

    Local files go to a temporary name and are renamed (hard-linked when ``exclusive``); object
    stores publish an object only when its upload completes. With ``exclusive`` the write happens
    only if ``url`` does not exist yet (local: link(2); S3: a conditional put with If-None-Match: *,
    atomic where the server enforces it, as AWS S3 and SeaweedFS do; other fsspec stores: fsspec's
    check-then-write) and AlreadyPublishedError is raised otherwise.
    """
    fs, path = open_fs(url, storage_options)
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        if not exclusive:
            fs.mv(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails if path exists: never replaces a published object
        except FileExistsError:
            raise AlreadyPublishedError(_published_message(url)) from None
        finally:
            os.unlink(tmp)
    elif exclusive:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise AlreadyPublishedError(_published_message(url)) from None
        except OSError as exc:
            if _precondition_failed(exc):  # servers that answer 412 without naming the condition (SeaweedFS)
                raise AlreadyPublishedError(_published_message(url)) from None
            raise
    else:
        fs.pipe_file(path, data)


def _published_message(url: str) -> str:
    return (f"{url} already exists: another run published this output first; nothing was replaced. "
            "Check it with `mergefleet verify`, or rerun with --overwrite to replace it")


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is a failed If-None-Match (412 PreconditionFailed, or 409 for a racing put)."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
    return False


def write_manifest(output_url: str, manifest: Manifest, parquet: bytes, *, storage_options: dict | None = None) -> None:
    """Write manifest.parquet, then manifest.json (the commit point of the run), only if no manifest.json
    is there: a run replacing an output removes the old one first (--overwrite)."""
    if hashlib.sha256(parquet).hexdigest() != manifest.tensors_table_sha256:
        raise RuntimeError("manifest.parquet does not match the checksum recorded in manifest.json")
    atomic_put(join_url(output_url, MANIFEST_PARQUET), parquet, storage_options=storage_options)
    atomic_put(join_url(output_url, MANIFEST_JSON), manifest.model_dump_json(indent=2).encode(),
               storage_options=storage_options, exclusive=True)  # two runs never both publish
