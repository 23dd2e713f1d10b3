"""Bad input, one test each: `mergefleet run` exits non-zero with a message naming the file or
tensor and the fix, and publishes nothing (no manifest.json)."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
import yaml
from helpers import make_models
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from workers import storage


@pytest.fixture
def models(tmp_path):
    """(base_dir, expert_dirs) of tiny checkpoints (float32 tensors + an int64 buffer)."""
    base_dir, expert_dirs, *_ = make_models(tmp_path / "in")
    return base_dir, expert_dirs


def _config(base, experts, out, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "output": str(out),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts], **extra}


def run_cli(tmp_path, capsys, config) -> str:
    """Run `mergefleet run` on a config (dict or raw YAML text); assert it failed and published
    nothing; return what it printed to stderr."""
    path = tmp_path / "merge.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    code = main(["run", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0, err
    assert err.startswith("mergefleet: error: ")
    assert not list(tmp_path.rglob("manifest.json"))
    return err


def _rewrite(model_dir, change) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor(tmp_path, capsys, models):
    base, experts = models
    _rewrite(experts[1], lambda t: t.pop("b.weight"))
    err = run_cli(tmp_path, capsys, _config(base, experts, tmp_path / "out"))
    assert "'b.weight'" in err and str(experts[1]) in err and "exclude the tensor" in err


def test_shape_mismatch(tmp_path, capsys, models):
    base, experts = models
    _rewrite(experts[2], lambda t: t.update({"a.weight": torch.zeros(16, 11)}))
    err = run_cli(tmp_path, capsys, _config(base, experts, tmp_path / "out"))
    assert "'a.weight'" in err and str(experts[2]) in err and "[16, 11]" in err and "[16, 12]" in err
    assert "share the base architecture" in err


def test_non_float_dtype_mismatch(tmp_path, capsys, models):
    base, experts = models
    _rewrite(experts[0], lambda t: t.update({"pos.ids": t["pos.ids"].to(torch.int32)}))
    err = run_cli(tmp_path, capsys, _config(base, experts, tmp_path / "out"))
    assert "'pos.ids'" in err and str(experts[0]) in err and "I32" in err and "I64" in err
    assert "re-export" in err


def test_truncated_file(tmp_path, capsys, models):
    base, experts = models
    path = experts[1] / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # inside the header
    err = run_cli(tmp_path, capsys, _config(base, experts, tmp_path / "out"))
    assert str(path) in err and "truncated" in err and "download or convert it again" in err


def test_corrupt_header(tmp_path, capsys, models):
    base, experts = models
    path = experts[0] / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"!!!!"  # the JSON header no longer parses; its length is unchanged
    path.write_bytes(bytes(data))
    err = run_cli(tmp_path, capsys, _config(base, experts, tmp_path / "out"))
    assert str(path) in err and "not valid JSON" in err and "download it again" in err


def test_header_offsets_beyond_the_file(tmp_path, capsys, models):
    base, experts = models
    path = experts[2] / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(data[:-4])  # the header is intact, the last tensor's bytes are cut short
    err = run_cli(tmp_path, capsys, _config(base, experts, tmp_path / "out"))
    assert str(path) in err and repr(last) in err and "beyond the file" in err and "download it again" in err


def test_pickle_checkpoint_is_refused_unread(tmp_path, capsys, models, monkeypatch):
    base, experts = models
    tensors = load_file(str(experts[1] / "model.safetensors"))
    (experts[1] / "model.safetensors").unlink()
    torch.save(tensors, experts[1] / "pytorch_model.bin")

    def never(*args, **kwargs):
        raise AssertionError("a pickle checkpoint was unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, never)
    err = run_cli(tmp_path, capsys, _config(base, experts, tmp_path / "out"))
    assert str(experts[1]) in err and "pytorch_model.bin" in err and "never unpickles" in err
    assert "Convert once with" in err and "save_file" in err
    # the .bin named directly is refused the same way
    config = _config(base, [experts[0], experts[1] / "pytorch_model.bin"], tmp_path / "out")
    err = run_cli(tmp_path, capsys, config)
    assert "pytorch_model.bin" in err and "never unpickles" in err


def test_missing_bucket(tmp_path, capsys, models, s3_server):
    base, experts = models
    url = "s3://mf-bad-no-such-bucket/experts/e0"
    err = run_cli(tmp_path, capsys, _config(base, [url, *experts[1:]], tmp_path / "out"))
    assert url in err and "bucket" in err and "credentials" in err


def test_unreachable_endpoint(tmp_path, capsys, models, monkeypatch):
    base, experts = models
    monkeypatch.setattr(storage, "READ_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "BACKOFF_SECONDS", 0.01)
    url = "s3://mf-bucket/experts/e0"
    unreachable = {"endpoint_url": "http://127.0.0.1:9", "key": "AKIDUNREACHABLE", "secret": "do-not-print-me",
                   "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    err = run_cli(tmp_path, capsys, _config(base, [url, *experts[1:]], tmp_path / "out", storage=unreachable))
    assert url in err and "after 2 attempts" in err and "endpoint" in err
    assert "do-not-print-me" not in err


def test_invalid_yaml(tmp_path, capsys):
    err = run_cli(tmp_path, capsys, "merge_method: ties\nmodels: [\n  - model: /x\n")
    assert "merge.yaml" in err and "invalid YAML" in err


def test_unknown_key(tmp_path, capsys, models):
    base, experts = models
    err = run_cli(tmp_path, capsys, {**_config(base, experts, tmp_path / "out"), "densty": 0.5})
    assert "merge.yaml" in err and "unknown key 'densty'" in err and "config reference" in err


def test_tensor_name_escaping_the_output_prefix(tmp_path, capsys, models):
    base, experts = models
    for d in [base, *experts]:
        _rewrite(d, lambda t: t.update({"../../evil": t.pop("c.bias")}))
    err = run_cli(tmp_path, capsys, _config(base, experts, tmp_path / "out"))
    assert "'../../evil'" in err and str(experts[0] / "model.safetensors") in err and "escape the output prefix" in err
    assert "rename it" in err
    assert not list(tmp_path.parent.rglob("evil*"))


def test_output_holding_a_different_run(tmp_path, capsys, models, ray_local):
    base, experts = models
    out = tmp_path / "out"
    path = tmp_path / "first.yaml"
    path.write_text(yaml.safe_dump(_config(base, experts, out)))
    assert main(["run", str(path), "--no-progress"]) == 0
    first = json.loads((out / "manifest.json").read_text())
    path.write_text(yaml.safe_dump(_config(base, experts, out, parameters={"lambda": 0.5})))
    assert main(["run", str(path), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert str(out) in err and first["run_id"] in err and "--overwrite" in err
    assert json.loads((out / "manifest.json").read_text()) == first  # untouched
