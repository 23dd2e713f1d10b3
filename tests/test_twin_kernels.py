"""workers/twin.py: rank rules, exact and randomized truncated SVD, determinism, exclusive knowledge."""

from __future__ import annotations

import math
import time

import pytest
import torch

from workers.kernels import twin
from workers.kernels.twin import Factors, choose_rank, compress_exclusive, exclusive, factorize


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank_plus_noise(m: int, n: int, signal_rank: int, noise: float, *, dtype=torch.float32) -> torch.Tensor:
    g = _generator(1)
    U = torch.linalg.qr(torch.randn(m, signal_rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, signal_rank, generator=g, dtype=torch.float64)).Q
    sigma = torch.logspace(1, 0, signal_rank, dtype=torch.float64)  # 10 .. 1
    return ((U * sigma) @ V.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)).to(dtype)


def _decaying_spectrum(m: int, n: int, decay: float) -> torch.Tensor:
    """float64 m×n with σ_i = i^-decay: the slow decay where the power iterations matter."""
    g = _generator(2)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * torch.arange(1, k + 1, dtype=torch.float64) ** -decay) @ V.T


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (64, 64)])
@pytest.mark.parametrize("r", [1, 5, 17])
def test_exact_is_the_best_rank_r_approximation(shape, r):
    v = torch.randn(*shape, generator=_generator(), dtype=torch.float64)
    f = factorize(v, rank=r, svd="exact")
    sigma = torch.linalg.svdvals(v)
    eckart_young = math.sqrt(float((sigma[r:] ** 2).sum())) / float(torch.linalg.norm(v))
    measured = float(torch.linalg.norm(v - f.B @ f.A)) / float(torch.linalg.norm(v))
    assert f.rank == r and f.method == "exact"
    assert f.B.shape == (shape[0], r) and f.A.shape == (r, shape[1])
    assert measured == pytest.approx(eckart_young, abs=1e-6)
    assert f.rel_error == pytest.approx(eckart_young, abs=1e-6)
    # B = U_r Σ_r and A = V_rᵀ: A has orthonormal rows, B's column norms are the top singular values
    assert torch.allclose(f.A @ f.A.T, torch.eye(r, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(torch.linalg.norm(f.B, dim=0), sigma[:r], atol=1e-10)


def test_randomized_is_within_5_percent_of_exact_on_1024_square():
    v = _low_rank_plus_noise(1024, 1024, signal_rank=40, noise=1e-3)
    exact = factorize(v, rank=32, svd="exact")
    randomized = factorize(v, rank=32, svd="randomized")
    assert randomized.method == "randomized" and randomized.rank == 32
    assert randomized.rel_error <= 1.05 * exact.rel_error
    # the reported error is the real one
    measured = float(torch.linalg.norm((v - randomized.B @ randomized.A).double())) / float(torch.linalg.norm(v.double()))
    assert randomized.rel_error == pytest.approx(measured, rel=1e-4)


@pytest.mark.parametrize("decay", [0.25, 0.5, 1.0])
def test_bfloat16_range_finder_keeps_the_float64_accuracy(decay):
    # float32 v: the range finder's products run in bfloat16, Qᵀv in float32; against float64
    # references, the error stays within 5% of the exact truncated SVD's and matches the float64
    # range finder's (the same algorithm with every product in float64)
    v64 = _decaying_spectrum(512, 1024, decay)
    sigma_sq = torch.linalg.svdvals(v64) ** 2
    best = math.sqrt(float(sigma_sq[32:].sum() / sigma_sq.sum()))
    f = factorize(v64.float(), rank=32, svd="randomized")
    reference = factorize(v64, rank=32, svd="randomized")
    measured = float(torch.linalg.norm(v64 - f.B.double() @ f.A.double())) / float(torch.linalg.norm(v64))
    assert f.B.dtype == torch.float32
    assert measured <= 1.05 * best and reference.rel_error <= 1.05 * best
    assert f.rel_error == pytest.approx(measured, rel=1e-4)
    assert measured <= reference.rel_error * (1 + 1e-3)


def test_randomized_svd_is_deterministic_and_leaves_the_global_rng_alone():
    v = _low_rank_plus_noise(300, 200, signal_rank=20, noise=1e-2)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = factorize(v, rank=8, svd="randomized")
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(999)  # a different global RNG state changes nothing
    second = factorize(v, rank=8, svd="randomized")
    assert first.B.numpy().tobytes() == second.B.numpy().tobytes()
    assert first.A.numpy().tobytes() == second.A.numpy().tobytes()
    assert first.rel_error == second.rel_error
    other_seed = factorize(v, rank=8, svd="randomized", seed=1)
    assert not torch.equal(first.A, other_seed.A)


def test_exact_is_deterministic():
    v = torch.randn(50, 40, generator=_generator())
    a, b = factorize(v, rank=6, svd="exact"), factorize(v, rank=6, svd="exact")
    assert a.B.numpy().tobytes() == b.B.numpy().tobytes() and a.A.numpy().tobytes() == b.A.numpy().tobytes()


def test_choose_rank_rules():
    assert choose_rank(None, (100, 40), rank=8) == 8
    assert choose_rank(None, (100, 40), rank=500) == 40  # capped at min(m, n)
    assert choose_rank(None, (100, 40), rank_ratio=0.1) == 4
    assert choose_rank(None, (100, 40), rank_ratio=0.01) == 1  # never below 1
    assert choose_rank(None, (100, 100), rank_ratio=0.29) == 28  # int() rounds down (0.29·100 = 28.999…)
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1, 0 of 14
    assert choose_rank(sigma, (4, 4), energy=9 / 14) == 1
    assert choose_rank(sigma, (4, 4), energy=9 / 14 + 1e-6) == 2
    assert choose_rank(sigma, (4, 4), energy=0.95) == 3
    assert choose_rank(sigma, (4, 4), energy=1.0) == 3
    assert choose_rank(torch.zeros(4), (4, 4), energy=0.9) == 1
    with pytest.raises(ValueError, match="exactly one"):
        choose_rank(sigma, (4, 4), rank=2, energy=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        choose_rank(sigma, (4, 4))
    for bad in ({"rank": 0}, {"rank_ratio": 0.0}, {"rank_ratio": 1.5}, {"energy": 0.0}, {"energy": 1.01}):
        with pytest.raises(ValueError):
            choose_rank(sigma, (4, 4), **bad)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_rank_exact_and_randomized(energy):
    v = _low_rank_plus_noise(400, 300, signal_rank=30, noise=1e-2, dtype=torch.float64)
    sigma_sq = torch.linalg.svdvals(v) ** 2
    cumulative = torch.cumsum(sigma_sq, 0) / sigma_sq.sum()
    expected = int((cumulative < energy).sum()) + 1
    exact = factorize(v, energy=energy, svd="exact")
    assert exact.rank == expected
    assert exact.rel_error ** 2 <= 1 - energy + 1e-12
    randomized = factorize(v, energy=energy, svd="randomized")
    # the randomized factors provably capture the energy, with a rank a little above the minimum at
    # most (σ̃ ≤ σ; the gap grows once the target reaches into the noise floor)
    assert randomized.rel_error ** 2 <= 1 - energy + 1e-12
    assert expected <= randomized.rank <= max(expected + 2, math.ceil(1.1 * expected))


def test_energy_randomized_falls_back_to_exact_when_the_rank_is_large():
    v = torch.randn(200, 200, generator=_generator(), dtype=torch.float64)  # flat spectrum
    f = factorize(v, energy=0.99, svd="randomized")
    assert f.method == "exact"
    assert f.rank == choose_rank(torch.linalg.svdvals(v), (200, 200), energy=0.99)


def test_auto_picks_randomized_only_for_large_matrices_with_small_rank():
    v = _low_rank_plus_noise(300, 200, signal_rank=10, noise=1e-3)
    assert factorize(v, rank=4, auto_threshold=100).method == "randomized"
    assert factorize(v, rank=4).method == "exact"  # below the default threshold
    assert factorize(v, rank=100, auto_threshold=100).method == "exact"  # rank too large for a sketch


def test_tall_embedding_never_builds_a_full_u(monkeypatch):
    calls = []
    real_svd = torch.linalg.svd

    def spy(a, full_matrices=True, **kwargs):
        calls.append(full_matrices)
        return real_svd(a, full_matrices=full_matrices, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    v = torch.randn(5000, 64, generator=_generator())
    start = time.perf_counter()
    for method in ("exact", "randomized"):
        f = factorize(v, rank=16, svd=method)
        assert f.B.shape == (5000, 16) and f.A.shape == (16, 64)
    factorize(v, energy=0.5, svd="exact")
    assert time.perf_counter() - start < 5.0
    assert calls and not any(calls)


def test_zero_matrix_gives_zero_factors():
    v = torch.zeros(20, 10)
    by_energy = factorize(v, energy=0.9)
    assert by_energy.rank == 1 and by_energy.method == "zero" and by_energy.rel_error == 0.0
    assert not by_energy.B.any() and not by_energy.A.any()
    assert factorize(v, rank=4).rank == 4
    assert factorize(v, rank_ratio=0.5).rank == 5


def test_input_checks():
    with pytest.raises(ValueError, match="2-D"):
        factorize(torch.ones(5), rank=1)
    with pytest.raises(ValueError, match="NaN"):
        factorize(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), rank=1)
    with pytest.raises(ValueError, match="svd must be"):
        factorize(torch.ones(3, 3), rank=1, svd="fast")
    with pytest.raises(ValueError, match="floating-point"):
        factorize(torch.ones(3, 3, dtype=torch.int64), rank=1)


def test_dtypes():
    v64 = torch.randn(12, 8, generator=_generator(), dtype=torch.float64)
    assert factorize(v64, rank=2).B.dtype == torch.float64
    assert factorize(v64.to(torch.bfloat16), rank=2).B.dtype == torch.float32


def test_exclusive_and_compress():
    g = _generator()
    theta_t = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}
    theta_star = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}
    assert torch.equal(exclusive(theta_t["w"], theta_star["w"]), theta_t["w"] - theta_star["w"])
    assert exclusive(theta_t["w"].bfloat16(), theta_star["w"].bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="share the base architecture"):
        exclusive(theta_t["w"], theta_star["b"])
    compressed_w = compress_exclusive(theta_t["w"], theta_star["w"], rank=4)
    assert isinstance(compressed_w, Factors)
    assert torch.allclose(compressed_w.B @ compressed_w.A, theta_t["w"] - theta_star["w"], atol=1e-5)
    compressed_b = compress_exclusive(theta_t["b"], theta_star["b"], rank=4)
    assert torch.equal(compressed_b, theta_t["b"] - theta_star["b"])


def test_residual_is_measured_in_blocks(monkeypatch):
    monkeypatch.setattr(twin, "_RESIDUAL_BLOCK_ELEMENTS", 64)  # many blocks of a few rows
    v = _low_rank_plus_noise(100, 50, signal_rank=8, noise=1e-2, dtype=torch.float64)
    f = factorize(v, rank=5, svd="randomized")
    measured = float(torch.linalg.norm(v - f.B @ f.A)) / float(torch.linalg.norm(v))
    assert f.rel_error == pytest.approx(measured, rel=1e-10)
