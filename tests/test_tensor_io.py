"""safetensors I/O: headers, bit-exact ranged reads, streamed shard writes, and corrupt inputs."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.tensor_io import (CheckpointError, RangeReader, ShardWriter, read_header, resolve_model)

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.int64: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1).view(INT_VIEW[x.dtype])


def _tensors(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 3e38, -1.0])
    f32 = torch.randn(17, 5, generator=g)
    f32.view(-1)[: special.numel()] = special
    f32.view(-1)[-1:] = torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32)  # a NaN payload
    return {
        "f32": f32,
        "bf16": (torch.randn(9, 3, 4, generator=g) * 100).to(torch.bfloat16),
        "f16": torch.cat([torch.randn(30, generator=g), torch.tensor([65504.0, 6e-8, float("nan")])]).to(torch.float16),
        "i64": torch.randint(-2**62, 2**62, (11, 2), generator=g, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 7),
    }


def _read_rows(reader: RangeReader, info, a: int, b: int) -> torch.Tensor:
    return reader.read_rows(info, a, b).reshape(-1)


def _close(reader: RangeReader) -> None:
    if hasattr(reader, "close"):
        reader.close()


def test_header_of_safetensors_file(tmp_path):
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    header = read_header(str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert header.size == len(raw)
    assert header.header_sha256 == hashlib.sha256(raw[8:8 + n]).hexdigest()
    assert header.metadata == {"format": "pt", "note": "x"}
    names = {"f32": "F32", "bf16": "BF16", "f16": "F16", "i64": "I64", "scalar": "F32", "empty": "F32"}
    assert {k: v.dtype for k, v in header.tensors.items()} == names
    for name, t in tensors.items():
        info = header.tensors[name]
        assert info.shape == tuple(t.shape) and info.numel == t.numel()
        assert info.file_url == str(path)
        assert raw[info.start:info.end] == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name


@pytest.mark.parametrize("name", ["f32", "bf16", "f16", "i64", "scalar", "empty"])
def test_ranged_row_reads_bit_exact(tmp_path, name):
    tensors = _tensors(1)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    info = read_header(str(path)).tensors[name]
    t = tensors[name]
    reader = RangeReader()
    rows = t.shape[0] if t.dim() else 1
    ranges = [(0, rows)] + [(a, b) for a in range(rows) for b in range(a, rows + 1) if (a * 7 + b) % 5 == 0]
    for a, b in ranges:
        got = _read_rows(reader, info, a, b)
        assert got.dtype == t.dtype
        expected = t.reshape(1) if t.dim() == 0 else t[a:b]
        assert torch.equal(_bits(got), _bits(expected)), (a, b)
    assert reader.bytes_read > 0 or t.numel() == 0
    _close(reader)


def test_whole_read_matches_load_file(tmp_path):
    tensors = _tensors(2)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    loaded = load_file(str(path))
    reader = RangeReader()
    for name, info in read_header(str(path)).tensors.items():
        rows = info.shape[0] if info.shape else 1
        got = _read_rows(reader, info, 0, rows)
        assert torch.equal(_bits(got), _bits(loaded[name])), name
    assert reader.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())
    _close(reader)


def test_shard_writer_roundtrip(tmp_path):
    tensors = _tensors(3)
    dtypes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    entries = [(n, dtypes[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    url = str(tmp_path / "out" / "nested" / "model-00001-of-00001.safetensors")
    writer = ShardWriter(url, entries)
    for name, t in tensors.items():
        if t.dim() and t.shape[0] > 2:  # in row chunks of uneven size
            for a, b in ((0, 1), (1, 3), (3, t.shape[0])):
                writer.write(name, t[a:b])
        else:
            writer.write(name, t)
    file_sha = writer.close()
    raw = (tmp_path / "out" / "nested" / "model-00001-of-00001.safetensors").read_bytes()
    assert file_sha == hashlib.sha256(raw).hexdigest()
    assert writer.bytes_written == len(raw)
    loaded = load_file(url)
    assert list(loaded) == list(tensors) or set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(_bits(loaded[name]), _bits(t)), name
    results = {r.name: r for r in writer.results}
    assert [r.name for r in writer.results] == list(tensors)
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        r = results[name]
        assert r.sha256 == hashlib.sha256(data).hexdigest(), name
        assert raw[r.offset:r.offset + r.nbytes] == data, name
        assert r.shape == tuple(t.shape)
    header = read_header(url)  # our own reader agrees with what we wrote
    assert header.metadata == {"format": "pt"}
    assert all(header.tensors[n].start == results[n].offset for n in tensors)


def test_shard_writer_refuses_misuse(tmp_path):
    entries = [("a", "F32", (2, 2)), ("b", "BF16", (3,))]
    writer = ShardWriter(str(tmp_path / "x.safetensors"), entries)
    with pytest.raises(RuntimeError, match="out of order"):
        writer.write("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="dtype"):
        writer.write("a", torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("a", torch.zeros(3, 2))
    writer = ShardWriter(str(tmp_path / "y.safetensors"), entries)
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="1 of 2"):
        writer.close()


# ---- corrupt and unusable inputs -----------------------------------------------------------------

def _write_raw(path, header: dict, data: bytes = b"") -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _good_file(tmp_path) -> bytes:
    path = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(10, 10), "b": torch.randn(10)}, str(path))
    return path.read_bytes()


def _assert_checkpoint_error(url: str, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as info:
        read_header(url)
    message = str(info.value)
    assert url in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_truncated_files(tmp_path):
    good = _good_file(tmp_path)
    cases = {"tiny": good[:5], "in_header": good[:30], "in_data": good[:-7], "empty": b""}
    for label, data in cases.items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(data)
        _assert_checkpoint_error(str(path), "truncated")


def test_corrupt_headers(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe not json!!!" + b"\0" * 64)
    _assert_checkpoint_error(str(garbage), "JSON")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _assert_checkpoint_error(str(huge), "header")
    not_object = _write_raw(tmp_path / "list.safetensors", [1, 2])
    _assert_checkpoint_error(not_object, "not a JSON object")
    missing_key = _write_raw(tmp_path / "nokey.safetensors", {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    _assert_checkpoint_error(missing_key, "'w'", "malformed")
    beyond = _write_raw(tmp_path / "beyond.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                        b"\0" * 8)
    _assert_checkpoint_error(beyond, "'w'", "beyond")
    wrong_size = _write_raw(tmp_path / "size.safetensors", {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                            b"\0" * 8)
    _assert_checkpoint_error(wrong_size, "'w'")
    negative = _write_raw(tmp_path / "neg.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
                          b"\0" * 8)
    _assert_checkpoint_error(negative, "'w'")
    unknown_dtype = _write_raw(tmp_path / "dtype.safetensors", {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}},
                               b"\0" * 8)
    _assert_checkpoint_error(unknown_dtype, "'w'", "Q4")


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": ["x", "8"]}},
    {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},
    {"__metadata__": ["format", "pt"], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
], ids=["str_offsets", "non_numeric_offsets", "list_dtype", "list_metadata"])
def test_header_entries_of_wrong_type(tmp_path, header):
    _assert_checkpoint_error(_write_raw(tmp_path / "bad.safetensors", header, b"\0" * 8))


def test_file_truncated_after_planning_fails_on_read(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(50, 4)}, str(path))
    info = read_header(str(path)).tensors["w"]
    path.write_bytes(path.read_bytes()[:-100])
    reader = RangeReader()
    with pytest.raises(CheckpointError, match="short read") as excinfo:
        reader.read_rows(info, 0, 50)
    assert str(path) in str(excinfo.value)
    _close(reader)


def test_missing_file(tmp_path):
    _assert_checkpoint_error(str(tmp_path / "absent.safetensors"), "not found")


# ---- model directories -------------------------------------------------------------------------

def test_pickle_only_directory_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(b"not unpickled")
    (model / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        resolve_model(str(model))
    message = str(info.value)
    assert str(model) in message and "pytorch_model.bin" in message
    assert "save_file" in message and "model.safetensors" in message  # says how to convert


def test_resolve_model_layouts(tmp_path):
    tensors = {"a": torch.randn(4, 4), "b": torch.randn(3), "c": torch.arange(5)}
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, str(single / "model.safetensors"))
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    save_file({"a": tensors["a"]}, str(indexed / "model-00001-of-00002.safetensors"))
    save_file({"b": tensors["b"], "c": tensors["c"]}, str(indexed / "model-00002-of-00002.safetensors"))
    (indexed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    a, b = resolve_model(str(single)), resolve_model(str(indexed))
    assert set(a.tensors) == set(b.tensors) == set(tensors)
    assert len(b.files) == 2
    for name in tensors:
        assert (a.tensors[name].dtype, a.tensors[name].shape) == (b.tensors[name].dtype, b.tensors[name].shape)
    file_only = resolve_model(str(single / "model.safetensors"))
    assert set(file_only.tensors) == set(tensors)
    with pytest.raises(CheckpointError, match="no such model directory"):
        resolve_model(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        resolve_model(str(empty))


def test_duplicate_tensor_across_files_errors(tmp_path):
    model = tmp_path / "dup"
    model.mkdir()
    save_file({"a": torch.zeros(2)}, str(model / "part1.safetensors"))
    save_file({"a": torch.ones(2)}, str(model / "part2.safetensors"))
    with pytest.raises(CheckpointError, match="'a'"):
        resolve_model(str(model))


def test_bit_patterns_survive_through_numpy():
    """The NaN payload used above is a real float32 NaN with a non-default payload."""
    x = torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(x).all() and np.asarray(x.view(torch.int32))[0] == 0x7FC01234
