"""The merge config: mergekit's YAML format plus mergefleet's optional keys, validated once.

An existing mergekit config works unchanged: ``models:``, ``slices:`` (pipeline/slices.py) or
``modules:`` (pipeline/modules.py). Unknown keys are an error naming the key. The keys under
``parameters:`` (top level, per module and per model) belong to the method: they are validated
through its registered parameter models (workers/methods/), so a key of another method says which
method has it. ``resolve_method`` turns a config into the
method's resolved options (every default filled).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from manifests.schema import config_digest
from workers.methods import (
    ConfigError,
    MethodOptions,
    MethodParameters,
    get_method,
    model_owners_of,
    validate_parameters,
)
from pipeline.settings import evaluate, is_setting, leaves
from workers.methods.base import describe_errors, keys_of, unknown_key
from workers.tensor_io import DTYPE_ALIASES

MERGEKIT_CONFIG_KEYS = frozenset({  # mergekit 0.1.5's config keys (top level and per model), supported here or not
    "modules", "slices", "models", "merge_method", "base_model", "dtype", "tokenizer_source", "tokenizer",
    "chat_template", "out_dtype", "parameters", "model", "layer_range", "sources",
})
DEFAULT_MEMORY_BUDGET = 4 * 1024**3
DEFAULT_PROCESS_RESERVE = "512MiB"  # a CPU worker with Python, torch, Ray and the compiled kernels: 0.2-0.5 GB
DEFAULT_SHARD_BYTES = 1024**3


def parse_bytes(value: Union[int, str]) -> int:
    """'4GB', '512MiB', '1e9' or an int -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"{value!r} is not a size; write e.g. 4GB or 512MiB")
    number, unit, binary = match.groups()
    exponent = "KMGT".find(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** exponent)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ModelEntry(_Frozen):
    model: str  # local directory or fsspec URL of a Hugging Face safetensors layout
    parameters: SerializeAsAny[MethodParameters] = MethodParameters()  # the method's per-model keys (weight, density, ...)

    @field_validator("model")
    @classmethod
    def _no_lora(cls, model: str) -> str:
        return refuse_lora(model)


def refuse_lora(model: str) -> str:
    """mergekit's ``model+lora`` (a LoRA applied on load) is refused with how to merge it first."""
    if "+" in model and "://" not in model and not Path(model).exists():
        base, _, lora = model.partition("+")
        raise ValueError(f"{model!r} is mergekit's model+LoRA form, which mergefleet does not load; merge the adapter "
                         f"into the model first (peft: PeftModel.from_pretrained(AutoModel.from_pretrained({base!r}), "
                         f"{lora!r}).merge_and_unload().save_pretrained(DIR)) and list DIR")
    return model


class ModuleModel(_Frozen):
    """A model of a module's ``models:`` (its parameters validated with the module: pipeline/modules.py)."""

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)  # the method's per-model keys for this model

    @field_validator("model")
    @classmethod
    def _no_lora(cls, model: str) -> str:
        return refuse_lora(model)


class SliceSource(ModuleModel):
    model: str  # the model the layers come from
    layer_range: tuple[int, int]  # [first, end) of its layers, as mergekit writes it ([n, n]: none)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value):
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"layer_range {list(value)} must be [first, end) with 0 <= first <= end")
        return value


class OutputSlice(_Frozen):
    sources: tuple[SliceSource, ...]  # the models whose layers make this slice of the output


