"""Per-tensor TIES, task arithmetic and linear through the real shard path, against references from docs/algorithms.md.

Each test writes tiny safetensors checkpoints under a temporary directory, plans the merge with
``pipeline.planner.build_plan`` and runs every shard with ``workers.shard_task.run_shard`` (no Ray),
then reads the output with safetensors.

Two references, both written from docs/algorithms.md and not from the implementation:

* ``merge_reference(..., torch.float64)``: the plain float64 rules. For the comparison to be exact up
  to the final roundings, the float64 tests use "grid" inputs: base values k/64 and task vectors j/256
  with small integers and dyadic weights, so τ, w·τ and every vote sum are exact in float32 too and
  the trim and the elected signs cannot depend on the precision; only the final divide, λ· and θ₀+
  round, which bounds |float32 − float64| by a few float32 ulps of |θ₀| + |λ·τ_m|.
* ``merge_reference(..., torch.float32)``: the same rules evaluated in float32 with the summation
  order docs/algorithms.md writes (experts in config order, left to right, starting from 0). With that order
  every operation is the same IEEE float32 operation the pipeline must do, so outputs must be
  bit-identical (checked with ``torch.equal`` on arbitrary Gaussian inputs).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import merge_reference, run_pipeline
from pipeline.samples import write_model

TINY_CONFIG = {"model_type": "llama", "hidden_size": 8}
SHAPES = {"a.weight": (16, 12), "b.weight": (33, 7), "c.bias": (12,), "d.weight": (5, 5, 3)}


# ---- inputs ----------------------------------------------------------------------------------

def gaussian_models(n_experts: int, seed: int, shapes=SHAPES, dtype=torch.float32, sparsity: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    experts = []
    for _ in range(n_experts):
        e = {}
        for n, t in base.items():
            delta = torch.randn(t.shape, generator=g) * 0.1
            delta *= torch.rand(t.shape, generator=g) >= sparsity
            e[n] = (t.float() + delta).to(dtype)
        experts.append(e)
    return base, experts


def grid_models(n_experts: int, seed: int, shapes=SHAPES, levels: int = 12):
    """Base k/64, τ = j/256 with |j| <= levels: exact in float32, with many equal magnitudes."""
    rng = np.random.default_rng(seed)
    base = {n: torch.from_numpy((rng.integers(-256, 257, size=s) / 64).astype(np.float32)) for n, s in shapes.items()}
    experts = [{n: t + torch.from_numpy((rng.integers(-levels, levels + 1, size=t.shape) / 256).astype(np.float32))
                for n, t in base.items()} for _ in range(n_experts)]
    return base, experts


# ---- running the pipeline --------------------------------------------------------------------

def write_inputs(root: Path, base: dict | None, experts: list[dict]) -> tuple[str | None, list[str]]:
    base_dir = str(write_model(root / "base", base, TINY_CONFIG)) if base is not None else None
    return base_dir, [str(write_model(root / f"e{i}", e, TINY_CONFIG)) for i, e in enumerate(experts)]


def make_config(method: str, base_dir, expert_dirs, out, *, weights=None, densities=None, parameters=None, **extra):
    models = []
    for i, e in enumerate(expert_dirs):
        p = {}
        if weights is not None:
            p["weight"] = weights[i]
        if densities is not None:
            p["density"] = densities[i]
        models.append({"model": e, "parameters": p})
    config = {"merge_method": method, "models": models, "output": str(out), "parameters": dict(parameters or {})}
    if base_dir is not None and method != "linear":
        config["base_model"] = base_dir
    config.update(extra)
    return config


def f32_ulp_bound(*magnitudes: torch.Tensor, ulps: float = 4.0) -> torch.Tensor:
    eps = torch.finfo(torch.float32).eps
    return ulps * eps * sum(m.abs() for m in magnitudes) + 1e-30


def delta_scale(base: torch.Tensor, models: list[torch.Tensor], weights, lam: float) -> torch.Tensor:
    """|λ|·Σ|w_t τ_t| / min|w|: an upper bound of every partial sum the merged delta goes through."""
    total = sum(abs(w) * (m.double() - base.double()).abs() for m, w in zip(models, weights))
    return abs(lam) * total / min(abs(w) for w in weights if w) if any(weights) else total


def assert_close_to_f64(got: torch.Tensor, ref64: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, name: str):
    """|float32 output − float64 reference| within a few float32 roundings of |θ₀| + ``scale``."""
    diff = (got.double() - ref64).abs()
    bound = f32_ulp_bound(base.double(), scale)
    assert (diff <= bound).all(), f"{name}: max error {float(diff.max())}"


# ---- TIES -------------------------------------------------------------------------------------

TIES_CASES = [
    # weights, densities, lambda, normalize, sign_method, zero_sign
    ((1.0, 0.5, 2.0), (0.5, 0.3, 0.8), 1.0, None, "sum", "positive"),
    ((1.0, 1.0, 1.0), (0.2, 0.2, 0.2), 0.75, True, "count", "positive"),
    ((0.5, 1.5, 1.0, 0.25), (0.1, 1.0, 0.45, 0.7), 1.7, False, "sum", "majority"),
    ((2.0, 0.75), (0.9, 0.35), 0.3, True, "count", "majority"),
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 1.0, True, "sum", "positive"),  # density 1.0: nothing trimmed
]


def _ties_params(lam, normalize, sign_method, zero_sign):
    params = {"lambda": lam, "sign_method": sign_method, "zero_sign": zero_sign}
    if normalize is not None:
        params["normalize"] = normalize
    return params


@pytest.mark.parametrize("weights, densities, lam, normalize, sign_method, zero_sign", TIES_CASES)
def test_ties_float32_bit_exact_and_close_to_float64(tmp_path, weights, densities, lam, normalize, sign_method, zero_sign):
    opts = dict(weights=weights, densities=densities, lam=lam, normalize=normalize, sign_method=sign_method,
                zero_sign=zero_sign)
    # arbitrary float32 inputs: bit-identical to the float32 evaluation of the rules
    base, experts = gaussian_models(len(weights), seed=len(weights) + int(lam * 10), sparsity=0.3)
    base_dir, expert_dirs = write_inputs(tmp_path / "g", base, experts)
    cfg = make_config("ties", base_dir, expert_dirs, tmp_path / "g_out", weights=weights, densities=densities,
                      parameters=_ties_params(lam, normalize, sign_method, zero_sign), dtype="float32")
    merged, _ = run_pipeline(cfg)
    for name, b in base.items():
        expected = merge_reference("ties", b, [e[name] for e in experts], dtype=torch.float32, **opts)
        assert merged[name].dtype == torch.float32
        assert torch.equal(merged[name], expected), name
    # grid inputs: within float32 rounding of the float64 rules
    base, experts = grid_models(len(weights), seed=7 * len(weights))
    base_dir, expert_dirs = write_inputs(tmp_path / "q", base, experts)
    cfg = make_config("ties", base_dir, expert_dirs, tmp_path / "q_out", weights=weights, densities=densities,
                      parameters=_ties_params(lam, normalize, sign_method, zero_sign), dtype="float32")
    merged, _ = run_pipeline(cfg)
    _assert_ties_matches_references(merged, base, experts, opts)


def _assert_ties_matches_references(merged, base, experts, opts):
    """Grid inputs: bytes equal to the float32 rules, and within float32 rounding of the float64 ones."""
    for name, b in base.items():
        xs = [e[name] for e in experts]
        assert torch.equal(merged[name], merge_reference("ties", b, xs, dtype=torch.float32, **opts)), name
        assert_close_to_f64(merged[name], merge_reference("ties", b, xs, **opts), b,
                            delta_scale(b, xs, opts["weights"], opts["lam"]), name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_experts=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    data=st.data(),
    lam=st.sampled_from([1.0, 0.5, 0.3, 1.25, 2.5]),
    normalize=st.sampled_from([None, True, False]),
    sign_method=st.sampled_from(["sum", "count"]),
    zero_sign=st.sampled_from(["positive", "majority"]),
    levels=st.sampled_from([1, 3, 40]),
)
def test_ties_property(n_experts, seed, data, lam, normalize, sign_method, zero_sign, levels):
    weights = data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0]), min_size=n_experts, max_size=n_experts))
    densities = data.draw(st.lists(st.floats(0.01, 1.0), min_size=n_experts, max_size=n_experts))
    opts = dict(weights=weights, densities=densities, lam=lam, normalize=normalize, sign_method=sign_method,
                zero_sign=zero_sign)
    base, experts = grid_models(n_experts, seed, levels=levels)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_dir, expert_dirs = write_inputs(root, base, experts)
        cfg = make_config("ties", base_dir, expert_dirs, root / "out", weights=weights, densities=densities,
                          parameters=_ties_params(lam, normalize, sign_method, zero_sign), dtype="float32")
        merged, _ = run_pipeline(cfg)
    _assert_ties_matches_references(merged, base, experts, opts)


@pytest.mark.parametrize("budget", [10**9, 300])
def test_ties_tie_break_at_threshold(tmp_path, budget):
    """Many |τ| equal to the threshold: exactly int(density·numel) kept, lowest flat indices first,
    also when the tensor is read one row at a time (budget 300: the quota spans chunks)."""
    shape = (6, 5)
    base = {"w": torch.zeros(shape)}
    tau = torch.full(shape, 0.25)
    tau[::2] *= -1  # equal magnitudes, both signs
    tau[1, 3] = 1.0
    tau[4, 0] = -2.0
    expert = {"w": base["w"] + tau}
    base_dir, expert_dirs = write_inputs(tmp_path, base, [expert])
    # n_keep = int(0.3 * 30) = 9: the two large values and the first 7 tied ones in flat order
    merged, plan = run_pipeline(make_config("ties", base_dir, expert_dirs, tmp_path / "out", densities=[0.3],
                                            dtype="float32", memory_budget=budget, process_reserve=0))
    assert (plan.tensors[0].chunk_rows == 1) == (budget == 300)
    expected = torch.zeros(30)
    flat = tau.reshape(-1)
    expected[[8, 20]] = flat[[8, 20]]
    tied = [i for i in range(30) if i not in (8, 20)][:7]
    expected[tied] = flat[tied]
    assert torch.equal(merged["w"].reshape(-1), expected)
    assert int((merged["w"] != 0).sum()) == 9


@pytest.mark.parametrize("zero_sign", ["positive", "majority"])
@pytest.mark.parametrize("chunked", [False, True])
def test_ties_zero_vote(tmp_path, zero_sign, chunked):
    """Elements whose vote is exactly 0 take +1 (positive) or the tensor's majority sign of γ."""
    rows, cols = 8, 4
    base = {"w": torch.zeros(rows, cols)}
    t1 = torch.full((rows, cols), -0.5)
    t2 = torch.full((rows, cols), -0.25)
    t1[0] = 0.5   # row 0: +0.5 and −0.5 with equal weight: the vote is exactly 0
    t2[0] = 0.0
    t3 = torch.zeros(rows, cols)
    t3[0] = -0.5
    experts = [{"w": t} for t in (t1, t2, t3)]
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    budget = 2000 if chunked else 10**9
    merged, plan = run_pipeline(make_config("ties", base_dir, expert_dirs, tmp_path / "out", densities=[1.0] * 3,
                                            dtype="float32", memory_budget=budget, process_reserve=0,
                                            parameters={"zero_sign": zero_sign}))
    assert (plan.tensors[0].chunk_rows < rows) == chunked
    # Σγ over the tensor is negative (7 rows of −1, one row of 0): majority is −1
    row0 = merged["w"][0]
    if zero_sign == "positive":
        assert torch.equal(row0, torch.full((cols,), 0.5))
    else:
        assert torch.equal(row0, torch.full((cols,), -0.5))
    assert torch.equal(merged["w"][1:], torch.full((rows - 1, cols), -0.375))
    expected = merge_reference("ties", base["w"], [t1, t2, t3], weights=[1.0] * 3, densities=[1.0] * 3,
                               zero_sign=zero_sign, dtype=torch.float32)
    assert torch.equal(merged["w"], expected)


