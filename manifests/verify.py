"""Re-read a published output and check it against its manifest: every file's size and sha256,
every tensor's header entry and sha256, the tensor table's checksum and the HF index."""

from __future__ import annotations

import hashlib
import json

from manifests.reader import ManifestError, read_manifest, read_tensor_table
from workers.storage import CheckpointError, join_url, open_fs
from workers.tensor_io import read_header

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
    """Every problem found in a published output (empty when it is intact)."""
    try:
        manifest = read_manifest(output_url, storage_options=storage_options)
        table, raw_table = read_tensor_table(output_url, manifest, storage_options=storage_options)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    problems: list[str] = []
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
