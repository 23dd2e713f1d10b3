"""No stale or foreign byte is served: exclusive claims of an output (two configs at one instant,
locally and on S3), input fingerprints (resume and no-op reruns after an input changed), outputs
that overlap inputs, foreign and stale files, edits of manifest.json, storage edges, side files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import start_embedded_ray
from helpers import make_models
from safetensors.torch import load_file, save_file

from manifests.verify import verify_output
from pipeline.config import ConfigError, load_config
from pipeline.coordinator import run_merge
from pipeline.planner import build_plan
from pipeline.resume import OutputInUseError, OutputNotFoundError, output_status, prepare_output
from pipeline.samples import build_sample_models
from workers.storage import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
RACES = 20


def _ties(base, experts, out, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "output": str(out), "shards": 3,
            "models": [{"model": str(e), "parameters": {"density": 0.5}} for e in experts], **extra}


def _linear(experts, out, **extra) -> dict:
    return {"merge_method": "linear", "output": str(out), "shards": 2, "models": [{"model": str(e)} for e in experts],
            **extra}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    base, experts, *_ = make_models(root / "in", seed=5)
    return base, experts


# --- 1. exclusive claims ---------------------------------------------------------------------------

_RACER = """
import json, sys, time
from pipeline.config import load_config
from pipeline.planner import build_plan
from pipeline.resume import OutputInUseError, prepare_output
configs, start, step = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
for i, config in enumerate(configs):
    plan = build_plan(load_config(config))
    time.sleep(max(0.0, start + i * step - time.time()))
    try:
        state = prepare_output(plan, overwrite=False)
        print(json.dumps({"i": i, "won": state.run_id}), flush=True)
    except OutputInUseError as exc:
        print(json.dumps({"i": i, "lost": str(exc)}), flush=True)
"""


def _race(configs_a: list[dict], configs_b: list[dict]) -> list[tuple[dict, dict]]:
    """Two processes claim the same outputs, each pair at the same instant; their reports per race."""
    start, step = time.time() + 12.0, 0.4  # both processes have imported everything by then
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, json.dumps(c), str(start), str(step)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (configs_a, configs_b)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append({r["i"]: r for r in map(json.loads, out.splitlines())})
    return [(outs[0][i], outs[1][i]) for i in range(len(configs_a))]


def _assert_one_winner(races, read_record) -> None:
    """Exactly one process claimed each output; the other names it; the record on disk is the winner's."""
    for i, (a, b) in enumerate(races):
        winners = [r for r in (a, b) if "won" in r]
        assert len(winners) == 1, (a, b)
        loser = b if "won" in a else a
        assert winners[0]["won"] in loser["lost"], loser
        assert read_record(i)["run_id"] == winners[0]["won"]


def test_two_configs_claiming_one_local_output_at_once(models, tmp_path):
    base, experts = models
    outs = [tmp_path / f"out{i}" for i in range(RACES)]
    _assert_one_winner(_race([_ties(base, experts, o) for o in outs], [_linear(experts, o) for o in outs]),
                       lambda i: json.loads((outs[i] / "_mergefleet" / "plan.json").read_text()))


def test_two_configs_claiming_one_s3_output_at_once(models, tmp_path, s3_server):
    base, experts = models
    fs = s3_server.filesystem()
    fs.mkdir("mf-race")
    outs = [f"s3://mf-race/out{i}" for i in range(RACES)]
    _assert_one_winner(_race([_ties(base, experts, o) for o in outs], [_linear(experts, o) for o in outs]),
                       lambda i: json.loads(fs.cat_file(f"mf-race/out{i}/_mergefleet/plan.json")))


