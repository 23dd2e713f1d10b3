"""Inputs and output on a real S3 server (SeaweedFS): an end-to-end TIES run, verify, no credentials
in what is published, the conditional manifest put, a missing bucket, retried reads."""

from __future__ import annotations

import gc
import hashlib
import json
import logging

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import make_models, merge_reference
from safetensors.torch import load

from manifests.verify import verify_output
from workers.storage import AlreadyPublishedError, atomic_put
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.coordinator import run_merge
from pipeline.planner import build_plan
from workers import storage, tensor_io
from workers.tensor_io import BackgroundUpload, CheckpointError, RangeReader, ShardWriter, resolve_model

pytestmark = pytest.mark.usefixtures("s3_server", "ray_local")  # the server first: Ray's workers take its env

WEIGHTS, DENSITIES = (1.0, 0.5, 2.0), (0.5, 0.3, 0.8)


def _upload(s3_server, tmp_path, bucket: str):
    """Tiny base + 3 experts written locally, then put under s3://bucket/in/."""
    base_dir, expert_dirs, base, experts = make_models(tmp_path / "in")
    fs = s3_server.filesystem()
    fs.mkdir(bucket)
    for d in [base_dir, *expert_dirs]:
        fs.put(str(d), f"{bucket}/in/{d.name}", recursive=True)
    urls = [f"s3://{bucket}/in/{d.name}" for d in expert_dirs]
    return f"s3://{bucket}/in/{base_dir.name}", urls, base, experts


def _config(base_url, expert_urls, output, **extra) -> dict:
    return {"merge_method": "ties", "base_model": base_url, "output": output, "dtype": "float32", "shards": 3,
            "models": [{"model": u, "parameters": {"weight": w, "density": d}}
                       for u, w, d in zip(expert_urls, WEIGHTS, DENSITIES)], **extra}


def test_ties_end_to_end_on_s3(s3_server, tmp_path):
    """Credentials from the environment only (the cluster path): CLI run, verify, values."""
    base_url, expert_urls, base, experts = _upload(s3_server, tmp_path, "mf-e2e")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(_config(base_url, expert_urls, "s3://mf-e2e/run")))
    assert main(["run", str(path), "--no-progress"]) == 0
    assert main(["verify", "s3://mf-e2e/run"]) == 0
    assert verify_output("s3://mf-e2e/run") == []

    fs = s3_server.filesystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("mf-e2e/run", detail=False))
    assert [n for n in names if n.startswith("model-")] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert {"manifest.json", "manifest.parquet", "model.safetensors.index.json", "config.json"} <= set(names)
    merged = {}
    for name in names:
        if name.startswith("model-"):
            merged.update(load(fs.cat_file(f"mf-e2e/run/{name}")))
    for name, b in base.items():
        if b.is_floating_point():
            expected = merge_reference("ties", b, [e[name] for e in experts], weights=WEIGHTS, densities=DENSITIES,
                                       dtype=torch.float32)
            assert torch.equal(merged[name], expected), name
        else:
            assert torch.equal(merged[name], b), name
    manifest = json.loads(fs.cat_file("mf-e2e/run/manifest.json"))
    assert [i["url"] for i in manifest["inputs"]] == [base_url, *expert_urls]
    with fs.open("mf-e2e/run/manifest.parquet", "rb") as f:
        assert set(pq.read_table(f).column("name").to_pylist()) == set(base)

    # a flipped byte in a shard on S3 is caught
    shard = "mf-e2e/run/model-00002-of-00003.safetensors"
    data = bytearray(fs.cat_file(shard))
    data[-1] ^= 0x01
    fs.pipe_file(shard, bytes(data))
    assert any("model-00002-of-00003.safetensors" in p for p in verify_output("s3://mf-e2e/run"))


