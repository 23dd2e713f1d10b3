"""A worker node of a 2-node ray.cluster_utils.Cluster dies mid-run: the run still finishes, byte-identical."""

from __future__ import annotations

import logging
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
from conftest import start_embedded_ray, two_node_cluster
from helpers import make_models

from manifests.verify import verify_output
from pipeline.config import load_config
from pipeline.coordinator import run_merge


def _config(base, experts, out):
    return load_config({"merge_method": "ties", "base_model": str(base), "output": str(out), "shards": 16,
                        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.4}} for e in experts]})


def _shas(out):
    return {r["name"]: r["sha256"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}


@pytest.mark.ray_cluster
def test_worker_node_killed_mid_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLEET_COMPILE", "0")
    shapes = {f"layers.{i}.weight": (512, 256) for i in range(16)}
    base, experts, *_ = make_models(tmp_path / "in", shapes=shapes, seed=4)
    ray.shutdown()
    cluster = two_node_cluster("mfkn")
    killed = []
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        done_dir = tmp_path / "disturbed" / "_mergefleet" / "done"

        def kill_worker_after_first_shard():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (done_dir.exists() and any(done_dir.iterdir())):
                time.sleep(0.01)
            cluster.remove_node(worker)
            killed.append(len(list(done_dir.iterdir())) if done_dir.exists() else 0)

        killer = threading.Thread(target=kill_worker_after_first_shard)
        killer.start()
        run_merge(_config(base, experts, tmp_path / "disturbed"), progress=False)
        killer.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert killed and killed[0] < 16
    start_embedded_ray()
    run_merge(_config(base, experts, tmp_path / "undisturbed"), progress=False)
    assert verify_output(str(tmp_path / "disturbed")) == []
    assert _shas(tmp_path / "disturbed") == _shas(tmp_path / "undisturbed")