def test_ties_majority_all_zero_votes_is_positive(tmp_path):
    """Σγ = 0 over the tensor (every vote 0): the majority fallback is +1."""
    base = {"w": torch.zeros(3, 2)}
    experts = [{"w": torch.full((3, 2), 0.5)}, {"w": torch.full((3, 2), -0.5)}]
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    merged, _ = run_pipeline(make_config("ties", base_dir, expert_dirs, tmp_path / "out", densities=[1.0, 1.0],
                                         dtype="float32", parameters={"zero_sign": "majority"}))
    assert torch.equal(merged["w"], torch.full((3, 2), 0.5))


def test_ties_density_below_one_element_keeps_one(tmp_path):
    """int(density·numel) == 0 for every tensor: mergekit 0.1.5 still keeps the largest |τ| of each
    expert (a positive density keeps at least one element), and so do we."""
    base, experts = gaussian_models(2, seed=11)
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    density = 0.002  # largest tensor has 264 elements: int(0.002·264) == 0
    merged, _ = run_pipeline(make_config("ties", base_dir, expert_dirs, tmp_path / "out", densities=[density] * 2,
                                         dtype="float32", parameters={"lambda": 1.7}))
    for name, b in base.items():
        assert int(density * b.numel()) == 0
        expected = merge_reference("ties", b, [e[name] for e in experts], weights=[1.0, 1.0], densities=[density] * 2,
                                   lam=1.7, dtype=torch.float32)
        assert torch.equal(merged[name], expected), name
        assert 1 <= int((merged[name] != b).sum()) <= 2, name


