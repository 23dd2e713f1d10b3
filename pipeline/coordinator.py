"""Run a plan on Ray and publish the output: shards, HF index, side files, manifest last."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
import uuid
from importlib import metadata

import ray
from tqdm import tqdm

from manifests import markers
from manifests.schema import INDEX_JSON, Manifest, OutputFile
from manifests.writer import atomic_put, tensor_table_bytes, write_manifest
from pipeline.config import MergeConfig
from pipeline.global_trim import compute_global_trim, with_global_rules
from pipeline.planner import SIDE_FILES, ShardPlan, build_plan
from pipeline.resume import prepare_output
from workers.ray_tasks import submit
from workers.selection import TrimRule
from workers.shard_task import ShardResult, ShardSpec
from workers.tensor_io import DTYPES, join_url, open_fs

LOG = logging.getLogger(__name__)
STAGES = ("read", "convert", "kernel", "write")
GLOBAL_TRIM_STATE = "global_trim.json"  # a resumed global-scope run reuses the thresholds it found


class RunError(RuntimeError):
    """A run failed; nothing was published."""


def mergefleet_version() -> str:
    try:
        return metadata.version("mergefleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def connect_ray(address: str | None = None) -> None:
    """Join a cluster at ``address``, or start an embedded local Ray (reused if already up)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, logging_level=logging.WARNING)


def run_shards(shards: tuple[ShardSpec, ...], kind: str = "merge", args: tuple = (), *, progress: bool = True) -> list:
    """Run one task of ``kind`` per shard with backpressure (ray.wait) and a progress bar; fail fast
    on the first error. Each task asks Ray for its planned ``memory_bytes``. Returns the results in
    shard order."""
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0
    max_in_flight = max(2, 2 * int(resources.get("GPU" if use_gpu else "CPU", 1)))
    pending = list(shards)
    in_flight: dict[ray.ObjectRef, ShardSpec] = {}
    results: list = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(shards), unit="shard", disable=not progress, desc=kind)
    try:
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                spec = pending.pop(0)
                ref = submit(kind, spec, *args, use_gpu=use_gpu, memory_bytes=spec.memory_bytes)
                in_flight[ref] = spec
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                spec = in_flight.pop(ref)
                try:
                    results.append(ray.get(ref))
                except Exception as exc:
                    raise RunError(f"shard {spec.index} ({spec.file_name}) failed: {_root_cause(exc)}") from exc
                read = sum(r.bytes_read for r in results)
                bar.update(1)
                bar.set_postfix_str(f"{read / 1e9 / max(1e-9, time.perf_counter() - t0):.2f} GB/s read")
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return sorted(results, key=lambda r: r.index)


def run_missing_shards(shards: tuple[ShardSpec, ...], done: dict[str, ShardResult], kind: str = "merge",
                       args: tuple = (), *, progress: bool) -> list:
    """``run_shards`` for the shards without a result in ``done`` (a resumed run's markers); returns
    every shard's result, in shard order."""
    missing = tuple(s for s in shards if s.file_name not in done)
    return sorted([*run_shards(missing, kind, args, progress=progress), *done.values()], key=lambda r: r.index)


def _root_cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)


