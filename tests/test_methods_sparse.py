"""DARE, Model Breadcrumbs and DELLA (with and without sign consensus) against a float64 reference
written from mergekit 0.1.5's definition; masks reproducible for any shard count and row chunking."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import start_embedded_ray
from helpers import make_models, read_output

from pipeline.config import load_config
from pipeline.coordinator import run_merge
from workers.kernels.random_masks import mask_key, uniforms

METHODS = {  # name: (sparsification, consensus, default normalize, default rescale), as mergekit registers them
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
    "breadcrumbs": ("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", None, False, True),
}
WEIGHTS, DENSITIES = (1.0, 0.6, 0.8), (0.5, 0.3, 0.7)


def _mask(sparsification, tau32, shape, name, t, density, gamma, epsilon, seed) -> torch.Tensor:
    """The keep mask of one expert's τ, from the definition (float32 |τ| ranked as the kernels see it)."""
    n = tau32.numel()
    index = torch.arange(n)
    if sparsification == "random":
        return uniforms(mask_key(seed, name, t), index) < density
    magnitude = tau32.abs()
    if sparsification == "magnitude_outliers":
        order = sorted(range(n), key=lambda i: (-float(magnitude[i]), i))  # descending, ties by lowest index
        target, n_top = int(density * n), int(gamma * n)
        n_bottom = max(0, n - target - n_top)
        upper = n - n_bottom - target
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[upper:upper + target]] = True
        return mask
    fibers = magnitude.reshape(1, -1, 1) if len(shape) == 1 else magnitude.reshape(shape[0], shape[1], -1)
    ranks = torch.empty(fibers.shape, dtype=torch.float64)
    for i in range(fibers.shape[0]):
        for k in range(fibers.shape[2]):
            column = fibers[i, :, k].tolist()
            for rank, j in enumerate(sorted(range(len(column)), key=lambda j: (column[j], j))):
                ranks[i, j, k] = rank
    cols = fibers.shape[1]
    probs = (density - epsilon) + (ranks / (cols - 1) if cols > 1 else ranks * 0) * (2 * epsilon)
    return uniforms(mask_key(seed, name, t), index) < probs.reshape(-1)


def reference(method, name, base, experts, *, weights, densities, gamma=0.01, epsilon=0.15, seed=0, lam=1.0,
              normalize=None, rescale=None) -> torch.Tensor:
    """mergekit 0.1.5's GTA merge_group in float64: sparsify (l1 rescale), weight, mix, λ."""
    sparsification, consensus, default_normalize, default_rescale = METHODS[method]
    normalize = default_normalize if normalize is None else normalize
    rescale = default_rescale if rescale is None else rescale
    shape = base.shape
    b = base.double().reshape(-1)
    weighted = []
    for t, (x, w, d) in enumerate(zip(experts, weights, densities)):
        tau = x.double().reshape(-1) - b
        if d < 1:
            tau32 = x.float().reshape(-1) - base.float().reshape(-1)
            masked = torch.where(_mask(sparsification, tau32, shape, name, t, d, gamma, epsilon, seed), tau, 0.0)
            before, after = float(tau.abs().sum()), float(masked.abs().sum())
            if rescale and before >= 1e-7 and after >= 1e-7:
                masked = masked * (before / after)
            tau = masked
        weighted.append(tau * w)
    stacked = torch.stack(weighted)
    ws = torch.tensor(weights, dtype=torch.float64).view(-1, 1)
    if consensus is None:
        mixed = stacked.sum(0)
        divisor = ws.sum()
        divisor = 1.0 if abs(float(divisor)) < 1e-8 else divisor
    else:
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(stacked) == elected
        mixed = (stacked * agree).sum(0)
        divisor = (ws * agree).sum(0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return (b + mixed * lam).reshape(shape)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    start_embedded_ray()
    return make_models(tmp_path_factory.mktemp("sparse") / "in", n_experts=3, seed=31)


def _config(method, base_dir, expert_dirs, out, **extra) -> dict:
    params = extra.pop("parameters", {})
    return {"merge_method": method, "base_model": str(base_dir), "output": str(out), "dtype": "float32",
            "models": [{"model": str(e), "parameters": {"weight": w, "density": d}}
                       for e, w, d in zip(expert_dirs, WEIGHTS, DENSITIES)], "parameters": params, **extra}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_the_float64_reference(models, tmp_path, method):
    base_dir, expert_dirs, base, experts = models
    params = {"lambda": 0.9, "random_seed": 7} if method.startswith(("dare", "della")) else {"lambda": 0.9}
    run_merge(load_config(_config(method, base_dir, expert_dirs, tmp_path / "out", parameters=params)), progress=False)
    merged = read_output(tmp_path / "out")
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(merged[name], b)
            continue
        expected = reference(method, name, b, [e[name] for e in experts], weights=WEIGHTS, densities=DENSITIES,
                             seed=params.get("random_seed", 0), lam=0.9)
        torch.testing.assert_close(merged[name], expected.float(), rtol=2e-6, atol=1e-6, msg=f"{method} {name}")


@pytest.mark.parametrize("method", ["dare_ties", "della", "breadcrumbs_ties"])
def test_bytes_independent_of_shards_and_row_chunks(models, tmp_path, method):
    base_dir, expert_dirs, *_ = models
    outs = {}
    for label, extra in {"one": {"shards": 1}, "seven": {"shards": 7},
                         "chunked": {"shards": 3, "memory_budget": 3000, "process_reserve": 0}}.items():
        run_merge(load_config(_config(method, base_dir, expert_dirs, tmp_path / label, **extra)), progress=False)
        outs[label] = {k: v.numpy().tobytes() for k, v in read_output(tmp_path / label).items()}
    assert outs["one"] == outs["seven"] == outs["chunked"]


def test_seed_reproduces_and_changes_the_masks(models, tmp_path):
    base_dir, expert_dirs, *_ = models
    runs = {}
    for label, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_merge(load_config(_config("dare_linear", base_dir, expert_dirs, tmp_path / label,
                                      parameters={"random_seed": seed})), progress=False)
        runs[label] = read_output(tmp_path / label)["a.weight"]
    assert torch.equal(runs["a"], runs["b"]) and not torch.equal(runs["a"], runs["c"])


def test_dare_keeps_density_within_three_sigma():
    n, density = 200_000, 0.3
    kept = int((uniforms(mask_key(0, "model.layers.0.mlp.up_proj.weight", 2), torch.arange(n)) < density).sum())
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 3 * sigma


def test_della_needs_density_plus_minus_epsilon_inside_0_1(models):
    base_dir, expert_dirs, *_ = models
    from pipeline.config import ConfigError

    config = _config("della", base_dir, expert_dirs, "/tmp/unused", parameters={"epsilon": 0.35})
    with pytest.raises(ConfigError, match="density ± epsilon inside"):
        load_config(config)