def test_ties_mixed_trivial_and_selected_densities(tmp_path):
    """One expert keeps one element, one keeps everything, one is trimmed."""
    base, experts = gaussian_models(3, seed=12)
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    densities = [0.001, 1.0, 0.37]
    merged, _ = run_pipeline(make_config("ties", base_dir, expert_dirs, tmp_path / "out", densities=densities,
                                         dtype="float32"))
    for name, b in base.items():
        expected = merge_reference("ties", b, [e[name] for e in experts], weights=[1.0] * 3, densities=densities,
                                   dtype=torch.float32)
        assert torch.equal(merged[name], expected), name


@pytest.mark.parametrize("method, zero_sign", [("ties", "positive"), ("ties", "majority"), ("task_arithmetic", None),
                                               ("linear", None)])
def test_chunked_run_gives_identical_bytes(tmp_path, method, zero_sign):
    """A tiny memory_budget splits tensors into several row chunks; the output bytes do not change."""
    shapes = {"big.weight": (64, 24), "odd.weight": (37, 5), "vec": (50,), "cube": (9, 4, 3)}
    base, experts = grid_models(3, seed=5, shapes=shapes, levels=3)  # many threshold ties across chunks
    base_dir, expert_dirs = write_inputs(tmp_path / "in", base, experts)
    files = {}
    for label, budget in (("whole", 10**9), ("chunked", 2000)):
        cfg = make_config(method, base_dir, expert_dirs, tmp_path / label, weights=[1.0, 0.5, 2.0],
                          densities=[0.3, 0.55, 0.8] if method == "ties" else None, dtype="float32",
                          memory_budget=budget, process_reserve=0, shards=2,
                          parameters={"zero_sign": zero_sign} if method == "ties" else {})
        merged, plan = run_pipeline(cfg)
        if method == "ties":
            for name, b in base.items():
                expected = merge_reference("ties", b, [e[name] for e in experts], weights=[1.0, 0.5, 2.0],
                                           densities=[0.3, 0.55, 0.8], zero_sign=zero_sign, dtype=torch.float32)
                assert torch.equal(merged[name], expected), (label, name)
        if label == "chunked":
            chunked = [t.name for t in plan.tensors if t.chunk_rows < t.shape[0]]
            assert {"big.weight", "odd.weight", "vec"} <= set(chunked)
            assert min(t.chunk_rows for t in plan.tensors) < 8
        else:
            assert all(t.chunk_rows >= t.shape[0] for t in plan.tensors)
        files[label] = {s.file_name: (Path(plan.output_url) / s.file_name).read_bytes() for s in plan.shards}
    assert files["whole"] == files["chunked"]


