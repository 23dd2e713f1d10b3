"""Faults: NaN/Inf inputs, a killed worker node, a killed coordinator, resumed runs."""

from __future__ import annotations

import pytest
from helpers import make_models

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.coordinator import run_merge
from pipeline.samples import write_model

pytestmark = pytest.mark.usefixtures("ray_local")


def _ties(base, experts, out, **extra):
    return {"merge_method": "ties", "base_model": str(base), "output": str(out), "shards": 3,
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts], **extra}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused(tmp_path, bad, capsys):
    base, experts, _, tensors = make_models(tmp_path / "in")
    poisoned = dict(tensors[1])
    poisoned["b.weight"] = poisoned["b.weight"].clone()
    poisoned["b.weight"][4, 2] = bad
    write_model(experts[1], poisoned, {})
    import yaml

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_ties(base, experts, tmp_path / "out")))
    assert main(["run", str(path), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "'b.weight'" in err and str(experts[1]) in err and "nan_policy" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    # allowed on request: the merge runs
    manifest = run_merge(load_config(_ties(base, experts, tmp_path / "out2", nan_policy="allow")), progress=False)
    assert manifest.n_tensors == len(tensors[1]) and (tmp_path / "out2" / "manifest.json").exists()


def _big_models(root, n_experts=3):
    shapes = {f"layers.{i}.weight": (512, 256) for i in range(16)}
    base, experts, _, _ = make_models(root, n_experts=n_experts, shapes=shapes, seed=21)
    return base, experts


def _shas(out):
    import pyarrow.parquet as pq

    return {r["name"]: r["sha256"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def _kill_session_processes(marker: str) -> None:
    """SIGKILL every process of the run's private Ray session (see ``_session_processes``)."""
    import os
    import signal

    for pid in _session_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_killed_coordinator_resumes_only_missing_shards(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import yaml

    base, experts = _big_models(tmp_path / "in")
    reference = tmp_path / "reference"
    run_merge(load_config(_ties(base, experts, reference, shards=16)), progress=False)
    out = tmp_path / "out"
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_ties(base, experts, out, shards=16)))
    ray_tmp = tempfile.mkdtemp(prefix="mfkill", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "MERGEFLEET_COMPILE": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path), "--no-progress"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = out / "_mergefleet" / "done"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.exists() and any(done_dir.iterdir()):
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_session_processes(ray_tmp)
    finished_before = len(list(done_dir.iterdir()))
    assert 1 <= finished_before < 16, finished_before
    assert not (out / "manifest.json").exists()
    manifest = run_merge(load_config(_ties(base, experts, out, shards=16)), progress=False)
    assert manifest.timings["resumed_shards"] >= finished_before
    assert manifest.timings["resumed_shards"] < 16
    assert _shas(out) == _shas(reference)
    assert main(["verify", str(out)]) == 0


def test_rerun_of_complete_output_is_a_no_op_and_other_config_is_refused(tmp_path):
    base, experts, *_ = make_models(tmp_path / "in")
    out = tmp_path / "out"
    first = run_merge(load_config(_ties(base, experts, out)), progress=False)
    again = run_merge(load_config(_ties(base, experts, out)), progress=False)
    assert again.run_id == first.run_id
    from pipeline.resume import OutputInUseError

    with pytest.raises(OutputInUseError, match="--overwrite"):
        run_merge(load_config(_ties(base, experts, out, parameters={"lambda": 0.5})), progress=False)
    assert main(["status", str(out)]) == 0


def test_killed_coordinator_leaves_no_ray_process_behind(tmp_path):
    """SIGKILL to the coordinator alone (as the OOM killer sends it): its embedded Ray's processes
    (the dashboard and runtime-env agents included, which Ray alone leaves for a minute) are gone
    within seconds."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import yaml

    base, experts = _big_models(tmp_path / "in")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_ties(base, experts, tmp_path / "out", shards=16)))
    ray_tmp = tempfile.mkdtemp(prefix="mfreap", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "MERGEFLEET_COMPILE": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path), "--no-progress"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = tmp_path / "out" / "_mergefleet" / "done"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (done_dir.exists() and any(done_dir.iterdir())):
            time.sleep(0.05)
        assert _session_processes(ray_tmp), "no Ray process seen while the run was going"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert _session_processes_gone(ray_tmp, within_s=20) == {}
    finally:
        _kill_session_processes(ray_tmp)


def _session_processes_gone(marker: str, *, within_s: float) -> dict[int, str]:
    """Wait up to ``within_s`` for the processes of ``_session_processes`` to go; those still left."""
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and _session_processes(marker):
        time.sleep(0.5)
    return _session_processes(marker)


def _session_processes(marker: str) -> dict[int, str]:
    """{pid: command line} of the processes whose command line or environment names ``marker`` (a
    Ray session's temp dir: Ray's agents retitle themselves, but keep the RAY_TMPDIR they inherited)."""
    import os

    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline or marker.encode() in environ:
            found[int(pid)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
    return found


def test_the_command_exits_without_waiting_for_ray_and_leaves_nothing(tmp_path):
    """`mergefleet run` with an embedded Ray exits as soon as the manifest is committed (no wait for
    Ray's shutdown); the output verifies and the watchdog reaps the Ray processes within seconds."""
    import os
    import subprocess
    import sys
    import tempfile

    import yaml

    from manifests.verify import verify_output

    base, experts, *_ = make_models(tmp_path / "in")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_ties(base, experts, tmp_path / "out", shards=2)))
    ray_tmp = tempfile.mkdtemp(prefix="mfexit", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--no-progress"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert verify_output(str(tmp_path / "out")) == []
        assert _session_processes_gone(ray_tmp, within_s=20) == {}
    finally:
        _kill_session_processes(ray_tmp)
