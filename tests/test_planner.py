"""The planner: shard grouping properties, input checks with clear errors, chunking, plan hash, index inputs."""

from __future__ import annotations

import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, load_config
from pipeline.planner import build_plan, shard_groups
from pipeline.samples import write_model
from workers.tensor_io import rows_of

TINY_CONFIG = {"model_type": "llama", "hidden_size": 8}


# ---- shard_groups ------------------------------------------------------------------------------

sizes_strategy = st.lists(st.one_of(st.integers(0, 100), st.integers(0, 10**9), st.just(0)), min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_strategy, n_shards=st.integers(1, 100))
def test_shard_groups_properties(sizes, n_shards):
    groups = shard_groups(sizes, n_shards)
    n = min(n_shards, len(sizes))
    assert len(groups) == n
    assert all(groups), "a group is empty"
    flat = [i for g in groups for i in g]
    assert flat == list(range(len(sizes))), "groups are not disjoint, complete and in order"
    for g in groups:
        assert g == list(range(g[0], g[-1] + 1)), "a group is not contiguous"
    assert shard_groups(list(sizes), n_shards) == groups, "not deterministic"
    total, largest = sum(sizes), max(sizes)
    for g in groups:  # balanced: no group holds more than its share plus one tensor (exact integer check)
        assert sum(sizes[i] for i in g) * n <= total + n * largest, (groups, sizes)


