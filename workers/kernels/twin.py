"""Twin-Merging kernels: exclusive knowledge v_t = θ_t − θ* and its truncated-SVD compression.

Tensors in, tensors out, no I/O. A 2-D exclusive tensor v (m×n) is stored as factors
B = U_r Σ_r (m×r) and A = V_rᵀ (r×n), never as the dense product.

Choices this module makes (docs/algorithms.md §5.3–5.4):

- **Rank.** Exactly one of ``rank`` (fixed, capped at min(m, n)), ``rank_ratio``
  (r = max(1, int(ratio · min(m, n))), rounded down like ``int(density · numel)`` in TIES) or
  ``energy`` (smallest r whose Σ_{i≤r} σ_i² reaches ``energy`` · ‖v‖_F²). The rank is never 0:
  a zero matrix gets rank 1 with zero factors under ``energy`` and the requested rank under
  ``rank``/``rank_ratio``, so every 2-D tensor has factors and a PEFT adapter (which needs r ≥ 1)
  can cover it.
- **SVD.** ``exact`` is ``torch.linalg.svd(full_matrices=False)`` (never ``True``: on a
  vocab×hidden embedding that would allocate vocab² floats). ``randomized`` is the Halko et al.
  range finder with ``power_iters`` subspace iterations and ``oversample`` extra columns, the
  algorithm of ``torch.svd_lowrank``, written out here so that the Gaussian test matrix comes
  from a seeded ``torch.Generator`` instead of the global RNG: results are byte-identical from
  call to call (same torch build, device and thread count) and calls from several threads do not
  disturb each other. For a float32 v the range finder (the sketch and the power iterations)
  multiplies a bfloat16 copy of v where bfloat16 products are native (a GPU, an AVX-512 BF16 or
  AMX CPU; several times float32's speed), orthonormalizing in float32; the last product Qᵀv is
  float32 on v itself, so the factors stay an orthogonal projection of v and the rounding only
  perturbs which subspace Q spans (the error matches the all-float64 algorithm's, tests). ``auto`` takes ``randomized`` when min(m, n) > ``auto_threshold`` and the
  sketch (r + oversample) is at most a quarter of min(m, n), else ``exact``.
- **Energy with randomized SVD.** ‖v‖_F² is known exactly, and the top-r factors of a randomized
  SVD capture exactly Σ_{i≤r} σ̃_i² of it (they are an orthogonal projection of v). So the
  sketch size starts small and doubles until the σ̃ reach the energy target; the returned factors
  then provably capture at least ``energy`` of ‖v‖² (r may exceed the exact minimum by a little,
  since σ̃ ≤ σ). When the sketch would pass a quarter of min(m, n) the exact SVD is used instead.
- **Error.** ``rel_error`` = ‖v − BA‖_F / ‖v‖_F (0 for a zero matrix). Exact: from the discarded
  singular values (Eckart–Young). Randomized: BA is the orthogonal projection of v onto the span
  of Q U_r, so ‖v − BA‖² = ‖v‖² − Σ_{i≤r} σ̃_i² (no pass over v); when that leaves less than
  10⁻⁴ of ‖v‖², where the subtraction loses digits, the residual is formed instead, in row
  blocks of at most 2²² elements (no extra m×n buffer). ‖v‖² is summed in float64 block by
  block, and a non-finite sum is how NaN or Inf in v is caught.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

SvdMethod = Literal["auto", "exact", "randomized"]

DEFAULT_AUTO_THRESHOLD = 256  # min(m, n) above which "auto" may pick the randomized SVD (when r is small)
_RESIDUAL_BLOCK_ELEMENTS = 1 << 22  # elements of v − BA formed at once when measuring the error
_NORM_BLOCK_ELEMENTS = 1 << 16  # elements of v upcast to float64 at once for ‖v‖²
_PROJECTION_ERROR_FLOOR = 1e-4  # below this share of ‖v‖², measure the residual instead of subtracting


@dataclass(frozen=True)
class Factors:
    """Low-rank factors of one exclusive tensor: v ≈ B @ A."""

    B: torch.Tensor  # m×r, U_r Σ_r
    A: torch.Tensor  # r×n, V_rᵀ (orthonormal rows, or zero for a zero matrix)
    rank: int  # r
    rel_error: float  # ‖v − BA‖_F / ‖v‖_F (0.0 when v is zero)
    method: str  # "exact", "randomized" or "zero" (v was all zeros: no SVD ran)


def exclusive(theta_t: torch.Tensor, theta_star: torch.Tensor) -> torch.Tensor:
    """v_t = θ_t − θ*, computed in float32 (float64 stays float64)."""
    if theta_t.shape != theta_star.shape:
        raise ValueError(
            f"expert tensor has shape {tuple(theta_t.shape)}, shared tensor has {tuple(theta_star.shape)}; "
            "experts must share the base architecture"
        )
    dtype = _compute_dtype(theta_t, theta_star)
    return theta_t.to(dtype) - theta_star.to(dtype)


def choose_rank(
    singular_values: torch.Tensor | None,
    shape: tuple[int, int],
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
) -> int:
    """The truncation rank r ≥ 1 for a matrix of ``shape``; exactly one of the three rules.

    ``singular_values`` (descending) is needed for ``energy`` only; the energy total is
    Σ σ², so pass the full spectrum. A zero spectrum gives 1.
    """
    _check_one_rule(rank, rank_ratio, energy)
    m, n = shape
    min_dim = min(m, n)
    if min_dim < 1:
        raise ValueError(f"cannot factorize an empty matrix of shape {tuple(shape)}")
    if rank is not None:
        return min(rank, min_dim)
    if rank_ratio is not None:
        return max(1, int(rank_ratio * min_dim))
    if singular_values is None:
        raise ValueError("energy needs the singular values; pass the full spectrum of the matrix")
    squares = singular_values.detach().to(torch.float64).pow(2)
    cumulative = torch.cumsum(squares, 0)
    total = float(cumulative[-1]) if cumulative.numel() else 0.0
    rank_found = _energy_rank(cumulative, total, energy)
    return min(rank_found if rank_found is not None else cumulative.numel(), min_dim)


def factorize(
    v: torch.Tensor,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    energy: float | None = None,
    svd: SvdMethod = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    auto_threshold: int = DEFAULT_AUTO_THRESHOLD,
    seed: int = 0,
) -> Factors:
    """Truncated SVD of a 2-D tensor v ≈ B A (see the module docstring for every rule).

    Computes in float32 (float64 input stays float64); the factors come back in that dtype on
    v's device.
    """
    _check_one_rule(rank, rank_ratio, energy)
    if v.dim() != 2:
        raise ValueError(f"factorize takes a 2-D tensor, got shape {tuple(v.shape)}; 1-D deltas are stored dense")
    if svd not in ("auto", "exact", "randomized"):
        raise ValueError(f"svd must be 'auto', 'exact' or 'randomized', got {svd!r}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"oversample ({oversample}) and power_iters ({power_iters}) must be >= 0")
    v = v.to(_compute_dtype(v))
    m, n = v.shape
    min_dim = min(m, n)
    if min_dim < 1:
        raise ValueError(f"cannot factorize an empty matrix of shape {(m, n)}")
    norm_sq = _squared_norm(v)
    if not math.isfinite(norm_sq):
        raise ValueError(f"matrix of shape {(m, n)} holds NaN or inf; check the expert and shared checkpoints")
    if norm_sq == 0.0:
        r = 1 if energy is not None else choose_rank(None, (m, n), rank=rank, rank_ratio=rank_ratio)
        return Factors(B=v.new_zeros(m, r), A=v.new_zeros(r, n), rank=r, rel_error=0.0, method="zero")

    if energy is not None:
        if svd == "exact" or (svd == "auto" and min_dim <= auto_threshold):
            return _exact(v, energy=energy)
        return _randomized_energy(v, energy, norm_sq, oversample=oversample, power_iters=power_iters, seed=seed)

    r = choose_rank(None, (m, n), rank=rank, rank_ratio=rank_ratio)
    use_randomized = svd == "randomized" or (
        svd == "auto" and min_dim > auto_threshold and 4 * (r + oversample) <= min_dim
    )
    if not use_randomized:
        return _exact(v, rank=r)
    q = min(r + oversample, min_dim)
    U, S, Vh = _randomized_svd(v, v.to(_sketch_dtype(v)), q, power_iters=power_iters, seed=seed)
    return _randomized_factors(v, U, S, Vh, r, norm_sq)


def compress_exclusive(
    theta_t: torch.Tensor, theta_star: torch.Tensor, **factorize_options
) -> Factors | torch.Tensor:
    """Twin step 2+3 for one tensor: factors of v_t when it is 2-D, else the dense v_t.

    Tensors that are not 2-D (biases, norms; conv kernels too) are kept dense.
    """
    v = exclusive(theta_t, theta_star)
    if v.dim() == 2:
        return factorize(v, **factorize_options)
    return v


def _check_one_rule(rank: int | None, rank_ratio: float | None, energy: float | None) -> None:
    given = [name for name, value in (("rank", rank), ("rank_ratio", rank_ratio), ("energy", energy)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank, rank_ratio, energy; got {given or 'none'}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if rank_ratio is not None and not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"rank_ratio must lie in (0, 1], got {rank_ratio!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy!r}")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    for t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"Twin compression takes floating-point tensors, got {t.dtype}")
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _energy_rank(cumulative: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest r with cumulative[r-1] ≥ energy · total; 1 when total is 0; None if never reached."""
    if total == 0.0:
        return 1
    target = torch.tensor(energy * total, dtype=torch.float64)
    index = int(torch.searchsorted(cumulative, target, side="left"))
    if index < cumulative.numel():
        return index + 1
    # energy = 1 can miss the last partial sum by one rounding step: take the full spectrum then
    return cumulative.numel() if energy * total <= float(cumulative[-1]) * (1 + 1e-12) else None