def bf16_gaussian_models(n_experts: int, seed: int, shapes):
    """Gaussian experts stored in bf16: many |τ| tie at a trim's threshold."""
    return gaussian_models(n_experts, seed, shapes, dtype=torch.bfloat16)


@pytest.mark.parametrize("make", [gaussian_models, grid_models, bf16_gaussian_models])
def test_one_pass_trim_writes_the_histograms_bytes(tmp_path, monkeypatch, make):
    """Tensors large enough for the one-pass bracketed selection: the bytes equal those of the
    two histogram passes (the path a missed bracket falls back to), whole and in row chunks (where
    the bf16 experts' kept ties end in another chunk than they start)."""
    from workers.kernels import selection

    base, experts = make(3, seed=11, shapes={"wide.weight": (520, 512), "vec": (300000,)})
    base_dir, expert_dirs = write_inputs(tmp_path / "in", base, experts)
    files = {}
    for label, budget, min_elements in (("one pass", 10**9, selection.BRACKET_MIN_ELEMENTS),
                                        ("one pass, chunked", 8 * 10**6, selection.BRACKET_MIN_ELEMENTS),
                                        ("histograms", 10**9, 1 << 62)):
        monkeypatch.setattr(selection, "BRACKET_MIN_ELEMENTS", min_elements)
        cfg = make_config("ties", base_dir, expert_dirs, tmp_path / label, weights=[1.0, 0.5, 2.0],
                          densities=[0.2, 0.55, 1.0], dtype="float32", memory_budget=budget, process_reserve=0)
        _, plan = run_pipeline(cfg)
        assert all((t.chunk_rows < t.shape[0]) == ("chunked" in label) for t in plan.tensors if t.action == "merge")
        files[label] = {s.file_name: (Path(plan.output_url) / s.file_name).read_bytes() for s in plan.shards}
    assert files["one pass"] == files["one pass, chunked"] == files["histograms"]