def test_racing_runs_publish_one_intact_output(models, tmp_path):
    """Whole runs (one embedded Ray, two threads): one publishes, the other fails naming it, and what
    was published verifies."""
    start_embedded_ray()
    base, experts = models
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        configs = [load_config(_ties(base, experts, out)), load_config(_linear(experts, out))]
        results: dict[int, object] = {}
        barrier = threading.Barrier(2)

        def go(k):
            barrier.wait()
            try:
                results[k] = run_merge(configs[k], progress=False)
            except OutputInUseError as exc:
                results[k] = exc

        threads = [threading.Thread(target=go, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [r for r in results.values() if isinstance(r, OutputInUseError)]
        assert len(errors) == 1, results
        assert verify_output(str(out)) == []


def test_a_run_that_lost_its_claim_writes_no_more(models, tmp_path):
    from pipeline.ray_tasks import MergeShard

    base, experts = models
    plan = build_plan(load_config(_ties(base, experts, tmp_path / "out")))
    state = prepare_output(plan, overwrite=False)
    prepare_output(plan, overwrite=True)  # another run takes the output over
    import dataclasses

    with pytest.raises(OutputInUseError, match=f"this run \\({state.run_id}\\) no longer holds"):
        MergeShard(dataclasses.replace(plan.shards[0], run_id=state.run_id)).run()
    assert not (tmp_path / "out" / plan.shards[0].file_name).exists()


# --- 2. input fingerprints ---------------------------------------------------------------------------

def _retrain(expert: Path) -> None:
    """The same tensors' names, shapes and dtypes (so the same header), other values."""
    tensors = load_file(str(expert / "model.safetensors"))
    save_file({n: t + 1 if t.is_floating_point() else t for n, t in tensors.items()}, str(expert / "model.safetensors"),
              metadata={"format": "pt"})


def test_changed_input_refused_on_a_complete_output(tmp_path):
    start_embedded_ray()
    base, experts, *_ = make_models(tmp_path / "in", seed=6)
    config = load_config(_ties(base, experts, tmp_path / "out"))
    run_merge(config, progress=False)
    assert run_merge(config, progress=False) is not None  # unchanged: a no-op
    _retrain(experts[1])
    with pytest.raises(OutputInUseError, match=r"e1/model.safetensors.*changed.*--overwrite"):
        run_merge(config, progress=False)
    fresh = run_merge(config, progress=False, overwrite=True)
    assert verify_output(str(tmp_path / "out")) == [] and fresh.inputs[2]["files"][0]["fingerprint"]


def test_changed_input_refused_on_resume(tmp_path):
    start_embedded_ray()
    import ray

    from pipeline.ray_tasks import MergeShard, submit

    base, experts, *_ = make_models(tmp_path / "in", seed=7)
    config = load_config(_ties(base, experts, tmp_path / "out"))
    plan = build_plan(config)
    import dataclasses

    state = prepare_output(plan, overwrite=False)
    ray.get(submit(MergeShard(dataclasses.replace(plan.shards[0], run_id=state.run_id)), use_gpu=False))
    _retrain(experts[0])
    with pytest.raises(OutputInUseError, match=r"e0/model.safetensors.*changed since it started"):
        run_merge(config, progress=False)


def test_changed_s3_input_refused(s3_server, tmp_path):
    start_embedded_ray()
    base, experts, *_ = make_models(tmp_path / "in", seed=8)
    fs = s3_server.filesystem()
    fs.mkdir("mf-fp")
    fs.put(str(experts[0]), "mf-fp/e0", recursive=True)
    urls = ["s3://mf-fp/e0", *map(str, experts[1:])]
    config = load_config({**_ties(base, urls, "s3://mf-fp/out")})
    run_merge(config, progress=False)
    local = tmp_path / "retrained"
    fs.get("mf-fp/e0", str(local), recursive=True)
    _retrain(local)
    fs.put(str(local / "model.safetensors"), "mf-fp/e0/model.safetensors")
    with pytest.raises(OutputInUseError, match=r"s3://mf-fp/e0/model.safetensors.*changed"):
        run_merge(config, progress=False)


# --- 3. outputs never overlap inputs ---------------------------------------------------------------

def test_output_overlapping_an_input_is_refused(tmp_path):
    base, experts, *_ = make_models(tmp_path / "in", seed=9)
    before = {p: p.read_bytes() for p in base.iterdir()}
    for out, relation in [(base, "is"), (base / "merged", "lies inside"), (tmp_path / "in", "contains"),
                          (Path(os.path.relpath(base)), "is")]:
        with pytest.raises(ConfigError, match=f"{relation} the input"):
            build_plan(load_config(_ties(base, experts, out)))
    link = tmp_path / "link-to-base"
    link.symlink_to(base)
    with pytest.raises(ConfigError, match="is the input"):
        build_plan(load_config(_ties(base, experts, link)))
    assert {p: p.read_bytes() for p in base.iterdir()} == before


# --- 4. foreign and stale files ----------------------------------------------------------------------

def test_foreign_weights_in_the_output_are_refused(models, tmp_path):
    base, experts = models
    out = tmp_path / "out"
    out.mkdir()
    save_file({"x": torch.zeros(2)}, str(out / "model.safetensors"))
    with pytest.raises(OutputInUseError, match="did not write.*model.safetensors"):
        prepare_output(build_plan(load_config(_ties(base, experts, out))), overwrite=False)
    with pytest.raises(OutputInUseError, match="weight files no mergefleet run there wrote.*model.safetensors"):
        prepare_output(build_plan(load_config(_ties(base, experts, out))), overwrite=True)
    assert (out / "model.safetensors").exists()  # never removed: mergefleet did not write it


def test_overwrite_to_fewer_shards_leaves_no_stale_shard(models, tmp_path):
    start_embedded_ray()
    base, experts = models
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    run_merge(load_config(_ties(base, experts, out / "run", shards=5)), progress=False)
    run_merge(load_config(_ties(base, experts, out / "run", shards=2)), progress=False, overwrite=True)
    names = sorted(p.name for p in (out / "run").glob("*.safetensors"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert verify_output(str(out / "run")) == []


def test_verify_fails_on_unlisted_weight_files(models, tmp_path):
    start_embedded_ray()
    base, experts = models
    out = tmp_path / "out"
    run_merge(load_config(_ties(base, experts, out)), progress=False)
    save_file({"x": torch.zeros(2)}, str(out / "model.safetensors"))
    (out / "extra.safetensors.index.json").write_text("{}")
    problems = verify_output(str(out))
    assert any("model.safetensors: a weight file the manifest does not list" in p for p in problems)
    assert any("extra.safetensors.index.json" in p for p in problems)


# --- 5. edits of manifest.json --------------------------------------------------------------------------

def test_verify_catches_edits_of_manifest_json(models, tmp_path):
    start_embedded_ray()
    base, experts = models
    out = tmp_path / "out"
    run_merge(load_config(_ties(base, experts, out, parameters={"lambda": 0.8})), progress=False)
    original = (out / "manifest.json").read_text()
    edited = json.loads(original)
    edited["config"]["parameters"]["lambda"] = 1.5
    (out / "manifest.json").write_text(json.dumps(edited, indent=2))
    problems = verify_output(str(out))
    assert any("sha256 differs from manifest.sha256" in p for p in problems)
    assert any("does not hash to its config_hash" in p for p in problems)
    edited = json.loads(original)
    edited["inputs"][0]["url"] = "/somewhere/else"
    (out / "manifest.json").write_text(json.dumps(edited, indent=2))
    assert any("the manifest was edited" in p for p in verify_output(str(out)))
    (out / "manifest.json").write_text(original)
    assert verify_output(str(out)) == []


# --- 7. storage edges -------------------------------------------------------------------------------------

def test_missing_output_bucket_is_an_error_not_created(models, s3_server):
    base, experts = models
    with pytest.raises(CheckpointError, match="bucket 'mf-no-such-output' does not exist"):
        build_plan(load_config(_ties(base, experts, "s3://mf-no-such-output/run")))
    assert not s3_server.filesystem().exists("mf-no-such-output")


def test_unknown_storage_option_is_named(models):
    base, experts = models
    with pytest.raises(CheckpointError, match=r"\['endpoint'\] are not options of s3fs.*S3FileSystem"):
        build_plan(load_config(_ties(base, experts, "s3://mf-x/run", storage={"endpoint": "http://127.0.0.1:1"})))


def test_wrong_credentials_in_verify_and_status_name_the_url(models, tmp_path, s3_server):
    start_embedded_ray()
    base, experts = models
    s3_server.filesystem().mkdir("mf-creds-v")
    run_merge(load_config(_ties(base, experts, "s3://mf-creds-v/run")), progress=False)
    wrong = {**s3_server.storage_options(), "secret": "wrong-secret"}
    for call in (verify_output, output_status):
        with pytest.raises(CheckpointError, match="s3://mf-creds-v/run"):
            call("s3://mf-creds-v/run", storage_options=wrong)
    assert verify_output("s3://mf-creds-v/run", storage_options=s3_server.storage_options()) == []


# --- 8. small things ----------------------------------------------------------------------------------------

def test_status_of_a_nonexistent_output_raises(tmp_path):
    with pytest.raises(OutputNotFoundError, match="no such output"):
        output_status(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no such output"):
        verify_output(str(tmp_path / "nothing"))


def test_every_non_weight_file_of_the_base_is_copied_and_dtype_keys_updated(tmp_path):
    start_embedded_ray()
    base, experts = build_sample_models(tmp_path / "in", n_experts=2, dtype=torch.float32)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "dtype": "float32", "text_config": {"dtype": "float32"}}))
    (base / "modules.json").write_text("[]")
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text("{}")
    (base / "README.md").write_text("# base")
    (base / "pytorch_model.bin").write_bytes(b"not unpickled")
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "output": str(tmp_path / "out"),
              "models": [{"model": str(e)} for e in experts], "dtype": "bfloat16", "exclude_files": ["README.md"]}
    manifest = run_merge(load_config(config), progress=False)
    out = tmp_path / "out"
    assert (out / "modules.json").exists() and (out / "1_Pooling" / "config.json").exists()
    assert not (out / "README.md").exists() and not (out / "pytorch_model.bin").exists()
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == written["text_config"]["dtype"] == "bfloat16"
    assert {"modules.json", "1_Pooling/config.json"} <= {f.name for f in manifest.files}
    assert verify_output(str(out)) == []


def test_twin_adapter_base_path_is_absolute(tmp_path, monkeypatch):
    start_embedded_ray()
    base, experts = build_sample_models(tmp_path / "in", n_experts=2, dtype=torch.float32)
    monkeypatch.chdir(tmp_path)
    config = {"merge_method": "twin", "base_model": str(base), "output": "twin-out",
              "models": [{"model": str(e)} for e in experts], "parameters": {"rank": 2}}
    run_merge(load_config(config), progress=False)
    adapter = json.loads((tmp_path / "twin-out/experts/expert0/adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "twin-out" / "shared")


def test_inputs_read_sha256_is_the_same_for_any_shard_count_and_chunking(models, tmp_path):
    """Each input file's read_sha256 covers the tensors the run read, hashed as they were read: the
    same for one shard or many row-chunked ones, and for the base (every tensor read) a digest of
    the whole data section."""
    from safetensors import safe_open

    start_embedded_ray()
    base, experts = models
    one = run_merge(load_config(_ties(base, experts, tmp_path / "one", shards=1)), progress=False)
    many = run_merge(load_config(_ties(base, experts, tmp_path / "many", shards=3, memory_budget=3000,
                                       process_reserve=0)), progress=False)
    digests = [[(f["url"], f["read_sha256"], f["read_tensors"]) for i in m.inputs for f in i["files"]] for m in (one, many)]
    assert digests[0] == digests[1]
    path = base / "model.safetensors"
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
    spans = sorted((8 + header_len + header[n]["data_offsets"][0], 8 + header_len + header[n]["data_offsets"][1])
                   for n in names)
    import hashlib

    expected = hashlib.sha256("".join(f"{a} {hashlib.sha256(raw[a:b]).hexdigest()}\n" for a, b in spans).encode())
    assert one.inputs[0]["files"][0]["read_sha256"] == expected.hexdigest()
    assert one.inputs[0]["files"][0]["read_tensors"] == len(names)


def test_input_checksums_can_be_turned_off(models, tmp_path):
    start_embedded_ray()
    base, experts = models
    manifest = run_merge(load_config(_ties(base, experts, tmp_path / "out", input_checksums=False)), progress=False)
    assert all(f["read_sha256"] is None and f["read_tensors"] == 0 and f["fingerprint"]
               for i in manifest.inputs for f in i["files"])
