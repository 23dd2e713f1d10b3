"""Kernels of the merge diagnostics (workers/diagnostics.py) over one row chunk [rows, p].

``row_gram`` gives, per row, ⟨τ_a, τ_b⟩ (a ≤ b) and ‖θ − θ₀‖² with every sum exact. Each row of
each vector (τ_t = θ_t − θ₀ and θ − θ₀, in float32 as the merge forms them) is scaled by a power of
two below 2^h, h = ⌊(52 − ⌈log₂ p⌉) / 2⌋, so that a product of two of them (exact in float64) is
below 2^2h; each product is rounded to an integer, and the p integers of a row sum to less than
2^52: exact in float64 whatever the order of the additions, eager or compiled, CPU or GPU. The
only rounding is that of the products, 2^−2h of the largest product the row can hold (2^−38 for
rows of 2^14 elements). ``vote_counts`` counts what the trim and the sign election kept, over the
last axis. Both are pure tensor code, compiled for large chunks.
"""

from __future__ import annotations

import torch

EXPONENT_LIMIT = 400  # row exponents are clamped to ±this (only a zero or non-finite row gets there)


def grid_bits(row_elements: int) -> int:
    """h of ``row_gram`` for rows of ``row_elements`` elements."""
    return (52 - (row_elements - 1).bit_length()) // 2


def gram_pairs(n: int) -> list[tuple[int, int]]:
    """(a, b) for a ≤ b, row by row: the order of the Gram entries."""
    return [(a, b) for a in range(n) for b in range(a, n)]


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent in float64, exactly, from int64 exponents in [−1022, 1023] (built from the bits)."""
    return ((exponent + 1023) << 52).view(torch.float64)


def row_gram(base, experts, out, half_bits: int) -> torch.Tensor:
    """[rows, P] float64 for base [rows, p], experts [T, rows, p], out [rows, p]: per row the
    P = T(T+1)/2 + 1 sums Σ τ_a·τ_b (``gram_pairs(T)``) and Σ (θ − θ₀)², exact on the grid."""
    b = base.float()
    vectors = [experts[t].float() - b for t in range(experts.shape[0])] + [out.float() - b]
    exponents = [((v.abs().amax(-1, keepdim=True).double().view(torch.int64) >> 52) - 1022)
                 .clamp(-EXPONENT_LIMIT, EXPONENT_LIMIT) for v in vectors]  # 2^e > the row's largest |value|
    scaled = [v.double().mul_(_pow2(half_bits - e)) for v, e in zip(vectors, exponents)]  # exact, below 2^h
    merged = len(vectors) - 1
    return torch.stack([(scaled[i] * scaled[j]).round_().sum(-1)
                        * _pow2(exponents[i] + exponents[j] - 2 * half_bits)[..., 0]
                        for i, j in gram_pairs(merged) + [(merged, merged)]], -1)


# float64 in 256-bit vectors: on AVX-512 the products ran in 39-42 ms per 11.5M x 4 chunk against 54-58 ms
# in 512-bit ones (g++'s code for 32 lanes of float64 spills); with COMPILE_OPTIONS it compiles in 4.0 s, not 6.0 s
# (workers/compiled.py)
row_gram.cpu_vector_bits = 256


def vote_counts(kept: list, conflicts: list | None, contributes: list) -> torch.Tensor:
    """int32 [..., 2T + 1], summed over the last axis: per expert its non-zero kept τ, per expert its
    kept values against the elected sign (zeros without ``conflicts``), then the elements no
    expert ``contributes`` to."""
    def count(mask):
        return mask.to(torch.int32).sum(-1, dtype=torch.int32)

    none = ~contributes[0]
    for c in contributes[1:]:
        none = none & ~c
    against = [count(c) for c in conflicts] if conflicts is not None else [torch.zeros_like(count(none))] * len(kept)
    return torch.stack([*(count(x != 0) for x in kept), *against, count(none)], -1)
