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

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=200 * 1024 * 1024,
                 _temp_dir=tempfile.mkdtemp(prefix="mfray", dir="/tmp"))


@pytest.fixture
def ray_local():
    """The session's embedded Ray (started on first use, shared by every test)."""
    start_embedded_ray()
    yield


def pytest_sessionfinish(session, exitstatus):
    import ray

    if ray.is_initialized():
        ray.shutdown()
