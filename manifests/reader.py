"""Read a published run's manifest back."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from manifests.schema import MANIFEST_JSON, Manifest
from workers.storage import join_url, open_fs

if TYPE_CHECKING:
    import pyarrow as pa


class ManifestError(ValueError):
    """The output has no readable manifest."""


def read_manifest(output_url: str, *, storage_options: dict | None = None) -> Manifest:
    """manifest.json of a run; fails if the run never committed."""
    fs, path = open_fs(join_url(output_url, MANIFEST_JSON), storage_options)
    try:
        return Manifest.model_validate_json(fs.cat_file(path))
    except FileNotFoundError:
        raise ManifestError(f"{output_url}: no {MANIFEST_JSON}; the run did not finish (or this is not a mergefleet output)") from None


def read_tensor_table(output_url: str, manifest: Manifest, *, storage_options: dict | None = None) -> tuple[pa.Table, bytes]:
    """The tensor table (one row per output tensor) and its raw bytes."""
    import pyarrow.parquet as pq  # here, not at the top: a shard task reads manifests without it

    fs, path = open_fs(join_url(output_url, manifest.tensors_table), storage_options)
    raw = fs.cat_file(path)
    return pq.read_table(io.BytesIO(raw)), raw
