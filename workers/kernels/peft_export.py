"""One expert's Twin factors as a PEFT LoRA adapter over the shared model θ* (pure, no I/O).

The adapter is what ``peft.PeftModel.from_pretrained(shared_model, adapter_dir)`` loads after the
caller writes ``adapter_model.safetensors`` (the state dict) and ``adapter_config.json`` (the
config) side by side. Keys are the ones peft saves, ``base_model.model.<module path>.…`` where the
module path is the tensor name without its trailing ``.weight``; load the adapter onto the same
model class whose tensor names θ* was written with (a ``bert.`` prefix in the names means a
``Bert…For…`` head model, not ``BertModel``).

What the adapter carries (``lora_coverage`` reports it per tensor, for the manifest):

- **2-D factors of nn.Linear weights**: ``lora_A.weight`` = A (r×n), ``lora_B.weight`` = B (m×r).
- **2-D factors of nn.Embedding weights** (module paths listed in ``embedding_modules``; use
  ``embedding_module_paths(model)`` to list them): peft's embedding LoRA adds
  ``(lora_embedding_Aᵀ)[ids] @ lora_embedding_Bᵀ``, so ``lora_embedding_A`` = Bᵀ (r×vocab) and
  ``lora_embedding_B`` = Aᵀ (dim×r). An embedding not listed would be written as a Linear
  adapter, which peft does not load into an embedding layer: list them.
- **1-D bias deltas of factored Linear layers** through peft's ``lora_bias`` (a bias on lora_B,
  so Δb is added with scale 1), when ``bias_deltas`` is true and no embedding is in the adapter
  (peft refuses ``lora_bias`` on embedding layers, and the flag is adapter-wide).
- **Nothing else.** LoRA cannot express a LayerNorm delta (or a bias of a layer without factors),
  and ``modules_to_save`` would store whole modules, not deltas, and lose the low-rank storage for
  a Linear. Those deltas are reported as ``"omitted"``; the adapter then equals the Twin model
  with exactly those deltas left out (Twin ``fixed`` mode with the expert's weight 1 and the
  omitted deltas dropped), which is the comparison the tests make.

Scale: every module's lora_alpha / r is exactly 1 — ``r`` is the largest rank, ``lora_alpha = r``,
and each module of another rank has the same number in ``rank_pattern`` and ``alpha_pattern``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping

import torch
from torch import nn

from workers.kernels.twin import Factors

LOG = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."

COVERAGE_LINEAR = "lora_linear"
COVERAGE_EMBEDDING = "lora_embedding"
COVERAGE_BIAS = "lora_bias"
COVERAGE_OMITTED = "omitted"

FactorPair = tuple[torch.Tensor, torch.Tensor] | Factors


def embedding_module_paths(model: nn.Module) -> list[str]:
    """Module paths of the nn.Embedding layers of a model (build it on the meta device if large)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Embedding)]


def lora_coverage(
    tensor_names: Iterable[str],
    factors: Mapping[str, FactorPair],
    dense_deltas: Mapping[str, torch.Tensor] | None = None,
    *,
    embedding_modules: Collection[str] = (),
    bias_deltas: bool = True,
) -> dict[str, str]:
    """How the adapter carries each exclusive tensor of one expert.

    Returns {tensor name: "lora_linear" | "lora_embedding" | "lora_bias" | "omitted"} for every
    name in ``factors`` and ``dense_deltas``.
    """
    names = set(tensor_names)
    embeddings = {_module_path(name) if name.endswith(".weight") else name for name in embedding_modules}
    coverage: dict[str, str] = {}
    for name, pair in factors.items():
        B, A = _pair(pair)
        _check_factor(name, B, A, names)
        coverage[name] = COVERAGE_EMBEDDING if _module_path(name) in embeddings else COVERAGE_LINEAR
    use_bias = _uses_lora_bias(coverage, dense_deltas or {}, bias_deltas)
    for name, delta in (dense_deltas or {}).items():
        if name not in names:
            raise ValueError(f"dense delta {name!r} is not a tensor of the shared model; check the tensor names")
        if name in coverage:
            raise ValueError(f"tensor {name!r} has both factors and a dense delta; give one")
        if delta.dim() != 1:
            raise ValueError(
                f"dense delta {name!r} has shape {tuple(delta.shape)}; 2-D deltas must come as factors"
            )
        linear_weight = name.removesuffix(".bias") + ".weight"
        carried = use_bias and name.endswith(".bias") and coverage.get(linear_weight) == COVERAGE_LINEAR
        coverage[name] = COVERAGE_BIAS if carried else COVERAGE_OMITTED
    return coverage


