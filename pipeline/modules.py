"""mergekit's ``modules:``: a model of several parts (a text decoder, a vision tower, a projector),
each merged by its own recipe.

An architecture is a list of modules. Each owns the tensors its pattern matches, numbers its layers
with its own index (``model.layers.N``, ``visual.blocks.N``: pipeline/settings.py's LAYER) and counts
them under its own config.json key (``text_config.num_hidden_layers``, ``vision_config.depth``). A
model of one part has a single module, ``default``, owning every tensor. The architecture is the
``model_type`` (or ``architectures``) of the base's config.json, else of the first model's.

A config is lowered as mergekit lowers it. Top-level ``slices:`` are the single module's (a model of
several modules refuses them); a module's ``models:`` are one slice of all its layers per model,
[0, n) with n the module's layer count in that model, the base added when the method reads it and it
is not listed. A module's ``parameters`` sit between the top-level ones and each model's. Each module
is then planned as a ``slices:`` config over its own tensors (pipeline/slices.py): its layers
renumbered from 0 within its own pattern, its own count key set in config.json. Only the modules
listed are planned: a module left out, and any tensor no module owns, is not in the output (as in
mergekit); the plan warns naming them. Top-level ``models:`` merge every tensor (pipeline/planner.py),
each gradient running over the layers of the tensor's module.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from pipeline.config import ConfigError, MergeConfig, load_config, resolve_method
from pipeline.settings import LAYER_COUNT_KEYS, config_value, falling_back, layer_count
from pipeline.slices import SlicedTensor, plan_slices
from workers.storage import join_url, open_fs
from workers.tensor_io import ModelFiles, resolve_model

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Module:
    """A module of an architecture: the tensors it owns and the config.json keys counting its layers."""

    name: str
    pattern: str  # regex matched at the start of the names of the tensors it owns
    count_keys: tuple[str, ...] = ()  # its layer count (dotted: nested); read from the first config.json has

    def owns(self, tensor: str) -> bool:
        return re.match(self.pattern, tensor) is not None

    def layers(self, model_config: dict, tensor_names) -> int:
        """Its layer count in a model: config.json's, else one more than its tensors' largest layer index."""
        return layer_count(model_config, [n for n in tensor_names if self.owns(n)], self.count_keys)

    def count_updates(self, model_config: dict, layers: int) -> dict[str, int]:
        """config.json's keys to set for an output of ``layers`` layers: each of its keys the config has."""
        return {key: layers for key in self.count_keys if config_value(model_config, key) is not None}


DEFAULT = (Module("default", "", LAYER_COUNT_KEYS),)
QWEN_VL = (  # the decoder at the root, the vision tower and its merger under visual. (or model.visual.)
    Module("text_decoder", r"lm_head\.|model\.(?!visual\.)", ("num_hidden_layers", "text_config.num_hidden_layers")),
    Module("vision_tower", r"(model\.)?visual\.(?!merger\.)", ("vision_config.depth",)),
    Module("multi_modal_projector", r"(model\.)?visual\.merger\."),
)
LLAVA = (  # language_model., vision_tower., multi_modal_projector. (or each under model.)
    Module("text_decoder", r"lm_head\.|(model\.)?language_model\.", ("text_config.num_hidden_layers",)),
    Module("vision_tower", r"(model\.)?vision_tower\.", ("vision_config.num_hidden_layers",)),
    Module("multi_modal_projector", r"(model\.)?multi_modal_projector\."),
)
ARCHITECTURES = {"qwen2_vl": QWEN_VL, "qwen2_5_vl": QWEN_VL, "mistral3": LLAVA, "gemma3": LLAVA}  # by model_type
MODEL_TYPES = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
               "Mistral3ForConditionalGeneration": "mistral3", "Gemma3ForConditionalGeneration": "gemma3"}  # by class


def architecture_of(model_config: dict) -> tuple[str, tuple[Module, ...] | None]:
    """(the architecture's name, its modules): a mapped one's, else the single ``default`` module;
    None for a model of several parts (sub-configs, an encoder and a decoder) not mapped here."""
    classes = model_config.get("architectures") or []
    name = model_config.get("model_type") or next((MODEL_TYPES[c] for c in classes if c in MODEL_TYPES), None)
    if name in ARCHITECTURES:
        return name, ARCHITECTURES[name]
    name = name or next(iter(classes), "unknown")
    return name, None if parts_of(model_config) else DEFAULT


def parts_of(model_config: dict) -> list[str]:
    """The sub-models config.json describes: its sub-configs (``text_config``, ...), an encoder and a decoder."""
    parts = [key for key, value in model_config.items() if isinstance(value, dict) and "model_type" in value]
    return parts + ["encoder", "decoder"] * (model_config.get("is_encoder_decoder") is True)


def layer_counts(model_config: dict, tensor_names: list[str]) -> dict[str, int]:
    """Per tensor, the layer count of the module owning it (of the whole model where no mapped module does)."""
    modules = architecture_of(model_config)[1] or DEFAULT
    counts = {m: m.layers(model_config, tensor_names) for m in modules}
    whole = DEFAULT[0].layers(model_config, tensor_names)
    return {n: next((c for m, c in counts.items() if m.owns(n)), whole) for n in tensor_names}


