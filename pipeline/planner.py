"""Plan a merge from safetensors headers alone: which tensors to merge or copy, in which shard,
in chunks of how many rows. The plan is deterministic for a given config and inputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field

from pipeline.config import DEFAULT_SHARD_BYTES, ConfigError, MergeConfig, parse_bytes
from pipeline.modules import layer_counts, model_names, plan_modules, read_model_config
from pipeline.settings import layer_position
from pipeline.tokenizer import chat_template_text, check_shared_vocabulary, tokenizer_source
from workers.compiled import compile_from_environment
from workers.methods import MethodOptions, get_method, method_of
from workers.methods.base import expert_models, task_bytes_per_element
from workers.specs import ShardSpec, TensorTask
from workers.storage import Location, check_bucket, check_storage_options, fingerprint, overlap
from workers.tensor_io import FLOAT_DTYPES, ModelFiles, TensorInfo, itemsize, resolve_model, rows_of

LOG = logging.getLogger(__name__)

DEFAULT_MIN_SHARDS = 8  # without `shards:`, a small model still spreads over several tasks


@dataclass(frozen=True)
class InputSummary:
    """One input model as the manifest records it."""

    role: str  # "base", "expert" or "model" (linear)
    url: str  # as given; a Hub model pinned to its commit (hf://org/name@<hash>)
    files: tuple[dict, ...]  # {"url", "size", "header_sha256"} per safetensors file
    nbytes: int
    revision: str | None = None  # a Hub model: the commit hash its files come from


@dataclass(frozen=True)
class ShardPlan:
    """The whole run: resolved method, every shard's spec, the inputs and the plan's hash."""

    config_hash: str
    plan_hash: str
    method: MethodOptions  # the resolved method; method_of(method) is its registered object
    output: Location  # the output root and its storage options (which also open the inputs)
    shards: tuple[ShardSpec, ...]
    inputs: tuple[InputSummary, ...]
    side_files_from: str  # model directory whose config.json and other non-weight files are copied
    ignored_tensors: tuple[str, ...]  # tensors not in the output: only in some experts; of modules not listed
    tokenizer_from: str | None = None  # model directory whose tokenizer files replace the reference's
    chat_template: str | None = None  # written into the output's tokenizer_config.json
    config_updates: dict = field(default_factory=dict)  # config.json keys to set (dotted: nested), e.g. layer counts

    @property
    def output_url(self) -> str:
        return self.output.url

    @property
    def storage_options(self) -> dict:
        return self.output.storage_options

    @property
    def tensors(self) -> list[TensorTask]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def output_bytes(self) -> int:
        return sum(_tensor_bytes(t) for t in self.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(i.nbytes for t in self.tensors for i in t.inputs)

    def summary(self) -> dict:
        """A small JSON-able description for `mergefleet plan` and logs."""
        return {
            **method_of(self.method).summary(self),
            "method": self.method.model_dump(),
            "config_hash": self.config_hash,
            "plan_hash": self.plan_hash,
            "output": self.output_url,
            "tensors": len(self.tensors),
            "merged": sum(t.action == "merge" for t in self.tensors),
            "copied": sum(t.action == "copy" for t in self.tensors),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "shards": [
                {"file": s.file_name, "tensors": len(s.tensors), "bytes": sum(_tensor_bytes(t) for t in s.tensors),
                 "chunked": [t.name for t in s.tensors if t.chunk_rows < rows_of(t.shape)]}
                for s in self.shards
            ],
        }


def _tensor_bytes(task: TensorTask) -> int:
    return math.prod(task.shape) * itemsize(task.out_dtype)


def natural_key(name: str) -> list:
    """Sort key putting layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _summarize(role: str, model: ModelFiles, storage_options: dict) -> InputSummary:
    """The manifest's record of one input: per file its size, header sha256 and fingerprint (what
    identifies this version of the file: mtime and inode, or the object's ETag / version)."""
    files = tuple({"url": h.url, "size": h.size, "header_sha256": h.header_sha256,
                   "fingerprint": fingerprint(h.url, storage_options)} for h in model.files)
    return InputSummary(role, model.source or model.url, files, sum(f["size"] for f in files), model.revision)