# ---- task arithmetic and linear ----------------------------------------------------------------

@pytest.mark.parametrize("weights, lam, normalize", [
    ((1.0, 0.5, 2.0), 1.0, None), ((0.3, 0.3, 0.4), 0.4, True), ((1.5, -0.5), 0.3, False), ((1.0,), 2.0, True)])
def test_task_arithmetic(tmp_path, weights, lam, normalize):
    params = {"lambda": lam} if lam != 1.0 else {}
    if normalize is not None:
        params["normalize"] = normalize
    opts = dict(weights=weights, lam=lam, normalize=bool(normalize))  # docs/algorithms.md: normalize defaults to false here
    for kind, make in (("gaussian", gaussian_models), ("grid", grid_models)):
        base, experts = make(len(weights), seed=len(weights))
        base_dir, expert_dirs = write_inputs(tmp_path / kind, base, experts)
        merged, _ = run_pipeline(make_config("task_arithmetic", base_dir, expert_dirs, tmp_path / f"{kind}_out",
                                             weights=weights, parameters=params, dtype="float32"))
        for name, b in base.items():
            xs = [e[name] for e in experts]
            assert torch.equal(merged[name], merge_reference("task_arithmetic", b, xs, dtype=torch.float32, **opts)), name
            if kind == "grid":
                assert_close_to_f64(merged[name], merge_reference("task_arithmetic", b, xs, **opts), b,
                                    delta_scale(b, xs, weights, lam), name)


