"""mergekit's ``slices:``: an output stacked from layer ranges of the inputs (a frankenmerge).

Each slice names one source model and a ``layer_range`` [first, end); the output's layers are the
slices' layers in order, renumbered from 0 (layer ``first + i`` of a slice's model becomes layer
``offset + i``, ``offset`` the layers of the slices before it), and config.json's layer count is
updated. Tensors outside the layers come from the first slice's model (embeddings) or the last
one's (final norm, head), as mergekit takes the pre- and post-layer weights. Stacking is
``merge_method: passthrough``; a slice merging several sources is not supported yet (refused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.config import ConfigError, MergeConfig, load_config
from pipeline.settings import LAYER, LAYER_COUNT_KEYS, layer_count
from workers.tensor_io import ModelFiles, TensorInfo, resolve_model

PRE_LAYER = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")  # before the layers


@dataclass(frozen=True)
class SlicedTensor:
    """One output tensor of a sliced plan: its name, where it comes from, and the slice's config."""

    name: str
    info: TensorInfo
    source: ModelFiles
    config: MergeConfig  # the plain one-model config of its slice (for the method's options)


def slice_configs(config: MergeConfig) -> list[MergeConfig]:
    """Per slice, the one-model config the method resolves for it (its source's parameters over the
    top-level ones)."""
    if config.merge_method != "passthrough":
        raise ConfigError(f"slices: with merge_method {config.merge_method} is not supported yet; mergefleet stacks "
                          "slices with merge_method: passthrough (one source per slice)")
    configs = []
    for i, output_slice in enumerate(config.slices):
        if len(output_slice.sources) != 1:
            raise ConfigError(f"slices.{i}.sources lists {len(output_slice.sources)} models; a slice that merges "
                              "several sources is not supported yet: give one source per slice (passthrough)")
        source = output_slice.sources[0]
        data = {k: v for k, v in config.record().items() if k not in ("slices", "base_model")}  # passthrough: no base
        data["models"] = [{"model": source.model, "parameters": dict(source.parameters)}]
        try:
            configs.append(load_config({**data, "storage": config.storage}))
        except ConfigError as exc:
            raise ConfigError(f"slices.{i}.sources.0: {exc}") from None
    return configs


def _renumbered(name: str, layer: int) -> str:
    """The tensor name with its layer index replaced."""
    match = LAYER.search(name)
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


def plan_slices(config: MergeConfig, storage_options: dict) -> tuple[list[SlicedTensor], list[ModelFiles], dict]:
    """(the output tensors in order, the distinct source models, config.json updates)."""
    configs = slice_configs(config)
    models = {s.sources[0].model: None for s in config.slices}
    for url in models:
        models[url] = resolve_model(url, storage_options=storage_options)
    tensors: list[SlicedTensor] = []
    first, last = models[config.slices[0].sources[0].model], models[config.slices[-1].sources[0].model]
    outside = lambda model: [n for n in model.tensors if not LAYER.search(n)]  # noqa: E731
    tensors += [SlicedTensor(n, first.tensors[n], first, configs[0]) for n in outside(first) if PRE_LAYER.search(n)]
    offset = 0
    for i, (output_slice, slice_config) in enumerate(zip(config.slices, configs)):
        source = output_slice.sources[0]
        model = models[source.model]
        available = layer_count({}, list(model.tensors))
        first_layer, end = source.layer_range
        if end > available:
            raise ConfigError(f"slices.{i}.sources.0.layer_range {list(source.layer_range)}: {source.model!r} has "
                              f"{available} layers")
        for layer in range(first_layer, end):
            for name in sorted(n for n in model.tensors if _layer_of(n) == layer):
                tensors.append(SlicedTensor(_renumbered(name, offset + layer - first_layer), model.tensors[name], model,
                                            slice_config))
        offset += end - first_layer
    tensors += [SlicedTensor(n, last.tensors[n], last, configs[-1]) for n in outside(last) if not PRE_LAYER.search(n)]
    return tensors, list(models.values()), {"layers": offset}


def _layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_count_updates(model_config: dict, layers: int) -> dict:
    """config.json keys to set for the stacked layer count (the key the model's config uses)."""
    key = next((k for k in LAYER_COUNT_KEYS if k in model_config), "num_hidden_layers")
    return {key: layers}