def test_storage_section_never_published(s3_server, tmp_path, caplog):
    """Explicit storage options reach the plan's shards, and no credential reaches the manifest,
    the plan summary, the config hash or the logs."""
    base_url, expert_urls, *_ = _upload(s3_server, tmp_path, "mf-creds")
    config = load_config(_config(base_url, expert_urls, "s3://mf-creds/run", storage=s3_server.storage_options()))
    plan = build_plan(config)
    assert all(s.storage_options == s3_server.storage_options() for s in plan.shards)
    without = load_config(_config(base_url, expert_urls, "s3://mf-creds/run"))
    assert config.config_hash() == without.config_hash()  # rotating keys does not invalidate a resumable run
    caplog.set_level(logging.DEBUG, logger="pipeline")
    caplog.set_level(logging.DEBUG, logger="workers")
    caplog.set_level(logging.DEBUG, logger="manifests")
    manifest = run_merge(config, progress=False)
    published = s3_server.filesystem().cat_file("mf-creds/run/manifest.json").decode()
    texts = {"manifest": published, "manifest model": manifest.model_dump_json(), "repr": repr(config),
             "plan": json.dumps(plan.summary()), "logs": caplog.text}
    for where, text in texts.items():
        assert s3_server.secret not in text, where
        assert s3_server.key not in text, where
    assert "storage" not in manifest.config
    assert verify_output("s3://mf-creds/run") == []


def test_second_manifest_put_is_refused(s3_server):
    """manifest.json is a conditional put (If-None-Match: *): the second publisher loses."""
    s3_server.filesystem().mkdir("mf-cond")
    url = "s3://mf-cond/run/manifest.json"
    atomic_put(url, b'{"run_id": "first"}', exclusive=True)
    with pytest.raises(AlreadyPublishedError, match="another run published"):
        atomic_put(url, b'{"run_id": "second"}', exclusive=True)
    assert s3_server.filesystem().cat_file("mf-cond/run/manifest.json") == b'{"run_id": "first"}'
    atomic_put(url, b"replaced")  # plain puts (shards, side files) still overwrite
    assert s3_server.filesystem().cat_file("mf-cond/run/manifest.json") == b"replaced"


def test_local_manifest_put_is_exclusive_too(tmp_path):
    url = str(tmp_path / "run" / "manifest.json")
    atomic_put(url, b"first", exclusive=True)
    with pytest.raises(AlreadyPublishedError, match="--overwrite"):
        atomic_put(url, b"second", exclusive=True)
    assert (tmp_path / "run" / "manifest.json").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["manifest.json"]  # no temporary left behind