@pytest.mark.parametrize("weights, normalize", [((1.0, 0.5, 2.0), None), ((0.2, 0.7), False), ((1.0, 1.0, 1.0, 1.0), True)])
def test_linear(tmp_path, weights, normalize):
    params = {} if normalize is None else {"normalize": normalize}
    opts = dict(weights=weights, normalize=normalize)
    for kind, make in (("gaussian", gaussian_models), ("grid", grid_models)):
        _, models = make(len(weights), seed=3 + len(weights))
        _, model_dirs = write_inputs(tmp_path / kind, None, models)
        merged, _ = run_pipeline(make_config("linear", None, model_dirs, tmp_path / f"{kind}_out", weights=weights,
                                             parameters=params, dtype="float32"))
        for name in models[0]:
            xs = [m[name] for m in models]
            assert torch.equal(merged[name], merge_reference("linear", None, xs, dtype=torch.float32, **opts)), name
            if kind == "grid":
                ref = merge_reference("linear", None, xs, **opts)
                diff = (merged[name].double() - ref).abs()
                bound = f32_ulp_bound(*[x.double() * w for x, w in zip(xs, weights)]) / (sum(weights) if normalize is not False else 1)
                assert (diff <= bound).all(), name


def test_linear_base_model_among_models_is_averaged(tmp_path):
    """docs/algorithms.md: a base_model given to linear is averaged in like any other model, with its weight."""
    base, experts = gaussian_models(2, seed=21)
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    cfg = make_config("linear", None, [expert_dirs[0], base_dir, expert_dirs[1]], tmp_path / "out",
                      weights=[1.0, 2.0, 0.5], dtype="float32")
    cfg["base_model"] = base_dir
    merged, _ = run_pipeline(cfg)
    for name, b in base.items():
        xs = [experts[0][name], b, experts[1][name]]
        expected = merge_reference("linear", None, xs, weights=[1.0, 2.0, 0.5], dtype=torch.float32)
        assert torch.equal(merged[name], expected), name


# ---- dtypes, non-float tensors, exclusions -------------------------------------------------------

@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_bf16_inputs_are_upcast(tmp_path, method):
    """bf16 inputs: computed in float32 on the upcast values, the output cast to bf16 (the base's dtype)."""
    base, experts = gaussian_models(3, seed=8, dtype=torch.bfloat16)
    weights, densities = [1.0, 0.5, 2.0], [0.5, 0.3, 0.8]
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    merged, plan = run_pipeline(make_config(method, base_dir, expert_dirs, tmp_path / "out", weights=weights,
                                            densities=densities if method == "ties" else None,
                                            parameters={"lambda": 0.7} if method != "linear" else {}))
    opts = dict(weights=weights, densities=densities, lam=0.7) if method == "ties" else (
        dict(weights=weights, lam=0.7) if method == "task_arithmetic" else dict(weights=weights))
    for name, b in base.items():
        xs = [e[name] for e in experts]
        upcast_base = b.float() if method != "linear" else None
        expected32 = merge_reference(method, upcast_base, [x.float() for x in xs], dtype=torch.float32, **opts)
        assert merged[name].dtype == torch.bfloat16, name
        assert torch.equal(merged[name], expected32.to(torch.bfloat16)), name
        ref64 = merge_reference(method, upcast_base, [x.float() for x in xs], **opts)
        # one bf16 rounding (2^-8 relative) plus float32 noise
        diff = (merged[name].double() - ref64).abs()
        assert (diff <= 2.0**-8 * ref64.abs() + 1e-6 * (1 + ref64.abs())).all(), name


