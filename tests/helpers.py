"""Test helpers: tiny checkpoints and a straightforward float32 implementation of SPEC.md's rules."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.samples import write_model

TINY_CONFIG = {"model_type": "llama", "hidden_size": 8}


def make_models(root: Path, n_experts: int = 3, *, dtype=torch.float32, seed: int = 0,
                shapes: dict | None = None) -> tuple[Path, list[Path], dict, list[dict]]:
    """A base and experts with random float tensors plus one int64 buffer; returns dirs and tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (16, 12), "b.weight": (33, 7), "c.bias": (12,), "d.weight": (5, 5, 3)}
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    base["pos.ids"] = torch.arange(10, dtype=torch.int64)
    experts = []
    for _ in range(n_experts):
        e = {n: (t.float() + torch.randn(t.shape, generator=g) * 0.1).to(dtype) for n, t in base.items() if t.is_floating_point()}
        e["pos.ids"] = base["pos.ids"].clone()
        experts.append(e)
    base_dir = write_model(root / "base", base, TINY_CONFIG)
    expert_dirs = [write_model(root / f"e{i}", e, TINY_CONFIG) for i, e in enumerate(experts)]
    return base_dir, expert_dirs, base, experts


def read_output(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def ties_reference(base: torch.Tensor, experts: list[torch.Tensor], weights, densities, *, lam=1.0, normalize=True) -> torch.Tensor:
    """Per-tensor TIES of SPEC.md in float32, written plainly (stable sort for the trim, mergekit zero sign)."""
    flat_base = base.float().reshape(-1)
    weighted = []
    for x, w, d in zip(experts, weights, densities):
        tau = x.float().reshape(-1) - flat_base
        n_keep = int(d * tau.numel())
        order = sorted(range(tau.numel()), key=lambda i: (-abs(float(tau[i])), i))[:n_keep]
        mask = torch.zeros_like(tau, dtype=torch.bool)
        mask[order] = True
        weighted.append(tau * mask * w)
    vote = torch.zeros_like(flat_base)
    for wt in weighted:
        vote = vote + wt
    gamma = torch.sign(vote)
    gamma[gamma == 0] = 1
    merged = torch.zeros_like(flat_base)
    divisor = torch.zeros_like(flat_base)
    for wt, w in zip(weighted, weights):
        agree = torch.sign(wt) == gamma
        merged = merged + wt * agree
        divisor = divisor + agree * w
    if normalize:
        divisor[divisor == 0] = 1
        merged = merged / divisor
    return (flat_base + lam * merged).reshape(base.shape)
