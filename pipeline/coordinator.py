"""The one run driver, for every method: plan, pre-pass, shards on Ray, publish (manifest last).

What differs between methods comes from the plan's registered method (workers/methods/): its
pre-pass (TIES global trim), its shard body (Twin's factors) and its publish hook (Twin's
adapters). Nothing here branches on a method's name."""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import ray
from tqdm import tqdm

from manifests import markers
from manifests.schema import Manifest, OutputFile
from manifests.writer import tensor_table_bytes, write_manifest
from pipeline import mergefleet_version
from pipeline.config import MergeConfig
from pipeline.planner import ShardPlan, build_plan
from pipeline.ray_tasks import MergeShard, ScanShard, submit
from pipeline.ray_watchdog import connect_ray
from pipeline.resume import check_claim, prepare_output
from pipeline.settings import with_config_values
from pipeline.tokenizer import TOKENIZER_FILES, with_chat_template
from workers import diagnostics
from workers.methods import method_of
from workers.publishing import put_file, tensor_rows, write_index
from workers.results import ShardResult
from workers.specs import ShardSpec
from workers.storage import open_fs
from workers.tensor_io import DTYPES, is_weight_file

LOG = logging.getLogger(__name__)
STAGES = ("read", "convert", "kernel", "write")
PREPASS_STATE = "prepass.json"  # a resumed run reuses what its method's pre-pass found (TIES global thresholds)


class RunError(RuntimeError):
    """A run failed; nothing was published."""


def run_jobs(jobs: list[MergeShard | ScanShard], *, progress: bool = True, desc: str = "merge") -> list:
    """Run the jobs (one per shard) with backpressure (ray.wait) and a progress bar; fail fast on
    the first error. Each asks Ray for its shard's planned ``memory_bytes``. Returns the results in
    shard order."""
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0
    max_in_flight = max(2, 2 * int(resources.get("GPU" if use_gpu else "CPU", 1)))
    pending = list(jobs)
    in_flight: dict[ray.ObjectRef, ShardSpec] = {}
    results: list = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="shard", disable=not progress, desc=desc)
    try:
        while pending or in_flight:
            while pending and len(in_flight) < max_in_flight:
                job = pending.pop(0)
                in_flight[submit(job, use_gpu=use_gpu)] = job.spec
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


def run_missing_shards(shards: tuple[ShardSpec, ...], done: dict[str, ShardResult], *, progress: bool) -> list:
    """Merge the shards without a result in ``done`` (a resumed run's markers); returns every
    shard's result, in shard order."""
    missing = [MergeShard(s) for s in shards if s.file_name not in done]
    return sorted([*run_jobs(missing, progress=progress), *done.values()], key=lambda r: r.index)


def _root_cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)


def copy_side_files(plan: ShardPlan, config: MergeConfig, *, directory: str = "") -> list[OutputFile]:
    """Copy every file of the reference model but its weights (``*.safetensors``, the weight index,
    pickles) and the config's ``exclude_files`` globs into ``directory`` of the output (its root by
    default): config.json, tokenizer files, sentence-transformers' modules.json and 1_Pooling/, the
    README, ... config.json gets every dtype key transformers reads set to the output dtype. The
    tokenizer files come from ``tokenizer_source`` when given, with the chat template set
    (pipeline/tokenizer.py). Returns what was written, named relative to the output root."""
    files = _side_files(plan.side_files_from, plan.storage_options, config.exclude_files,
                        skip=TOKENIZER_FILES if plan.tokenizer_from else ())
    if plan.tokenizer_from:
        files.update(_side_files(plan.tokenizer_from, plan.storage_options, config.exclude_files,
                                 only=TOKENIZER_FILES))
    if "config.json" in files and (config.output_dtype or plan.config_updates):
        model_config = json.loads(files["config.json"])
        if config.output_dtype:
            model_config = _with_dtype(model_config, config.output_dtype)
        files["config.json"] = json.dumps(with_config_values(model_config, plan.config_updates), indent=2).encode()
    if plan.chat_template is not None:
        files.pop("chat_template.jinja", None)
        files["tokenizer_config.json"] = with_chat_template(files.get("tokenizer_config.json", b""), plan.chat_template)
    return [put_file(plan.output, f"{directory}/{name}" if directory else name, data)
            for name, data in sorted(files.items())]


def _side_files(model_dir: str, storage_options: dict, exclude: tuple[str, ...], *, skip: tuple = (),
                only: tuple | None = None) -> dict[str, bytes]:
    """{relative name: bytes} of a model directory's non-weight files."""
    fs, root = open_fs(model_dir, storage_options)
    root = root.rstrip("/")
    files = {}
    for path in sorted(fs.find(root)):
        name = path[len(root) + 1:]
        if (_is_weight_file(name) or name in skip or (only is not None and name not in only)
                or any(fnmatch.fnmatch(name, g) for g in exclude)):
            continue
        files[name] = fs.cat_file(path)
    return files


