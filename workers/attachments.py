"""Files an output gains after its manifest: the Twin router (``router/``), trained later on a
committed twin run. They are bound to that run by their record, ``router/metrics.json``, written
last: the run id they were trained for and each file's sha256. A router whose record names
another run (an older run at this output, overwritten since) or whose bytes changed is stale:
loading refuses it, ``verify`` reports it, ``--overwrite`` removes it with the run it belongs to.
"""

from __future__ import annotations

import hashlib
import json

from workers.storage import Location

ROUTER_DIR = "router"
ROUTER_RECORD = f"{ROUTER_DIR}/metrics.json"


def is_attachment(name: str) -> bool:
    """Whether an output-relative file name lies where attachments go."""
    return name.startswith(ROUTER_DIR + "/")


def attachment_record(files: dict[str, bytes], run_id: str) -> dict:
    """The record's binding for these attachment files (names relative to ``router/``)."""
    return {"run_id": run_id, "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}}


def read_record(output: Location) -> dict | None:
    """The router's record, or None when the output has none."""
    fs, path = output.fs(ROUTER_RECORD)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def attachment_problems(output: Location, names: list[str], run_id: str,
                        contents: dict[str, bytes] | None = None) -> list[str]:
    """What is wrong with the attachment files ``names`` (output-relative) of the run ``run_id``:
    no record, a record of another run, a file it does not list or whose sha256 differs.
    ``contents``: the bytes of those files already read (the others are read here)."""
    contents = contents or {}
    names = [n for n in names if is_attachment(n) and n != ROUTER_RECORD]
    if not names:
        return []
    record = read_record(output)
    fix = "run `mergefleet twin train-router` again, or remove router/"
    if record is None:
        return [f"{ROUTER_DIR}/: {', '.join(names)} without {ROUTER_RECORD} (an interrupted or foreign router); {fix}"]
    if record.get("run_id") != run_id:
        return [f"{ROUTER_DIR}/: trained for run {record.get('run_id')}, but the output holds run {run_id} (stale); {fix}"]
    listed = record.get("files", {})
    problems = []
    for name in names:
        relative = name.removeprefix(ROUTER_DIR + "/")
        if relative not in listed:
            problems.append(f"{name}: not in {ROUTER_RECORD} (foreign); remove it")
            continue
        if name in contents:
            data = contents[name]
        else:
            fs, path = output.fs(name)
            data = fs.cat_file(path)
        if hashlib.sha256(data).hexdigest() != listed[relative]:
            problems.append(f"{name}: its sha256 differs from {ROUTER_RECORD}'s (changed since training); {fix}")
    return problems
