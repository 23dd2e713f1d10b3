"""A run on a real 2-node ray.cluster_utils.Cluster gives the same bytes as the embedded run."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq
import pytest
import ray
from conftest import start_embedded_ray, two_node_cluster
from helpers import make_models

from manifests.verify import verify_output
from pipeline.config import load_config
from pipeline.coordinator import run_merge


def _config(base, experts, out):
    return load_config({"merge_method": "ties", "base_model": str(base), "output": str(out), "shards": 4,
                        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.4}} for e in experts]})


def _shas(out):
    return {r["name"]: r["sha256"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}


@pytest.mark.ray_cluster
def test_two_node_cluster_matches_embedded(tmp_path):
    base, experts, *_ = make_models(tmp_path / "in", seed=11)
    ray.shutdown()
    cluster = two_node_cluster("mfcl")
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        run_merge(_config(base, experts, tmp_path / "cluster"), progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    start_embedded_ray()
    run_merge(_config(base, experts, tmp_path / "embedded"), progress=False)
    assert verify_output(str(tmp_path / "cluster")) == []
    assert _shas(tmp_path / "cluster") == _shas(tmp_path / "embedded")
