"""Per-tensor merge diagnostics, computed in the shard tasks from the chunks the merge holds (no
extra read). docs/diagnostics.md defines them; in short, for the task-vector methods, with
τ_t = θ_t − θ₀ and τ̂_t what the trim keeps of it (float32, as the kernels form them):

- ``kept``: per expert, the non-zero τ̂_t (no trim: the non-zero τ_t), out of ``elements``;
- ``sign_conflicts``: per expert, the kept w_t·τ̂_t against the elected sign (None for a method
  that elects none);
- ``none_kept``: the elements no expert contributes to (θ keeps θ₀ there);
- ``gram``: ⟨τ_a, τ_b⟩ for a ≤ b (``gram_pairs``), and ``merged_sq``: ‖θ − θ₀‖² of the output as
  written (λ included).

Counts are exact integers; the sums are exact per row (workers/kernels/diagnostics.py) and added
over the rows with ``math.fsum`` (correctly rounded), so every value is the same for any row
chunking, shard count, device, or eager and compiled kernels. slerp records its angle.
"""

from __future__ import annotations

import functools
import math

import torch

from workers.kernels.diagnostics import gram_pairs, grid_bits, row_gram

EAGER_BLOCK_ELEMENTS = 1 << 16  # elements per eager row_gram call: its temporaries stay small and cached


