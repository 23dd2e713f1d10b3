"""Start (or join) the Ray a run uses, and reap an embedded Ray's processes once the coordinator
that started them is gone.

``connect_ray`` imports nothing of the pipeline (Ray alone), so the command starts Ray while a
thread imports the pipeline and loads the config (pipeline/cli.py).

A coordinator killed without shutting Ray down (SIGKILL, the OOM killer) leaves Ray's dashboard
and runtime-env agents behind for a minute or more: they notice the raylet's death within seconds,
then spend 60 s trying to report it to the GCS, which died too. ``connect_ray`` starts this
watchdog (embedded Ray only) in its own session, so a signal to the coordinator's process group
does not reach it: it keeps a list of the coordinator's descendants, and a few seconds after the
coordinator exits it kills those still running (psutil compares creation times, so a reused pid
is never hit). After a normal exit there is nothing left to kill.

    python -m pipeline.ray_watchdog COORDINATOR_PID
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import psutil

POLL_SECONDS = 1.0  # how often the descendants are listed while the coordinator runs
GRACE_SECONDS = 3.0  # after the coordinator is gone: time for Ray's own shutdown before killing


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at ``address`` (else at RAY_ADDRESS, when set), or start an embedded Ray of
    this process's own, with a watchdog that reaps its processes should this process die without
    shutting it down. Never a cluster found on the machine: a bare ``ray.init()`` joins whichever
    one the machine started last (/tmp/ray/ray_current_cluster: another user's, or a test's)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    subprocess.Popen([sys.executable, "-m", "pipeline.ray_watchdog", str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watch(pid: int) -> int:
    """Wait for ``pid`` to exit, then kill what is left of its descendants; returns how many."""
    try:
        coordinator = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    me = psutil.Process().pid
    descendants: dict[int, psutil.Process] = {}
    while coordinator.is_running() and coordinator.status() != psutil.STATUS_ZOMBIE:
        try:
            descendants.update({p.pid: p for p in coordinator.children(recursive=True) if p.pid != me})
        except psutil.Error:
            pass
        time.sleep(POLL_SECONDS)
    time.sleep(GRACE_SECONDS)
    killed = 0
    for process in descendants.values():
        try:
            if process.is_running():
                process.kill()
                killed += 1
        except psutil.Error:
            pass
    return killed


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    watch(int(sys.argv[1]))