def export_lora_adapter(
    tensor_names: Iterable[str],
    factors: Mapping[str, FactorPair],
    dense_deltas: Mapping[str, torch.Tensor] | None = None,
    *,
    base_model_name_or_path: str | None = None,
    embedding_modules: Collection[str] = (),
    bias_deltas: bool = True,
    task_type: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter state dict, adapter_config.json dict) for one expert; see the module docstring.

    ``tensor_names``: every tensor name of the shared model (to pick target_modules that match
    nothing else). ``factors``: {weight name: (B, A)} or {weight name: Factors}.
    ``dense_deltas``: the expert's 1-D deltas. ``bias_deltas=False`` leaves bias deltas out
    (for loaders without ``lora_bias`` support).
    """
    names = list(tensor_names)
    if not factors:
        raise ValueError("no factors to export: a LoRA adapter needs at least one 2-D tensor")
    dense_deltas = dense_deltas or {}
    coverage = lora_coverage(
        names, factors, dense_deltas, embedding_modules=embedding_modules, bias_deltas=bias_deltas
    )
    omitted = sorted(name for name, how in coverage.items() if how == COVERAGE_OMITTED)
    if omitted:
        LOG.warning("LoRA adapter leaves out %d 1-D deltas it cannot express: %s", len(omitted), omitted)
    lora_bias = any(how == COVERAGE_BIAS for how in coverage.values())

    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, pair in factors.items():
        B, A = _pair(pair)
        path = _module_path(name)
        ranks[path] = A.shape[0]
        key = PEFT_PREFIX + path
        if coverage[name] == COVERAGE_EMBEDDING:
            state[f"{key}.lora_embedding_A"] = _fresh(B.mT)
            state[f"{key}.lora_embedding_B"] = _fresh(A.mT)
            continue
        state[f"{key}.lora_A.weight"] = _fresh(A)
        state[f"{key}.lora_B.weight"] = _fresh(B)
        if lora_bias:
            bias = dense_deltas.get(path + ".bias")
            state[f"{key}.lora_B.bias"] = _fresh(bias.to(B.dtype)) if bias is not None else B.new_zeros(B.shape[0])

    r = max(ranks.values())
    all_modules = {name.rsplit(".", 1)[0] for name in names if "." in name}
    targets = _target_modules(sorted(ranks), all_modules)
    patterns = {_pattern_key(path, ranks): rank for path, rank in sorted(ranks.items()) if rank != r}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return state, config


def _pair(pair: FactorPair) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(pair, Factors):
        return pair.B, pair.A
    B, A = pair
    return B, A


def _module_path(name: str) -> str:
    return name.removesuffix(".weight")


def _check_factor(name: str, B: torch.Tensor, A: torch.Tensor, names: set[str]) -> None:
    if not name.endswith(".weight"):
        raise ValueError(f"factors for {name!r}: LoRA adapts module weights, the name must end with '.weight'")
    if name not in names:
        raise ValueError(f"factors for {name!r}, which is not a tensor of the shared model; check the tensor names")
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0] or A.shape[0] < 1:
        raise ValueError(
            f"factors for {name!r} have shapes B {tuple(B.shape)}, A {tuple(A.shape)}; "
            "expected B m×r and A r×n with r >= 1"
        )


def _uses_lora_bias(coverage: Mapping[str, str], dense_deltas: Mapping[str, torch.Tensor], bias_deltas: bool) -> bool:
    if not bias_deltas or COVERAGE_EMBEDDING in coverage.values():
        return False
    return any(
        name.endswith(".bias") and coverage.get(name.removesuffix(".bias") + ".weight") == COVERAGE_LINEAR
        for name in dense_deltas
    )


def _target_modules(paths: list[str], all_modules: set[str]) -> list[str]:
    """Module-name suffixes (["query", "dense", ...]) when they select exactly ``paths``, else the full paths."""
    suffixes = {path.rsplit(".", 1)[-1] for path in paths}
    selected = {module for module in all_modules if module.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if selected == set(paths) else paths


def _pattern_key(path: str, ranks: Mapping[str, int]) -> str:
    """The module path as a rank_pattern key; anchored and escaped if peft's regex would match another module."""
    if any(other != path and re.match(rf"(.*\.)?({path})$", other) for other in ranks):
        return "^" + re.escape(path)
    return path


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy with its own storage (safetensors refuses shared or strided views)."""
    return t.detach().contiguous().clone()