def copy_side_files(plan: ShardPlan, output_dtype: str | None, storage_options: dict, *,
                    directory: str = "") -> list[OutputFile]:
    """Copy config.json and tokenizer files from the reference model into ``directory`` of the
    output (its root by default); returns what was written, named relative to the output root."""
    written = []
    src_fs, src_root = open_fs(plan.side_files_from, storage_options)
    if src_root.endswith(".safetensors"):
        src_root = src_root.rsplit("/", 1)[0]
    for name in SIDE_FILES:
        path = join_url(src_root, name)
        if not src_fs.exists(path):
            continue
        data = src_fs.cat_file(path)
        if name == "config.json" and output_dtype:
            cfg = json.loads(data)
            cfg["torch_dtype"] = str(DTYPES[output_dtype]).removeprefix("torch.")
            data = json.dumps(cfg, indent=2).encode()
        relative = f"{directory}/{name}" if directory else name
        atomic_put(join_url(plan.output_url, relative), data, storage_options=storage_options)
        written.append(OutputFile(name=relative, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return written


def shard_rows(plan: ShardPlan, results: list[ShardResult]) -> tuple[list[dict], list[OutputFile]]:
    """Tensor-table rows and output files of the merged shards (file names relative to the output root)."""
    rows, files = [], []
    for result in results:
        files.append(OutputFile(name=result.file_name, size=result.file_size, sha256=result.file_sha256))
        actions = {x.name: x.action for x in plan.shards[result.index].tensors}
        for t in result.tensors:
            rows.append({"name": t.name, "file": result.file_name, "dtype": t.dtype, "shape": list(t.shape),
                         "offset": t.offset, "nbytes": t.nbytes, "sha256": t.sha256,
                         "method": plan.method.method if actions[t.name] == "merge" else "copy"})
    return rows, files


def write_index(output_url: str, rows: list[dict], *, storage_options: dict, directory: str = "",
                index_name: str = INDEX_JSON) -> OutputFile:
    """Write the HF index of the rows whose file lies in ``directory`` (file names relative to it)."""
    prefix = f"{directory}/" if directory else ""
    mine = sorted((r for r in rows if r["file"].startswith(prefix) and "/" not in r["file"][len(prefix):]),
                  key=lambda r: r["name"])
    index = {"metadata": {"total_size": sum(r["nbytes"] for r in mine)},
             "weight_map": {r["name"]: r["file"][len(prefix):] for r in mine}}
    data = json.dumps(index, indent=2).encode()
    atomic_put(join_url(output_url, prefix + index_name), data, storage_options=storage_options)
    return OutputFile(name=prefix + index_name, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def commit_manifest(plan: ShardPlan, config: MergeConfig, rows: list[dict], files: list[OutputFile], results: list,
                    timings: dict, *, storage_options: dict, extra: dict | None = None,
                    method: dict | None = None) -> Manifest:
    """Write manifest.parquet (the rows) and manifest.json, last: the commit point of the run.
    ``results`` are the shard results (anything with index, bytes_read, timings and device)."""
    parquet = tensor_table_bytes(rows)
    stage_sums = {s: round(sum(r.timings.get(s, 0.0) for r in results), 4)
                  for s in dict.fromkeys([*STAGES, *(k for r in results for k in r.timings if k != "total")])}
    manifest = Manifest(
        run_id=uuid.uuid4().hex,
        mergefleet_version=mergefleet_version(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=config.model_dump(mode="json", by_alias=True, exclude_none=True),
        config_hash=plan.config_hash,
        plan_hash=plan.plan_hash,
        method=method if method is not None else plan.method.model_dump(),
        inputs=[{"role": i.role, "url": i.url, "revision": i.revision, "files": list(i.files), "bytes": i.nbytes}
                for i in plan.inputs],
        files=files,
        tensors_table_sha256=hashlib.sha256(parquet).hexdigest(),
        n_tensors=len(rows),
        output_bytes=sum(r["nbytes"] for r in rows),
        bytes_read=sum(r.bytes_read for r in results),
        timings={**timings, "stages": stage_sums,
                 "shards": [{"index": r.index, "seconds": round(r.timings.get("total", 0.0), 4), "device": r.device,
                             "planned_bytes": r.planned_bytes, "peak_rss_anon": r.peak_rss_anon,
                             "start_rss_anon": r.start_rss_anon} for r in results]},
        extra={"ignored_tensors": list(plan.ignored_tensors), **(extra or {})},
    )
    write_manifest(plan.output_url, manifest, parquet, storage_options=storage_options)
    return manifest


def publish(plan: ShardPlan, results: list[ShardResult], config: MergeConfig, timings: dict, *,
            storage_options: dict, extra: dict | None = None) -> Manifest:
    """Write the HF index and side files, then the manifest (last, atomically)."""
    rows, files = shard_rows(plan, results)
    files.append(write_index(plan.output_url, rows, storage_options=storage_options))
    files += copy_side_files(plan, config.output_dtype, storage_options)
    return commit_manifest(plan, config, rows, files, results, timings, storage_options=storage_options, extra=extra)


def global_trim_shards(plan: ShardPlan, *, progress: bool, storage_options: dict | None = None
                       ) -> tuple[tuple[ShardSpec, ...], dict, dict]:
    """The plan's shards ready to merge: with model-wide trim rules for a global-scope TIES (three
    or four scan passes first, or the rules a resumed run already found), as they are otherwise.
    Returns (shards, manifest extra, timings)."""
    if not (plan.method.method == "ties" and plan.method.trim_scope == "global"):
        return plan.shards, {}, {}
    t0 = time.perf_counter()
    saved = markers.read_state(plan.output_url, GLOBAL_TRIM_STATE, storage_options=storage_options)
    if saved is not None:
        rules = tuple(TrimRule(r["threshold"], r["tie_quota"]) for r in saved["rules"])
        zero_sign, record = saved["zero_sign"], saved["record"]
    else:
        rules, zero_sign, record = compute_global_trim(
            plan, lambda kind, args: run_shards(plan.shards, kind, args, progress=progress))
        markers.write_state(plan.output_url, GLOBAL_TRIM_STATE, {
            "rules": [dataclasses.asdict(r) for r in rules], "zero_sign": zero_sign, "record": record},
            storage_options=storage_options)
    return with_global_rules(plan, rules, zero_sign), {"global_trim": record}, {"global_trim": round(time.perf_counter() - t0, 4)}


def run_merge(config: MergeConfig, *, output_url: str | None = None, address: str | None = None,
              storage_options: dict | None = None, overwrite: bool = False, progress: bool = True) -> Manifest:
    """Plan, run every shard on Ray, and publish. Returns the committed manifest."""
    if config.merge_method == "twin":
        from pipeline.twin_run import run_twin  # twin_run builds on this module

        return run_twin(config, output_url=output_url, address=address, storage_options=storage_options,
                        overwrite=overwrite, progress=progress)
    opts = storage_options or dict(config.storage)
    t0 = time.perf_counter()
    plan = build_plan(config, output_url=output_url, storage_options=opts)
    t_plan = time.perf_counter() - t0
    state = prepare_output(plan, overwrite=overwrite, storage_options=opts)
    if state.complete is not None:
        LOG.warning("%s already holds this run (%s); nothing to do", plan.output_url, state.complete.run_id)
        return state.complete
    connect_ray(address)
    LOG.info("plan %s: %d tensors in %d shards (%d already done), %.2f GB in", plan.plan_hash[:12],
             len(plan.tensors), len(plan.shards), len(state.done), plan.input_bytes / 1e9)
    t1 = time.perf_counter()
    shards, extra, trim_timings = global_trim_shards(plan, progress=progress, storage_options=opts)
    timings = {"plan": round(t_plan, 4), **trim_timings, "resumed_shards": len(state.done)}
    results = run_missing_shards(shards, state.done, progress=progress)
    timings["run"] = round(time.perf_counter() - t1, 4)
    manifest = publish(plan, results, config, timings, storage_options=opts, extra=extra)
    markers.clear_state(plan.output_url, storage_options=opts)  # the manifest is the record from now on
    LOG.info("published %s (run %s)", plan.output_url, manifest.run_id)
    return manifest
