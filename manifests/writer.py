"""Publish the manifest: the tensor table first, manifest.json last and atomically."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import MANIFEST_JSON, MANIFEST_PARQUET, MANIFEST_SHA256, Manifest
from workers.storage import Location

TENSOR_TABLE = pa.schema([
    ("name", pa.string()),
    ("file", pa.string()),
    ("dtype", pa.string()),
    ("shape", pa.list_(pa.int64())),
    ("offset", pa.int64()),  # absolute byte offset of the data in the file
    ("nbytes", pa.int64()),
    ("sha256", pa.string()),
    ("method", pa.string()),  # merge method, or "copy" for tensors taken from the reference unmerged
    # the merge's diagnostics (docs/diagnostics.md; null where a tensor has none): per expert t in
    # config order, with τ_t = θ_t − θ₀ and τ̂_t what the trim keeps of it
    ("elements", pa.int64()),  # elements of the tensor (the counts' total)
    ("kept", pa.list_(pa.int64())),  # per expert: non-zero τ̂_t
    ("sign_conflicts", pa.list_(pa.int64())),  # per expert: kept w_t·τ̂_t against the elected sign
    ("none_kept", pa.int64()),  # elements no expert contributes to (θ = θ₀ there)
    ("tau_norm", pa.list_(pa.float64())),  # per expert: ‖τ_t‖
    ("tau_dot", pa.list_(pa.float64())),  # ⟨τ_a, τ_b⟩ for a < b: (0, 1), (0, 2), …, (1, 2), …
    ("merged_norm", pa.float64()),  # ‖θ − θ₀‖ of the output as written (λ included)
    ("slerp_angle", pa.float64()),  # slerp: the angle between the tensor's two models, radians
])


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