def test_vote_is_computed_in_float32_not_bf16(tmp_path):
    """bf16 inputs, element 0: τ = (+1, +2^-8, −1). In float32 the vote is +2^-8, γ = +1. Summed in bf16,
    1 + 2^-8 rounds to 1, the vote is 0 and the majority fallback (element 1 votes −1) would give γ = −1."""
    base = {"w": torch.zeros(1, 2, dtype=torch.bfloat16)}
    experts = [{"w": torch.tensor([[v, -1.0]], dtype=torch.bfloat16)} for v in (1.0, 2.0**-8, -1.0)]
    assert float(torch.tensor(1.0, dtype=torch.bfloat16) + torch.tensor(2.0**-8, dtype=torch.bfloat16)) == 1.0
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    merged, _ = run_pipeline(make_config("ties", base_dir, expert_dirs, tmp_path / "out", densities=[1.0] * 3,
                                         parameters={"zero_sign": "majority"}, dtype="float32"))
    assert merged["w"].tolist() == [[(1.0 + 2.0**-8) / 2, -1.0]]  # disjoint mean of the agreeing values


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_mixed_input_dtypes(tmp_path, method):
    """Experts stored in other float precisions than the base (bf16, f16): every input is upcast to
    float32 first; the output takes the configured dtype (float16 here)."""
    base, experts = gaussian_models(3, seed=15)
    experts[0] = {n: t.to(torch.bfloat16) for n, t in experts[0].items()}
    experts[1] = {n: t.to(torch.float16) for n, t in experts[1].items()}
    weights, densities = [1.0, 0.5, 2.0], [0.6, 0.3, 0.8]
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    merged, _ = run_pipeline(make_config(method, base_dir, expert_dirs, tmp_path / "out", weights=weights,
                                         densities=densities if method == "ties" else None, dtype="float16"))
    opts = dict(weights=weights, densities=densities) if method == "ties" else dict(weights=weights)
    for name, b in base.items():
        xs = [e[name].float() for e in experts]
        expected = merge_reference(method, b if method != "linear" else None, xs, dtype=torch.float32, **opts)
        assert merged[name].dtype == torch.float16
        assert torch.equal(merged[name], expected.to(torch.float16)), name


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_int_tensors_copied_and_exclude_regex(tmp_path, method):
    base, experts = gaussian_models(2, seed=9)
    base["pos.ids"] = torch.arange(10, dtype=torch.int64) * 3
    for i, e in enumerate(experts):
        e["pos.ids"] = base["pos.ids"].clone()
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    cfg = make_config(method, base_dir, expert_dirs, tmp_path / "out", weights=[1.0, 2.0],
                      densities=[0.4, 0.6] if method == "ties" else None, dtype="bfloat16",
                      exclude=[r"\.bias$", r"^d\."])
    merged, plan = run_pipeline(cfg)
    reference_model = base if method != "linear" else experts[0]  # linear has no base: its first model
    actions = {t.name: t.action for t in plan.tensors}
    assert actions == {"a.weight": "merge", "b.weight": "merge", "c.bias": "copy", "d.weight": "copy", "pos.ids": "copy"}
    assert merged["pos.ids"].dtype == torch.int64
    assert torch.equal(merged["pos.ids"], base["pos.ids"])
    for name in ("c.bias", "d.weight"):  # excluded float tensors: copied, then cast to the configured dtype
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], reference_model[name].to(torch.bfloat16)), name
    assert not torch.equal(merged["a.weight"], reference_model["a.weight"].to(torch.bfloat16))


def test_linear_exclude_copies_from_base_model(tmp_path):
    base, experts = gaussian_models(2, seed=10)
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    cfg = make_config("linear", None, [expert_dirs[0], base_dir, expert_dirs[1]], tmp_path / "out",
                      weights=[1.0, 1.0, 1.0], dtype="float32", exclude=[r"\.bias$"])
    cfg["base_model"] = base_dir
    merged, _ = run_pipeline(cfg)
    assert torch.equal(merged["c.bias"], base["c.bias"])