def _exact(v: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> Factors:
    U, S, Vh = torch.linalg.svd(v, full_matrices=False)
    r = rank if rank is not None else choose_rank(S, tuple(v.shape), energy=energy)
    squares = S.to(torch.float64).pow(2)
    rel_error = math.sqrt(float(squares[r:].sum()) / float(squares.sum()))
    return Factors(B=U[:, :r] * S[:r], A=Vh[:r].clone(), rank=r, rel_error=rel_error, method="exact")


def _randomized_energy(
    v: torch.Tensor, energy: float, norm_sq: float, *, oversample: int, power_iters: int, seed: int
) -> Factors:
    min_dim = min(v.shape)
    sketch = max(16, min_dim // 32)
    v_sketch = v.to(_sketch_dtype(v))
    while 4 * (sketch + oversample) <= min_dim:
        U, S, Vh = _randomized_svd(v, v_sketch, sketch + oversample, power_iters=power_iters, seed=seed)
        r = _energy_rank(torch.cumsum(S.to(torch.float64).pow(2), 0), norm_sq, energy)
        if r is not None:
            return _randomized_factors(v, U, S, Vh, r, norm_sq)
        sketch *= 2
    return _exact(v, energy=energy)


def _randomized_svd(
    v: torch.Tensor, v_sketch: torch.Tensor, q: int, *, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-q SVD of v by a seeded randomized range finder with subspace iteration (Halko 4.4): the
    range finder multiplies ``v_sketch`` (v in ``_sketch_dtype``), the final Qᵀv is v's own."""
    n = v.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=generator, dtype=v.dtype).to(v.device, v_sketch.dtype)
    Q = _orthonormal(v_sketch @ omega, v.dtype)
    for _ in range(power_iters):
        Z = _orthonormal((Q.to(v_sketch.dtype).mT @ v_sketch).mT, v.dtype)
        Q = _orthonormal(v_sketch @ Z.to(v_sketch.dtype), v.dtype)
    U_small, S, Vh = torch.linalg.svd(Q.mT @ v, full_matrices=False)
    return Q @ U_small, S, Vh


def _sketch_dtype(v: torch.Tensor) -> torch.dtype:
    """The dtype of the range finder's products: bfloat16 for a float32 v on a GPU or on a CPU that
    multiplies bfloat16 natively (AVX-512 BF16, which every AMX CPU has), else v's dtype."""
    fast = v.device.type == "cuda" or (v.device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())
    return torch.bfloat16 if v.dtype == torch.float32 and fast else v.dtype


def _orthonormal(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An orthonormal basis of y's columns, in ``dtype``."""
    return torch.linalg.qr(y.to(dtype)).Q


def _randomized_factors(v, U, S, Vh, r: int, norm_sq: float) -> Factors:
    """Factors B = U_r Σ_r, A = V_rᵀ of a randomized SVD, with their error (module docstring)."""
    B, A = U[:, :r] * S[:r], Vh[:r].clone()
    residual_sq = norm_sq - float(S[:r].to(torch.float64).pow(2).sum())
    if residual_sq > _PROJECTION_ERROR_FLOOR * norm_sq:
        rel_error = math.sqrt(residual_sq / norm_sq)
    else:
        rel_error = _relative_error(v, B, A, norm_sq)
    return Factors(B=B, A=A, rank=r, rel_error=rel_error, method="randomized")


def _squared_norm(v: torch.Tensor) -> float:
    """‖v‖_F² summed in float64 a block at a time (inf or NaN when v holds either)."""
    flat = v.reshape(-1)
    total = 0.0
    for block in flat.split(_NORM_BLOCK_ELEMENTS):
        wide = block.to(torch.float64)
        total += float(torch.dot(wide, wide))
    return total


def _relative_error(v: torch.Tensor, B: torch.Tensor, A: torch.Tensor, norm_sq: float) -> float:
    """‖v − BA‖_F / ‖v‖_F, forming the residual a block of rows at a time."""
    m, n = v.shape
    rows = max(1, _RESIDUAL_BLOCK_ELEMENTS // max(n, 1))
    residual_sq = 0.0
    for start in range(0, m, rows):
        block = v[start : start + rows] - B[start : start + rows] @ A
        residual_sq += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    return math.sqrt(residual_sq / norm_sq)
