"""slerp, nuslerp, multislerp and karcher (mergekit 0.1.5) through the real shard path, against plain
float64 references written from mergekit's definitions (docs/algorithms.md §9).

Most tests plan with ``pipeline.planner.build_plan`` and run every shard with
``workers.shard_task.run_shard`` (no Ray); a few go end to end through ``run_merge`` on the embedded
Ray. Inputs are float32 and the output dtype float32, so the outputs must equal the references up
to float32 rounding: ``assert_close`` with rtol 1e-6 and atol 1e-7 relative to the inputs' scale.
Whole-tensor quantities are summed over every row chunk before any chunk is merged, so 1 shard,
5 shards and a tiny memory budget that cuts every tensor into row chunks give the same bytes.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import pytest
import torch
from helpers import read_output, run_pipeline
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.samples import write_model
from workers.kernels import spherical
from workers.methods.multislerp import MultislerpError
from workers.tensor_io import rows_of

TINY_CONFIG = {"model_type": "llama", "hidden_size": 8}
SHAPES = {"a.weight": (16, 12), "b.weight": (33, 7), "c.bias": (12,), "d.weight": (5, 5, 3), "e.scale": ()}


# ---- float64 references, from mergekit 0.1.5's definitions ---------------------------------------

def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """merge_methods/slerp.py: one slerp over the whole flattened tensor, a at t = 0."""
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return (1 - t) * a + t * b
    na, nb = a.norm(), b.norm()
    na = na if na > 1e-8 else torch.ones((), dtype=torch.float64)
    nb = nb if nb > 1e-8 else torch.ones((), dtype=torch.float64)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    return torch.sin((1 - t) * theta) / torch.sin(theta) * a + torch.sin(t * theta) / torch.sin(theta) * b


def ref_nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """merge_methods/nuslerp.py ``nuslerp``: vectors along the last axis (after flattening, or after
    swapping axis 0 with the last for row_wise)."""
    shape = v0.shape
    v0, v1 = v0.double(), v1.double()
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos * cos) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    result = torch.where(colinear, (1 - t) * v0 + t * v1,
                         (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def ref_nuslerp(weights, xs, base, flatten=True, row_wise=False) -> torch.Tensor:
    """nuslerp_merge_method: t = w₂ / (w₁ + w₂) (0.5 when the sum is ~0), on task vectors with a base."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return ref_nuslerp_vectors(t, xs[0], xs[1], flatten, row_wise)
    b = base.double()
    return b + ref_nuslerp_vectors(t, xs[0].double() - b, xs[1].double() - b, flatten, row_wise)


def ref_multislerp(weights, xs, base, normalize=True, eps=1e-8) -> torch.Tensor:
    """merge_methods/multislerp.py, step by step (tangent projection and exponential map included)."""
    if len(xs) == 1:
        return xs[0].double()
    shape = xs[0].shape
    tensors = torch.stack([x.double() for x in xs])
    if base is not None:
        tensors = tensors - base.double()
    flat = tensors.reshape(len(xs), -1)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(xs) != 2:
            raise ValueError("the weighted sum of the input tensors is zero")
        result = (tensors[0] * w[0] + tensors[1] * w[1]).reshape(shape)
        return result + base.double() if base is not None else result
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w[:, None]).sum(0)
    tangent_norm = tangent.norm() + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).reshape(shape)
    return result + base.double() if base is not None else result


def ref_karcher(xs, max_iter=10, tol=1e-5) -> torch.Tensor:
    """merge_methods/karcher.py: weighted Karcher mean with α = 1/N, explicit tensors in float64."""
    shape = xs[0].shape
    xs = [x.double().reshape(-1) for x in xs]
    if len(xs) == 1:
        return xs[0].reshape(shape)
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [x.norm() for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(xs[0]).reshape(shape)
    a = [alphas[i] for i in valid]
    a = [x / sum(a) for x in a]
    us = [units[i] for i in valid]
    mean = sum(ai * u for ai, u in zip(a, us))
    mean_norm = mean.norm()
    mean = us[0].clone() if float(mean_norm) < tol or float(mean_norm) == 0.0 else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us):
            dot = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol or float(theta) == 0.0:  # θ = 0 (tol = 0): mergekit's 0 / sin 0 is NaN
                continue
            tangent = tangent + ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = tangent.norm()
        if float(tangent_norm) < tol or float(tangent_norm) == 0.0:  # (tol = 0: mergekit divides 0 by 0)
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = mean.norm()
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(al * n for al, n in zip(alphas, norms))
    return (scale * mean).reshape(shape)


