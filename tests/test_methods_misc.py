"""model_stock, nearswap, passthrough, arcee_fusion, sce, ram, ramplus_tl (mergekit 0.1.5):
plain float64 references written from mergekit's definitions, end-to-end runs against them, the
same bytes for any shard count or row chunking, mergekit's refusals, and the exact whole-tensor
kernels they rest on (fixed-tree sums, float64 order statistics). docs/algorithms.md §10."""

from __future__ import annotations

import math
import random

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CONFIG, make_models, read_output

from pipeline.config import ConfigError, load_config, resolve_method
from pipeline.coordinator import run_merge
from pipeline.planner import build_plan
from pipeline.samples import write_model
from workers.kernels.order64 import TopCut, kth_smallest, sortable_keys, top_n_rule
from workers.kernels.tree_sum import TreeSum, pairwise_sum

F64 = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}  # float32 rounding of values of magnitude ~1-4

# --- float64 references, from mergekit 0.1.5's definitions ------------------------------------------


def ref_model_stock(base, experts, filter_wise=False):
    w0, ws = base.to(F64), [x.to(F64) for x in experts]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = a.norm(dim=-1) * b.norm(dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), n * cos / torch.where(den.abs() < 1e-6, 1.0, den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def ref_nearswap(base, other, t):
    a, b = base.to(F64), other.to(F64)
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def ref_arcee_fusion(base, other):
    b, x = base.to(F64), other.to(F64)
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(b, dim=-1) + 1e-8
    importance = (x - b).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel()
    q1, med, q3 = (ordered[math.floor(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return torch.where(importance >= med + 1.5 * (q3 - q1), x, b)


def ref_sce(base, experts, select_topk=1.0):
    b = base.to(F64)
    tv = torch.stack([x.to(F64) - b for x in experts])
    if select_topk < 1:
        var = torch.var(tv, dim=0, unbiased=False).reshape(-1)
        k = int(torch.tensor(int(torch.count_nonzero(var))) * select_topk) if select_topk > 0 else 0
        order = sorted(range(var.numel()), key=lambda i: (-float(var[i]), i))[:k]  # ties: lowest index
        mask = torch.zeros(var.numel(), dtype=F64)
        mask[order] = 1
        tv = tv * mask.reshape(b.shape)
    majority = torch.where(tv.sum(dim=0) >= 0, 1.0, -1.0).to(F64)
    keep = (tv.sign() == majority).to(F64)
    w = tv.square().reshape(len(experts), -1).mean(dim=1)
    w = torch.full_like(w, 1 / len(experts)) if abs(float(w.sum())) < 1e-6 else w / w.sum()
    e = w.reshape(-1, *([1] * b.dim())) * keep
    return b + (tv * e).sum(dim=0) / e.sum(dim=0).clamp(min=1e-6)


def ref_ram(base, experts, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    b = base.to(F64)
    tv = torch.stack([x.to(F64) - b for x in experts]).reshape(len(experts), -1)
    active = tv.abs() > epsilon
    count = active.sum(dim=0, keepdim=True)
    unique, overlap = count == 1, count > 1
    scale = torch.ones(len(experts), 1, dtype=F64)
    if plus:
        shared_n, unique_n = (active & overlap).sum(dim=1), (active & unique).sum(dim=1)
        rho = shared_n / unique_n.clamp(min=epsilon)
        scale = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1).to(F64)
    tz = tv * active
    merged = (tz * unique * scale + tz * overlap / count.clamp(min=1)).sum(dim=0)
    return b + merged.reshape(b.shape)


# --- running -----------------------------------------------------------------------------------------

SHAPES = {"a.weight": (16, 12), "b.weight": (33, 7), "c.bias": (12,), "d.weight": (5, 5, 3), "e.norm": (200,),
          "f.scalar": ()}


def _config(out, method, experts, base=None, parameters=None, **extra):
    cfg = {"merge_method": method, "models": [{"model": str(e)} for e in experts], "output": str(out),
           "dtype": "float32", **extra}
    if base is not None:
        cfg["base_model"] = str(base)
    if parameters:
        cfg["parameters"] = parameters
    return load_config(cfg)


def _run(out, *args, **kwargs):
    run_merge(_config(out, *args, **kwargs), progress=False)
    return read_output(out)


def _hashes(out):
    return {r["name"]: r["sha256"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}


CASES = {  # method, number of experts, parameters, reference(base, experts)
    "model_stock": ("model_stock", 3, {}, lambda b, xs: ref_model_stock(b, xs)),
    "model_stock_filter_wise": ("model_stock", 3, {"filter_wise": True},
                                lambda b, xs: ref_model_stock(b, xs, filter_wise=True)),
    "nearswap": ("nearswap", 1, {"t": 0.05}, lambda b, xs: ref_nearswap(b, xs[0], 0.05)),
    "arcee_fusion": ("arcee_fusion", 1, {}, lambda b, xs: ref_arcee_fusion(b, xs[0])),
    "sce": ("sce", 3, {}, lambda b, xs: ref_sce(b, xs)),
    "sce_topk": ("sce", 3, {"select_topk": 0.3}, lambda b, xs: ref_sce(b, xs, 0.3)),
    "ram": ("ram", 3, {"epsilon": 0.08}, lambda b, xs: ref_ram(b, xs, 0.08)),
    "ramplus_tl": ("ramplus_tl", 3, {"epsilon": 0.08, "r": 0.5, "alpha": 0.9},
                   lambda b, xs: ref_ram(b, xs, 0.08, plus=True, r=0.5, alpha=0.9)),
    "ramplus_tl_defaults": ("ramplus_tl", 3, {}, lambda b, xs: ref_ram(b, xs, plus=True)),
    "ramplus_tl_negative_alpha": ("ramplus_tl", 2, {"epsilon": 0.05, "r": 2.0, "alpha": -1.0},
                                  lambda b, xs: ref_ram(b, xs, 0.05, plus=True, r=2.0, alpha=-1.0)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("misc_in")
    return make_models(root, 3, shapes=SHAPES, seed=11)


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(tmp_path, models, case):
    method, n, parameters, reference = CASES[case]
    base_dir, expert_dirs, base, experts = models
    merged = _run(tmp_path / "out", method, expert_dirs[:n], base_dir, parameters)
    exact = method == "arcee_fusion"  # a selection: every element is θ₀ or θ₁ exactly
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(merged[name], b), name
            continue
        expected = reference(b, [e[name] for e in experts[:n]]).float()
        assert merged[name].dtype == torch.float32 and merged[name].shape == b.shape, name
        if exact:
            assert torch.equal(merged[name], expected), name
        else:
            torch.testing.assert_close(merged[name], expected, **TOL, msg=f"{case} {name}")


@pytest.mark.usefixtures("ray_local")
def test_passthrough_copies_and_scales(tmp_path, models):
    _, expert_dirs, _, experts = models
    merged = _run(tmp_path / "plain", "passthrough", expert_dirs[1:2])
    for name, x in experts[1].items():
        assert torch.equal(merged[name], x), name  # float32 to float32: the very bytes
    cfg = {"merge_method": "passthrough", "output": str(tmp_path / "scaled"), "dtype": "float32",
           "base_model": str(expert_dirs[1]), "parameters": {"scale": 5.0},
           "models": [{"model": str(expert_dirs[1]), "parameters": {"scale": 0.3}}]}  # a model's scale wins
    run_merge(load_config(cfg), progress=False)
    scaled = read_output(tmp_path / "scaled")
    for name, x in experts[1].items():
        expected = (x.to(F64) * 0.3).float() if x.is_floating_point() else x  # integer buffers copied unscaled
        torch.testing.assert_close(scaled[name], expected, rtol=1.2e-7, atol=0, msg=name)


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("case", ["model_stock", "model_stock_filter_wise", "nearswap", "arcee_fusion", "sce_topk",
                                  "ramplus_tl", "passthrough"])
def test_same_bytes_for_any_sharding_and_chunking(tmp_path, models, case):
    method, n, parameters, _ = CASES.get(case, ("passthrough", 1, {"scale": 0.7}, None))
    base_dir, expert_dirs, *_ = models
    base = None if method == "passthrough" else base_dir
    runs = {}
    for label, extra in {"one": {"shards": 1}, "many": {"shards": 4},
                         "chunked": {"shards": 2, "memory_budget": 3000, "process_reserve": 0}}.items():
        config = _config(tmp_path / label, method, expert_dirs[:n], base, parameters, **extra)
        if label == "chunked":  # the budget really cuts the tensors into row chunks, the 1-D one too
            chunked = {name for s in build_plan(config, output_url=str(tmp_path / "plan")).summary()["shards"]
                       for name in s["chunked"]}
            assert {"a.weight", "b.weight", "e.norm"} <= chunked, chunked
        run_merge(config, progress=False)
        runs[label] = _hashes(tmp_path / label)
    assert runs["one"] == runs["many"] == runs["chunked"]


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("method,n,parameters", [("model_stock", 2, {}), ("sce", 3, {"select_topk": 0.5}),
                                                 ("arcee_fusion", 1, {})])
def test_bfloat16_chunking_invariant(tmp_path, method, n, parameters):
    base_dir, expert_dirs, *_ = make_models(tmp_path / "in", n, dtype=torch.bfloat16, shapes=SHAPES, seed=4)
    runs = []
    for label, extra in {"one": {"shards": 1}, "chunked": {"memory_budget": 3000, "process_reserve": 0}}.items():
        run_merge(_config(tmp_path / label, method, expert_dirs, base_dir, parameters, dtype="bfloat16", **extra),
                  progress=False)
        runs.append(_hashes(tmp_path / label))
    assert runs[0] == runs[1]


# --- edge cases mergekit handles ---------------------------------------------------------------------

def _write(root, tensors_per_model):
    """Models from explicit tensors (float32); returns their directories."""
    return [write_model(root / f"m{i}", dict(t), TINY_CONFIG) for i, t in enumerate(tensors_per_model)]


@pytest.mark.usefixtures("ray_local")
def test_model_stock_edges(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"opposed": torch.randn(6, 4, generator=g), "tiny": torch.randn(6, 4, generator=g),
            "vec": torch.randn(50, generator=g), "mixed": torch.randn(3, 5, generator=g)}
    d = torch.randn(6, 4, generator=g)
    e1 = {"opposed": base["opposed"] + d, "tiny": base["tiny"] + 1e-5 * d,
          "vec": base["vec"] + 0.1 * torch.randn(50, generator=g), "mixed": base["mixed"].clone()}
    e2 = {"opposed": base["opposed"] - d, "tiny": base["tiny"] + 2e-5 * d,
          "vec": base["vec"] + 0.1 * torch.randn(50, generator=g),
          "mixed": base["mixed"] + torch.randn(3, 5, generator=g)}
    e2["mixed"][1] = base["mixed"][1]  # a row where both experts equal the base
    dirs = _write(tmp_path, [base, e1, e2])
    for filter_wise in (False, True):
        merged = _run(tmp_path / f"out{filter_wise}", "model_stock", dirs[1:], dirs[0], {"filter_wise": filter_wise},
                      memory_budget=2000, process_reserve=0)
        for name in base:
            expected = ref_model_stock(base[name], [e1[name], e2[name]], filter_wise).float()
            torch.testing.assert_close(merged[name], expected, **TOL, msg=f"{name} filter_wise={filter_wise}")
        # τ₂ = −τ₁: cos −1, 1 + (N−1)·cos = 0: the base is kept
        assert torch.equal(merged["opposed"], base["opposed"])
    # ‖τ₁‖‖τ₂‖ < 1e-6: the floor shrinks cos (to ~0.003), so t ≈ 0.006 although the τ are parallel (t = 1)
    tiny = ref_model_stock(base["tiny"], [e1["tiny"], e2["tiny"]])
    step = 1.5e-5 * d.double().reshape(-1)
    t = float((tiny - base["tiny"].double()).reshape(-1) @ step / step.square().sum())
    assert 0 < t < 0.02


@pytest.mark.usefixtures("ray_local")
def test_model_stock_t_far_above_one(tmp_path):
    """The norm floor shrinks only the cosine of the two small τ: the mean falls below −1/(N−1),
    1 + (N−1)·cos < 0 and t ≈ 9 (nothing clamps t)."""
    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]])},
               {"w": torch.tensor([[-0.9e-4, 0.43589e-4], [0.0, 0.0]])},
               {"w": torch.tensor([[-0.9e-4, -0.43589e-4], [0.0, 0.0]])}]
    dirs = _write(tmp_path, [base, *experts])
    merged = _run(tmp_path / "out", "model_stock", dirs[1:], dirs[0])["w"]
    expected = ref_model_stock(base["w"], [e["w"] for e in experts])
    torch.testing.assert_close(merged, expected.float(), **TOL)
    average = sum(e["w"].double() for e in experts) / 3
    assert 9 < float((expected * average).sum() / average.square().sum()) < 9.3


@pytest.mark.usefixtures("ray_local")
def test_nearswap_edges(tmp_path, models):
    base_dir, expert_dirs, base, experts = models
    for t, expect in ((0.0, "base"), (-1.0, "base"), (1e6, "other")):
        merged = _run(tmp_path / f"t{t}", "nearswap", expert_dirs[:1], base_dir, {"t": t})
        for name, b in base.items():
            if b.is_floating_point():
                assert torch.equal(merged[name], b if expect == "base" else experts[0][name]), (t, name)
    # in exact arithmetic nearswap is a clip: θ₀ + clamp(θ₁ − θ₀, −t, t)
    merged = _run(tmp_path / "clip", "nearswap", expert_dirs[:1], base_dir, {"t": 0.05})
    for name, b in base.items():
        if b.is_floating_point():
            clip = b.double() + (experts[0][name].double() - b.double()).clamp(-0.05, 0.05)
            torch.testing.assert_close(merged[name], clip.float(), **TOL)


@pytest.mark.usefixtures("ray_local")
def test_arcee_fusion_edges(tmp_path):
    g = torch.Generator().manual_seed(5)
    base = {"one": torch.tensor([0.5]), "flat": torch.randn(40, 8, generator=g), "vec": torch.randn(301, generator=g)}
    other = {"one": torch.tensor([2.0]), "flat": base["flat"].clone(),
             "vec": base["vec"] + 0.1 * torch.randn(301, generator=g)}
    other["flat"][3, :5] += 0.5  # most importance values 0: the quartiles and the threshold are 0
    dirs = _write(tmp_path, [base, other])
    merged = _run(tmp_path / "out", "arcee_fusion", dirs[1:], dirs[0], memory_budget=1500, process_reserve=0)
    for name in base:
        assert torch.equal(merged[name], ref_arcee_fusion(base[name], other[name]).float()), name
    assert torch.equal(merged["one"], other["one"])  # one element: KL 0, threshold 0, I ≥ 0 takes θ₁
    assert torch.equal(merged["flat"], other["flat"])  # threshold 0: every element qualifies
    taken = merged["vec"] == other["vec"]
    assert 0 < int(taken.sum()) < 301


@pytest.mark.usefixtures("ray_local")
def test_sce_edges(tmp_path):
    # variance ties at the cut: |τ| takes few values, so many elements share one σ²
    base = {"w": torch.zeros(8, 10), "tiny": torch.zeros(4, 4)}
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0])
    e1 = {"w": levels[torch.arange(80) % 4].reshape(8, 10), "tiny": torch.full((4, 4), 1e-4)}
    e2 = {"w": -e1["w"] * torch.where(torch.arange(80).reshape(8, 10) % 3 == 0, 1.0, 0.5),
          "tiny": torch.full((4, 4), -2e-4)}
    e3 = {"w": e1["w"] * 0.75, "tiny": torch.full((4, 4), 3e-4)}
    dirs = _write(tmp_path, [base, e1, e2, e3])
    for topk in (0.37, 0.5, 0.0, 1.0):
        merged = _run(tmp_path / f"k{topk}", "sce", dirs[1:], dirs[0], {"select_topk": topk},
                      memory_budget=2500, process_reserve=0)
        for name in base:
            expected = ref_sce(base[name], [e1[name], e2[name], e3[name]], topk).float()
            torch.testing.assert_close(merged[name], expected, **TOL, msg=f"{name} select_topk={topk}")
        if topk == 0.0:
            assert torch.equal(merged["w"], base["w"])
    # one expert and select_topk < 1: σ² is 0 everywhere, k = 0, the base comes out
    merged = _run(tmp_path / "single", "sce", dirs[1:2], dirs[0], {"select_topk": 0.9})
    assert torch.equal(merged["w"], base["w"])


