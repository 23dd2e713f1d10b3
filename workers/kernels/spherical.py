"""Spherical-interpolation kernels (slerp, nuslerp, multislerp, karcher): chunk-invariant sums and
the small per-tensor (or per-vector) angle math. docs/algorithms.md §9.

These methods need whole-tensor quantities (norms, dot products) before any element is merged, and
a tensor larger than the memory budget arrives in row chunks. For the output bytes not to depend on
the chunking, every sum is taken in one fixed order that depends only on the tensor's shape: inside
a row, a pairwise tree over its elements (``row_sums``); across rows, a pairwise tree over absolute
row indices, built as the chunks arrive in row order (``RowTree``). Both trees are built from
elementwise adds only, so the order is the same for any chunk size and on any device. The sums are
accumulated in float64: a product of two float32 numbers is exact in float64, so a norm or a dot
product carries only the rounding of the additions (the Karcher iteration's stopping test needs
tangent norms that a float32 Gram matrix cannot give, see ``karcher_coefficients``).

The merged values themselves are computed elementwise in float32 (``combine``), one model at a
time in input order, from coefficients computed here in float64 and rounded to float32 once.
"""

from __future__ import annotations

import math

import torch

# mergekit 0.1.5's constants (merge_methods/slerp.py, nuslerp.py)
SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: linear interpolation instead of slerp
SLERP_NORM_EPS = 1e-8  # a norm at or below this is replaced by 1 (the vector is used unnormalized)
NUSLERP_NORM_CLAMP = 1e-7  # nuslerp normalizes by max(‖v‖, this)
NUSLERP_COLINEAR_EPS = 1e-8  # nuslerp: colinear when 1 − cos² <= this²
NUSLERP_ZERO_WEIGHT_SUM = 1e-6  # nuslerp: |w₀ + w₁| below this gives t = 0.5


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ over the last axis of ``x`` [..., n] by a pairwise tree of elementwise adds (the first half
    plus the second half, an odd last element carried): each row's sum depends on that row alone,
    never on how many rows ``x`` holds. An empty last axis sums to 0."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        paired = x[..., :half] + x[..., half:2 * half]
        x = torch.cat([paired, x[..., 2 * half:]], dim=-1) if x.shape[-1] % 2 else paired
    return x[..., 0]


