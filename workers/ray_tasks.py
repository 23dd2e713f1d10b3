"""Thin Ray wrappers around the shard task body: resources and retries live here, logic does not."""

from __future__ import annotations

import ray

from workers.shard_task import ShardResult, ShardSpec, run_shard

MAX_RETRIES = 3  # a shard is rerun elsewhere if its node dies


@ray.remote(max_retries=MAX_RETRIES)
def _shard_remote(spec: ShardSpec) -> ShardResult:
    return run_shard(spec)


def submit_shard(spec: ShardSpec, *, use_gpu: bool, memory_bytes: int) -> ray.ObjectRef:
    """Start one shard task; it asks Ray for a GPU when the cluster has any, and its planned memory."""
    return _shard_remote.options(num_gpus=1 if use_gpu else 0, memory=memory_bytes,
                                 name=f"mergefleet-shard-{spec.index}").remote(spec)