def _is_weight_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return is_weight_file(base) or name.startswith(".cache/") or base.startswith(".")


def _with_dtype(model_config: dict, output_dtype: str, *, top: bool = True) -> dict:
    """config.json with ``torch_dtype`` (transformers 4) and ``dtype`` (transformers 5) set to the
    output dtype: always ``torch_dtype`` at the top level, and either key wherever a nested config
    (e.g. text_config) carries it."""
    name = str(DTYPES[output_dtype]).removeprefix("torch.")
    updated = {k: _with_dtype(v, output_dtype, top=False) if isinstance(v, dict) else v for k, v in model_config.items()}
    for key in ("torch_dtype", "dtype"):
        if key in updated or (top and key == "torch_dtype"):
            updated[key] = name
    return updated


def shard_rows(plan: ShardPlan, results: list[ShardResult]) -> tuple[list[dict], list[OutputFile]]:
    """Tensor-table rows and output files of the merged shards (file names relative to the output root)."""
    rows, files = [], []
    for result in results:
        files.append(OutputFile(name=result.file_name, size=result.file_size, sha256=result.file_sha256))
        copied = {x.name for x in plan.shards[result.index].tensors if x.action == "copy"}
        found = {d["name"]: d for d in result.diagnostics}
        for t in result.tensors:
            rows += [{**row, **diagnostics.table_columns(found.get(t.name))} for row in
                     tensor_rows(result.file_name, [t], "copy" if t.name in copied else plan.method.tensor_method)]
    return rows, files


def diagnostics_summary(plan: ShardPlan, results: list[ShardResult]) -> dict:
    """manifest.json's ``extra.diagnostics`` (tied copies counted once); empty when there are none."""
    tied = {t.name for t in plan.tensors if t.tied_to is not None}
    records = [d for r in results for d in r.diagnostics if d["name"] not in tied]
    experts = [i.url for i in plan.inputs if i.role == "expert"]
    return {"diagnostics": diagnostics.summary(records, experts)} if records else {}


def input_records(plan: ShardPlan, results: list[ShardResult]) -> list[dict]:
    """The manifest's inputs: per file its size, header sha256, fingerprint, and ``read_sha256``:
    sha256 over "<offset> <sha256>" lines (by offset) of every tensor the shards read from it whole,
    each hashed as it was read (no extra read); ``read_tensors`` counts them (``input_checksums: false``:
    None and 0)."""
    read: dict[str, dict[int, str]] = {}
    for result in results:
        for url, start, sha in result.input_sha256:
            read.setdefault(url, {})[start] = sha
    records = []
    for i in plan.inputs:
        files = []
        for f in i.files:
            tensors = read.get(f["url"], {})
            digest = hashlib.sha256("".join(f"{start} {tensors[start]}\n" for start in sorted(tensors)).encode())
            files.append({**f, "read_sha256": digest.hexdigest() if tensors else None, "read_tensors": len(tensors)})
        records.append({"role": i.role, "url": i.url, "revision": i.revision, "files": files, "bytes": i.nbytes})
    return records


