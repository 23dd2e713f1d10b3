"""Global-scope TIES equals the paper's official algorithm on the flattened model, for any shard count."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_models, read_output

from manifests.verify import verify_output
from pipeline.config import load_config
from pipeline.coordinator import run_merge
from pipeline.samples import write_model
from workers.kernels import selection
from workers.methods import ties_global

pytestmark = pytest.mark.usefixtures("ray_local")


def paper_ties(base: dict, experts: list[dict], names: list[str], density: float, lam: float,
               tied: dict | None = None, zero_sign: str = "majority") -> tuple[dict, list[float]]:
    """The official TIES code in float64: flatten, kthvalue, mask >=, mass sign with majority fallback,
    disjoint mean, λ. Tied copies are left out of the flat vector and take their primary's result."""
    tied = tied or {}
    flat_names = [n for n in names if n not in tied]
    flat = lambda m: torch.cat([m[n].double().reshape(-1) for n in flat_names])
    b = flat(base)
    taus = torch.stack([flat(e) - b for e in experts])
    d = taus.shape[1]
    k = d - int(d * density)
    thresholds = []
    if k > 0:
        for t in range(len(experts)):
            thr = taus[t].abs().float().kthvalue(k).values.double()  # the float32 value, compared in float64
            thresholds.append(float(thr))
            taus[t] = taus[t] * (taus[t].abs().float().double() >= thr)
    sign = torch.sign(taus.sum(0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = (majority if majority != 0 else 1) if zero_sign == "majority" else 1
    agree = (torch.sign(taus) == sign)
    merged = (taus * agree).sum(0) / agree.sum(0).clamp(min=1)
    out_flat = b + lam * merged
    out, pos = {}, 0
    for n in flat_names:
        size = base[n].numel()
        out[n] = out_flat[pos:pos + size].reshape(base[n].shape)
        pos += size
    for copy, primary in tied.items():
        out[copy] = out[primary]
    return out, thresholds


def _run(base_dir, expert_dirs, out, density, shards, **params):
    config = load_config({
        "merge_method": "ties", "base_model": str(base_dir), "output": str(out), "shards": shards, "dtype": "float32",
        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": density}} for e in expert_dirs],
        "parameters": {"trim_scope": "global", "lambda": 1.3, **params}, **({"memory_budget": 1500, "process_reserve": 0} if shards == 7 else {}),
    })
    return run_merge(config, progress=False)


@pytest.mark.parametrize("density, bracket", [(0.2, "sampled"), (1.0, "sampled"), (0.001, "sampled"), (0.2, "missed"),
                                              (0.2, "too many values")])
def test_global_matches_flattened_reference(tmp_path, monkeypatch, density, bracket):
    """Any shard count and chunking; the threshold from the sampled bracket, or (a bracket that
    misses, or a shard with more distinct values inside it than it tallies) from the two histogram
    passes, is the same float."""
    if bracket == "missed":  # [∞, ∞] holds no |τ|: every model falls back to the histograms
        monkeypatch.setattr(selection, "sample_quantile_bracket", lambda *args: (math.inf, math.inf))
    if bracket == "too many values":
        monkeypatch.setattr(ties_global, "TALLY_LIMIT", 1)
    base_dir, expert_dirs, base, experts = make_models(tmp_path / "in", n_experts=3, seed=7)
    names = [n for n, t in base.items() if t.is_floating_point()]
    expected, thresholds = paper_ties(base, experts, names, density, 1.3)
    outputs = {}
    for shards in (1, 2, 7):  # 7: many shards and a tiny memory budget, so tensors are row-chunked too
        out = tmp_path / f"out{shards}"
        manifest = _run(base_dir, expert_dirs, out, density, shards)
        record = manifest.extra["global_trim"]
        assert [e["threshold"] for e in record["experts"]] == (thresholds or [0.0] * 3)
        # full reads: threshold pass(es), Σγ (majority), merge
        assert record["input_reads"] == (2 if density == 1.0 else 3 if bracket == "sampled" else 5)
        assert record["experts"][0]["d"] == sum(base[n].numel() for n in names)
        merged = read_output(out)
        for n in names:
            torch.testing.assert_close(merged[n].double(), expected[n], rtol=2e-6, atol=1e-6, msg=n)
        assert torch.equal(merged["pos.ids"], base["pos.ids"])
        outputs[shards] = {n: merged[n] for n in names}
        assert verify_output(str(out)) == []
    for n in names:
        assert torch.equal(outputs[1][n], outputs[2][n]) and torch.equal(outputs[1][n], outputs[7][n])


def test_threshold_among_ties(tmp_path):
    """k lands inside a run of equal |τ|: every value equal to the threshold is kept."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.zeros(40, 10), "v": torch.zeros(25)}
    experts = []
    for _ in range(2):
        e = {n: torch.full(t.shape, 0.5) * torch.sign(torch.randn(t.shape, generator=g)) for n, t in base.items()}
        e["w"][:3] = 2.0  # 30 big values, then 370 + 25 ties at 0.5
        experts.append(e)
    base_dir = write_model(tmp_path / "base", base, {})
    expert_dirs = [write_model(tmp_path / f"e{i}", e, {}) for i, e in enumerate(experts)]
    expected, thresholds = paper_ties(base, experts, ["w", "v"], 0.1, 1.3)
    assert thresholds == [0.5, 0.5]
    manifest = _run(base_dir, expert_dirs, tmp_path / "out", 0.1, 2)
    assert [e["kept"] for e in manifest.extra["global_trim"]["experts"]] == [425, 425]
    merged = read_output(tmp_path / "out")
    for n in base:
        torch.testing.assert_close(merged[n].double(), expected[n], rtol=0, atol=1e-7)


def test_tied_embedding_counted_once(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"model.embed_tokens.weight": torch.randn(30, 8, generator=g), "model.layer.weight": torch.randn(8, 8, generator=g)}
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    experts = []
    for _ in range(3):
        e = {n: t + torch.randn(t.shape, generator=g) * 0.1 for n, t in base.items()}
        e["lm_head.weight"] = e["model.embed_tokens.weight"].clone()
        experts.append(e)
    cfg = {"tie_word_embeddings": True}
    base_dir = write_model(tmp_path / "base", base, cfg)
    expert_dirs = [write_model(tmp_path / f"e{i}", e, cfg) for i, e in enumerate(experts)]
    names = sorted(base)
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    expected, thresholds = paper_ties(base, experts, names, 0.3, 1.3, tied=tied)
    manifest = _run(base_dir, expert_dirs, tmp_path / "out", 0.3, 2)
    assert manifest.extra["global_trim"]["experts"][0]["d"] == 30 * 8 + 8 * 8
    assert [e["threshold"] for e in manifest.extra["global_trim"]["experts"]] == thresholds
    merged = read_output(tmp_path / "out")
    for n in names:
        torch.testing.assert_close(merged[n].double(), expected[n], rtol=2e-6, atol=1e-6, msg=n)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["method"]["trim_scope"] == "global"