class OutputModule(_Frozen):
    """One module of a ``modules:`` config (pipeline/modules.py): its models or its slices."""

    models: tuple[ModuleModel, ...] | None = None  # every layer of the module, merged from these models
    slices: tuple[OutputSlice, ...] | None = None  # or its layers slice by slice, as the top-level slices:
    parameters: dict[str, Any] = Field(default_factory=dict)  # over the top-level ones, under each model's

    @model_validator(mode="after")
    def _models_or_slices(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError("give the module models: or slices: (one of them, not empty), as mergekit requires")
        return self


class TokenizerSpec(_Frozen):
    """mergekit's ``tokenizer:`` section; only its source is supported."""

    source: str = "union"  # base | a model's name | union (mergekit's default; refused: see pipeline/tokenizer.py)
    tokens: dict | None = None  # mergekit: per-token embedding sources (not supported yet)
    pad_to_multiple_of: int | None = None  # mergekit: pad the vocabulary (not supported yet)

    @model_validator(mode="after")
    def _supported(self):
        for key in ("tokens", "pad_to_multiple_of"):
            if getattr(self, key) is not None:
                raise ValueError(f"tokenizer.{key} changes the vocabulary and embeddings, which mergefleet does not "
                                 "do yet; leave it out, or merge with mergekit")
        return self


class MergeConfig(_Frozen):
    merge_method: str  # the algorithm, as in mergekit (+ twin): a name in workers.methods.REGISTRY
    models: tuple[ModelEntry, ...] = ()  # experts (linear: every model averaged); or slices: or modules:
    slices: tuple[OutputSlice, ...] | None = None  # mergekit's layer slices (stacked by passthrough: pipeline/slices.py)
    modules: dict[str, OutputModule] | None = None  # mergekit's per-module recipes (pipeline/modules.py)
    base_model: str | None = None  # θ₀; required for task_arithmetic and ties
    parameters: SerializeAsAny[MethodParameters] = MethodParameters()  # the method's top-level keys (workers/methods/)
    dtype: str | None = None  # output dtype (computation is always float32); default: the base's dtype
    out_dtype: str | None = None  # output dtype, overrides dtype
    output: str | None = None  # output URL (local dir, file://, s3://, gs://); --output overrides
    exclude: tuple[str, ...] = ()  # regexes of tensor names copied from the base unmerged
    tokenizer_source: str | None = None  # base | a model's name: whose tokenizer files the output gets (union: refused)
    tokenizer: TokenizerSpec | None = None  # mergekit's tokenizer section (source only)
    chat_template: str | None = None  # auto | a Jinja template, written into tokenizer_config.json
    exclude_files: tuple[str, ...] = ()  # glob patterns of the reference model's other files not to copy (e.g. "README.md")
    shards: Union[int, str, None] = None  # number of output shards (int) or target bytes per shard ("2GB")
    memory_budget: Union[int, str] = DEFAULT_MEMORY_BUDGET  # anonymous memory per shard task, its process included
    process_reserve: Union[int, str] = DEFAULT_PROCESS_RESERVE  # part of memory_budget the worker process itself holds
    nan_policy: Literal["error", "allow"] = "error"  # NaN / Inf in a merged input: fail naming it, or merge anyway
    input_checksums: bool = True  # sha256 each input tensor as it is read, into the manifest (~1 core-second per GB read)
    diagnostics: bool = Field(default=True, exclude=True)  # per-tensor merge diagnostics in the manifest
    #   (docs/diagnostics.md); changes no output byte, so it is not part of the config hash
    parameter_settings: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude=True)  # gradients / filters
    #   as given, by scope ("parameters", "models.<i>"); `parameters` holds their value outside the layers
    storage: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)  # fsspec storage options (endpoint_url, key, secret, client_kwargs, ...) over the environment's (AWS_*, FSSPEC_S3_*); never dumped, hashed or logged

    @model_validator(mode="before")
    @classmethod
    def _method_parameters(cls, data):
        """Validate `parameters:` and each model's through the method's parameter models."""
        if not isinstance(data, dict) or not isinstance(data.get("merge_method"), str):
            return data
        if "parameter_settings" in data and not isinstance(data.get("parameters"), MethodParameters):
            raise ValueError("unknown key 'parameter_settings' (see the config reference in README.md)")
        method = get_method(data["merge_method"])
        raw = data.get("parameters")
        settings = {}
        if isinstance(raw, MethodParameters):
            parameters = raw
        else:
            raw = dict(raw or {})
            parameters = _validated(raw, "parameters", settings,
                                    lambda values: validate_parameters(method, values, "parameters"))
        per_model = method.model_parameters_for(parameters)
        models = data.get("models")
        if isinstance(models, (list, tuple)):
            data = {**data, "models": [_model_entry(m, i, per_model, method.name, settings)
                                       for i, m in enumerate(models)]}
        if settings and not method.per_tensor_parameters:
            scope, values = next(iter(settings.items()))
            raise ValueError(f"{scope}.{next(iter(values))}: gradients and filters are not supported by "
                             f"merge_method {method.name}; give one number")
        return {**data, "parameters": parameters, "parameter_settings": data.get("parameter_settings", settings)}

    @model_validator(mode="after")
    def _models_slices_or_modules(self):
        given = [key for key, value in (("models", self.models or None), ("slices", self.slices),
                                        ("modules", self.modules)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one of models:, slices: or modules: (as mergekit); this config gives "
                             f"{' and '.join(given)}")
        if not given:
            raise ValueError("missing required key 'models': list at least one model (or give slices: or modules:)")
        for key in ("slices", "modules"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ValueError(f"{key}: is empty; list at least one {key[:-1]}")
        return self

    @field_validator("base_model")
    @classmethod
    def _base_no_lora(cls, model):
        return refuse_lora(model) if model is not None else model

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value):
        if value is not None and value not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {value!r}; use one of {sorted(DTYPE_ALIASES)}")
        return value

    @field_validator("exclude")
    @classmethod
    def _regex(cls, patterns):
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"exclude pattern {p!r} is not a regex: {exc}") from exc
        return patterns

    @field_validator("shards")
    @classmethod
    def _shards(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("shards must be >= 1 (a count) or a size like '2GB'")
        if isinstance(value, str):
            parse_bytes(value)
        return value

    @model_validator(mode="after")
    def _budget_above_reserve(self):
        budget, reserve = parse_bytes(self.memory_budget), parse_bytes(self.process_reserve)
        if budget <= reserve:
            raise ValueError(f"memory_budget ({self.memory_budget}) must exceed process_reserve ({self.process_reserve}), "
                             "the memory a worker process holds before any tensor; raise memory_budget")
        return self

    @property
    def sliced(self) -> bool:
        """Whether the config gives slices: or modules: (planned slice by slice: pipeline/modules.py)."""
        return self.slices is not None or self.modules is not None

    @property
    def output_dtype(self) -> str | None:
        """The safetensors dtype name of the output, or None to keep each tensor's base dtype."""
        name = self.out_dtype or self.dtype
        return DTYPE_ALIASES[name] if name else None

    @property
    def memory_budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)

    @property
    def process_reserve_bytes(self) -> int:
        return parse_bytes(self.process_reserve)

    @property
    def chunk_budget_bytes(self) -> int:
        """What a task's tensor chunks may hold at once: the budget less the process's own memory."""
        return self.memory_budget_bytes - self.process_reserve_bytes

    def record(self) -> dict:
        """The validated config as the manifest stores it (storage options never included), with
        gradients and filters as given."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        for scope, values in self.parameter_settings.items():
            target = data if scope == "parameters" else data["models"][int(scope.split(".")[1])]
            target.setdefault("parameters", {}).update(values)
        return data

    def at(self, tensor: str, t: float) -> MergeConfig:
        """This config with every gradient and filter evaluated for one tensor at layer position ``t``
        (pipeline/settings.py); itself when it has none."""
        if not self.parameter_settings:
            return self
        method = get_method(self.merge_method)

        def evaluated(model: MethodParameters, scope: str, validate) -> MethodParameters:
            values = self.parameter_settings.get(scope)
            if not values:
                return model
            fixed = {k: v for k, v in model.model_dump(by_alias=True, exclude_unset=True).items() if k not in values}
            now = {k: v for k, v in ((k, evaluate(s, tensor, t)) for k, s in values.items()) if v is not None}
            return validate({**fixed, **now})

        parameters = evaluated(self.parameters, "parameters", lambda values: validate_parameters(method, values, "parameters"))
        per_model = method.model_parameters_for(parameters)
        models = tuple(m.model_copy(update={"parameters": evaluated(m.parameters, f"models.{i}", per_model.model_validate)})
                       for i, m in enumerate(self.models))
        return self.model_copy(update={"parameters": parameters, "models": models, "parameter_settings": {}})

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of ``record()``, output location excluded (verify recomputes it)."""
        return config_digest(self.record())