def commit_manifest(plan: ShardPlan, config: MergeConfig, rows: list[dict], files: list[OutputFile], results: list,
                    timings: dict, *, extra: dict | None = None) -> Manifest:
    """Write manifest.parquet (the rows) and manifest.json, last: the commit point of the run.
    ``results`` are the shard results (anything with index, bytes_read, timings and device)."""
    parquet = tensor_table_bytes(rows)
    stage_sums = {s: round(sum(r.timings.get(s, 0.0) for r in results), 4)
                  for s in dict.fromkeys([*STAGES, *(k for r in results for k in r.timings if k != "total")])}
    manifest = Manifest(
        run_id=uuid.uuid4().hex,
        mergefleet_version=mergefleet_version(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=config.record(),
        config_hash=plan.config_hash,
        plan_hash=plan.plan_hash,
        method=plan.method.model_dump(),
        inputs=input_records(plan, results),
        files=files,
        tensors_table_sha256=hashlib.sha256(parquet).hexdigest(),
        n_tensors=len(rows),
        output_bytes=sum(r["nbytes"] for r in rows),
        bytes_read=sum(r.bytes_read for r in results),
        timings={**timings, "stages": stage_sums,
                 "shards": [{"index": r.index, "seconds": round(r.timings.get("total", 0.0), 4), "device": r.device,
                             "planned_bytes": r.planned_bytes, "peak_rss_anon": r.peak_rss_anon,
                             "start_rss_anon": r.start_rss_anon, "started_at": round(r.started_at, 3),
                             "first_tensor_at": round(r.first_tensor_at, 3), "finished_at": round(r.finished_at, 3)}
                            for r in results]},
        extra={"ignored_tensors": list(plan.ignored_tensors), **(extra or {})},
    )
    write_manifest(plan.output, manifest, parquet)
    return manifest


def publish(plan: ShardPlan, results: list[ShardResult], config: MergeConfig, timings: dict, prepared,
            extra: dict, run_id: str) -> Manifest:
    """The shards' HF index and side files (in the method's output folder), the method's own files,
    then the manifest (last, atomically), while ``run_id`` holds the claim. ``prepared``: what
    ``publish_inputs`` made while the shards ran."""
    method = method_of(plan.method)
    t0 = time.perf_counter()
    check_claim(plan.output, run_id)
    rows, files = shard_rows(plan, results)
    files.append(write_index(plan.output, rows, directory=method.output_dir))
    files += copy_side_files(plan, config, directory=method.output_dir)
    published = method.publish(plan, results, prepared)
    tensor_options = {t.name: t.options.model_dump(mode="json") for t in plan.tensors if t.options is not None}
    if tensor_options:  # gradients / filters: the options each such tensor was merged with
        extra = {**extra, "tensor_options": tensor_options}
    timings = {**timings, "publish": round(time.perf_counter() - t0, 4)}
    check_claim(plan.output, run_id)
    return commit_manifest(plan, config, rows + published.rows, files + published.files, results, timings,
                           extra={**extra, **diagnostics_summary(plan, results), **published.extra})


def run_prepass(plan: ShardPlan, run_id: str, *, progress: bool) -> tuple[tuple[ShardSpec, ...], dict, dict]:
    """The plan's shards ready to merge, with what the method's model-wide pre-pass found (or what
    a resumed run already found); returns (shards, manifest extra, timings)."""
    t0 = time.perf_counter()
    saved = markers.read_state(plan.output, PREPASS_STATE)

    def run_scans(scan) -> list:
        return run_jobs([ScanShard(s, scan) for s in plan.shards], progress=progress, desc=type(scan).__name__)

    found = method_of(plan.method).prepass(plan.method, plan, run_scans, saved)
    if found is None:
        return plan.shards, {}, {}
    if saved is None:
        check_claim(plan.output, run_id)
        markers.write_state(plan.output, PREPASS_STATE, found.state)
    shards = tuple(dataclasses.replace(s, prepass=found.shard_data) for s in plan.shards)
    return shards, found.record, {"prepass": round(time.perf_counter() - t0, 4)}


def run_merge(config: MergeConfig, *, output_url: str | None = None, address: str | None = None,
              storage_options: dict | None = None, overwrite: bool = False, progress: bool = True) -> Manifest:
    """Plan, run the method's pre-pass and every shard on Ray, and publish. Returns the committed manifest."""
    t0, started_at = time.perf_counter(), time.time()
    plan = build_plan(config, output_url=output_url, storage_options=storage_options)
    t_plan = time.perf_counter() - t0
    state = prepare_output(plan, overwrite=overwrite)
    if state.complete is not None:
        LOG.warning("%s already holds this run (%s); nothing to do", plan.output_url, state.complete.run_id)
        return state.complete
    connect_ray(address)
    ray_ready_at = time.time()
    LOG.info("plan %s: %s, %d tensors in %d shards (%d already done), %.2f GB in", plan.plan_hash[:12],
             plan.method.method, len(plan.tensors), len(plan.shards), len(state.done), plan.input_bytes / 1e9)
    t1 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as background:  # e.g. Twin loads transformers while the shards run
        prepared = background.submit(method_of(plan.method).publish_inputs, plan)
        shards, extra, prepass_timings = run_prepass(plan, state.run_id, progress=progress)
        shards = tuple(dataclasses.replace(s, run_id=state.run_id) for s in shards)
        results = run_missing_shards(shards, state.done, progress=progress)
        timings = {"plan": round(t_plan, 4), **prepass_timings, "resumed_shards": len(state.done),
                   "run": round(time.perf_counter() - t1, 4),
                   "wall_clock": {"started": round(started_at, 3), "ray_ready": round(ray_ready_at, 3),
                                  "shards_done": round(time.time(), 3)}}  # Unix seconds
        manifest = publish(plan, results, config, timings, prepared.result(), extra, state.run_id)
    markers.clear_state(plan.output)  # the manifest is the record from now on
    LOG.info("published %s (run %s)", plan.output_url, manifest.run_id)
    return manifest