class RowTree:
    """Σ over a tensor's rows of per-row values [rows, ...], fed chunk by chunk in row order.

    The sum is a pairwise tree over absolute row indices: node (level l, j) is the sum of rows
    j·2ˡ … (j+1)·2ˡ − 1, its left child plus its right child. A chunk is cut into the largest aligned
    blocks it holds (each a whole subtree, reduced by adjacent pairs), and a stack merges a block
    with its left sibling as soon as both are known, so the nodes, and the total, are the same
    bits for any chunking. The stack holds at most log₂(rows) + 1 partial sums."""

    def __init__(self):
        self._stack: list[tuple[int, torch.Tensor]] = []  # (level, subtree sum), levels decreasing
        self._next = 0  # the first row not yet added

    def add(self, values: torch.Tensor, start: int) -> None:
        """Add rows ``start`` … ``start + len(values) − 1`` (the next rows, in order)."""
        if start != self._next:
            raise ValueError(f"RowTree: rows must arrive in order (expected row {self._next}, got {start})")
        pos, end = start, start + values.shape[0]
        while pos < end:
            level = 0
            while pos % (2 << level) == 0 and pos + (2 << level) <= end:
                level += 1
            block = values[pos - start:pos - start + (1 << level)]
            while block.shape[0] > 1:
                block = block[0::2] + block[1::2]
            self._push(level, block[0])
            pos += 1 << level
        self._next = end

    def _push(self, level: int, value: torch.Tensor) -> None:
        while self._stack and self._stack[-1][0] == level:
            value = self._stack.pop()[1] + value
            level += 1
        self._stack.append((level, value))

    def total(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of every row added (``like``'s shape of zeros when none was)."""
        if not self._stack:
            if like is None:
                raise ValueError("RowTree: no rows were added")
            return torch.zeros_like(like)
        acc = self._stack[-1][1]
        for _, value in reversed(self._stack[:-1]):
            acc = value + acc
        return acc


def gram_row_sums(rows: list[torch.Tensor], pairs: list[tuple[int, int]]) -> torch.Tensor:
    """[r, len(pairs)] float64: per row (``rows[i]`` is [r, n]), Σ x_i·x_j over the row for each pair."""
    wide = [x.double() for x in rows]
    return torch.stack([row_sums(wide[i] * wide[j]) for i, j in pairs], dim=1)


def combine(terms: list[tuple[torch.Tensor, torch.Tensor]], base: torch.Tensor | None, *,
            out_dtype: torch.dtype) -> torch.Tensor:
    """base + Σ c_k (x_k − base) (Σ c_k x_k without a base), in float32, one term at a time in order.

    Each ``terms`` entry is (x_k, c_k): c_k a float32 scalar or a float32 tensor broadcasting
    against x_k (per-vector coefficients). Plain multiplies and adds, never fused."""
    b = base.float() if base is not None else None
    total = None
    for x, c in terms:
        v = x.float() if b is None else x.float() - b
        term = v * c
        total = term if total is None else total + term
    if b is not None:
        total = b + total
    return total.to(out_dtype)


def slerp_cosine(norm_sq_a: float, norm_sq_b: float, dot: float) -> float:
    """mergekit 0.1.5 slerp's cos = a·b / (‖a‖‖b‖), norms ≤ 1e-8 replaced by 1, clamped to [−1, 1]."""
    na, nb = math.sqrt(norm_sq_a), math.sqrt(norm_sq_b)
    na = na if na > SLERP_NORM_EPS else 1.0
    nb = nb if nb > SLERP_NORM_EPS else 1.0
    return min(1.0, max(-1.0, dot / na / nb))


def slerp_coefficients(norm_sq_a: float, norm_sq_b: float, dot: float, t: float) -> tuple[float, float, bool]:
    """mergekit 0.1.5 slerp of whole tensors a (t = 0) and b (t = 1): (c_a, c_b, linear) with
    result = c_a·a + c_b·b (cos from ``slerp_cosine``); |cos| > 0.9995 (near-parallel or
    antipodal) falls back to the lerp (1 − t, t)."""
    cos = slerp_cosine(norm_sq_a, norm_sq_b, dot)
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t, True
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s, False


def nuslerp_coefficients(norm_sq_0: torch.Tensor, norm_sq_1: torch.Tensor, dot: torch.Tensor, t: float):
    """mergekit 0.1.5 nuslerp per vector (float64 tensors of any shape, one entry per vector):
    (c₀, c₁, colinear) with result = c₀·v₀ + c₁·v₁. Vectors are normalized by max(‖v‖, 1e-7);
    colinear (1 − cos² <= 1e-16) gives the lerp (1 − t, t)."""
    n0 = norm_sq_0.sqrt().clamp(min=NUSLERP_NORM_CLAMP)
    n1 = norm_sq_1.sqrt().clamp(min=NUSLERP_NORM_CLAMP)
    cos = (dot / n0 / n1).clamp(-1.0, 1.0)
    colinear = (1.0 - cos * cos) <= NUSLERP_COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
    return c0, c1, colinear


def nuslerp_t(w0: float, w1: float) -> float:
    """mergekit's interpolation fraction from the two weights: w₁ / (w₀ + w₁), or 0.5 when
    |w₀ + w₁| < 1e-6."""
    total = w0 + w1
    return 0.5 if abs(total) < NUSLERP_ZERO_WEIGHT_SUM else w1 / total


def multislerp_unit_scales(norm_sq: list[float], eps: float) -> list[float]:
    """1 / (‖x_i‖ + eps): mergekit's "unit" vectors are x_i / (‖x_i‖ + eps)."""
    return [1.0 / (math.sqrt(s) + eps) for s in norm_sq]


def multislerp_coefficients(norm_sq: list[float], weights: list[float], mean_norm: float, eps: float) -> list[float]:
    """mergekit 0.1.5 multislerp (≥ 2 inputs, mean_norm >= eps): result = Σ k_i x_i.

    With u_i = x_i / (‖x_i‖ + eps), m = Σ w_i u_i and M = ‖m‖, mergekit projects the u_i to the
    tangent space at m / M, averages there and maps back with the exponential map. The tangent
    average is Σ w_i (u_i − (u_i·m̂) m̂) = m − (m·m̂) m̂ = 0 identically, so the map returns
    m̂·cos(0 + eps); the result, scaled by Σ w_i ‖x_i‖, is
    (Σ_j w_j ‖x_j‖) · cos(eps) · m / M, i.e. k_i = (Σ_j w_j ‖x_j‖) · cos(eps) · w_i / ((‖x_i‖ + eps) M)."""
    avg_norm = sum(w * math.sqrt(s) for w, s in zip(weights, norm_sq))
    scale = avg_norm * math.cos(eps) / mean_norm
    return [scale * w * u for w, u in zip(weights, multislerp_unit_scales(norm_sq, eps))]


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> tuple[list[float], dict]:
    """mergekit 0.1.5's weighted Karcher mean on the unit sphere, equal weights 1/N, from the
    inputs' Gram matrix ``gram`` [N, N] (float64, x_i·x_j): k with result = Σ k_i x_i, and a record
    (iterations run, whether the tangent norm fell below tol).

    The mean stays in the span of the unit vectors u_i = x_i / ‖x_i‖, so it is carried as
    coefficients β (mean = Σ β_j u_j) and every dot product comes from G_ij = u_i·u_j:
    inputs with ‖x_i‖ <= tol are left out of the direction (their norms still count in the scale);
    the start is the normalized mean of the unit vectors (the first valid unit vector when that
    mean's norm is below tol); each step takes θ_i = acos(clamp(u_i·mean)) (inputs with θ_i < tol
    or 0 skipped), the tangent Σ α_i θ_i / sin θ_i (u_i − cos θ_i · mean) with α = 1 / #valid, stops when
    its norm is below tol, else moves along it by the exponential map and renormalizes (when the
    norm exceeds tol); at most ``max_iter`` steps. The result is (Σ_i ‖x_i‖ / N) · mean; zeros when
    no input is valid. A float64 Gram matrix makes the tangent norm (a small difference of O(1)
    quadratic terms) accurate to ~1e-8, well below tol."""
    g = gram.to(torch.float64).cpu()
    n_inputs = g.shape[0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n_inputs)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    record = {"iterations": 0, "converged": False, "valid": len(valid)}
    if not valid:
        return [0.0] * n_inputs, record
    nv = torch.tensor([norms[i] for i in valid], dtype=torch.float64)
    units = g[valid][:, valid] / nv[:, None] / nv[None, :]  # G_ij = u_i · u_j
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def norm_of(coefficients: torch.Tensor) -> float:
        return math.sqrt(max(float(coefficients @ units @ coefficients), 0.0))

    beta = alpha.clone()
    mean_norm = norm_of(beta)
    if mean_norm < tol or mean_norm == 0.0:  # (== 0 with tol = 0: mergekit divides 0 by 0)
        beta = torch.zeros_like(alpha)
        beta[0] = 1.0
    else:
        beta = beta / mean_norm
    for _ in range(max_iter):
        dots = (units @ beta).clamp(-1.0, 1.0)
        theta = torch.acos(dots)
        moving = (theta >= tol) & (theta > 0)  # θ = 0 (tol = 0): mergekit's 0 / sin 0 is NaN; the term is 0
        ratio = torch.where(moving, theta / torch.where(moving, torch.sin(theta), torch.ones_like(theta)),
                            torch.zeros_like(theta))
        c = alpha * ratio
        gamma = c - float(c @ dots) * beta  # tangent = Σ c_i (u_i − d_i mean) = Σ γ_j u_j
        tangent_norm = norm_of(gamma)
        if tangent_norm < tol or tangent_norm == 0.0:  # (== 0 with tol = 0: mergekit divides by 0)
            record["converged"] = True
            break
        record["iterations"] += 1
        beta = math.cos(tangent_norm) * beta + (math.sin(tangent_norm) / tangent_norm) * gamma
        unit_norm = norm_of(beta)
        if unit_norm > tol:
            beta = beta / unit_norm
    scale = sum(norms) / n_inputs
    k = [0.0] * n_inputs
    for position, i in enumerate(valid):
        k[i] = scale * float(beta[position]) / norms[i]
    return k, record
