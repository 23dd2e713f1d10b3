"""Re-read a published output and check it against its manifest: every file's size and sha256,
every tensor's header entry and sha256, the tensor table's checksum and the HF index."""

from __future__ import annotations

import hashlib
import json

from manifests.markers import STATE_DIR
from manifests.reader import ManifestError, read_manifest, read_tensor_table
from manifests.schema import MANIFEST_JSON, MANIFEST_SHA256, config_digest
from workers.attachments import attachment_problems, is_attachment
from workers.storage import CheckpointError, Location, join_url, open_fs, storage_errors
from workers.tensor_io import is_weight_file, read_header

BLOCK = 8 * 1024 * 1024
INDEX_SUFFIX = ".safetensors.index.json"  # model.safetensors.index.json and the like, in any folder


def _hash_file(url: str, spans: list[tuple[str, int, int]], storage_options) -> tuple[str, int, dict[str, str]]:
    """Stream a file once: its sha256, its size, and the sha256 of each (name, start, end) span."""
    fs, path = open_fs(url, storage_options)
    whole = hashlib.sha256()
    hashers = {name: hashlib.sha256() for name, _, _ in spans}
    pos = 0
    with fs.open(path, "rb") as f:
        while block := f.read(BLOCK):
            whole.update(block)
            end = pos + len(block)
            for name, lo, hi in spans:
                if lo < end and hi > pos:
                    hashers[name].update(block[max(lo, pos) - pos:min(hi, end) - pos])
            pos = end
    return whole.hexdigest(), pos, {n: h.hexdigest() for n, h in hashers.items()}


def verify_output(output_url: str, *, storage_options: dict | None = None) -> list[str]:
    """Every problem found in a published output (empty when it is intact). Raises when it cannot
    look at all: nothing at ``output_url`` (FileNotFoundError), storage failures (CheckpointError
    naming the URL)."""
    with storage_errors(output_url, "the output"):
        fs, root = open_fs(output_url, storage_options)
        fs.invalidate_cache()  # listings cached by this process may predate the files verified now
        exists = fs.exists(root)
    if not exists:
        raise FileNotFoundError(f"{output_url}: no such output (nothing is there); check the URL")
    with storage_errors(output_url, "the output"):
        return _problems(output_url, storage_options)


def _problems(output_url: str, storage_options: dict | None) -> list[str]:
    try:
        manifest = read_manifest(output_url, storage_options=storage_options)
        table, raw_table = read_tensor_table(output_url, manifest, storage_options=storage_options)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    problems = _manifest_problems(output_url, manifest, storage_options) + _unlisted_files(output_url, manifest,
                                                                                          storage_options)
    if hashlib.sha256(raw_table).hexdigest() != manifest.tensors_table_sha256:
        problems.append(f"{manifest.tensors_table}: sha256 differs from manifest.json")
    rows_by_file: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows_by_file.setdefault(row["file"], []).append(row)
    if len(table) != manifest.n_tensors:
        problems.append(f"tensor table has {len(table)} rows, manifest.json says {manifest.n_tensors}")

    for entry in manifest.files:
        url = join_url(output_url, entry.name)
        rows = rows_by_file.pop(entry.name, [])
        if rows:
            try:
                header = read_header(url, storage_options=storage_options)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            for row in rows:
                info = header.tensors.get(row["name"])
                if info is None:
                    problems.append(f"{entry.name}: tensor {row['name']!r} listed in the manifest is not in the file")
                elif (info.dtype, list(info.shape), info.start, info.nbytes) != (row["dtype"], row["shape"], row["offset"], row["nbytes"]):
                    problems.append(f"{entry.name}: tensor {row['name']!r} header differs from the manifest")
        try:
            sha, size, tensor_shas = _hash_file(url, [(r["name"], r["offset"], r["offset"] + r["nbytes"]) for r in rows],
                                                storage_options)
        except FileNotFoundError:
            problems.append(f"{entry.name}: listed in the manifest but missing")
            continue
        if size != entry.size:
            problems.append(f"{entry.name}: {size} bytes, manifest says {entry.size}")
        if sha != entry.sha256:
            problems.append(f"{entry.name}: sha256 differs from the manifest (file corrupted or replaced)")
        for row in rows:
            if tensor_shas[row["name"]] != row["sha256"]:
                problems.append(f"{entry.name}: tensor {row['name']!r} sha256 differs from the manifest")
    for name in rows_by_file:
        problems.append(f"{name}: holds tensors in the table but is not listed in manifest.json files")

    # every HF-style index (model.safetensors.index.json, or e.g. a twin run's shared/ and
    # experts/<name>/factors.safetensors.index.json) maps exactly the tensors of its own folder
    index_names = [f.name for f in manifest.files if f.name.endswith(INDEX_SUFFIX)]
    for index_name in index_names:
        fs, path = open_fs(join_url(output_url, index_name), storage_options)
        weight_map = json.loads(fs.cat_file(path)).get("weight_map", {})
        folder = index_name.rpartition("/")[0]
        expected = {r["name"]: r["file"].rpartition("/")[2] for r in table.to_pylist()
                    if r["file"].rpartition("/")[0] == folder}
        if weight_map != expected:
            problems.append(f"{index_name}: weight_map does not match the tensor table")
    return problems


def _manifest_problems(output_url: str, manifest, storage_options) -> list[str]:
    """manifest.json itself: its bytes against manifest.sha256, its config against config_hash."""
    problems = []
    fs, path = open_fs(join_url(output_url, MANIFEST_JSON), storage_options)
    raw = fs.cat_file(path)
    fs, path = open_fs(join_url(output_url, MANIFEST_SHA256), storage_options)
    try:
        recorded = fs.cat_file(path).decode().strip()
    except FileNotFoundError:
        problems.append(f"{MANIFEST_SHA256}: missing, so edits to {MANIFEST_JSON} cannot be ruled out")
    else:
        if recorded != hashlib.sha256(raw).hexdigest():
            problems.append(f"{MANIFEST_JSON}: sha256 differs from {MANIFEST_SHA256} (the manifest was edited)")
    if config_digest(manifest.config) != manifest.config_hash:
        problems.append(f"{MANIFEST_JSON}: its config does not hash to its config_hash (the config was edited)")
    return problems


def _unlisted_files(output_url: str, manifest, storage_options) -> list[str]:
    """Weight files and indexes under the output that the manifest does not list (a loader would
    serve them), and attachments (the Twin router) not bound to the manifest's run."""
    fs, root = open_fs(output_url, storage_options)
    root = root.rstrip("/")
    listed = {f.name for f in manifest.files}
    names = (p[len(root) + 1:] for p in fs.find(root))
    unlisted = [name for name in sorted(names) if not name.startswith(STATE_DIR + "/") and name not in listed]
    attached = [name for name in unlisted if is_attachment(name)]
    return attachment_problems(Location(output_url, storage_options or {}), attached, manifest.run_id) + [
        f"{name}: a weight file the manifest does not list (foreign or stale); remove it"
        for name in unlisted if name not in attached and is_weight_file(name)]