class TensorProbe:
    """One merged tensor's diagnostics, fed chunk by chunk; ``finish`` adds its record to the shard's."""

    def __init__(self, records: list[dict], task, n_experts: int, elects_sign: bool):
        self.records, self.name, self.elects_sign = records, task.name, elects_sign
        self.elements = math.prod(task.shape)
        self.row_elements = max(1, math.prod(task.shape[1:]))
        self.half_bits = grid_bits(self.row_elements)
        self.counted = [0] * (2 * n_experts + 1)  # kept per expert, conflicts per expert, none kept
        self.row_sums: list[list[float]] = [[] for _ in range(len(gram_pairs(n_experts)) + 1)]

    def chunk(self, ctx, rows, base, experts, out, counts: torch.Tensor) -> None:
        """Add one merged chunk: its ``counts`` (``vote_counts``) and its ``row_gram``, in one call
        when the chunk compiles (no temporaries), else in row blocks."""
        with ctx.timer.track("diagnostics"):
            totals = counts.reshape(-1, len(self.counted)).sum(0, dtype=torch.int64).tolist()
            self.counted = [a + b for a, b in zip(self.counted, totals)]
            p, n = self.row_elements, rows[1] - rows[0]
            base, experts, out = base.view(n, p), experts.view(experts.shape[0], n, p), out.view(n, p)
            compiles = ctx.compiler.enabled and experts.numel() >= ctx.compiler.min_elements
            step = n if compiles else max(1, EAGER_BLOCK_ELEMENTS // p)
            for r in range(0, n, step):
                sums = ctx.compiler.run(row_gram, base[r:r + step], experts[:, r:r + step], out[r:r + step],
                                        self.half_bits, numel=experts.numel())
                for column, values in zip(self.row_sums, sums.T.tolist()):
                    column.extend(values)

    def finish(self) -> None:
        t = (len(self.counted) - 1) // 2
        sums = [math.fsum(column) for column in self.row_sums]
        self.records.append({"name": self.name, "elements": self.elements, "kept": self.counted[:t],
                             "sign_conflicts": self.counted[t:2 * t] if self.elects_sign else None,
                             "none_kept": self.counted[2 * t], "gram": sums[:-1], "merged_sq": sums[-1]})


@functools.cache
def counted_into(kernel):
    """``kernel(..., counted=True)`` as a kernel writing its merged chunk into ``out`` and returning
    the counts; one code object per kernel, so dynamo keeps their graphs apart (as
    ``workers.compiled.into_kernel``)."""
    def counted(out, *args, **kwargs):
        merged, counts = kernel(*args, counted=True, **kwargs)
        out.copy_(merged)
        return counts

    counted.__code__ = counted.__code__.replace(co_name=f"{kernel.__name__}_counted")
    counted.__name__ = counted.__code__.co_name
    return counted


def merge_chunk(ctx, counted: bool, kernel, out, base, experts, *args, **kwargs):
    """(merged chunk, counts): a task-vector merge kernel run into ``out`` (``ctx.compiler.run_into``),
    or, ``counted``, its counted form (same bytes) with its ``vote_counts`` (else None)."""
    if not counted:
        return ctx.compiler.run_into(kernel, out, base, experts, *args, numel=experts.numel(), **kwargs), None
    return out, ctx.compiler.run(counted_into(kernel), out, base, experts, *args, numel=experts.numel(), **kwargs)


def table_columns(record: dict | None) -> dict:
    """The manifest.parquet columns of one tensor's record (None where it has none): counts as
    they are, ‖τ_t‖ and ‖θ − θ₀‖ as norms, ⟨τ_a, τ_b⟩ for a < b."""
    record = record or {}
    gram, merged_sq = record.get("gram"), record.get("merged_sq")
    pairs = gram_pairs(len(record.get("kept") or ()))
    return {"elements": record.get("elements"), "kept": record.get("kept"),
            "sign_conflicts": record.get("sign_conflicts"), "none_kept": record.get("none_kept"),
            "tau_norm": None if gram is None else [math.sqrt(g) for (a, b), g in zip(pairs, gram) if a == b],
            "tau_dot": None if gram is None else [g for (a, b), g in zip(pairs, gram) if a < b],
            "merged_norm": None if merged_sq is None else math.sqrt(merged_sq),
            "slerp_angle": record.get("slerp_angle")}


def ratio(a, b):
    """a / b, None when b is 0 (or None)."""
    return a / b if b else None


def summary(records: list[dict], experts: list[str]) -> dict:
    """manifest.json's ``extra.diagnostics``: the task-vector records summed over the model (counts
    exactly, float sums with math.fsum), fractions and cosines from the sums; slerp's angles."""
    merged = [r for r in records if "gram" in r]
    angles = [r["slerp_angle"] for r in records if r.get("slerp_angle") is not None]
    found: dict = {"tensors": len(records), "columns": "manifest.parquet (docs/diagnostics.md)"}
    if angles:
        found["slerp_angle"] = {"tensors": len(angles), "mean": math.fsum(angles) / len(angles),
                                "min": min(angles), "max": max(angles)}
    widths = {len(r["kept"]) for r in merged}
    if len(widths) != 1:  # none, or recipes merging different numbers of models (slices, modules)
        return found
    n = widths.pop()
    pairs = gram_pairs(n)
    elements = sum(r["elements"] for r in merged)
    kept = [sum(r["kept"][t] for r in merged) for t in range(n)]
    gram = {pair: math.fsum(r["gram"][i] for r in merged) for i, pair in enumerate(pairs)}
    norms = [math.sqrt(gram[(t, t)]) for t in range(n)]
    merged_norm = math.sqrt(math.fsum(r["merged_sq"] for r in merged))
    elected = [r for r in merged if r["sign_conflicts"] is not None]
    conflicts = [sum(r["sign_conflicts"][t] for r in elected) for t in range(n)] if elected else None
    none_kept = sum(r["none_kept"] for r in merged)
    found.update({
        "task_vector_tensors": len(merged), "elements": elements,
        "experts": experts if len(experts) == n else None,
        "kept": kept, "kept_fraction": [ratio(k, elements) for k in kept],
        "sign_conflicts": conflicts,
        "sign_conflict_rate": ratio(sum(conflicts), sum(sum(r["kept"]) for r in elected)) if elected else None,
        "none_kept": none_kept, "none_kept_fraction": ratio(none_kept, elements),
        "tau_norm": norms, "merged_norm": merged_norm, "norm_ratio": ratio(merged_norm, sum(norms) / n),
        "cosine": [[ratio(gram[min(a, b), max(a, b)], norms[a] * norms[b]) for b in range(n)] for a in range(n)],
    })
    return found