def test_shard_groups_equal_sizes_split_evenly():
    assert shard_groups([10] * 12, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert shard_groups([5, 5, 5], 10) == [[0], [1], [2]]
    assert shard_groups([7], 1) == [[0]]


# ---- tiny checkpoints --------------------------------------------------------------------------

def _tensors(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.layers.10.w": torch.randn(40, 16, generator=g),
        "model.layers.2.w": torch.randn(40, 16, generator=g),
        "model.embed.weight": torch.randn(64, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
    }
    tensors = {n: t.to(dtype) for n, t in tensors.items()}
    tensors["pos.ids"] = torch.arange(12, dtype=torch.int64)
    return tensors


def _models(root, n_experts=2, *, edit=None, max_file_bytes=None):
    base = _tensors(0)
    base_dir = write_model(root / "base", base, TINY_CONFIG, max_file_bytes=max_file_bytes)
    expert_dirs = []
    for i in range(n_experts):
        e = {n: (t + 0.01 * torch.randn(t.shape) if t.is_floating_point() else t.clone()) for n, t in base.items()}
        if edit is not None and i == n_experts - 1:
            edit(e)
        expert_dirs.append(write_model(root / f"expert{i}", e, TINY_CONFIG, max_file_bytes=max_file_bytes))
    return base_dir, expert_dirs


def _config(base_dir, expert_dirs, out, method="ties", **extra):
    cfg = {"merge_method": method, "output": str(out),
           "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in expert_dirs]}
    if method != "linear":
        cfg["base_model"] = str(base_dir)
    cfg.update(extra)
    return load_config(cfg)


def _bad_plan(tmp_path, edit):
    base_dir, expert_dirs = _models(tmp_path, edit=edit)
    with pytest.raises(ConfigError) as info:
        build_plan(_config(base_dir, expert_dirs, tmp_path / "out"))
    return str(info.value), str(expert_dirs[-1])


def test_missing_tensor_is_named(tmp_path):
    message, bad_model = _bad_plan(tmp_path, lambda e: e.pop("model.norm.weight"))
    assert "'model.norm.weight'" in message and bad_model in message and "missing" in message


def test_shape_mismatch_is_named(tmp_path):
    def edit(e):
        e["model.embed.weight"] = torch.zeros(65, 8)

    message, bad_model = _bad_plan(tmp_path, edit)
    assert "'model.embed.weight'" in message and bad_model in message
    assert "[65, 8]" in message and "[64, 8]" in message


def test_int_vs_float_dtype_mismatch_is_named(tmp_path):
    def edit(e):
        e["pos.ids"] = e["pos.ids"].float()

    message, bad_model = _bad_plan(tmp_path, edit)
    assert "'pos.ids'" in message and bad_model in message and "F32" in message and "I64" in message


def test_float_vs_int_dtype_mismatch_is_named(tmp_path):
    def edit(e):
        e["model.norm.weight"] = torch.arange(8, dtype=torch.int32)

    message, bad_model = _bad_plan(tmp_path, edit)
    assert "'model.norm.weight'" in message and bad_model in message and "I32" in message


def test_float_precisions_may_differ(tmp_path):
    """A bf16 expert over an f32 base is fine: all floats are upcast to float32."""
    def edit(e):
        e["model.norm.weight"] = e["model.norm.weight"].to(torch.bfloat16)

    base_dir, expert_dirs = _models(tmp_path, edit=edit)
    plan = build_plan(_config(base_dir, expert_dirs, tmp_path / "out"))
    task = next(t for t in plan.tensors if t.name == "model.norm.weight")
    assert [i.dtype for i in task.inputs] == ["F32", "F32", "BF16"]


def test_missing_base_model_directory_errors(tmp_path):
    _, expert_dirs = _models(tmp_path)
    with pytest.raises(ValueError, match="nowhere"):
        build_plan(_config(tmp_path / "nowhere", expert_dirs, tmp_path / "out"))


def test_plan_contents_and_order(tmp_path):
    base_dir, expert_dirs = _models(tmp_path)
    plan = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", shards=2))
    names = [t.name for t in plan.tensors]
    assert names == ["model.embed.weight", "model.layers.2.w", "model.layers.10.w", "model.norm.weight", "pos.ids"]
    actions = {t.name: t.action for t in plan.tensors}
    assert actions["pos.ids"] == "copy" and actions["model.layers.2.w"] == "merge"
    merged = next(t for t in plan.tensors if t.name == "model.layers.2.w")
    assert [i.file_url for i in merged.inputs] == [str(base_dir / "model.safetensors")] + [
        str(e / "model.safetensors") for e in expert_dirs]  # base first, then experts in config order
    copied = next(t for t in plan.tensors if t.name == "pos.ids")
    assert len(copied.inputs) == 1 and copied.inputs[0].file_url.startswith(str(base_dir))
    assert len(plan.shards) == 2
    assert [s.file_name for s in plan.shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert plan.method.method == "ties" and plan.method.densities == (0.5, 0.5)


def test_memory_budget_chunks_big_tensors(tmp_path):
    base_dir, expert_dirs = _models(tmp_path)
    roomy = build_plan(_config(base_dir, expert_dirs, tmp_path / "out"))
    assert all(t.chunk_rows == rows_of(t.shape) for t in roomy.tensors)
    tight = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", memory_budget=2000, process_reserve=0))
    by_name = {t.name: t for t in tight.tensors}
    for name in ("model.layers.2.w", "model.layers.10.w", "model.embed.weight"):
        assert 1 <= by_name[name].chunk_rows < rows_of(by_name[name].shape), name
    assert all(t.chunk_rows >= 1 for t in tight.tensors)
    assert tight.plan_hash != roomy.plan_hash
    # a string budget is parsed
    parsed = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", memory_budget="2kB", process_reserve=0))
    assert [t.chunk_rows for t in parsed.tensors] == [t.chunk_rows for t in tight.tensors]


def test_plan_hash_stable_and_sensitive(tmp_path):
    base_dir, expert_dirs = _models(tmp_path)
    first = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", shards=2))
    again = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", shards=2))
    elsewhere = build_plan(_config(base_dir, expert_dirs, tmp_path / "elsewhere", shards=2))
    assert first.plan_hash == again.plan_hash == elsewhere.plan_hash
    assert first.config_hash == again.config_hash
    assert len(first.plan_hash) == 64
    for changed in (dict(shards=3), dict(parameters={"lambda": 0.5}), dict(dtype="bfloat16")):
        assert build_plan(_config(base_dir, expert_dirs, tmp_path / "out", **changed)).plan_hash != first.plan_hash, changed


def test_sharded_index_inputs_plan_the_same_tensors(tmp_path):
    single_base, single_experts = _models(tmp_path / "single")
    sharded_base, sharded_experts = _models(tmp_path / "sharded", max_file_bytes=3000)
    assert (sharded_base / "model.safetensors.index.json").exists()
    assert len(list(sharded_base.glob("model-*.safetensors"))) > 1
    a = build_plan(_config(single_base, single_experts, tmp_path / "out", shards=2))
    b = build_plan(_config(sharded_base, sharded_experts, tmp_path / "out", shards=2))

    def summary(plan):
        return [(s.file_name, [(t.name, t.shape, t.out_dtype, t.action, t.chunk_rows, [i.dtype for i in t.inputs],
                                [i.nbytes for i in t.inputs]) for t in s.tensors]) for s in plan.shards]

    assert summary(a) == summary(b)
    files = {i.file_url.rsplit("/", 1)[-1] for t in b.tensors for i in t.inputs}
    assert len(files) > 1


def test_linear_plans_without_base(tmp_path):
    _, expert_dirs = _models(tmp_path, n_experts=3)
    plan = build_plan(_config(None, expert_dirs, tmp_path / "out", method="linear"))
    merged = next(t for t in plan.tensors if t.action == "merge")
    assert len(merged.inputs) == 3
    assert [i.role for i in plan.inputs] == ["model"] * 3


def test_no_output_errors(tmp_path):
    base_dir, expert_dirs = _models(tmp_path)
    config = load_config({"merge_method": "ties", "base_model": str(base_dir),
                          "models": [{"model": str(e)} for e in expert_dirs]})
    with pytest.raises(ConfigError, match="output"):
        build_plan(config)


def test_shard_count_from_bytes_and_default(tmp_path):
    base_dir, expert_dirs = _models(tmp_path)
    default = build_plan(_config(base_dir, expert_dirs, tmp_path / "out"))
    n_tensors = len(default.tensors)
    assert 1 <= len(default.shards) <= n_tensors
    by_bytes = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", shards="3kB"))
    total = by_bytes.output_bytes
    assert len(by_bytes.shards) == min(n_tensors, -(-total // 3000))
    one = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", shards="10GB"))
    assert len(one.shards) == 1 and one.shards[0].file_name == "model-00001-of-00001.safetensors"
    many = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", shards=100))
    assert len(many.shards) == n_tensors
    for plan in (default, by_bytes, one, many):  # every tensor planned exactly once, in name order
        assert [t.name for t in plan.tensors] == [t.name for t in default.tensors]


def test_memory_budget_holds_the_process_reserve_and_the_chunks(tmp_path):
    """memory_budget bounds the whole task: the worker's own process_reserve plus its largest chunk."""
    base_dir, expert_dirs = _models(tmp_path)
    plan = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", memory_budget=3000, process_reserve=1000))
    same_chunks = build_plan(_config(base_dir, expert_dirs, tmp_path / "out", memory_budget=2000, process_reserve=0))
    assert [t.chunk_rows for t in plan.tensors] == [t.chunk_rows for t in same_chunks.tensors]
    for spec, bare in zip(plan.shards, same_chunks.shards):
        assert spec.memory_bytes == bare.memory_bytes + 1000 <= 3000
    with pytest.raises(ConfigError, match=r"memory_budget \(400MB\) must exceed process_reserve \(512MiB\)"):
        _config(base_dir, expert_dirs, tmp_path / "out", memory_budget="400MB")
