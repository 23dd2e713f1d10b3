"""Shared fixtures: one embedded Ray for the whole session, tiny generated checkpoints."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(items):
    """Tests that replace the session's Ray with a multi-node cluster run last."""
    items.sort(key=lambda item: item.get_closest_marker("ray_cluster") is not None)


def pytest_configure(config):
    config.addinivalue_line("markers", "ray_cluster: starts its own ray.cluster_utils.Cluster (runs last)")


def start_embedded_ray() -> None:
    import ray

    if not ray.is_initialized():  # address="local": a new instance, never a `ray start` cluster the machine runs
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=200 * 1024 * 1024,
                 _temp_dir=tempfile.mkdtemp(prefix="mfray", dir="/tmp"))


def two_node_cluster(prefix: str):
    """A ``ray.cluster_utils.Cluster`` head (1 CPU) in a fresh temp dir; the caller adds the second node.
    The Cluster records its address under Ray's default temp dir (/tmp/ray), which a machine that
    never ran ``ray start`` does not have yet."""
    import ray
    from ray.cluster_utils import Cluster

    os.makedirs(os.path.dirname(ray._private.utils.get_ray_address_file(None)), exist_ok=True)
    return Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "temp_dir": tempfile.mkdtemp(prefix=prefix, dir="/tmp"),
        "object_store_memory": 100 * 1024 * 1024})


@pytest.fixture
def ray_local():
    """The session's embedded Ray (started on first use, shared by every test)."""
    start_embedded_ray()
    yield


def pytest_sessionfinish(session, exitstatus):
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`, fresh data dir) for the session, with the AWS_*
    environment set for this process and for Ray's workers; stopped at the end."""
    import ray
    from s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs") / "data")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    if ray.is_initialized():  # workers copy the driver's environment at ray.init: restart to pass the new one on
        ray.shutdown()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