def _client_error(code: str, status: int) -> OSError:
    """What s3fs raises for an S3 error response (a translated botocore ClientError)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                             "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))


def test_transient_errors_are_told_apart():
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    for exc in [_client_error("SlowDown", 503), _client_error("InternalError", 500), TimeoutError("t"),
                ReadTimeoutError(endpoint_url="http://x"), EndpointConnectionError(endpoint_url="http://x"),
                ConnectionResetError()]:
        assert storage.is_transient(exc), exc
    for exc in [_client_error("NoSuchKey", 404), _client_error("AccessDenied", 403), FileNotFoundError("f"),
                PermissionError("p"), _client_error("InvalidRange", 416), CheckpointError("c"), ValueError("v")]:
        assert not storage.is_transient(exc), exc


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(CheckpointError) as info:
        resolve_model("s3://mf-no-such-bucket/models/base")
    message = str(info.value)
    assert "s3://mf-no-such-bucket/models/base" in message and "bucket" in message
    assert s3_server.secret not in message


def test_large_reads_are_chunked_and_retried(s3_server, tmp_path, monkeypatch):
    """A tensor read in several bounded GETs, the first of which fails transiently, comes back exact."""
    base_url, *_ = _upload(s3_server, tmp_path, "mf-chunks")
    info = resolve_model(base_url).tensors["b.weight"]
    monkeypatch.setattr(tensor_io, "REMOTE_CHUNK_BYTES", 100)
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.01)
    reader = RangeReader()
    fs, _ = reader._open(info.file_url)
    calls, real_cat = [], fs.cat_file

    def flaky_cat(path, start=None, end=None, **kwargs):
        calls.append((start, end))
        if len(calls) == 1:
            raise TimeoutError("simulated read timeout")
        return real_cat(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(fs, "cat_file", flaky_cat)
    out = reader.read_rows(info, 0, info.shape[0])
    expected = load(s3_server.filesystem().cat_file(base_url.removeprefix("s3://") + "/model.safetensors"))["b.weight"]
    assert torch.equal(out.view(info.shape), expected)
    assert all(end - start <= 100 for start, end in calls)
    assert len(calls) == 1 + -(-info.nbytes // 100)  # one retry, then every chunk once


def test_shard_writer_uploads_whole_parts(s3_server, monkeypatch):
    """A shard larger than a part goes up as a multipart upload, part by part on a thread; the
    object holds exactly the bytes written, in order."""
    monkeypatch.setattr(tensor_io, "REMOTE_PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part but the last
    fs = s3_server.filesystem()
    fs.mkdir("mf-parts")
    a, b = torch.arange(3 * 1024 * 1024, dtype=torch.float32), torch.randn(1000)
    writer = ShardWriter("s3://mf-parts/run/model.safetensors", [("a", "F32", tuple(a.shape)), ("b", "F32", (1000,))])
    for chunk in a.split(700_000):
        writer.write("a", chunk)
    writer.write("b", b)
    sha = writer.close()
    data = fs.cat_file("mf-parts/run/model.safetensors")
    assert hashlib.sha256(data).hexdigest() == sha
    assert fs.info("mf-parts/run/model.safetensors")["ETag"].strip('"').endswith("-3")  # three parts
    loaded = load(data)
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)


def test_background_upload_error_is_raised(monkeypatch):
    """A part that fails to upload on the thread fails the writer's next call."""
    class FailingFile:
        def write(self, data):
            raise ConnectionResetError("simulated upload failure")

        def close(self):
            raise AssertionError("a failed upload is never completed")

    monkeypatch.setattr(tensor_io, "REMOTE_PART_BYTES", 4)
    upload = BackgroundUpload(FailingFile())
    upload.write(b"123456")  # one whole part goes to the thread
    with pytest.raises(ConnectionResetError, match="simulated"):
        upload.close()


@pytest.mark.parametrize("store", ["s3", "local"])
def test_an_unfinished_shard_publishes_nothing(s3_server, tmp_path, monkeypatch, store):
    """A shard closed with a tensor missing (or discarded, or left by a failure) after parts went up
    leaves nothing at its URL: the upload is aborted, not completed with what it had, and an older
    object at that key is untouched; a partial local file is removed."""
    monkeypatch.setattr(tensor_io, "REMOTE_PART_BYTES", 5 * 1024 * 1024)
    fs = s3_server.filesystem()
    if store == "s3":
        fs.mkdir("mf-unfinished")
        url = "s3://mf-unfinished/run/model.safetensors"
        fs.pipe_file("mf-unfinished/run/model.safetensors", b"the older shard")
    else:
        url = str(tmp_path / "model.safetensors")
    a = torch.arange(3 * 1024 * 1024, dtype=torch.float32)
    for finish in ("close", "discard", "a failure inside with"):
        writer = ShardWriter(url, [("a", "F32", tuple(a.shape)), ("b", "F32", (10,))])
        writer.write("a", a)  # two parts uploaded, "b" never written
        if finish == "close":
            with pytest.raises(RuntimeError, match="closed after 1 of 2 tensors"):
                writer.close()
        elif finish == "discard":
            writer.discard()
        else:
            with pytest.raises(OSError, match="simulated"), writer:
                raise OSError("simulated read failure")
        del writer
        gc.collect()  # the client's finaliser must not complete the upload either
        if store == "s3":
            assert fs.cat_file("mf-unfinished/run/model.safetensors") == b"the older shard"
        else:
            assert not (tmp_path / "model.safetensors").exists()
