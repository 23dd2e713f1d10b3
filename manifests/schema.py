"""What a run publishes about itself: manifest.json (the run) and manifest.parquet (one row per tensor)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from workers.results import OutputFile
from workers.tensor_io import INDEX_NAME

FORMAT = "mergefleet-manifest/1"
MANIFEST_JSON = "manifest.json"
MANIFEST_PARQUET = "manifest.parquet"
MANIFEST_SHA256 = "manifest.sha256"  # sha256 of manifest.json's bytes, written just before it
INDEX_JSON = INDEX_NAME  # the HF weight index of a sharded model


def config_digest(record: dict[str, Any]) -> str:
    """The config hash: sha256 of a config record's canonical JSON, its output location left out."""
    data = {k: v for k, v in record.items() if k != "output"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class Manifest(BaseModel):
    """manifest.json: the run, its config, inputs, resolved method, outputs and timings."""

    model_config = ConfigDict(frozen=True)

    format: str = FORMAT
    run_id: str
    mergefleet_version: str
    created: str  # ISO 8601 UTC
    config: dict[str, Any]  # the validated config as given (credentials never stored)
    config_hash: str
    plan_hash: str
    method: dict[str, Any]  # every resolved parameter
    inputs: list[dict[str, Any]]  # role, url, files (size, header sha256), bytes
    files: list[OutputFile]  # safetensors shards, index and copied side files
    tensors_table: str = MANIFEST_PARQUET
    tensors_table_sha256: str
    n_tensors: int
    output_bytes: int
    bytes_read: int
    timings: dict[str, Any]  # seconds: plan, run, per-stage sums, per-shard totals
    extra: dict[str, Any] = {}  # method-specific records (e.g. global TIES thresholds)
