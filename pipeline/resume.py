"""Claim, resume or refuse an output: the plan record, the inputs' fingerprints and the files decide.

- **Claim.** A fresh run creates the plan record (``_mergefleet/plan.json``: config and plan hash,
  the inputs' fingerprints, a run id) with a conditional put: of two runs starting at one instant
  only one creates it; the other fails before writing anything, naming the winner. Every later
  write of the run (shard files, markers, index, side files, manifest) checks that the record
  still carries its run id (``check_claim``), so a run whose output was taken over stops.
- **Resume.** A record of the same config and inputs: the marked shards are kept, the rest run,
  and the record is taken over with the new run id. Changed inputs (a fingerprint differs:
  mtime / inode, ETag / version, Hub commit) are refused, naming the file.
- **Complete.** A committed manifest of the same config and inputs: nothing to do. Of other
  inputs or another config: refused.
- **Foreign files.** A fresh run needs an empty output. ``overwrite`` removes the old run's files
  (those its manifest or plan record lists, and the run state), the files this run will write,
  and nothing else; weight files it did not write are still refused.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from manifests import markers
from manifests.reader import ManifestError, read_manifest
from manifests.schema import MANIFEST_JSON, MANIFEST_PARQUET, MANIFEST_SHA256, Manifest
from pipeline.planner import ShardPlan
from workers.attachments import ROUTER_DIR, ROUTER_RECORD, read_record
from workers.results import ShardResult
from workers.storage import AlreadyPublishedError, Location, storage_errors
from workers.tensor_io import is_weight_file

LOG = logging.getLogger(__name__)


class OutputInUseError(RuntimeError):
    """The output holds another run or files mergefleet did not write; the message says how to proceed."""


class OutputNotFoundError(FileNotFoundError):
    """There is nothing at the output URL."""


@dataclass
class OutputState:
    """What an output already holds for this plan, and the run id this run writes under."""

    run_id: str = ""
    complete: Manifest | None = None  # the committed manifest of this very config and inputs
    done: dict[str, ShardResult] = field(default_factory=dict)  # shard file name -> result, from markers


def plan_record(plan: ShardPlan, run_id: str) -> dict:
    return {"config_hash": plan.config_hash, "plan_hash": plan.plan_hash, "run_id": run_id,
            "shards": [s.file_name for s in plan.shards], "inputs": input_fingerprints(plan.inputs)}


def input_fingerprints(inputs) -> dict[str, dict]:
    """{file url: fingerprint} of every input file (summaries or manifest records)."""
    return {f["url"]: f.get("fingerprint") for i in inputs for f in (i.files if hasattr(i, "files") else i["files"])}


def changed_inputs(before: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """The input files whose fingerprint differs (or that appeared or went)."""
    return sorted(u for u in set(before) | set(now) if before.get(u) != now.get(u))


def prepare_output(plan: ShardPlan, *, overwrite: bool) -> OutputState:
    """Decide whether this run starts fresh, resumes or is already complete; refuse a foreign output."""
    output = plan.output
    existing = _manifest(output)
    record = markers.read_state(output, markers.PLAN_JSON)
    if overwrite:
        remove_previous_run(plan, existing, record)
        existing = record = None
    if existing is not None:
        return OutputState(complete=_same_run(plan, existing))
    if record is not None:
        return _resume(plan, record)
    return _claim(plan, overwrite=overwrite)


def _manifest(output: Location) -> Manifest | None:
    try:
        return read_manifest(output.url, storage_options=output.storage_options)
    except ManifestError:
        return None


def _same_run(plan: ShardPlan, existing: Manifest) -> Manifest:
    """The committed manifest when it is this config over these very inputs; else refuse."""
    url = plan.output_url
    if existing.config_hash != plan.config_hash:
        raise OutputInUseError(f"{url} already holds run {existing.run_id} of a different config "
                               f"({existing.config_hash[:12]}); choose another output or pass --overwrite to replace it")
    changed = changed_inputs(input_fingerprints(existing.inputs), input_fingerprints(plan.inputs))
    if changed:
        raise OutputInUseError(f"{url} holds run {existing.run_id} of this config, but input file(s) {changed} changed "
                               "since it was made; pass --overwrite to merge them again")
    return existing


def _resume(plan: ShardPlan, record: dict) -> OutputState:
    url = plan.output_url
    if record["config_hash"] != plan.config_hash:
        raise OutputInUseError(f"{url} holds an unfinished run ({record.get('run_id', '?')}) of a different config "
                               f"({record['config_hash'][:12]}); rerun that config to finish it, or pass --overwrite "
                               "to start over")
    changed = changed_inputs(record.get("inputs", {}), input_fingerprints(plan.inputs))
    if changed or record["plan_hash"] != plan.plan_hash:
        what = f"input file(s) {changed} changed" if changed else "the inputs or the plan changed"
        raise OutputInUseError(f"{url} holds an unfinished run of this config, but {what} since it started; "
                               "pass --overwrite to start over")
    run_id = uuid.uuid4().hex
    markers.write_state(plan.output, markers.PLAN_JSON, plan_record(plan, run_id))  # take the claim over
    fs, _ = plan.output.fs()
    for name in (MANIFEST_PARQUET, MANIFEST_SHA256):  # left by a publish that never committed
        if fs.exists(plan.output.fs(name)[1]):
            fs.rm(plan.output.fs(name)[1])
    done = _valid_markers(plan)
    LOG.info("resuming %s (run %s takes over from %s): %d of %d shards already done", url, run_id,
             record.get("run_id"), len(done), len(plan.shards))
    return OutputState(run_id=run_id, done=done)


def _claim(plan: ShardPlan, *, overwrite: bool) -> OutputState:
    """A fresh run: the output must hold nothing; create the plan record, exclusively."""
    foreign = [f for f in list_files(plan.output) if not f.startswith(markers.STATE_DIR + "/")]
    if foreign and overwrite:
        raise OutputInUseError(f"{plan.output_url} still holds files no mergefleet run there wrote ({_some(foreign)}) "
                               "after --overwrite removed the older run's; remove them or choose an empty output")
    if foreign:
        raise OutputInUseError(f"{plan.output_url} holds files mergefleet did not write ({_some(foreign)}); choose an "
                               "empty output, or pass --overwrite (it removes an older run's files and those this "
                               "run writes, nothing else)")
    run_id = uuid.uuid4().hex
    try:
        markers.write_state(plan.output, markers.PLAN_JSON, plan_record(plan, run_id), exclusive=True)
    except AlreadyPublishedError:
        other = markers.read_state(plan.output, markers.PLAN_JSON) or {}
        raise OutputInUseError(f"{plan.output_url}: run {other.get('run_id', '?')} (config "
                               f"{str(other.get('config_hash', '?'))[:12]}) claimed this output at the same time; "
                               "nothing was written. Wait for it, or choose another output") from None
    return OutputState(run_id=run_id)


def remove_previous_run(plan: ShardPlan, existing: Manifest | None, record: dict | None) -> None:
    """--overwrite: remove what an older run wrote (the files its manifest, plan record or markers
    list, its manifest and run state, the router trained for it) and the files this run will write;
    refuse when weight files
    nobody listed would still be served beside the new run's."""
    output = plan.output
    listed = {f.name for f in existing.files} if existing is not None else set()
    listed |= set(record.get("shards", [])) if record is not None else set()
    listed |= {name for result in markers.read_markers(output).values() for name, _ in result.files()}
    listed |= {MANIFEST_JSON, MANIFEST_PARQUET, MANIFEST_SHA256, *(s.file_name for s in plan.shards)}
    attached = read_record(output)
    if existing is not None and attached is not None and attached.get("run_id") == existing.run_id:
        listed |= {ROUTER_RECORD, *(f"{ROUTER_DIR}/{name}" for name in attached.get("files", {}))}  # its router
    present = list_files(output)
    foreign = [f for f in present if f not in listed and not f.startswith(markers.STATE_DIR + "/")
               and is_weight_file(f)]
    if foreign:
        raise OutputInUseError(f"{plan.output_url} holds weight files no mergefleet run there wrote ({_some(foreign)}); "
                               "they would be served beside this run's. Remove them or choose another output")
    fs, _ = output.fs()
    for name in (MANIFEST_JSON, *sorted(listed & set(present) - {MANIFEST_JSON})):  # un-publish first
        if name in present:
            fs.rm(output.fs(name)[1])
    markers.clear_state(output)