@pytest.mark.usefixtures("ray_local")
def test_ramplus_without_unique_changes(tmp_path):
    base = {"w": torch.zeros(4, 6)}
    e1 = {"w": torch.linspace(-1, 1, 24).reshape(4, 6)}
    e2 = {"w": e1["w"] * 0.5}  # every element changed by both experts: no unique counts
    e2["w"][0, 0] = 0.0
    dirs = _write(tmp_path, [base, e1, e2])
    for method, plus in (("ram", False), ("ramplus_tl", True)):
        merged = _run(tmp_path / method, method, dirs[1:], dirs[0])
        expected = ref_ram(base["w"], [e1["w"], e2["w"]], plus=plus).float()
        torch.testing.assert_close(merged["w"], expected, **TOL)


# --- config --------------------------------------------------------------------------------------

def _cfg(method, models=("a", "b", "c"), base="base", **extra):
    cfg = {"merge_method": method, "models": [{"model": m} for m in models], **extra}
    if base:
        cfg["base_model"] = base
    return cfg


def test_defaults_resolved():
    assert resolve_method(load_config(_cfg("model_stock"))).filter_wise is False
    assert resolve_method(load_config(_cfg("sce"))).select_topk == 1.0
    ram = resolve_method(load_config(_cfg("ram")))
    assert (ram.epsilon, ram.r, ram.alpha) == (1e-5, None, None)
    plus = resolve_method(load_config(_cfg("ramplus_tl")))
    assert (plus.epsilon, plus.r, plus.alpha) == (1e-5, 0.1, 0.2)
    assert resolve_method(load_config(_cfg("nearswap", ["a"], parameters={"t": 0.001}))).t == 0.001
    assert resolve_method(load_config(_cfg("passthrough", ["a"], base=None))).scale is None
    # a base listed under models: is the base (mergekit counts it once), not one more expert
    stock = resolve_method(load_config(_cfg("model_stock", ["base", "a", "b"])))
    assert stock.n_experts == 2
    assert resolve_method(load_config(_cfg("nearswap", ["base", "a"], parameters={"t": 0.1}))).t == 0.1
    assert resolve_method(load_config(_cfg("arcee_fusion", ["a", "base"]))).uses_base