def resolve_method(config: MergeConfig) -> MethodOptions:
    """The config's method with every default filled (its registered object's ``resolve``)."""
    return get_method(config.merge_method).resolve(config)


def _model_entry(entry, index: int, per_model: type[MethodParameters], method: str, settings: dict):
    """A `models:` entry with its parameters validated by the method's per-model model."""
    if not isinstance(entry, dict) or isinstance(entry.get("parameters"), MethodParameters):
        return entry
    path = f"models.{index}.parameters"

    def validate(values):
        try:
            return per_model.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, path, method, model_owners_of, keys_of(per_model))) from None

    return {**entry, "parameters": _validated(dict(entry.get("parameters") or {}), path, settings, validate,
                                              scope=f"models.{index}")}


def _validated(raw: dict, path: str, settings: dict, validate, *, scope: str = "parameters") -> MethodParameters:
    """``raw`` validated with each gradient / filter at its value outside the layers, every single
    value inside them validated too; the settings as given go to ``settings[scope]``."""
    given = {k: v for k, v in raw.items() if is_setting(v)}
    if not given:
        return validate(raw)
    plain = {k: v for k, v in raw.items() if k not in given}
    for key, setting in given.items():
        try:
            samples = leaves(setting, f"{path}.{key}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for sample in samples:
            validate({**plain, key: sample})
    settings[scope] = given
    outside = {k: v for k, v in ((k, evaluate(s, "", 0.0)) for k, s in given.items()) if v is not None}
    return validate({**plain, **outside})


def load_config(source: Union[str, Path, dict[str, Any]]) -> MergeConfig:
    """Parse and validate a config from a YAML path, YAML text or a dict; errors name the key."""
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        is_path = _looks_like_path(source)
        where = str(source) if is_path else "config text"
        try:
            text = Path(source).read_text() if is_path else source
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: invalid YAML: {exc}") from exc
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such config file") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the config: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: " + "; ".join(_describe(e) for e in exc.errors())) from None
    if config.modules is not None:
        from pipeline.modules import module_configs  # each module is resolved as a config of its own

        module_configs(config)
    elif config.slices is not None:
        from pipeline.slices import slice_configs  # slices are resolved one source model at a time

        slice_configs(config)
    else:
        resolve_method(config)
    return config


