"""Input validation at plan time: safetensors layouts refused exactly as safetensors refuses them,
normalize with weights that sum to ~0, and missing local paths (absolute, relative, or a bare
ORG/NAME that is neither a local directory nor a cached Hub model)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
import yaml
from helpers import make_models
from safetensors import SafetensorError, safe_open

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from workers.tensor_io import CheckpointError, read_header, resolve_model


def _write_raw(path, header: dict, data: bytes = b"") -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _f32(begin: int, end: int, shape=None) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4] if shape is None else shape, "data_offsets": [begin, end]}


def _safetensors_loads(path: str) -> bool:
    try:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                f.get_tensor(name)
        return True
    except SafetensorError:
        return False


# ---- data offsets and shapes -------------------------------------------------------------------

CORRUPT_LAYOUTS = {
    # name: (header, data bytes, tensor names the error must quote, words it must hold)
    "identical_offsets": ({"a": _f32(0, 8), "b": _f32(0, 8)}, 8, ["'a'", "'b'"], "same data offsets 0..8"),
    "partial_overlap": ({"a": _f32(0, 8), "b": _f32(4, 12)}, 12, ["'a'", "'b'"], "overlaps"),
    "gap": ({"a": _f32(0, 8), "b": _f32(12, 20)}, 20, ["'a'", "'b'"], "4 bytes between"),
    "first_not_at_zero": ({"a": _f32(4, 12)}, 12, ["'a'"], "not 0"),
    "trailing_bytes": ({"a": _f32(0, 8), "b": _f32(8, 16)}, 20, ["'b'"], "4 trailing bytes"),
    "no_tensors_but_data": ({}, 8, [], "8 trailing bytes"),
    "zero_size_inside_a_tensor": ({"a": _f32(0, 8), "z": _f32(4, 4, [0])}, 8, ["'a'", "'z'"], "overlaps"),
    "negative_dims": ({"a": _f32(0, 8, [-1, -2])}, 8, ["'a'"], "non-negative integers"),
    "float_dim": ({"a": _f32(0, 8, [2.0])}, 8, ["'a'"], "non-negative integers"),
    "string_dim": ({"a": _f32(0, 8, ["2"])}, 8, ["'a'"], "non-negative integers"),
    "bool_dim": ({"a": _f32(0, 8, [True, 2])}, 8, ["'a'"], "non-negative integers"),
}


@pytest.mark.parametrize("case", CORRUPT_LAYOUTS)
def test_layouts_safetensors_refuses_are_refused(tmp_path, case):
    header, nbytes, names, words = CORRUPT_LAYOUTS[case]
    path = _write_raw(tmp_path / "bad.safetensors", header, b"\0" * nbytes)
    assert not _safetensors_loads(path)  # the library itself refuses this file
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    message = str(info.value)
    assert path in message and words in message, message
    assert all(name in message for name in names), message
    assert "corrupt" in message and ("re-export" in message or "download it again" in message), message


LEGAL_LAYOUTS = {
    "listed_out_of_order": ({"b": _f32(8, 16), "a": _f32(0, 8)}, 16),
    "zero_size_between": ({"a": _f32(0, 8), "z": _f32(8, 8, [0, 3]), "b": _f32(8, 16)}, 16),
    "zero_size_first_and_last": ({"y": _f32(0, 0, [0]), "a": _f32(0, 8), "z": _f32(8, 8, [2, 0])}, 8),
    "two_zero_size_at_one_offset": ({"y": _f32(0, 0, [0]), "z": _f32(0, 0, [0, 5])}, 0),
    "no_tensors": ({}, 0),
}


@pytest.mark.parametrize("case", LEGAL_LAYOUTS)
def test_layouts_safetensors_accepts_are_accepted(tmp_path, case):
    header, nbytes = LEGAL_LAYOUTS[case]
    path = _write_raw(tmp_path / "ok.safetensors", header, b"\0" * nbytes)
    assert _safetensors_loads(path)
    tensors = read_header(path).tensors
    assert set(tensors) == set(header)
    assert all(tensors[n].shape == tuple(header[n]["shape"]) for n in header)


def test_corrupt_layout_fails_the_run_before_anything_is_published(tmp_path, capsys):
    base, experts, *_ = make_models(tmp_path / "in")
    path = experts[1] / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 16)  # bytes past the last tensor
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "output": str(tmp_path / "out"),
                                      "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}}
                                                 for e in experts]}))
    assert main(["run", str(config), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert str(path) in err and "16 trailing bytes" in err and "corrupt" in err
    assert not list(tmp_path.rglob("manifest.json"))


# ---- normalize with weights that sum to ~0 -----------------------------------------------------

def _weighted(method: str, weights, normalize: bool) -> dict:
    config = {"merge_method": method, "parameters": {"normalize": normalize},
              "models": [{"model": f"m{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)]}
    if method == "task_arithmetic":
        config["base_model"] = "base"
    return config


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("weights", [[0.7, -0.7 + 5.6e-17], [1.0, 2.0, -3.0 + 1e-9], [0.0, 0.0]])
def test_normalize_refuses_weights_summing_to_about_zero(method, weights):
    with pytest.raises(ConfigError) as info:
        load_config(_weighted(method, weights, normalize=True))
    message = str(info.value)
    assert "~0 relative to their size" in message and "normalize: false" in message, message


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_normalize_accepts_weights_summing_clearly_away_from_zero(method):
    load_config(_weighted(method, [1.0, -0.5], normalize=True))
    load_config(_weighted(method, [1.0, -1.0 + 1e-3], normalize=True))
    load_config(_weighted(method, [0.7, -0.7 + 5.6e-17], normalize=False))  # nothing divides by the sum


# ---- missing input paths -----------------------------------------------------------------------

STORAGE_WORDS = ("bucket", "endpoint", "credentials")


@pytest.mark.parametrize("relative", [False, True])
def test_missing_local_directory_says_so_without_storage_hints(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    url = "./models/x" if relative else str(tmp_path / "nonexistent" / "model")
    with pytest.raises(CheckpointError) as info:
        resolve_model(url)
    message = str(info.value)
    where = str(tmp_path / "models" / "x") if relative else url
    assert url in message and where in message and "does not exist" in message and "check the path" in message
    assert not any(word in message for word in STORAGE_WORDS), message


def test_missing_local_file_says_so_without_storage_hints(tmp_path):
    url = str(tmp_path / "absent" / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        resolve_model(url)
    message = str(info.value)
    assert url in message and "does not exist" in message and "check the path" in message
    assert not any(word in message for word in STORAGE_WORDS), message


def test_index_naming_a_missing_local_shard_says_so(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError) as info:
        resolve_model(str(model))
    message = str(info.value)
    assert "model-00001-of-00001.safetensors" in message and "does not exist" in message
    assert not any(word in message for word in STORAGE_WORDS), message


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline Hub cache under tmp_path, and tmp_path as the current directory."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_missing_relative_path_names_both_readings(tmp_path, hub_cache):
    (tmp_path / "models").mkdir()  # the parent exists, the model directory does not
    with pytest.raises(CheckpointError) as info:
        resolve_model("models/base")
    message = str(info.value)
    assert message.startswith("models/base: ")
    assert "no local directory" in message and str(tmp_path / "models" / "base") in message
    assert "relative to the current directory" in message and "check it" in message
    assert "Hub model models/base@main" in message and "HF_HUB_OFFLINE" in message


def test_missing_hf_reference_names_only_the_hub(hub_cache):
    with pytest.raises(CheckpointError) as info:
        resolve_model("hf://models/base")
    message = str(info.value)
    assert "Hub model models/base@main" in message and "no local directory" not in message


def test_cached_hub_models_still_resolve_bare_and_with_scheme(tmp_path, hub_cache):
    base, *_ = make_models(tmp_path / "src", n_experts=0)
    commit = hashlib.sha1(b"mf-test/base").hexdigest()
    repo = hub_cache / "models--mf-test--base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(base, repo / "snapshots" / commit)
    for url in ("mf-test/base", "mf-test/base@main", "hf://mf-test/base", f"hf://mf-test/base@{commit}"):
        model = resolve_model(url)
        assert model.revision == commit and model.source == f"hf://mf-test/base@{commit}", url
        assert set(model.tensors) == {"a.weight", "b.weight", "c.bias", "d.weight", "pos.ids"}
    assert torch.Size(model.tensors["a.weight"].shape) == torch.Size([16, 12])
