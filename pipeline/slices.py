"""mergekit's ``slices:``: an output made of layer ranges of the inputs, slice after slice.

Each slice lists its sources (a model and a ``layer_range`` [first, end) each; every source of a
slice spans the same number of layers). Layer ``first + j`` of every source of a slice is merged
with the config's method into output layer ``offset + j`` (``offset`` the layers of the slices
before it), so the output's layers are renumbered from 0 and config.json's layer count is updated.
Tensors outside the layers are merged from the first slice's sources (embeddings) or the last
slice's (final norm, head), as mergekit plans its pre- and post-layer weights. One source per slice
with ``passthrough`` is a frankenmerge; several sources with any method is mergekit's usual slerp
(or TIES, …) over layer ranges. Gradients in a slice run over that slice's layers: layer j of n has
t = j / (n − 1); tensors outside the layers have t = 0. Each slice's sources carry their own
``parameters`` (over the top-level ones), as per-model parameters. A slice may be empty ([n, n]:
no layers, as mergekit allows). pipeline/modules.py plans these slices module by module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import ConfigError, MergeConfig, load_config
from pipeline.settings import LAYER, layer_count
from workers.methods import get_method
from workers.methods.base import expert_models
from workers.tensor_io import ModelFiles, TensorInfo

PRE_LAYER = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type|patch|ln_pre")  # before layers


@dataclass(frozen=True)
class SlicedTensor:
    """One output tensor of a sliced plan: its name, its inputs in the method's order (the base
    first when it reads one), the slice's one-slice config and the tensor's layer position t."""

    name: str
    infos: tuple[TensorInfo, ...]
    models: tuple[ModelFiles, ...]
    config: MergeConfig
    t: float


def slice_configs(config: MergeConfig) -> list[MergeConfig]:
    """Per slice, the plain config of its sources (models: the sources with their parameters)."""
    method = get_method(config.merge_method)
    configs = []
    for i, output_slice in enumerate(config.slices):
        counts = {s.layer_range[1] - s.layer_range[0] for s in output_slice.sources}
        if len(counts) != 1:
            raise ConfigError(f"slices.{i}.sources span different numbers of layers {sorted(counts)}; every source "
                              "of a slice must give as many layers (as mergekit requires)")
        data = {k: v for k, v in config.record().items() if k != "slices"}
        sources = [s.model for s in output_slice.sources]
        if not method.needs_base and data.get("base_model") not in sources:
            data.pop("base_model", None)  # a method without a base: the top-level base does not enter the slice
        data["models"] = [{"model": s.model, "parameters": dict(s.parameters)} for s in output_slice.sources]
        try:
            configs.append(load_config({**data, "storage": config.storage}))
        except ConfigError as exc:
            raise ConfigError(f"slices.{i}: {exc}") from None
    return configs


def plan_slices(config: MergeConfig, models: dict[str, ModelFiles],
                owns: Callable[[str], bool]) -> tuple[list[SlicedTensor], int]:
    """(the output tensors in order, the output's layer count) of the tensors ``owns`` accepts
    (a module's: pipeline/modules.py), the inputs resolved in ``models`` by the config's names."""
    configs = slice_configs(config)
    method = get_method(config.merge_method)
    ordered = [_ordered_sources(c, method, sl) for c, sl in zip(configs, config.slices)]
    tensors: list[SlicedTensor] = []
    first_sources, last_sources = ordered[0], ordered[-1]
    tensors += _outside(first_sources, models, configs[0], owns, pre=True)
    offset = 0
    for i, (sources, slice_config) in enumerate(zip(ordered, configs)):
        n = sources[0][1][1] - sources[0][1][0]
        for url, (first, end) in sources:
            available = layer_count({}, list(filter(owns, models[url].tensors)))
            if end > available:
                raise ConfigError(f"slices.{i}: layer_range [{first}, {end}] of {url!r}: it has {available} layers")
        lead_url, (lead_first, _) = sources[0]
        for j in range(n):
            for name in sorted(x for x in models[lead_url].tensors if owns(x) and _layer_of(x) == lead_first + j):
                infos = tuple(_tensor(models[url], _renumbered(name, first + j), i) for url, (first, _) in sources)
                tensors.append(SlicedTensor(_renumbered(name, offset + j), infos,
                                            tuple(models[url] for url, _ in sources), slice_config,
                                            j / (n - 1) if n > 1 else 1.0))
        offset += n
    tensors += _outside(last_sources, models, configs[-1], owns, pre=False)
    return tensors, offset


def _ordered_sources(slice_config: MergeConfig, method, output_slice) -> list[tuple[str, tuple[int, int]]]:
    """A slice's (model, layer_range) in the method's input order: the base first when it reads one."""
    ranges = {s.model: tuple(s.layer_range) for s in output_slice.sources}
    options = method.resolve(slice_config)
    base = [slice_config.base_model] if options.uses_base else []
    if options.uses_base and slice_config.base_model not in ranges:
        raise ConfigError(f"merge_method {method.name} over slices needs the base model {slice_config.base_model!r} "
                          "among every slice's sources (with its layer_range)")
    return [(url, ranges[url]) for url in base + [m.model for m in expert_models(slice_config, options.uses_base)]]


def _outside(sources, models: dict, slice_config: MergeConfig, owns: Callable[[str], bool], *,
             pre: bool) -> list[SlicedTensor]:
    """The tensors ``owns`` accepts outside the layers, before them (``pre``) or after, merged from these sources."""
    lead = models[sources[0][0]]
    names = sorted(n for n in lead.tensors if owns(n) and not LAYER.search(n) and bool(PRE_LAYER.search(n)) == pre)
    return [SlicedTensor(n, tuple(_tensor(models[url], n, None) for url, _ in sources),
                         tuple(models[url] for url, _ in sources), slice_config, 0.0) for n in names]


def _tensor(model: ModelFiles, name: str, slice_index: int | None) -> TensorInfo:
    info = model.tensors.get(name)
    if info is None:
        where = f"slices.{slice_index}: " if slice_index is not None else ""
        raise ConfigError(f"{where}tensor {name!r} is missing from {model.url!r}; the sources of a slice must share "
                          "the architecture")
    return info


def _layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def _renumbered(name: str, layer: int) -> str:
    """The tensor name with its layer index replaced."""
    match = LAYER.search(name)
    return name[:match.start(1)] + str(layer) + name[match.end(1):]