def check_claim(output: Location, run_id: str) -> None:
    """Fail unless this output's plan record still carries ``run_id`` (another run took it over)."""
    record = markers.read_state(output, markers.PLAN_JSON)
    if record is None or record.get("run_id") != run_id:
        other = (record or {}).get("run_id", "none")
        raise OutputInUseError(f"{output.url}: this run ({run_id}) no longer holds the output (its claim is now "
                               f"{other}); stopped before writing more")


def list_files(output: Location) -> list[str]:
    """Every file below the output, relative to it (empty when the output does not exist)."""
    fs, root = output.fs()
    fs.invalidate_cache()  # another process may have written since this filesystem last listed
    if not fs.exists(root):
        return []
    root = root.rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root) if p != root)


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _valid_markers(plan: ShardPlan) -> dict[str, ShardResult]:
    """Markers of this plan's shards whose files are all still there with the recorded sizes."""
    names = {s.file_name for s in plan.shards}

    def intact(name: str, size: int) -> bool:
        fs, path = plan.output.fs(name)
        return fs.exists(path) and fs.size(path) == size

    return {name: result for name, result in markers.read_markers(plan.output).items()
            if name in names and all(intact(*file) for file in result.files())}


def output_status(url: str, *, storage_options: dict | None = None) -> dict:
    """Complete, partial (done / missing shards) or empty, of the output at ``url`` (`mergefleet status`)."""
    output = Location(url, storage_options or {})
    fs, root = output.fs()
    with storage_errors(url, "the output"):
        exists = fs.exists(root)
    if not exists:
        raise OutputNotFoundError(f"{url}: no such output (nothing is there); check the URL")
    with storage_errors(url, "the output"):
        return _status(output)


def _status(output: Location) -> dict:
    manifest = _manifest(output)
    if manifest is not None:
        return {"state": "complete", "run_id": manifest.run_id, "config_hash": manifest.config_hash}
    record = markers.read_state(output, markers.PLAN_JSON)
    if record is None:
        return {"state": "empty"}
    done = set(markers.read_markers(output))
    return {"state": "partial", "run_id": record.get("run_id"), "config_hash": record["config_hash"],
            "done": [s for s in record["shards"] if s in done], "missing": [s for s in record["shards"] if s not in done]}

