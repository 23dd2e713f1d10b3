"""Per-tensor merge diagnostics (workers/diagnostics.py, docs/diagnostics.md): equal to a float64
reference computed from the inputs (counts exactly), the same for one shard and for row-chunked
shards, and published in manifest.parquet and manifest.json."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import start_embedded_ray
from helpers import make_models, read_output, trim_reference

from pipeline.config import load_config
from pipeline.coordinator import run_merge
from pipeline.planner import build_plan
from workers.kernels.diagnostics import gram_pairs
from workers.shard_task import run_shard

WEIGHTS, DENSITIES = (1.0, 0.5, 0.8), (0.5, 0.3, 0.7)
CHUNKED = {"memory_budget": 3000, "process_reserve": 0, "shards": 3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    base, experts, base_tensors, expert_tensors = make_models(root / "m", 3, dtype=torch.bfloat16, seed=5)
    return root, base, experts, base_tensors, expert_tensors


def _config(models, method: str, out: Path, **extra) -> dict:
    root, base, experts, _, _ = models
    entries = [{"model": str(e), "parameters": {"weight": w, "density": d}}
               for e, w, d in zip(experts, WEIGHTS, DENSITIES)]
    if method == "task_arithmetic":
        entries = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in entries]
    return {"merge_method": method, "base_model": str(base), "models": entries, "output": str(out), **extra}


def _records(config: dict) -> dict[str, dict]:
    """Every shard run in this process; the diagnostics records by tensor name."""
    plan = build_plan(load_config(config))
    return {d["name"]: d for spec in plan.shards for d in run_shard(spec).diagnostics}


def _taus(models) -> dict[str, list[torch.Tensor]]:
    """τ_t in float64 of every merged tensor, from float32 differences as the kernels form them."""
    _, _, _, base, experts = models
    return {name: [(e[name].float() - b.float()).double().reshape(-1) for e in experts]
            for name, b in base.items() if b.is_floating_point()}


def _gram_close(record: dict, taus: list[torch.Tensor]) -> None:
    expected = [float(taus[a] @ taus[b]) for a, b in gram_pairs(len(taus))]
    scale = max(float(t @ t) for t in taus)
    assert record["gram"] == pytest.approx(expected, rel=1e-6, abs=1e-7 * scale)


def _merged_close(record: dict, out: torch.Tensor, base: torch.Tensor) -> None:
    merged = (out.float() - base.float()).double()
    assert record["merged_sq"] == pytest.approx(float((merged * merged).sum()), rel=1e-6)


def test_ties_diagnostics_equal_a_float64_reference(models, tmp_path):
    out = tmp_path / "ties"
    records = _records(_config(models, "ties", out))
    outputs, base = read_output(out), models[3]
    for name, taus in _taus(models).items():
        record = records[name]
        kept = [trim_reference(tau, d) for tau, d in zip(taus, DENSITIES)]
        weighted = [x * w for x, w in zip(kept, WEIGHTS)]
        gamma = torch.sign(sum(weighted))
        gamma = torch.where(gamma == 0, 1.0, gamma)
        assert record["elements"] == taus[0].numel()
        assert record["kept"] == [int((x != 0).sum()) for x in kept]
        assert record["sign_conflicts"] == [int((u * gamma < 0).sum()) for u in weighted]
        assert record["none_kept"] == int((~torch.stack([u * gamma > 0 for u in weighted]).any(0)).sum())
        _gram_close(record, taus)
        _merged_close(record, outputs[name], base[name])
    assert "pos.ids" not in records  # copied, not merged


def test_task_arithmetic_diagnostics_count_the_non_zero_task_vectors(models, tmp_path):
    out = tmp_path / "ta"
    records = _records(_config(models, "task_arithmetic", out, parameters={"lambda": 0.7}))
    outputs, base = read_output(out), models[3]
    for name, taus in _taus(models).items():
        record = records[name]
        assert record["kept"] == [int((tau != 0).sum()) for tau in taus]
        assert record["sign_conflicts"] is None
        assert record["none_kept"] == int((torch.stack(taus) == 0).all(0).sum())
        _gram_close(record, taus)
        _merged_close(record, outputs[name], base[name])


def test_slerp_records_the_angle(models, tmp_path):
    _, base_dir, experts, base, expert_tensors = models
    config = {"merge_method": "slerp", "base_model": str(base_dir), "models": [{"model": str(experts[0])}],
              "parameters": {"t": 0.3}, "output": str(tmp_path / "slerp")}
    records = _records(config)
    for name, b in base.items():
        if b.is_floating_point():
            x, y = b.double().reshape(-1), expert_tensors[0][name].double().reshape(-1)
            cos = float(x @ y) / math.sqrt(float(x @ x) * float(y @ y))
            assert records[name]["slerp_angle"] == pytest.approx(math.acos(min(1.0, cos)), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("method,extra", [
    ("ties", {}), ("ties", {"parameters": {"sign_method": "count", "zero_sign": "majority"}}),
    ("task_arithmetic", {}), ("dare_ties", {"parameters": {"random_seed": 3}}), ("dare_linear", {}),
    ("breadcrumbs_ties", {}), ("della", {"parameters": {"random_seed": 1}}), ("della_linear", {}),
])
def test_diagnostics_are_the_same_for_one_shard_and_for_row_chunked_shards(models, tmp_path, method, extra):
    """And so are the output bytes (bf16 inputs: ties at the trims' cuts, which breadcrumbs once
    cut by absolute instead of in-chunk index)."""
    whole = _records(_config(models, method, tmp_path / "whole", **extra))
    chunked = _records(_config(models, method, tmp_path / "chunked", **extra, **CHUNKED))
    plan = build_plan(load_config(_config(models, method, tmp_path / "plan", **extra, **CHUNKED)))
    assert any(t.chunk_rows < t.shape[0] for t in plan.tensors if t.action == "merge")  # really row-chunked
    assert whole == chunked
    outputs = [{k: v.view(torch.uint8) for k, v in read_output(tmp_path / label).items()}
               for label in ("whole", "chunked")]
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])  # bf16 ties at the cuts included
    for record in whole.values():
        assert all(0 <= k <= record["elements"] for k in record["kept"])
        assert all(c <= k for c, k in zip(record["sign_conflicts"] or [], record["kept"]))


def _table(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in pq.read_table(io.BytesIO((out / "manifest.parquet").read_bytes())).to_pylist()}


def test_the_manifest_holds_the_diagnostics_of_a_global_trim(models, tmp_path):
    """A global-scope TIES run on Ray: the kept counts follow the model-wide thresholds, the
    parquet columns carry every record, manifest.json sums them; diagnostics: false leaves them out."""
    start_embedded_ray()
    out = tmp_path / "global"
    manifest = run_merge(load_config(_config(models, "ties", out, parameters={"trim_scope": "global"}, **CHUNKED)),
                         progress=False)
    thresholds = [e["threshold"] for e in manifest.extra["global_trim"]["experts"]]
    table, summary = _table(out), manifest.extra["diagnostics"]
    taus = _taus(models)
    for name, tau in taus.items():
        row = table[name]
        assert row["kept"] == [int(((t.abs() >= thr) & (t != 0)).sum()) for t, thr in zip(tau, thresholds)]
        assert row["tau_norm"] == pytest.approx([float(t.norm()) for t in tau], rel=1e-6)
        assert row["tau_dot"] == pytest.approx([float(tau[a] @ tau[b]) for a, b in gram_pairs(3) if a < b],
                                               rel=1e-5, abs=1e-6)
    assert table["pos.ids"]["kept"] is None and table["pos.ids"]["method"] == "copy"
    assert summary["kept"] == [sum(table[n]["kept"][t] for n in taus) for t in range(3)]
    assert summary["elements"] == sum(t[0].numel() for t in taus.values())
    assert summary["sign_conflicts"] == [sum(table[n]["sign_conflicts"][t] for n in taus) for t in range(3)]
    assert summary["tau_norm"] == pytest.approx([math.sqrt(sum(table[n]["tau_norm"][t] ** 2 for n in taus))
                                                 for t in range(3)])
    assert summary["cosine"][0][0] == pytest.approx(1.0)
    assert summary["experts"] == [str(e) for e in models[2]]

    off = tmp_path / "off"
    manifest = run_merge(load_config(_config(models, "ties", off, diagnostics=False)), progress=False)
    assert "diagnostics" not in manifest.extra
    assert all(r["kept"] is None for r in _table(off).values())


def test_row_sums_are_exact_whatever_the_order():
    """Every row's sums are exact on their grid: permuting a row's elements changes no bit, and
    they match float64 to the grid's precision (2^-38 of the largest product a row can hold)."""
    from workers.kernels.diagnostics import grid_bits, row_gram

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4099, generator=g)
    experts = base + torch.randn(3, 6, 4099, generator=g) * torch.logspace(-8, 0, 4099)
    out = base + torch.randn(6, 4099, generator=g) * 0.01
    h = grid_bits(4099)
    sums = row_gram(base, experts, out, h)
    order = torch.randperm(4099, generator=g)
    assert torch.equal(sums, row_gram(base[:, order], experts[:, :, order], out[:, order], h))
    taus = [(e - base).double() for e in experts] + [(out - base).double()]
    expected = torch.stack([(taus[a] * taus[b]).sum(-1) for a, b in gram_pairs(3) + [(3, 3)]], -1)
    bound = torch.stack([t.abs().amax(-1) for t in taus], -1)
    scale = torch.stack([bound[:, a] * bound[:, b] for a, b in gram_pairs(3) + [(3, 3)]], -1)
    assert ((sums - expected).abs() <= 4099 * 2.0 ** -37 * scale).all()