def test_zero_dim_and_empty_tensors(tmp_path):
    shapes = {"scalar": (), "empty": (0, 4), "w": (4, 4)}
    base, experts = gaussian_models(2, seed=13, shapes=shapes)
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    merged, _ = run_pipeline(make_config("ties", base_dir, expert_dirs, tmp_path / "out", densities=[1.0, 0.5],
                                         dtype="float32"))
    for name, b in base.items():
        assert merged[name].shape == b.shape
        expected = merge_reference("ties", b, [e[name] for e in experts], weights=[1.0, 1.0], densities=[1.0, 0.5],
                                   dtype=torch.float32)
        assert torch.equal(merged[name], expected), name


def test_default_density_is_mergekits(tmp_path, caplog):
    """No density anywhere: mergekit's 1.0 (no trim), with a hint naming the paper's 0.2."""
    base, experts = gaussian_models(2, seed=14)
    base_dir, expert_dirs = write_inputs(tmp_path, base, experts)
    with caplog.at_level("WARNING"):
        merged, plan = run_pipeline(make_config("ties", base_dir, expert_dirs, tmp_path / "out", dtype="float32"))
    assert plan.method.densities == (1.0, 1.0)
    assert "density: 0.2" in caplog.text
    for name, b in base.items():
        expected = merge_reference("ties", b, [e[name] for e in experts], weights=[1.0, 1.0], densities=[1.0, 1.0],
                                   dtype=torch.float32)
        assert torch.equal(merged[name], expected), name
    assert math.isclose(plan.method.lam, 1.0)


# ---- many experts ------------------------------------------------------------------------------

MANY = 6
MANY_SHAPES = {"vec": (1000,), "w": (40, 3)}


def _many_expert_runs(root: Path, method: str, budgets: dict[str, int]):
    base, experts = gaussian_models(MANY, seed=1, shapes=MANY_SHAPES)
    base_dir, expert_dirs = write_inputs(root / "in", base, experts)
    weights = [1.0, 0.5, 2.0, 1.5, 0.25, 1.0]
    densities = [0.5, 0.3, 0.8, 1.0, 0.6, 0.45]
    runs = {}
    for label, budget in budgets.items():
        cfg = make_config(method, base_dir, expert_dirs, root / label, weights=weights,
                          densities=densities if method == "ties" else None, dtype="float32", memory_budget=budget, process_reserve=0)
        merged, plan = run_pipeline(cfg)
        files = {s.file_name: (Path(plan.output_url) / s.file_name).read_bytes() for s in plan.shards}
        runs[label] = (merged, plan, files)
    return base, experts, weights, densities, runs


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_many_experts_within_float32_rounding(tmp_path, method):
    """Six experts: the pipeline may sum in another order than expert order, so compare with the float32
    rules to a few ulps of the summands' magnitude (and with float64 the same way)."""
    base, experts, weights, densities, runs = _many_expert_runs(tmp_path, method, {"whole": 10**9})
    merged = runs["whole"][0]
    lam = 1.0
    for name, b in base.items():
        xs = [e[name] for e in experts]
        ref_base = b if method != "linear" else None
        opts = dict(weights=weights, densities=densities) if method != "linear" else dict(weights=weights)
        scale_base = b if method != "linear" else torch.zeros_like(b)
        scale = (delta_scale(b, xs, weights, lam) if method != "linear"
                 else sum(abs(w) * x.double().abs() for x, w in zip(xs, weights)) / sum(weights))
        for dtype in (torch.float32, torch.float64):
            ref = merge_reference(method, ref_base, xs, dtype=dtype, **opts).double()
            diff = (merged[name].double() - ref).abs()
            assert (diff <= f32_ulp_bound(scale_base.double(), scale)).all(), (name, dtype, float(diff.max()))


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_many_experts_chunking_does_not_change_bytes(tmp_path, method):
    *_, runs = _many_expert_runs(tmp_path, method, {"whole": 10**9, "chunked": 1000})
    assert all(t.chunk_rows * math.prod(t.shape[1:]) <= 12 for t in runs["chunked"][1].tensors)  # tiny chunks
    assert runs["whole"][2] == runs["chunked"][2]