@pytest.mark.parametrize("cfg,words", [
    (_cfg("model_stock", ["a"]), ["at least 2 models besides base_model", "3 inputs"]),
    (_cfg("model_stock", ["base", "a"]), ["at least 2 models besides base_model"]),
    (_cfg("model_stock", base=None), ["needs base_model"]),
    (_cfg("model_stock", ["a", "b", "a"]), ["models.2", "already models.0", "duplicate"]),
    (_cfg("model_stock", models=["a", "b"], parameters={"weight": 1.0}), ["parameters.weight"]),
    ({**_cfg("model_stock"), "models": [{"model": "a", "parameters": {"filter_wise": True}}, {"model": "b"}]},
     ["filter_wise is a top-level parameter", "move filter_wise there"]),
    (_cfg("nearswap", ["a"]), ["nearswap needs parameters.t"]),
    (_cfg("nearswap", ["a"], parameters={"t": float("nan")}), ["parameters.t is NaN"]),
    (_cfg("nearswap", ["a", "b"], parameters={"t": 0.1}), ["exactly one model", "exactly 2 inputs"]),
    ({**_cfg("nearswap", parameters={"t": 1.0}), "models": [{"model": "a", "parameters": {"t": 0.1}}]},
     ["t is a top-level parameter of nearswap"]),
    (_cfg("arcee_fusion", ["a", "b"]), ["exactly one model", "exactly 2 inputs"]),
    (_cfg("arcee_fusion", ["base"]), ["lists only the base model"]),
    (_cfg("arcee_fusion", ["a"], parameters={"t": 0.1}), ["parameters.t", "nearswap"]),
    (_cfg("passthrough", ["a", "b"], base=None), ["exactly one model", "exactly 1 input"]),
    (_cfg("passthrough", ["a"]), ["passthrough takes no base model", "base_model 'base'"]),
    (_cfg("passthrough", ["a"], base=None, slices=[]), ["slices"]),
    ({**_cfg("sce"), "models": [{"model": "a", "parameters": {"select_topk": 0.5}}]},
     ["select_topk is a top-level parameter of sce"]),
    (_cfg("sce", base=None), ["needs base_model"]),
    ({**_cfg("ram"), "models": [{"model": "a", "parameters": {"epsilon": 0.5}}]},
     ["epsilon is a top-level parameter of ram"]),
    (_cfg("ram", parameters={"alpha": 0.5}), ["parameters.alpha", "ramplus_tl"]),
    (_cfg("ramplus_tl", parameters={"r": "x"}), ["parameters.r"]),
])
def test_refusals_name_the_key(cfg, words):
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.usefixtures("ray_local")
def test_filtered_parameters_apply_per_tensor(tmp_path, models):
    """mergekit's filters and gradients reach these methods tensor by tensor (pipeline/settings.py)."""
    base_dir, expert_dirs, base, experts = models
    merged = _run(tmp_path / "ns", "nearswap", expert_dirs[:1], base_dir,
                  {"t": [{"filter": "a.weight", "value": 1e6}, {"value": 0.0}]})
    cfg = {"merge_method": "passthrough", "output": str(tmp_path / "pt"), "dtype": "float32",
           "models": [{"model": str(expert_dirs[0]), "parameters": {"scale": [{"filter": "c.bias", "value": 0.0}]}}]}
    run_merge(load_config(cfg), progress=False)
    scaled = read_output(tmp_path / "pt")
    for name, b in base.items():
        if b.is_floating_point():
            assert torch.equal(merged[name], experts[0][name] if name == "a.weight" else b), name
            assert torch.equal(scaled[name], torch.zeros_like(b) if name == "c.bias" else experts[0][name]), name