def _looks_like_path(source: Union[str, Path]) -> bool:
    """A Path, a *.yaml / *.yml name, or an existing file (anything else is YAML text)."""
    if isinstance(source, Path):
        return True
    if "\n" in source:
        return False
    if source.endswith((".yaml", ".yml")):
        return True
    try:
        return Path(source).is_file()
    except OSError:  # e.g. a name too long for the filesystem: it is text
        return False


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if not key:  # a check across keys (model validator): the message names them
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        name = str(error["loc"][-1])
        return unknown_key(key, name, list(_section(error["loc"]).model_fields),
                           mergekit_has=name in MERGEKIT_CONFIG_KEYS)
    if error["type"] == "missing":
        return f"missing required key {key!r}"
    return f"{key}: {error['msg'].removeprefix('Value error, ')}"


SECTIONS = {(): MergeConfig, ("models",): ModelEntry, ("slices",): OutputSlice, ("slices", "sources"): SliceSource,
            ("modules",): OutputModule, ("modules", "models"): ModuleModel, ("modules", "slices"): OutputSlice,
            ("modules", "slices", "sources"): SliceSource, ("tokenizer",): TokenizerSpec}


def _section(loc: tuple) -> type[BaseModel]:
    """The config section (its model) holding the key at ``loc``: list indices and module names skipped."""
    path = tuple(part for i, part in enumerate(loc[:-1])
                 if isinstance(part, str) and not (i == 1 and loc[0] == "modules"))
    return SECTIONS.get(path, ModelEntry)
