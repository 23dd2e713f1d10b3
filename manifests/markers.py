"""Run state kept beside the output while a run is in progress: the plan, and one completion
marker per finished shard (its result, merge or twin: the shard's manifest fragment). A rerun with the same
config reads the markers once and runs only the shards without one."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from manifests.writer import atomic_put
from workers.shard_task import ShardResult
from workers.twin_task import FactorFileResult, FactorRecord, TwinShardResult
from workers.tensor_io import WrittenTensor, join_url, open_fs

STATE_DIR = "_mergefleet"
PLAN_JSON = "plan.json"
DONE_DIR = "done"


def write_state(output_url: str, name: str, data: dict, *, storage_options: dict | None = None) -> None:
    """A small JSON document of run state (the plan record, global-trim thresholds) under the state folder."""
    atomic_put(join_url(output_url, STATE_DIR, name), json.dumps(data, sort_keys=True).encode(),
               storage_options=storage_options)


def read_state(output_url: str, name: str, *, storage_options: dict | None = None) -> dict | None:
    """A run-state document written by ``write_state``, or None when there is none."""
    fs, path = open_fs(join_url(output_url, STATE_DIR, name), storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def marker_url(output_url: str, file_name: str) -> str:
    """One flat folder of markers, also for shards whose file lies in a subfolder (twin: shared/)."""
    return join_url(output_url, STATE_DIR, DONE_DIR, f"{file_name.replace('/', '--')}.json")


def write_marker(output_url: str, result: ShardResult, *, storage_options: dict | None = None) -> None:
    """Mark a shard done; call only after its files are completely written."""
    kind = "twin" if isinstance(result, TwinShardResult) else "merge"
    atomic_put(marker_url(output_url, result.file_name),
               json.dumps({"kind": kind, **dataclasses.asdict(result)}).encode(), storage_options=storage_options)


def _tensors(rows: list[dict]) -> tuple[WrittenTensor, ...]:
    return tuple(WrittenTensor(**{**t, "shape": tuple(t["shape"])}) for t in rows)


def _result_from_json(data: dict[str, Any]) -> ShardResult:
    fields = {**data, "tensors": _tensors(data["tensors"])}
    if fields.pop("kind", "merge") == "merge":
        return ShardResult(**fields)
    return TwinShardResult(**{
        **fields,
        "factor_files": tuple(FactorFileResult(**{**f, "tensors": _tensors(f["tensors"])}) for f in data["factor_files"]),
        "records": tuple(FactorRecord(**r) for r in data["records"])})


def read_markers(output_url: str, *, storage_options: dict | None = None) -> dict[str, ShardResult]:
    """Every completion marker at this output, by shard file name (one listing, then small reads)."""
    fs, path = open_fs(join_url(output_url, STATE_DIR, DONE_DIR), storage_options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return {}
    results = {}
    for name in names:
        if name.endswith(".json"):
            result = _result_from_json(json.loads(fs.cat_file(name)))
            results[result.file_name] = result
    return results


def clear_state(output_url: str, *, storage_options: dict | None = None) -> None:
    """Forget a previous run's plan and markers (for --overwrite)."""
    fs, path = open_fs(join_url(output_url, STATE_DIR), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
