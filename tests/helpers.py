"""Test helpers: tiny checkpoints and plain references of docs/algorithms.md's rules (trim, linear, task arithmetic, TIES)."""

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


def run_pipeline(config: dict) -> tuple[dict[str, torch.Tensor], object]:
    """Plan with build_plan, run every shard in this process with run_shard, read every output file."""
    from pipeline.config import load_config
    from pipeline.planner import build_plan
    from workers.shard_task import run_shard

    plan = build_plan(load_config(config))
    for spec in plan.shards:
        run_shard(spec)
    tensors = {}
    for spec in plan.shards:
        tensors.update(load_file(str(Path(plan.output_url) / spec.file_name)))
    return tensors, plan


def read_output(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def trim_reference(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Per-tensor trim (docs/algorithms.md): keep the first n of a stable sort by (−|τ|, index), with
    n = every element at density ≥ 1, else max(1, int(density·numel)) (mergekit 0.1.5)."""
    flat = tau.reshape(-1).tolist()
    n_keep = len(flat) if density >= 1 else max(1, int(density * len(flat))) if flat else 0
    order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))[:n_keep]
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order] = True
    return torch.where(keep, tau.reshape(-1), torch.zeros(())).reshape(tau.shape)


def merge_reference(method: str, base: torch.Tensor | None, models: list[torch.Tensor], *, weights, densities=None,
                    lam: float = 1.0, normalize: bool | None = None, sign_method: str = "sum",
                    zero_sign: str = "positive", dtype=torch.float64) -> torch.Tensor:
    """docs/algorithms.md's linear / task arithmetic / per-tensor TIES on one tensor, in ``dtype``."""
    shape = models[0].shape
    xs = [m.to(dtype).reshape(-1) for m in models]
    if method == "linear":
        total = torch.zeros_like(xs[0])
        for x, w in zip(xs, weights):
            total = total + x * w
        normalize = True if normalize is None else normalize
        return (total / sum(weights) if normalize else total).reshape(shape)
    b = base.to(dtype).reshape(-1)
    taus = [x - b for x in xs]
    if method == "task_arithmetic":
        total = torch.zeros_like(b)
        for tau, w in zip(taus, weights):
            total = total + tau * w
        if normalize:
            total = total / sum(weights)
        return (b + lam * total).reshape(shape)
    assert method == "ties"
    normalize = True if normalize is None else normalize
    weighted = [trim_reference(tau, d) * w for tau, w, d in zip(taus, weights, densities)]  # weights multiply τ before the vote
    vote = torch.zeros_like(b)
    for wt in weighted:
        vote = vote + (wt if sign_method == "sum" else torch.sign(wt))
    gamma = torch.sign(vote)
    if zero_sign == "positive":
        fill = 1.0
    else:  # the sign of Σγ over the tensor (before filling), +1 when that is 0
        fill = -1.0 if float(gamma.sum()) < 0 else 1.0
    gamma = torch.where(gamma == 0, torch.full_like(gamma, fill), gamma)
    kept_sum = torch.zeros_like(b)
    kept_weight = torch.zeros_like(b)
    for wt, w in zip(weighted, weights):
        agree = torch.sign(wt) == gamma
        kept_sum = kept_sum + wt * agree
        kept_weight = kept_weight + agree * w
    if normalize:
        merged = torch.where(kept_weight == 0, kept_sum, kept_sum / torch.where(kept_weight == 0, 1.0, kept_weight))
    else:
        merged = kept_sum
    return (b + lam * merged).reshape(shape)
