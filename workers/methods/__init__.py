"""The merge-method registry: every method is one registered object (workers/methods/base.py).

Adding a method is one module defining its object plus one line in ``REGISTRY`` below. The order
is mergekit 0.1.5's, then mergefleet's own.
"""

from __future__ import annotations

from workers.methods.arcee_fusion import ARCEE_FUSION
from workers.methods.base import ConfigError, MergeMethod, MethodOptions, MethodParameters
from workers.methods.karcher import KARCHER
from workers.methods.linear import LINEAR
from workers.methods.model_stock import MODEL_STOCK
from workers.methods.multislerp import MULTISLERP
from workers.methods.nearswap import NEARSWAP
from workers.methods.nuslerp import NUSLERP
from workers.methods.passthrough import PASSTHROUGH
from workers.methods.ram import RAM, RAMPLUS_TL
from workers.methods.sce import SCE
from workers.methods.slerp import SLERP
from workers.methods.sparse_gta import BREADCRUMBS, BREADCRUMBS_TIES, DARE_LINEAR, DARE_TIES, DELLA, DELLA_LINEAR
from workers.methods.task_arithmetic import TASK_ARITHMETIC
from workers.methods.ties import TIES
from workers.methods.twin import TWIN

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (
    LINEAR,
    TASK_ARITHMETIC,
    TIES,
    DARE_TIES,
    DARE_LINEAR,
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DELLA,
    DELLA_LINEAR,
    SCE,
    SLERP,
    NUSLERP,
    MULTISLERP,
    KARCHER,
    MODEL_STOCK,
    NEARSWAP,
    ARCEE_FUSION,
    RAM,
    RAMPLUS_TL,
    PASSTHROUGH,
    TWIN,
)}


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; an unknown name lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"merge_method: unknown method {name!r}; mergefleet has {', '.join(REGISTRY)}") from None


def method_of(options: MethodOptions) -> MergeMethod:
    """The registered method that resolved these options."""
    return REGISTRY[options.method]


def owners_of(key: str) -> list[str]:
    """The methods whose top-level parameters accept ``key`` (its name or alias)."""
    return [name for name, m in REGISTRY.items() if _accepts(m.parameters, key)]


def model_owners_of(key: str) -> list[str]:
    """The methods whose per-model parameters accept ``key``."""
    return [name for name, m in REGISTRY.items() if _accepts(m.model_parameters, key)]


def _accepts(parameters: type[MethodParameters], key: str) -> bool:
    return any(key in (field, info.alias) for field, info in parameters.model_fields.items())


def validate_parameters(method: MergeMethod, raw: dict, path: str) -> MethodParameters:
    """``method``'s top-level parameters from ``raw``, errors naming keys under ``path``."""
    return method.validate_parameters(raw, path, owners_of)


__all__ = ["REGISTRY", "ConfigError", "MergeMethod", "MethodOptions", "get_method", "method_of", "model_owners_of", "owners_of",
           "validate_parameters"]