def _check_input(name: str, ref: TensorInfo, model_url: str, info: TensorInfo | None, ref_url: str) -> None:
    if info is None:
        raise ConfigError(
            f"tensor {name!r}: missing from model {model_url!r} but present in {ref_url!r}; "
            "every model must have the reference's tensors (same architecture), or exclude the tensor"
        )
    if info.shape != ref.shape:
        raise ConfigError(
            f"tensor {name!r}: model {model_url!r} has shape {list(info.shape)}, {ref_url!r} has {list(ref.shape)}; "
            "experts must share the base architecture"
        )
    if (info.dtype in FLOAT_DTYPES) != (ref.dtype in FLOAT_DTYPES) or (
        ref.dtype not in FLOAT_DTYPES and info.dtype != ref.dtype
    ):
        raise ConfigError(
            f"tensor {name!r}: model {model_url!r} stores {info.dtype}, {ref_url!r} stores {ref.dtype}; "
            "non-float tensors must match exactly (re-export the model from the same base)"
        )


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "embed_in.weight")


def tied_copies(model: ModelFiles, model_config: dict) -> dict[str, str]:
    """Names that are a second name for another tensor's weight: {copy: primary}, from
    ``tie_word_embeddings: true`` in config.json with both ``lm_head.weight`` and an input embedding
    stored. (Two names sharing bytes in one file cannot occur: read_header refuses it, as safetensors does.)
    """
    tied: dict[str, str] = {}
    head = model.tensors.get("lm_head.weight")
    if model_config.get("tie_word_embeddings") is True and head is not None:
        embedding = next((n for n in sorted(model.tensors) if n.endswith(EMBEDDING_SUFFIXES)
                          and model.tensors[n].shape == head.shape), None)
        if embedding:
            tied["lm_head.weight"] = embedding
    return tied


def shard_groups(sizes: list[int], n_shards: int) -> list[list[int]]:
    """Split tensor indices (in order) into min(n_shards, len(sizes)) contiguous, non-empty groups
    balanced by bytes: a group closes once a tensor's byte midpoint passes its share of the total."""
    n = len(sizes)
    n_shards = min(n_shards, n)
    total = sum(sizes) or 1
    groups: list[list[int]] = [[]] if n else []
    position = 0
    for i, size in enumerate(sizes):
        if groups[-1] and len(groups) < n_shards:
            must_split = n - i == n_shards - len(groups)  # one tensor left per group still to fill
            if must_split or (position + size / 2) * n_shards / total >= len(groups):
                groups.append([])
        groups[-1].append(i)
        position += size
    return groups


def build_plan(config: MergeConfig, *, output_url: str | None = None, storage_options: dict | None = None) -> ShardPlan:
    """Read the headers of every input and plan the shards (no tensor data is read). The output URL
    and the storage options (``storage_options``, else the config's ``storage:``) are resolved here,
    once, and travel in the plan."""
    method = get_method(config.merge_method)
    url = output_url or config.output
    if not url:
        raise ConfigError("no output: give `output:` in the config or --output URL")
    output = _output_location(url, storage_options or dict(config.storage))
    for model_url in {config.base_model, *(m.model for m in config.models), *model_names(config)} - {None}:
        check_storage_options(model_url, output.storage_options)
    if config.sliced:
        options, tasks, inputs, reference, summaries, config_updates, ignored = _sliced(config, method, output)
    else:
        options = method.resolve(config)
        inputs, reference, summaries = _inputs(config, options, output.storage_options)
        reference_config = read_model_config(reference.url, output.storage_options)
        tied = tied_copies(reference, reference_config)
        tasks = [_tensor_task(config, method, name, reference, inputs, tied.get(name))
                 for name in sorted(reference.tensors, key=natural_key)]
        if config.parameter_settings:
            tasks = _per_tensor_options(config, method, options, tasks, reference_config)
        ignored = sorted({n for m in inputs for n in m.tensors} - set(reference.tensors), key=natural_key)
        config_updates = {}
        if ignored:
            LOG.warning("%d tensors exist in some inputs but not in %s and are not merged: %s", len(ignored),
                        reference.url, ignored[:10])
    _check_apart(output.url, inputs)
    if not tasks:
        raise ConfigError(f"{reference.url}: holds no tensors to merge")
    sizes = [_tensor_bytes(t) for t in tasks]
    groups = shard_groups(sizes, _shard_count(config.shards, sum(sizes), len(tasks)))
    prefix = f"{method.output_dir}/" if method.output_dir else ""
    compile_choice = compile_from_environment()
    specs = tuple(
        ShardSpec(i, len(groups), f"{prefix}model-{i + 1:05d}-of-{len(groups):05d}.safetensors", output,
                  tuple(tasks[j] for j in group), options, nan_policy=config.nan_policy,
                  memory_bytes=config.process_reserve_bytes + max(
                      method.tensor_memory(tasks[j], options, config.chunk_budget_bytes) for j in group),
                  chunk_budget=config.chunk_budget_bytes,
                  compile_kernels=compile_choice,
                  input_checksums=config.input_checksums, diagnostics=config.diagnostics)
        for i, group in enumerate(groups)
    )
    plan_hash = hashlib.sha256(json.dumps(
        {"config": config.config_hash(), "inputs": [s.files for s in summaries],
         "shards": [[s.file_name, [asdict(t) for t in s.tensors]] for s in specs]},
        sort_keys=True, default=str).encode()).hexdigest()
    tokenizer_from, chat_template = _tokenizer(config, options, inputs, output.storage_options)
    return ShardPlan(config.config_hash(), plan_hash, options, output, specs, tuple(summaries), model_dir(reference),
                     tuple(ignored), tokenizer_from, chat_template, config_updates)