def assert_matches(got: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor], msg: str = "") -> None:
    """Equal up to float32 rounding: rtol 1e-6, atol 1e-7 of the inputs' (and result's) largest |value|."""
    scale = max([float(expected.abs().max()) if expected.numel() else 0.0]
                + [float(x.abs().max()) for x in inputs if x.numel()] + [1e-30])
    assert got.dtype == torch.float32, msg
    torch.testing.assert_close(got.double(), expected.double().reshape(got.shape), rtol=1e-6, atol=1e-7 * scale,
                               msg=lambda m: f"{msg}: {m}")


# ---- inputs and runs -------------------------------------------------------------------------------

def gaussian_models(root: Path, n_models: int, seed: int = 0, shapes=SHAPES, spread: float = 0.1):
    """A base and models base + spread·N(0, 1) (float32, plus an int64 buffer), written to disk."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: t + torch.randn(t.shape, generator=g) * spread for n, t in base.items()} for _ in range(n_models)]
    return write_all(root, base, models)


def write_all(root: Path, base: dict | None, models: list[dict]):
    def own(tensors: dict) -> dict:  # every tensor its own contiguous storage (safetensors refuses shared ones)
        return {**{n: t.clone().contiguous() for n, t in tensors.items()}, "pos.ids": torch.arange(10)}

    base_dir = write_model(root / "base", own(base), TINY_CONFIG) if base is not None else None
    dirs = [write_model(root / f"m{i}", own(m), TINY_CONFIG) for i, m in enumerate(models)]
    return base_dir, dirs, base, models


def config(method: str, out: Path, models, base=None, parameters=None, **extra) -> dict:
    """``models``: directories, or (directory, per-model parameters) pairs."""
    entries = []
    for m in models:
        directory, params = m if isinstance(m, tuple) else (m, None)
        entries.append({"model": str(directory), **({"parameters": params} if params else {})})
    cfg = {"merge_method": method, "models": entries, "output": str(out), "dtype": "float32",
           "parameters": parameters or {}, **extra}
    if base is not None:
        cfg["base_model"] = str(base)
    return cfg


def floats(tensors: dict) -> list[str]:
    return [n for n, t in tensors.items() if t.is_floating_point()]


def check_copied_buffer(merged: dict, reference_dir: Path) -> None:
    assert torch.equal(merged["pos.ids"], load_file(str(reference_dir / "model.safetensors"))["pos.ids"])


# ---- the sums: same bits for any chunking -------------------------------------------------------------

def test_row_sums_depend_on_each_row_alone():
    x = torch.randn(37, 129, dtype=torch.float64)
    whole = spherical.row_sums(x)
    for i in range(37):
        assert torch.equal(spherical.row_sums(x[i:i + 1])[0], whole[i])
    torch.testing.assert_close(whole, x.sum(dim=1), rtol=1e-13, atol=1e-13)
    assert spherical.row_sums(torch.zeros(3, 0)).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("n_rows", [1, 2, 7, 64, 100, 257])
def test_row_tree_same_bits_for_any_chunking(n_rows):
    values = torch.randn(n_rows, 3, 5, dtype=torch.float64) * 10 ** torch.randint(-8, 8, (n_rows, 3, 5))
    totals = []
    rng = random.Random(n_rows)
    for chunking in ["one", "each", "random", "random", "random"]:
        tree, start = spherical.RowTree(), 0
        while start < n_rows:
            size = {"one": n_rows, "each": 1}.get(chunking) or rng.randint(1, max(1, n_rows // 3))
            tree.add(values[start:start + size], start)
            start += size
        totals.append(tree.total())
    assert all(torch.equal(t, totals[0]) for t in totals)
    torch.testing.assert_close(totals[0], values.sum(dim=0), rtol=1e-12, atol=1e-20)
    with pytest.raises(ValueError, match="in order"):
        spherical.RowTree().add(values[1:], 1)


# ---- slerp ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.4, -0.2])
@pytest.mark.parametrize("listed", [True, False])
def test_slerp_matches_reference(tmp_path, t, listed):
    base_dir, dirs, base, models = gaussian_models(tmp_path / "in", 1, seed=1)
    listed_models = [base_dir, dirs[0]] if listed else [dirs[0]]  # mergekit style: the base listed, or appended
    merged, plan = run_pipeline(config("slerp", tmp_path / "out", listed_models, base_dir, {"t": t}))
    assert [i.role for i in plan.inputs] == ["base", "expert"]
    for name in floats(base):
        assert_matches(merged[name], ref_slerp(t, base[name], models[0][name]), [base[name], models[0][name]], name)
    check_copied_buffer(merged, base_dir)
    if t == 0.0:
        assert all(torch.equal(merged[n], base[n]) for n in floats(base))


def slerp_edge_models():
    """Per tensor a pair (a, b) that takes one of slerp's branches."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(20, 6, generator=g)
    ortho = torch.randn(20, 6, generator=g)
    ortho = ortho - (ortho * a).sum() / (a * a).sum() * a  # ⊥ a

    def at_angle(cos: float) -> torch.Tensor:
        return cos * a / a.norm() + math.sqrt(1 - cos * cos) * ortho / ortho.norm()

    pairs = {
        "parallel": (a, 2 * a + 1e-4 * ortho / ortho.norm()),  # |cos| > 0.9995: lerp
        "antipodal": (a, -0.5 * a),  # cos = −1: lerp
        "inside": (a, 3 * at_angle(0.999)),  # just below the threshold: slerp
        "beyond": (a, 3 * at_angle(0.9999)),  # just above: lerp
        "orthogonal": (a, ortho),
        "obtuse": (a, at_angle(-0.7)),
        "zero_base": (torch.zeros(20, 6), a),  # a norm <= 1e-8 counts as 1: cos = 0, θ = π/2
        "zero_other": (a, torch.zeros(20, 6)),
        "both_zero": (torch.zeros(20, 6), torch.zeros(20, 6)),
        "tiny": (a * 1e-12, ortho),
        "vector": (a[0], ortho[0]),
    }
    return {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}


