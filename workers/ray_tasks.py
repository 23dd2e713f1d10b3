"""Thin Ray wrappers around the shard task bodies: resources and retries live here, logic does not."""

from __future__ import annotations

import ray

from manifests.markers import write_marker
from workers import shard_task, twin_task
from workers.memory import release_free_memory

MAX_RETRIES = 3  # a shard is rerun elsewhere if its node dies

def _merge_and_mark(spec: shard_task.ShardSpec) -> shard_task.ShardResult:
    """Merge one shard, then mark it done (its file is complete), so a rerun can skip it."""
    result = shard_task.run_shard(spec)
    write_marker(spec.output_url, result, storage_options=spec.storage_options)
    return result


def _twin_and_mark(spec: shard_task.ShardSpec, options: twin_task.TwinOptions) -> twin_task.TwinShardResult:
    """Run one twin shard (θ* and every expert's factors), then mark it done."""
    result = twin_task.run_twin_shard(spec, options)
    write_marker(spec.output_url, result, storage_options=spec.storage_options)
    return result


_BODIES = {
    "merge": _merge_and_mark,
    "high": shard_task.scan_high_histograms,
    "low": shard_task.scan_low_histograms,
    "sign": shard_task.scan_sign_sum,
    "twin": _twin_and_mark,
}


@ray.remote(max_retries=MAX_RETRIES)
def _shard_remote(kind: str, spec: shard_task.ShardSpec, *args):
    try:
        return _BODIES[kind](spec, *args)
    finally:
        release_free_memory()  # Ray reuses this worker process for the next task


def submit(kind: str, spec: shard_task.ShardSpec, *args, use_gpu: bool, memory_bytes: int) -> ray.ObjectRef:
    """Start one task of ``kind`` (merge, a global-trim scan, or twin) for a shard; it asks Ray for a GPU
    when the cluster has any, and for its planned memory."""
    return _shard_remote.options(num_gpus=1 if use_gpu else 0, memory=memory_bytes,
                                 name=f"mergefleet-{kind}-{spec.index}").remote(kind, spec, *args)