def test_passthrough_accepts_its_own_model_as_base():
    options = resolve_method(load_config(_cfg("passthrough", ["a"], base="a", parameters={"scale": 2})))
    assert options.scale == 2.0 and not options.uses_base


# --- the exact kernels -------------------------------------------------------------------------------

def _cuts(n: int, rng: random.Random) -> list[tuple[int, int]]:
    points = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 6)))) if n > 1 else []
    edges = [0, *points, n]
    return list(zip(edges, edges[1:]))


def test_tree_sum_is_chunking_invariant():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 8, 13, 64, 100, 1000, 4097):
        x = torch.randn(3, n, generator=g, dtype=F64) * torch.logspace(-8, 8, n, dtype=F64)
        whole = pairwise_sum(x)
        for _ in range(5):
            tree = TreeSum()
            for a, b in _cuts(n, rng):
                tree.add(a, x[:, a:b])
            assert torch.equal(tree.total(), whole), n
        torch.testing.assert_close(whole, x.sum(dim=1), rtol=1e-12, atol=1e-12 * float(x.abs().sum()))
    with pytest.raises(ValueError):
        TreeSum().add(3, x[:, :2])


def test_kth_smallest_matches_sort():
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    pool = torch.tensor([0.0, -0.0, 1e-300, -1e-300, 5e-324, 1.5, -1.5, 2.0, 1e300, -1e300], dtype=F64)
    for n in (1, 2, 5, 50, 333):
        values = torch.where(torch.rand(n, generator=g) < 0.5, pool[torch.randint(len(pool), (n,), generator=g)],
                             torch.randn(n, generator=g, dtype=F64))  # negatives, ±0, subnormals, ties
        cuts = _cuts(n, rng)
        ks = sorted({1, n, (n + 1) // 2, rng.randint(1, n)})
        ranks = kth_smallest(lambda v=values, c=cuts: (v[a:b] for a, b in c), ks)
        ordered = values.sort().values
        keys = sortable_keys(values)
        for k, rank in zip(ks, ranks):
            assert rank.value == float(ordered[k - 1]), (n, k)
            assert rank.n_below < k <= rank.n_below + rank.n_equal
            assert (rank.n_below, rank.n_equal) == (int((keys < rank.key).sum()), int((keys == rank.key).sum()))
    assert torch.equal(sortable_keys(pool).argsort(), torch.tensor([9, 6, 3, 1, 0, 4, 2, 5, 7, 8]))


def test_top_n_keeps_exactly_n_ties_by_lowest_index():
    rng = random.Random(2)
    g = torch.Generator().manual_seed(2)
    for n in (1, 9, 60, 257):
        values = torch.randint(0, 5, (n,), generator=g).to(F64) / 4  # many ties
        cuts = _cuts(n, rng)
        for n_keep in (0, 1, n // 3, n // 2, n - 1, n):
            rule = top_n_rule(lambda v=values, c=cuts: (v[a:b] for a, b in c), n, n_keep)
            cut = TopCut(rule)
            parts = [cut.keep(values[a:b]) for a, b in cuts]
            kept = torch.ones(n, dtype=torch.bool) if parts[0] is None else torch.cat(parts)
            order = sorted(range(n), key=lambda i: (-float(values[i]), i))[:n_keep]
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order] = True
            assert torch.equal(kept, expected), (n, n_keep)