@pytest.mark.parametrize("t", [0.25, 0.8])
def test_slerp_edge_cases(tmp_path, t):
    base, other = slerp_edge_models()
    base_dir, dirs, *_ = write_all(tmp_path / "in", base, [other])
    merged, _ = run_pipeline(config("slerp", tmp_path / "out", [base_dir, dirs[0]], base_dir, {"t": t}))
    for name in base:
        expected = ref_slerp(t, base[name], other[name])
        assert_matches(merged[name], expected, [base[name], other[name]], name)
    lerp = {n: (1 - t) * base[n] + t * other[n] for n in base}
    for name in ("parallel", "antipodal", "beyond", "both_zero"):
        torch.testing.assert_close(merged[name], lerp[name], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(merged["inside"], lerp["inside"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged["zero_base"], math.sin(t * math.pi / 2) * other["zero_base"])  # not t·b


def layered_models(root: Path, n_models: int, seed: int):
    """Three layers (t = 0, 0.5, 1 for mergekit's gradients) with attention and MLP tensors, plus an embedding (t = 0)."""
    shapes = {"model.embed_tokens.weight": (6, 4)}
    for i in range(3):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (4, 4)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (5, 4)
    return gaussian_models(root, n_models, seed=seed, shapes=shapes, spread=0.5)


def layer_t(name: str) -> float:
    return int(name.split(".")[2]) / 2 if ".layers." in name else 0.0


def test_slerp_t_gradient_and_filters(tmp_path):
    """mergekit's usual slerp config: a t gradient over the layers for attention, another for the MLPs,
    a default for the rest; each tensor is merged with its own t."""
    base_dir, dirs, base, models = layered_models(tmp_path / "in", 1, seed=18)
    t = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": [1.0, 0.5, 0.0]}, {"value": 0.3}]
    merged, plan = run_pipeline(config("slerp", tmp_path / "out", [base_dir, dirs[0]], base_dir, {"t": t}))
    for name in floats(base):
        position = layer_t(name)
        expected_t = position if "self_attn" in name else (1.0 - position if "mlp" in name else 0.3)
        task = next(task for task in plan.tensors if task.name == name)
        assert (task.options or plan.method).t == pytest.approx(expected_t), name
        assert_matches(merged[name], ref_slerp(expected_t, base[name], models[0][name]),
                       [base[name], models[0][name]], name)


def test_nuslerp_weight_gradients(tmp_path):
    """Per-model weight gradients: t = w₂ / (w₁ + w₂) per tensor."""
    base_dir, dirs, base, models = layered_models(tmp_path / "in", 2, seed=19)
    listed = [(dirs[0], {"weight": [1.0, 0.0]}), (dirs[1], {"weight": [0.0, 1.0]})]
    merged, _ = run_pipeline(config("nuslerp", tmp_path / "out", listed, base_dir, {"nuslerp_flatten": False}))
    for name in floats(base):
        position = layer_t(name)
        xs = [m[name] for m in models]
        expected = ref_nuslerp([1.0 - position, position], xs, base[name], False, False)
        assert_matches(merged[name], expected, xs + [base[name]], name)


# ---- nuslerp ---------------------------------------------------------------------------------------------

NUSLERP_MODES = [(True, False), (False, False), (False, True)]  # (nuslerp_flatten, nuslerp_row_wise)


@pytest.mark.parametrize("flatten, row_wise", NUSLERP_MODES)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_reference(tmp_path, flatten, row_wise, with_base):
    base_dir, dirs, base, models = gaussian_models(tmp_path / "in", 2, seed=2)
    listed = [(dirs[0], {"weight": 0.3}), (dirs[1], {"weight": 0.5})]
    if with_base:
        listed.insert(1, (base_dir, None))  # the base listed among the models is the base
    cfg = config("nuslerp", tmp_path / "out", listed, base_dir if with_base else None,
                 {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise})
    merged, plan = run_pipeline(cfg)
    assert [i.role for i in plan.inputs] == (["base", "expert", "expert"] if with_base else ["model", "model"])
    for name in floats(base):
        xs = [m[name] for m in models]
        expected = ref_nuslerp([0.3, 0.5], xs, base[name] if with_base else None, flatten, row_wise)
        assert_matches(merged[name], expected, xs + [base[name]], f"{name} {flatten} {row_wise}")
    check_copied_buffer(merged, base_dir if with_base else dirs[0])


@pytest.mark.parametrize("weights, t", [((None, None), 0.5), ((1.0, -1.0), 0.5), ((2.0, -0.5), -1 / 3)])
def test_nuslerp_t_from_weights(tmp_path, weights, t):
    """A top-level weight alone gives t = 0.5; weights summing to ~0 give 0.5; negative weights extrapolate."""
    base_dir, dirs, base, models = gaussian_models(tmp_path / "in", 2, seed=3)
    listed = [(d, {"weight": w} if w is not None else None) for d, w in zip(dirs, weights)]
    merged, plan = run_pipeline(config("nuslerp", tmp_path / "out", listed, base_dir,
                                       {"weight": 1.0} if weights[0] is None else {}))
    assert plan.method.t == pytest.approx(t)
    for name in floats(base):
        xs = [m[name] for m in models]
        b = base[name].double()
        expected = b + ref_nuslerp_vectors(t, xs[0].double() - b, xs[1].double() - b, True, False)
        assert_matches(merged[name], expected, xs + [base[name]], name)


@pytest.mark.parametrize("flatten, row_wise", NUSLERP_MODES)
def test_nuslerp_edge_cases(tmp_path, flatten, row_wise):
    """Without a base: rows / columns that are colinear, antipodal, zero or orthogonal."""
    g = torch.Generator().manual_seed(11)
    v0 = torch.randn(8, 6, generator=g)
    v1 = torch.randn(8, 6, generator=g)
    v1[:, 4] = 4 * v0[:, 4]  # colinear column
    v1[:, 5] = -0.5 * v0[:, 5]  # antipodal column
    v1[0] = 2 * v0[0]  # colinear row
    v1[1] = -v0[1]  # antipodal row
    v0[2] = 0  # zero row: cos = 0, θ = π/2
    v0[3], v1[3] = 0, 0
    cube0, cube1 = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    cube1[1] = 3 * cube0[1]
    m0 = {"mat": v0, "cube": cube0, "same": v0.clone(), "zero": torch.zeros(6), "one": torch.tensor([2.0])}
    m1 = {"mat": v1, "cube": cube1, "same": v0.clone(), "zero": torch.zeros(6), "one": torch.tensor([-3.0])}
    _, dirs, *_ = write_all(tmp_path / "in", None, [m0, m1])
    merged, _ = run_pipeline(config("nuslerp", tmp_path / "out", [(dirs[0], {"weight": 1.0}), (dirs[1], {"weight": 3.0})],
                                    None, {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}))
    for name, x0 in m0.items():
        expected = ref_nuslerp([1.0, 3.0], [x0, m1[name]], None, flatten, row_wise)
        assert_matches(merged[name], expected, [x0, m1[name]], name)
    torch.testing.assert_close(merged["same"], v0)
    if not flatten and not row_wise:
        torch.testing.assert_close(merged["mat"][0], 0.25 * v0[0] + 0.75 * v1[0])  # colinear: lerp
        torch.testing.assert_close(merged["mat"][2], math.sin(0.75 * math.pi / 2) * v1[2])  # zero row


def test_nuslerp_flatten_wins_over_row_wise(tmp_path, caplog):
    base_dir, dirs, base, models = gaussian_models(tmp_path / "in", 2, seed=4)
    with caplog.at_level(logging.WARNING):
        merged, _ = run_pipeline(config("nuslerp", tmp_path / "out", [(d, {"weight": 1.0}) for d in dirs], base_dir,
                                        {"nuslerp_row_wise": True}))
    assert "nuslerp_row_wise has no effect" in caplog.text
    for name in floats(base):
        xs = [m[name] for m in models]
        assert_matches(merged[name], ref_nuslerp([1.0, 1.0], xs, base[name], True, False), xs + [base[name]], name)


# ---- multislerp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize, eps", [(True, 1e-8), (False, 1e-8), (True, 0.05)])
def test_multislerp_matches_reference(tmp_path, with_base, normalize, eps):
    base_dir, dirs, base, models = gaussian_models(tmp_path / "in", 3, seed=5)
    weights = [0.2, 0.5, 1.0]
    listed = [(d, {"weight": w}) for d, w in zip(dirs, weights)]
    merged, _ = run_pipeline(config("multislerp", tmp_path / "out", listed, base_dir if with_base else None,
                                    {"normalize_weights": normalize, "eps": eps}))
    for name in floats(base):
        xs = [m[name] for m in models]
        expected = ref_multislerp(weights, xs, base[name] if with_base else None, normalize, eps)
        assert_matches(merged[name], expected, xs + [base[name]], name)


def test_multislerp_single_model_is_returned_unchanged(tmp_path):
    base_dir, dirs, base, models = gaussian_models(tmp_path / "in", 1, seed=6)
    merged, _ = run_pipeline(config("multislerp", tmp_path / "out", [base_dir, (dirs[0], {"weight": 0.1})], base_dir))
    assert all(torch.equal(merged[n], models[0][n]) for n in floats(base))


def test_multislerp_edge_cases(tmp_path):
    """Two antipodal task vectors with balancing weights: mergekit's weighted-sum fallback; a zero task
    vector (a model equal to the base) contributes no direction."""
    g = torch.Generator().manual_seed(8)
    base = {"w": torch.randn(10, 4, generator=g), "v": torch.randn(9, generator=g)}
    x0 = {n: torch.randn(t.shape, generator=g) for n, t in base.items()}
    x1 = {n: -2 * t for n, t in x0.items()}  # antipodal (exactly, in float32), twice the norm
    x2 = {n: t.clone() for n, t in base.items()}
    _, dirs, *_ = write_all(tmp_path / "in", base, [x0, x1, x2])
    merged, _ = run_pipeline(config("multislerp", tmp_path / "out", [(dirs[0], {"weight": 1.0}), (dirs[1], {"weight": 1.0})]))
    for name in base:
        expected = ref_multislerp([1.0, 1.0], [x0[name], x1[name]], None)
        assert_matches(merged[name], expected, [x0[name], x1[name]], name)
        torch.testing.assert_close(merged[name], -0.5 * x0[name])  # 0.5·x − 0.5·2x: the fallback
    base_dir = tmp_path / "in" / "base"
    merged, _ = run_pipeline(config("multislerp", tmp_path / "out2", [(dirs[0], {"weight": 1.0}),
                                                                      (dirs[2], {"weight": 2.0})], base_dir))
    for name, b in base.items():
        expected = ref_multislerp([1.0, 2.0], [x0[name], x2[name]], b)
        assert_matches(merged[name], expected, [x0[name], x2[name], b], name)


def test_multislerp_balanced_antipodes_fail_like_mergekit(tmp_path):
    g = torch.Generator().manual_seed(9)
    x0 = {"w": torch.randn(6, 3, generator=g)}
    x2 = {"w": torch.randn(6, 3, generator=g)}
    _, dirs, *_ = write_all(tmp_path / "in", None, [x0, {"w": -x0["w"]}, x2])
    cfg = config("multislerp", tmp_path / "out", [(dirs[0], {"weight": 1.0}), (dirs[1], {"weight": 1.0}),
                                                   (dirs[2], {"weight": 0.0})])
    with pytest.raises(ValueError):
        ref_multislerp([1.0, 1.0, 0.0], [x0["w"], -x0["w"], x2["w"]], None)
    with pytest.raises(MultislerpError, match="'w'.*change the weights"):
        run_pipeline(cfg)


# ---- karcher ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_role", ["appended", "listed", "none"])
@pytest.mark.parametrize("max_iter, tol", [(10, 1e-5), (0, 1e-5), (1, 1e-5), (3, 0.0), (50, 1e-9), (10, 0.3)])
def test_karcher_matches_reference(tmp_path, base_role, max_iter, tol):
    base_dir, dirs, base, models = gaussian_models(tmp_path / "in", 3, seed=10, spread=0.8)
    listed = {"appended": dirs, "listed": [dirs[0], base_dir, dirs[1], dirs[2]], "none": dirs}[base_role]
    cfg = config("karcher", tmp_path / "out", listed, None if base_role == "none" else base_dir,
                 {"max_iter": max_iter, "tol": tol})
    merged, plan = run_pipeline(cfg)
    points = {"appended": models + [base], "listed": [models[0], base, models[1], models[2]], "none": models}[base_role]
    assert len(plan.inputs) == len(points)
    for name in floats(base):
        xs = [p[name] for p in points]
        assert_matches(merged[name], ref_karcher(xs, max_iter, tol), xs, name)


def test_karcher_edge_cases(tmp_path):
    """Close points (small angles), a zero input, all inputs zero, identical inputs, tiny norms."""
    g = torch.Generator().manual_seed(12)
    centre = torch.randn(12, 5, generator=g)
    ms = [{"close": centre + 1e-3 * torch.randn(12, 5, generator=g),
           "one_zero": torch.randn(7, generator=g) if i else torch.zeros(7),
           "all_zero": torch.zeros(4, 4),
           "same": centre.clone(),
           "tiny": torch.randn(6, generator=g) * (1e-7 if i < 2 else 1.0),
           "opposed": centre * (1 if i == 0 else -1) + 0.3 * torch.randn(12, 5, generator=g)} for i in range(3)]
    _, dirs, *_ = write_all(tmp_path / "in", None, ms)
    merged, _ = run_pipeline(config("karcher", tmp_path / "out", dirs))
    for name in ms[0]:
        xs = [m[name] for m in ms]
        assert_matches(merged[name], ref_karcher(xs), xs, name)
    assert torch.equal(merged["all_zero"], torch.zeros(4, 4))
    torch.testing.assert_close(merged["same"], centre)


def test_karcher_single_model_is_returned_unchanged(tmp_path):
    _, dirs, base, models = gaussian_models(tmp_path / "in", 1, seed=13)
    merged, _ = run_pipeline(config("karcher", tmp_path / "out", [dirs[0]]))
    assert all(torch.equal(merged[n], models[0][n]) for n in floats(base))


def test_karcher_coefficients_match_explicit_iteration():
    """The Gram-matrix iteration against the explicit one, on points from nearly equal to far apart."""
    g = torch.Generator().manual_seed(14)
    for spread in (1e-4, 1e-2, 0.3, 3.0):
        centre = torch.randn(200, generator=g, dtype=torch.float64)
        xs = [centre + spread * torch.randn(200, generator=g, dtype=torch.float64) for _ in range(4)]
        gram = torch.stack(xs) @ torch.stack(xs).T
        for max_iter, tol in ((10, 1e-5), (2, 1e-5), (30, 1e-12)):
            k, _ = spherical.karcher_coefficients(gram, max_iter, tol)
            got = sum(c * x for c, x in zip(k, xs))
            torch.testing.assert_close(got, ref_karcher(xs, max_iter, tol), rtol=1e-9, atol=1e-9)


# ---- chunking and shard count -----------------------------------------------------------------------

def spherical_configs(base_dir, dirs):
    weighted = [(d, {"weight": w}) for d, w in zip(dirs, (0.3, 0.5, 1.1))]
    flat_off = {"nuslerp_flatten": False}
    return {
        "slerp": {"models": [base_dir, dirs[0]], "base": base_dir, "parameters": {"t": 0.4}},
        "nuslerp_flat": {"models": weighted[:2], "base": base_dir, "parameters": {}},
        "nuslerp_rows": {"models": weighted[:2], "base": base_dir, "parameters": flat_off},
        "nuslerp_columns": {"models": weighted[:2], "base": None, "parameters": {**flat_off, "nuslerp_row_wise": True}},
        "multislerp": {"models": weighted, "base": base_dir, "parameters": {}},
        "karcher": {"models": dirs, "base": base_dir, "parameters": {"max_iter": 20, "tol": 1e-9}},
    }


def case_reference(case: str, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    """The reference of one ``spherical_configs`` case for one tensor (models ``xs``, base ``base``)."""
    if case == "slerp":
        return ref_slerp(0.4, base, xs[0])
    if case.startswith("nuslerp"):
        mode = {"nuslerp_flat": (True, False), "nuslerp_rows": (False, False), "nuslerp_columns": (False, True)}[case]
        return ref_nuslerp([0.3, 0.5], xs[:2], None if case == "nuslerp_columns" else base, *mode)
    if case == "multislerp":
        return ref_multislerp([0.3, 0.5, 1.1], xs, base)
    return ref_karcher(xs + [base], 20, 1e-9)


@pytest.mark.parametrize("case", ["slerp", "nuslerp_flat", "nuslerp_rows", "nuslerp_columns", "multislerp", "karcher"])
def test_shards_and_row_chunks_give_identical_bytes(tmp_path, case):
    shapes = {**SHAPES, "big.weight": (64, 24), "vec": (50,)}
    base_dir, dirs, *_ = gaussian_models(tmp_path / "in", 3, seed=15, shapes=shapes)
    spec = spherical_configs(base_dir, dirs)[case]
    method = case.split("_")[0]
    outputs = {}
    for label, extra in {"one": {"shards": 1}, "many": {"shards": 5},
                         "chunked": {"shards": 3, "memory_budget": 3000, "process_reserve": 0}}.items():
        merged, plan = run_pipeline(config(method, tmp_path / label, spec["models"], spec["base"], spec["parameters"],
                                           **extra))
        if label == "chunked":
            chunked = {t.name for t in plan.tensors if t.action == "merge" and t.chunk_rows < rows_of(t.shape)}
            assert {"a.weight", "b.weight", "big.weight", "vec"} <= chunked
        else:
            assert all(t.chunk_rows == rows_of(t.shape) for t in plan.tensors)
        assert len(plan.shards) == {"one": 1, "many": 5, "chunked": 3}[label]
        outputs[label] = {n: t.contiguous().view(-1).view(torch.uint8) for n, t in merged.items()}
    for label in ("many", "chunked"):
        assert outputs[label].keys() == outputs["one"].keys()
        for name, data in outputs["one"].items():
            assert torch.equal(outputs[label][name], data), (label, name)


@pytest.mark.parametrize("case", ["slerp", "nuslerp_flat", "nuslerp_rows", "nuslerp_columns", "multislerp", "karcher"])
def test_bfloat16_inputs_round_once(tmp_path, case):
    """bf16 checkpoints: computed in float32 (sums in float64) and rounded to bf16 once, so the output is
    the float64 definition rounded to bf16 except where that value lies within float32 error of a tie."""
    g = torch.Generator().manual_seed(20)
    shapes = {"w": (48, 40), "v": (40,)}
    base = {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}
    models = [{n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).bfloat16() for n, t in base.items()}
              for _ in range(3)]
    base_dir, dirs, *_ = write_all(tmp_path / "in", base, models)
    spec = spherical_configs(base_dir, dirs)[case]
    merged, _ = run_pipeline(config(case.split("_")[0], tmp_path / "out", spec["models"], spec["base"],
                                    spec["parameters"], dtype="bfloat16"))
    for name, b in base.items():
        xs = [m[name] for m in models]
        expected = case_reference(case, b, xs)
        got = merged[name]
        assert got.dtype == torch.bfloat16
        rounded = expected.bfloat16()
        assert (got == rounded).float().mean() > 0.999, name
        torch.testing.assert_close(got.double(), expected, rtol=2 ** -8, atol=1e-6 * float(expected.abs().max()))


# ---- end to end on Ray ---------------------------------------------------------------------------------

@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("case", ["slerp", "nuslerp_columns", "multislerp", "karcher"])
def test_run_merge_end_to_end(tmp_path, case):
    from manifests.verify import verify_output
    from pipeline.coordinator import run_merge

    base_dir, dirs, base, models = gaussian_models(tmp_path / "in", 3, seed=16)
    spec = spherical_configs(base_dir, dirs)[case]
    method = case.split("_")[0]
    sha = {}
    for label, extra in {"one": {"shards": 1}, "chunked": {"shards": 3, "memory_budget": 3000, "process_reserve": 0}}.items():
        out = tmp_path / label
        manifest = run_merge(load_config(config(method, out, spec["models"], spec["base"], spec["parameters"], **extra)),
                             progress=False)
        assert manifest.method["method"] == method
        assert verify_output(str(out)) == []
        merged = read_output(out)
        sha[label] = {n: t.contiguous().view(-1).view(torch.uint8) for n, t in merged.items()}
        for name in floats(base):
            b, xs = base[name], [m[name] for m in models]
            assert_matches(merged[name], case_reference(case, b, xs), xs + [b], f"{label} {name}")
        assert torch.equal(merged["pos.ids"], torch.arange(10))
    assert all(torch.equal(sha["one"][n], sha["chunked"][n]) for n in sha["one"])


# ---- config errors ------------------------------------------------------------------------------------

@pytest.fixture
def dirs3(tmp_path):
    base_dir, dirs, *_ = gaussian_models(tmp_path / "in", 3, seed=17, shapes={"a.weight": (4, 3)})
    return base_dir, dirs


BAD_CONFIGS = {
    "slerp_no_base": (lambda b, d: config("slerp", "o", [d[0], d[1]], None, {"t": 0.5}), r"slerp needs base_model"),
    "slerp_three": (lambda b, d: config("slerp", "o", [d[0], d[1]], b, {"t": 0.5}),
                    r"exactly two models.*this config has 3"),
    "slerp_only_base": (lambda b, d: config("slerp", "o", [b], b, {"t": 0.5}), r"exactly two models.*has 1"),
    "slerp_no_t": (lambda b, d: config("slerp", "o", [d[0]], b), r"parameters\.t is required"),
    "slerp_model_t": (lambda b, d: config("slerp", "o", [(d[0], {"t": 0.3})], b, {"t": 0.5}),
                      r"t under a model's parameters.*parameters: t"),
    "slerp_twice": (lambda b, d: config("slerp", "o", [d[0], d[0]], b, {"t": 0.5}), r"more than once"),
    "slerp_weight": (lambda b, d: config("slerp", "o", [(d[0], {"weight": 1.0})], b, {"t": 0.5}),
                     r"models\.0\.parameters\.weight.*not of slerp"),
    "nuslerp_three": (lambda b, d: config("nuslerp", "o", [(x, {"weight": 1.0}) for x in d], b),
                      r"nuslerp interpolates exactly two models besides base_model; this config has 3"),
    "nuslerp_one": (lambda b, d: config("nuslerp", "o", [b, (d[0], {"weight": 1.0})], b), r"exactly two.*has 1"),
    "nuslerp_no_weight": (lambda b, d: config("nuslerp", "o", [(d[0], {"weight": 1.0}), d[1]], b),
                          r"models\.1\.parameters\.weight is required by nuslerp"),
    "multislerp_only_base": (lambda b, d: config("multislerp", "o", [(b, {"weight": 1.0})], b), r"at least one model"),
    "multislerp_no_weight": (lambda b, d: config("multislerp", "o", [d[0], d[1]]),
                             r"models\.0\.parameters\.weight is required by multislerp"),
    "multislerp_zero_sum": (lambda b, d: config("multislerp", "o", [(d[0], {"weight": 1.0}), (d[1], {"weight": -1.0})]),
                            r"sum to 0.*normalize_weights: false"),
    "multislerp_eps": (lambda b, d: config("multislerp", "o", [(d[0], {"weight": 1.0})], None, {"eps": 0}),
                       r"parameters\.eps"),
    "karcher_max_iter": (lambda b, d: config("karcher", "o", d, None, {"max_iter": -1}), r"parameters\.max_iter"),
    "karcher_tol": (lambda b, d: config("karcher", "o", d, None, {"tol": -1e-3}), r"parameters\.tol"),
    "karcher_weight": (lambda b, d: config("karcher", "o", [(d[0], {"weight": 2.0}), d[1]]),
                       r"models\.0\.parameters\.weight.*not of karcher"),
    "karcher_twice": (lambda b, d: config("karcher", "o", [d[0], d[1], d[0]]), r"more than once"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_name_the_key(dirs3, case):
    build, pattern = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=pattern):
        load_config(build(*dirs3))


def test_good_configs_resolve(dirs3, caplog):
    b, d = dirs3
    with caplog.at_level(logging.WARNING):
        options = load_config(config("slerp", "o", [d[0]], b, {"t": 1.5}))
    assert "outside [0, 1]" in caplog.text
    assert load_config(config("nuslerp", "o", [(d[0], {"weight": 2.0}), (d[1], {"weight": 6.0})])).parameters.nuslerp_flatten
    from pipeline.config import resolve_method
    assert resolve_method(load_config(config("nuslerp", "o", [(d[0], {"weight": 2.0}), (d[1], {"weight": 6.0})]))).t == 0.75
    karcher = resolve_method(load_config(config("karcher", "o", d, b)))
    assert (karcher.max_iter, karcher.tol, karcher.appended_base, karcher.uses_base) == (10, 1e-5, True, True)
    karcher = resolve_method(load_config(config("karcher", "o", [b, *d], b)))
    assert (karcher.appended_base, karcher.n_models) == (False, 4)
    multi = resolve_method(load_config(config("multislerp", "o", [(d[0], {"weight": 1.0})], None, {"weight": 3.0})))
    assert (multi.weights, multi.normalize_weights, multi.eps, multi.uses_base) == ((1.0,), True, 1e-8, False)
    assert options.parameters.t == 1.5