def read_model_config(model_url: str, storage_options: dict) -> dict:
    """A model's config.json ({} when it has none)."""
    fs, root = open_fs(model_url, storage_options)
    path = join_url(root.rsplit("/", 1)[0] if root.endswith(".safetensors") else root, "config.json")
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {}


def model_names(config: MergeConfig) -> list[str]:
    """Every model a ``slices:`` or ``modules:`` config reads, as it names them, in first-use order
    (the base last)."""
    sections = [config] if config.slices is not None else list((config.modules or {}).values())
    names = dict.fromkeys(n for section in sections for n in [
        *(m.model for m in section.models or ()), *(s.model for sl in section.slices or () for s in sl.sources)])
    return list(names | ({config.base_model: None} if config.base_model else {}))


def module_configs(config: MergeConfig) -> dict[str, MergeConfig]:
    """Per module listed, the config it is merged by: its ``models:`` or ``slices:``, its parameters
    over the top-level ones (a module's filter that matches nothing leaves the key to the top level)."""
    data = config.record()
    listed, top = data.pop("modules"), data.pop("parameters", {})
    configs = {}
    for name, module in listed.items():
        own = module.pop("parameters", {})
        parameters = {**top, **{k: falling_back(v, top[k]) if k in top else v for k, v in own.items()}}
        try:
            configs[name] = load_config({**data, **module, "parameters": parameters, "storage": config.storage})
        except ConfigError as exc:
            raise _in_module(name, exc) from None
    return configs


def _in_module(name: str, exc: ConfigError) -> ConfigError:
    """The error as one of module ``name``'s."""
    return ConfigError(f"modules.{name}: {str(exc).removeprefix('config: ')}")


def plan_modules(config: MergeConfig,
                 storage_options: dict) -> tuple[list[SlicedTensor], list[ModelFiles], dict[str, int], list[str]]:
    """(the output tensors in order, the distinct input models, config.json's layer-count updates, the
    tensors left out) of a ``slices:`` or ``modules:`` config, module by module."""
    names = model_names(config)
    models = {url: resolve_model(url, storage_options=storage_options) for url in names}
    configs = {url: read_model_config(models[url].url, storage_options) for url in names}
    reference_url = config.base_model or names[0]
    reference = configs[reference_url]
    tensors: list[SlicedTensor] = []
    updates: dict[str, int] = {}
    recipes = _recipes(config, reference)
    for module, recipe in recipes:
        try:
            sliced, layers = plan_slices(_as_slices(recipe, module, models, configs), models, module.owns)
        except ConfigError as exc:
            raise (_in_module(module.name, exc) if config.modules is not None else exc) from None
        tensors += sliced
        updates |= module.count_updates(reference, layers)
    left_out = sorted(n for n in models[reference_url].tensors
                      if not any(module.owns(n) for module, _ in recipes))
    if left_out:
        LOG.warning("%d tensors belong to no module listed under modules: and are left out of the output, as "
                    "mergekit leaves them (list their module to merge them): %s", len(left_out), left_out[:10])
    return tensors, list(models.values()), updates, left_out


def _recipes(config: MergeConfig, reference: dict) -> list[tuple[Module, MergeConfig]]:
    """Each module to plan with its config: the listed modules', or the top-level slices: as the single module's."""
    architecture, modules = architecture_of(reference)
    where = f"modules ({', '.join(config.modules)})" if config.modules is not None else "slices"
    if modules is None:
        raise ConfigError(f"{where}: the model ({architecture}) is made of several parts "
                          f"({', '.join(parts_of(reference))}) and mergefleet has no module map for {architecture}; "
                          f"it maps {', '.join(sorted(ARCHITECTURES))}. Merge it with top-level models: (every tensor "
                          "by one recipe), or with mergekit")
    valid = ", ".join(m.name for m in modules)
    if config.modules is None:
        if len(modules) > 1:
            raise ConfigError(f"slices: {architecture} is made of the modules {valid}, and top-level slices: apply "
                              f"to a model of one module (as in mergekit); give them to a module instead: modules: "
                              f"{{{modules[0].name}: {{slices: [...]}}, ...}}")
        return [(modules[0], config)]
    by_name = {m.name: m for m in modules}
    for name in config.modules:
        if name not in by_name:
            raise ConfigError(f"modules.{name}: {architecture} has no module {name!r}; its modules are {valid}")
    return [(by_name[name], recipe) for name, recipe in module_configs(config).items()]


def _as_slices(recipe: MergeConfig, module: Module, models: dict[str, ModelFiles],
               configs: dict[str, dict]) -> MergeConfig:
    """A module's recipe as slices: its own, or its models: as one slice of all the module's layers
    per model (the base added when the method reads it and it is not listed), as mergekit lowers them."""
    if recipe.slices is not None:
        return recipe
    data = recipe.record()
    entries = data.pop("models")
    if resolve_method(recipe).uses_base and recipe.base_model not in [e["model"] for e in entries]:
        entries.append({"model": recipe.base_model})
    sources = [{**e, "layer_range": [0, module.layers(configs[e["model"]], models[e["model"]].tensors)]}
               for e in entries]
    return load_config({**data, "slices": [{"sources": sources}], "storage": recipe.storage})