def _sliced(config: MergeConfig, method, output: Location):
    """(options, tasks, inputs, reference, summaries, config.json updates, tensors left out) of a
    ``slices:`` or ``modules:`` config (pipeline/modules.py); a tensor whose options differ from the
    first one's carries its own."""
    sliced, models, updates, left_out = plan_modules(config, output.storage_options)
    if not sliced:
        raise ConfigError("the listed modules own no tensor of the model; list the modules that hold its weights")
    resolved: dict[str, MethodOptions] = {}
    first = method.resolve(sliced[0].config)
    tasks = []
    for t in sliced:
        for model, info in zip(t.models, t.infos):
            _check_input(t.name, t.infos[0], model.url, info, t.models[0].url)
        own = method.resolve(t.config.at(t.name, t.t))
        own = resolved.setdefault(own.model_dump_json(), own)
        tasks.append(make_task(config, method, t.name, t.infos[0], t.infos, options=None if own == first else own))
    tasks.sort(key=lambda task: natural_key(task.name))  # as a models: plan orders them
    summaries = [_summarize("model", m, output.storage_options) for m in models]
    return first, tasks, models, sliced[0].models[0], summaries, updates, left_out


def model_dir(model: ModelFiles) -> str:
    """The directory of a model (its URL, or the folder of a single .safetensors URL)."""
    return model.url.rsplit("/", 1)[0] if model.url.endswith(".safetensors") else model.url


def _tokenizer(config: MergeConfig, options: MethodOptions, inputs: list[ModelFiles], storage_options: dict):
    """(directory of the tokenizer source or None, chat template or None), checked at plan time."""
    if config.sliced:
        names = model_names(config)
    else:
        names = [config.base_model] * options.uses_base + [m.model for m in expert_models(config, options.uses_base)]
    dirs = {name: model_dir(model) for name, model in zip(names, inputs)}
    source = tokenizer_source(config)
    source_dir = None
    if source is not None:
        source_dir = dirs.get(source) or model_dir(resolve_model(source, storage_options=storage_options))
        check_shared_vocabulary(source_dir, dirs, storage_options)
    return source_dir, chat_template_text(config, list(dirs.values()), storage_options)


