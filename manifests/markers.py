"""Run state kept beside the output while a run is in progress: the plan, and one completion
marker per finished shard (its result, merge or twin: the shard's manifest fragment). A rerun with the same
config reads the markers once and runs only the shards without one."""

from __future__ import annotations

import json

from workers.results import ShardResult
from workers.storage import Location

STATE_DIR = "_mergefleet"
PLAN_JSON = "plan.json"
DONE_DIR = "done"


def write_state(output: Location, name: str, data: dict, *, exclusive: bool = False) -> None:
    """A small JSON document of run state (the plan record, a pre-pass's findings) under the state
    folder; ``exclusive``: only if it does not exist yet (AlreadyPublishedError otherwise)."""
    output.put(f"{STATE_DIR}/{name}", json.dumps(data, sort_keys=True).encode(), exclusive=exclusive)


def read_state(output: Location, name: str) -> dict | None:
    """A run-state document written by ``write_state``, or None when there is none."""
    fs, path = output.fs(STATE_DIR, name)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def marker_name(file_name: str) -> str:
    """One flat folder of markers, also for shards whose file lies in a subfolder (twin: shared/)."""
    return f"{STATE_DIR}/{DONE_DIR}/{file_name.replace('/', '--')}.json"


def write_marker(output: Location, result: ShardResult) -> None:
    """Mark a shard done; call only after its files are completely written."""
    output.put(marker_name(result.file_name), json.dumps(result.to_json()).encode())


def read_markers(output: Location) -> dict[str, ShardResult]:
    """Every completion marker at this output, by shard file name (one listing, then small reads)."""
    fs, path = output.fs(STATE_DIR, DONE_DIR)
    fs.invalidate_cache(path)  # markers written by other processes since this filesystem last listed
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return {}
    results = {}
    for name in names:
        if name.endswith(".json"):
            result = ShardResult.from_json(json.loads(fs.cat_file(name)))
            results[result.file_name] = result
    return results


def clear_state(output: Location) -> None:
    """Forget a previous run's plan and markers (for --overwrite, and once the manifest is committed)."""
    fs, path = output.fs(STATE_DIR)
    if fs.exists(path):
        fs.rm(path, recursive=True)
