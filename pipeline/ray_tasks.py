"""Thin Ray wrappers around the shard bodies (workers/shard_task.py): resources, retries and the
completion marker live here, logic does not. A job is typed: merge a shard, or scan it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from manifests.markers import write_marker
from pipeline.resume import check_claim
from workers import shard_task
from workers.memory import release_free_memory
from workers.results import ScanResult, ShardResult
from workers.specs import ShardSpec

MAX_RETRIES = 3  # a shard is rerun elsewhere if its node dies


@dataclass(frozen=True)
class MergeShard:
    """Make one shard's files, then mark it done (its files are complete), so a rerun can skip it;
    only while the run holds the output's claim (checked before and after)."""

    spec: ShardSpec

    def run(self) -> ShardResult:
        check_claim(self.spec.output, self.spec.run_id)
        result = shard_task.run_shard(self.spec)
        check_claim(self.spec.output, self.spec.run_id)
        write_marker(self.spec.output, result)
        return result


@dataclass(frozen=True)
class ScanShard:
    """One pre-pass scan of a shard (e.g. TIES global trim's histograms); writes nothing."""

    spec: ShardSpec
    scan: Any  # a workers.shard_task.Scan

    def run(self) -> ScanResult:
        return shard_task.run_scan(self.spec, self.scan)


@ray.remote(max_retries=MAX_RETRIES)
def _run_remote(job):
    try:
        return job.run()
    finally:
        release_free_memory()  # Ray reuses this worker process for the next task


def submit(job: MergeShard | ScanShard, *, use_gpu: bool) -> ray.ObjectRef:
    """Start one job; it asks Ray for a GPU when the cluster has any, and for its shard's planned memory."""
    kind = type(job).__name__
    return _run_remote.options(num_gpus=1 if use_gpu else 0, memory=job.spec.memory_bytes,
                               name=f"mergefleet-{kind}-{job.spec.index}").remote(job)