def _per_tensor_options(config: MergeConfig, method, options: MethodOptions, tasks: list[TensorTask],
                        model_config: dict) -> list[TensorTask]:
    """The merged tensors whose gradients / filters give them other options than the plan's carry
    their own (pipeline/settings.py: a tensor's layer position t, its name against the filters)."""
    if getattr(options, "trim_scope", "tensor") == "global":
        raise ConfigError("trim_scope: global takes one density per expert for the whole model; gradients and "
                          "filters need trim_scope: tensor")
    n_layers = layer_counts(model_config, [t.name for t in tasks])
    resolved: dict[str, MethodOptions] = {}
    result = []
    for task in tasks:
        if task.action == "merge":
            own = method.resolve(config.at(task.name, layer_position(task.name, n_layers[task.name])))
            own = resolved.setdefault(own.model_dump_json(), own)
            if own != options:
                task = dataclasses.replace(task, options=own)
        result.append(task)
    return result


def _inputs(config: MergeConfig, options: MethodOptions, storage_options: dict):
    """(models in input order, the reference model, their summaries): the base first when the
    method reads one; otherwise (linear) copies come from base_model when it is among the models,
    else from the first model."""
    experts = [resolve_model(m.model, storage_options=storage_options)
               for m in expert_models(config, options.uses_base)]
    if options.uses_base:
        base = resolve_model(config.base_model, storage_options=storage_options)
        return [base, *experts], base, [_summarize(role, m, storage_options)
                                        for role, m in [("base", base), *(("expert", e) for e in experts)]]
    urls = [m.model for m in config.models]
    reference = experts[urls.index(config.base_model) if config.base_model in urls else 0]
    return experts, reference, [_summarize("model", e, storage_options) for e in experts]


def _output_location(url: str, storage_options: dict) -> Location:
    """The output, checked before anything is written: a local path made absolute (so records made
    from it, like an adapter's base path, load from anywhere), storage options the store takes,
    an object store's bucket that exists."""
    if "://" not in url:
        url = os.path.abspath(url)
    check_storage_options(url, storage_options)
    check_bucket(url, storage_options)
    return Location(url, storage_options)


def _check_apart(output_url: str, inputs: list[ModelFiles]) -> None:
    """Refuse an output equal to, inside or containing an input's location: the run would overwrite
    the checkpoints it reads."""
    for model in inputs:
        where = model.url.rsplit("/", 1)[0] if model.url.endswith(".safetensors") else model.url
        relation = overlap(output_url, where)
        if relation:
            raise ConfigError(f"output {output_url} {relation} the input {model.source or model.url}; the run would "
                              "overwrite the checkpoints it reads. Choose an output outside every input")


def _tensor_task(config: MergeConfig, method, name: str, reference: ModelFiles, inputs: list[ModelFiles],
                 tied_to: str | None) -> TensorTask:
    """One tensor of the plan: checked in every input, merged or copied, in chunks that fit the budget."""
    ref = reference.tensors[name]
    infos = tuple(m.tensors.get(name) for m in inputs)
    for model, info in zip(inputs, infos):
        _check_input(name, ref, model.url, info, reference.url)
    return make_task(config, method, name, ref, infos, tied_to)


def make_task(config: MergeConfig, method, name: str, ref: TensorInfo, infos: tuple[TensorInfo, ...],
              tied_to: str | None = None, options: MethodOptions | None = None) -> TensorTask:
    """The task of one output tensor from its inputs' infos (``ref``: where copies come from)."""
    is_float = ref.dtype in FLOAT_DTYPES
    out_dtype = (config.output_dtype or ref.dtype) if is_float else ref.dtype
    merge = is_float and not any(re.search(p, name) for p in config.exclude)
    task = TensorTask(name, ref.shape, out_dtype, "merge" if merge else "copy", infos if merge else (ref,), 1, tied_to,
                      options if merge else None)
    budget = config.chunk_budget_bytes
    if merge:
        rows = method.chunk_rows(task, budget, config.process_reserve_bytes)
    else:
        rows = max(1, min(rows_of(ref.shape), budget // (task_bytes_per_element(task) * max(1, math.prod(ref.shape[1:])))))
    return dataclasses.replace(task, chunk_rows=rows)


def _shard_count(shards, total_bytes: int, n_tensors: int) -> int:
    if isinstance(shards, int):
        wanted = shards
    elif shards is not None:
        wanted = math.ceil(total_bytes / max(1, parse_bytes(shards)))
    else:
        wanted = max(DEFAULT_MIN_SHARDS, math.ceil(total_bytes / DEFAULT_SHARD_BYTES))
    return max(1, min(wanted, n_tensors))
