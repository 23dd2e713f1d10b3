"""Start, resume or refuse a run at an output: the plan record and completion markers decide.

A committed manifest with the same config means the run is complete; a plan record with the same
config and plan means a partial run whose marked shards are kept; anything else is refused unless
``overwrite``, which un-publishes the old manifest first so no reader sees it over new shards."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from manifests import markers
from manifests.reader import ManifestError, read_manifest
from manifests.schema import MANIFEST_JSON, Manifest
from pipeline.planner import ShardPlan
from workers.results import ShardResult
from workers.storage import Location

LOG = logging.getLogger(__name__)


class OutputInUseError(RuntimeError):
    """The output holds another run; the message says how to proceed."""


@dataclass
class OutputState:
    """What an output already holds for this plan."""

    complete: Manifest | None = None  # the committed manifest of this very config
    done: dict[str, ShardResult] = field(default_factory=dict)  # shard file name -> result (merge or twin), from markers


def plan_record(plan: ShardPlan) -> dict:
    return {"config_hash": plan.config_hash, "plan_hash": plan.plan_hash,
            "shards": [s.file_name for s in plan.shards]}


def prepare_output(plan: ShardPlan, *, overwrite: bool) -> OutputState:
    """Decide whether this run starts fresh, resumes or is already complete; refuse a foreign output."""
    url, output = plan.output_url, plan.output
    try:
        existing = read_manifest(url, storage_options=output.storage_options)
    except ManifestError:
        existing = None
    record = markers.read_state(output, markers.PLAN_JSON)
    if overwrite:
        if existing is not None:
            fs, path = output.fs(MANIFEST_JSON)
            fs.rm(path)
        markers.clear_state(output)
        existing = record = None
    if existing is not None:
        if existing.config_hash == plan.config_hash:
            return OutputState(complete=existing)
        raise OutputInUseError(f"{url} already holds run {existing.run_id} of a different config "
                               f"({existing.config_hash[:12]}); choose another output or pass --overwrite to replace it")
    if record is not None:
        if record["config_hash"] != plan.config_hash:
            raise OutputInUseError(f"{url} holds an unfinished run of a different config ({record['config_hash'][:12]}); "
                                   "rerun that config to finish it, or pass --overwrite to start over")
        if record["plan_hash"] != plan.plan_hash:
            raise OutputInUseError(f"{url} holds an unfinished run of this config over different inputs "
                                   "(a checkpoint changed since); pass --overwrite to start over")
        done = _valid_markers(plan)
        LOG.info("resuming %s: %d of %d shards already done", url, len(done), len(plan.shards))
        return OutputState(done=done)
    markers.write_state(output, markers.PLAN_JSON, plan_record(plan))
    return OutputState()


def _valid_markers(plan: ShardPlan) -> dict[str, ShardResult]:
    """Markers of this plan's shards whose files are all still there with the recorded sizes."""
    names = {s.file_name for s in plan.shards}

    def intact(name: str, size: int) -> bool:
        fs, path = plan.output.fs(name)
        return fs.exists(path) and fs.size(path) == size

    return {name: result for name, result in markers.read_markers(plan.output).items()
            if name in names and all(intact(*file) for file in result.files())}


def output_status(url: str, *, storage_options: dict | None = None) -> dict:
    """Done / missing shards of the run at ``url`` (for `mergefleet status`)."""
    try:
        manifest = read_manifest(url, storage_options=storage_options)
        return {"state": "complete", "run_id": manifest.run_id, "config_hash": manifest.config_hash}
    except ManifestError:
        pass
    output = Location(url, storage_options or {})
    record = markers.read_state(output, markers.PLAN_JSON)
    if record is None:
        return {"state": "empty"}
    done = set(markers.read_markers(output))
    return {"state": "partial", "config_hash": record["config_hash"],
            "done": [s for s in record["shards"] if s in done], "missing": [s for s in record["shards"] if s not in done]}
