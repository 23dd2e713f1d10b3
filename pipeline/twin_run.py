"""Twin-Merging end to end: plan and run on Ray, publish, train the router, load for dynamic inference.

A twin run is the shared merge's plan (same planner, same shards by parameter name) run with the
``twin`` shard body (``workers/twin_task.py``), which writes θ* and every expert's factors in one
pass. The output:

```
OUTPUT/shared/                 θ*: model-0000k-of-0000N.safetensors, model.safetensors.index.json,
                               config.json + tokenizer files of the base (transformers loads it)
OUTPUT/experts/<name>/         factors-0000k-of-0000N.safetensors (<tensor>.B, <tensor>.A; 1-D dense),
                               factors.safetensors.index.json
OUTPUT/experts/<name>/adapter/ adapter_config.json + adapter_model.safetensors (PEFT LoRA over θ*)
OUTPUT/manifest.parquet        one row per shared and factor tensor (file relative to OUTPUT)
OUTPUT/manifest.json           written last; extra["twin"]: per expert and tensor rank, stored
                               bytes, relative error; storage ratios
OUTPUT/router/                 router.safetensors, router_config.json, metrics.json (train-router)
```

The adapters are assembled here, after the shard tasks, from the factor files read back (they are
small: r·(m+n) per matrix). The router is trained later, on the published shared model, and is not
part of the manifest (it can be retrained without touching the run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from manifests import markers
from manifests.reader import read_manifest
from manifests.schema import INDEX_JSON, Manifest, OutputFile
from manifests.writer import atomic_put
from pipeline.config import TWIN_DEFAULT_RANK_RATIO, ConfigError, MergeConfig
from pipeline.coordinator import (
    commit_manifest,
    connect_ray,
    copy_side_files,
    global_trim_shards,
    run_missing_shards,
    shard_rows,
    write_index,
)
from pipeline.planner import ShardPlan, build_plan
from pipeline.resume import prepare_output
from pipeline.twin_inference import TwinModel
from pipeline.twin_router import (
    ROUTER_CONFIG_FILE,
    ROUTER_WEIGHTS_FILE,
    Router,
    evaluate_router,
    extract_features,
    labels_for,
    mean_pool,
    parse_examples,
    router_files,
    router_from_files,
    split_examples,
    train_router,
)
from workers.peft_export import COVERAGE_OMITTED, export_lora_adapter, lora_coverage
from workers.tensor_io import DTYPES, FLOAT_DTYPES, is_local, join_url, open_fs, read_header, rows_of
from workers.twin_task import (
    TWIN_MATRIX_COPIES,
    TwinOptions,
    TwinShardResult,
    expert_names,
    held_matrix_bytes,
    stream_bytes_per_element,
    twin_shard_memory,
)

LOG = logging.getLogger(__name__)

SHARED_DIR = "shared"
EXPERTS_DIR = "experts"
ROUTER_DIR = "router"
FACTOR_INDEX = "factors.safetensors.index.json"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ROUTER_METRICS = "metrics.json"


# --- plan ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TwinPlan:
    """A twin run: the shared merge's plan (files under shared/, chunks sized for the twin working
    set) and what every shard task needs to compress the experts."""

    plan: ShardPlan
    options: TwinOptions
    expert_urls: tuple[str, ...]

    def summary(self) -> dict:
        summary = self.plan.summary()
        summary["method"] = twin_method_record(self.plan, self.options)
        summary["experts"] = dict(zip(self.options.experts, self.expert_urls))
        summary["largest_matrix_bytes"] = max((held_matrix_bytes(t.shape) for t in self.plan.tensors
                                               if t.action == "merge"), default=0)
        return summary


def twin_method_record(plan: ShardPlan, options: TwinOptions) -> dict:
    """manifest.json's ``method`` of a twin run: the shared merge and the compression rule."""
    return {"method": "twin", "shared": plan.method.model_dump(), "rank": options.rank,
            "rank_ratio": options.rank_ratio, "energy": options.energy, "svd": options.svd}


def build_twin_plan(config: MergeConfig, *, output_url: str | None = None,
                    storage_options: dict | None = None) -> TwinPlan:
    """Plan a twin run from the inputs' headers; refuses a matrix whose SVD cannot fit memory_budget."""
    if config.merge_method != "twin":
        raise ConfigError(f"merge_method is {config.merge_method}; build_twin_plan plans merge_method: twin")
    plan = build_plan(config, output_url=output_url, storage_options=storage_options)  # the shared merge's plan
    budget = config.chunk_budget_bytes
    shards = tuple(dataclasses.replace(spec, file_name=f"{SHARED_DIR}/{spec.file_name}",
                                       tensors=tuple(_twin_chunks(t, budget, config.process_reserve_bytes)
                                                     for t in spec.tensors))
                   for spec in plan.shards)
    p = config.parameters
    rules = {"rank": p.rank, "rank_ratio": p.rank_ratio, "energy": p.energy}
    if all(v is None for v in rules.values()):
        rules["rank_ratio"] = TWIN_DEFAULT_RANK_RATIO
    urls = tuple(m.model for m in config.models)
    options = TwinOptions(experts=expert_names(list(urls)), n_shards=len(shards), svd=p.svd or "auto",
                          chunk_budget=budget, **rules)
    shards = tuple(dataclasses.replace(s, memory_bytes=config.process_reserve_bytes + twin_shard_memory(s, options))
                   for s in shards)
    plan_hash = hashlib.sha256(json.dumps(
        {"shared_plan": plan.plan_hash, "options": dataclasses.asdict(options),
         "chunks": [[t.chunk_rows for t in s.tensors] for s in shards]}, sort_keys=True).encode()).hexdigest()
    return TwinPlan(dataclasses.replace(plan, shards=shards, plan_hash=plan_hash), options, urls)


def _twin_chunks(task, budget: int, reserve: int):
    """The task with row chunks that fit ``budget`` (memory_budget less ``reserve``, the process's
    own) next to the whole matrix a 2-D tensor's SVD holds."""
    if task.action != "merge":
        return task
    held = held_matrix_bytes(task.shape)
    row_bytes = stream_bytes_per_element(task) * max(1, math.prod(task.shape[1:]))
    if held + row_bytes > budget:
        m, n = task.shape
        raise ConfigError(
            f"tensor {task.name!r} ({m}×{n}) needs {_size(held + row_bytes)} to factorize in one piece "
            f"(θ*, v_t and the SVD workspace: {TWIN_MATRIX_COPIES} float32 copies of the matrix plus min(m, n)²), "
            f"but memory_budget less process_reserve leaves {_size(budget)}; raise memory_budget to at least "
            f"{held + row_bytes + reserve} (bytes), or exclude the tensor (it is then copied from the base, without factors)"
        )
    chunk_rows = max(1, min(rows_of(task.shape), (budget - held) // row_bytes))
    return dataclasses.replace(task, chunk_rows=chunk_rows)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


# --- run and publish ----------------------------------------------------------------------------

def run_twin(config: MergeConfig, *, output_url: str | None = None, address: str | None = None,
             storage_options: dict | None = None, overwrite: bool = False, progress: bool = True) -> Manifest:
    """Plan, run every twin shard on Ray, assemble the adapters and publish. Returns the manifest."""
    opts = storage_options or dict(config.storage)
    t0 = time.perf_counter()
    twin = build_twin_plan(config, output_url=output_url, storage_options=opts)
    plan = twin.plan
    t_plan = time.perf_counter() - t0
    state = prepare_output(plan, overwrite=overwrite, storage_options=opts)
    if state.complete is not None:
        LOG.warning("%s already holds this run (%s); nothing to do", plan.output_url, state.complete.run_id)
        return state.complete
    connect_ray(address)
    LOG.info("twin plan %s: %d tensors in %d shards, %d experts, %.2f GB in", plan.plan_hash[:12],
             len(plan.tensors), len(plan.shards), len(twin.options.experts), plan.input_bytes / 1e9)
    t1 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as background:  # loads transformers while the shards run
        modules = background.submit(_module_kinds, plan.side_files_from, [t.name for t in plan.tensors], opts)
        shards, extra, trim_timings = global_trim_shards(plan, progress=progress, storage_options=opts)
        results = run_missing_shards(shards, state.done, "twin", (twin.options,), progress=progress)
        timings = {"plan": round(t_plan, 4), **trim_timings, "resumed_shards": len(state.done),
                   "run": round(time.perf_counter() - t1, 4)}
        manifest = publish_twin(twin, results, config, timings, modules.result(), storage_options=opts, extra=extra)
    markers.clear_state(plan.output_url, storage_options=opts)
    LOG.info("published twin run %s at %s", manifest.run_id, plan.output_url)
    return manifest


def publish_twin(twin: TwinPlan, results: list[TwinShardResult], config: MergeConfig, timings: dict,
                 modules: dict[str, str] | None, *, storage_options: dict, extra: dict | None = None) -> Manifest:
    """shared/ (index, side files), each expert's factor index and adapter, then the manifest, last.
    ``modules``: the architecture's module kinds (``_module_kinds``), which the adapters target."""
    plan, options = twin.plan, twin.options
    out = plan.output_url
    t0 = time.perf_counter()
    rows, files = shard_rows(plan, results)
    files.append(write_index(out, rows, storage_options=storage_options, directory=SHARED_DIR))
    files += copy_side_files(plan, config.output_dtype, storage_options, directory=SHARED_DIR)
    names = [t.name for t in plan.tensors]
    checkpoint_bytes = {i.url: i.nbytes for i in plan.inputs}
    experts = []
    for e, expert in enumerate(options.experts):
        directory = f"{EXPERTS_DIR}/{expert}"
        factor_rows = []
        for r in results:
            ff = r.factor_files[e]
            files.append(OutputFile(name=ff.file_name, size=ff.file_size, sha256=ff.file_sha256))
            factor_rows += [{"name": t.name, "file": ff.file_name, "dtype": t.dtype, "shape": list(t.shape),
                             "offset": t.offset, "nbytes": t.nbytes, "sha256": t.sha256, "method": "twin"}
                            for t in ff.tensors]
        rows += factor_rows
        files.append(write_index(out, factor_rows, storage_options=storage_options, directory=directory,
                                 index_name=FACTOR_INDEX))
        records = [rec for r in results for rec in r.records if rec.expert == expert]
        adapter_files, adapter_record = _write_adapter(out, directory, [r.factor_files[e].file_name for r in results],
                                                       records, names, modules, storage_options)
        files += adapter_files
        factor_bytes = sum(rec.stored_bytes for rec in records)
        dense_bytes = sum(rec.dense_bytes for rec in records)
        experts.append({
            "name": expert, "url": twin.expert_urls[e], "dir": directory, "index": f"{directory}/{FACTOR_INDEX}",
            "factor_files": [r.factor_files[e].file_name for r in results],
            "factor_bytes": factor_bytes, "dense_bytes": dense_bytes,
            "storage_ratio": factor_bytes / dense_bytes if dense_bytes else None,
            "checkpoint_bytes": checkpoint_bytes.get(twin.expert_urls[e]),
            "adapter": adapter_record,
            "tensors": {rec.tensor: {"kind": rec.kind, "rank": rec.rank, "stored_bytes": rec.stored_bytes,
                                     "dense_bytes": rec.dense_bytes, "rel_error": rec.rel_error, "svd": rec.svd}
                        for rec in records},
        })
    factor_total, dense_total = sum(x["factor_bytes"] for x in experts), sum(x["dense_bytes"] for x in experts)
    record = {
        "shared_dir": SHARED_DIR, "experts_dir": EXPERTS_DIR, "router_dir": ROUTER_DIR,
        "rank_rule": {k: v for k, v in (("rank", options.rank), ("rank_ratio", options.rank_ratio),
                                        ("energy", options.energy)) if v is not None},
        "svd": options.svd,
        "factor_bytes": factor_total, "dense_bytes": dense_total,
        "storage_ratio": factor_total / dense_total if dense_total else None,
        "rel_error_note": "‖v − BA‖_F / ‖v‖_F in float32, before the factors are cast to the stored dtype",
        "storage_ratio_note": "factor bytes / bytes of the same exclusive tensors stored dense in the same dtype",
        "experts": experts,
    }
    timings = {**timings, "publish": round(time.perf_counter() - t0, 4)}
    return commit_manifest(plan, config, rows, files, results, timings, storage_options=storage_options,
                           extra={**(extra or {}), "twin": record}, method=twin_method_record(plan, options))


def _put(url: str, data: bytes, storage_options: dict | None) -> None:
    """atomic_put into a folder that may not exist yet."""
    fs, path = open_fs(url, storage_options)
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    atomic_put(url, data, storage_options=storage_options)


def _read_safetensors(output_url: str, file_names: Sequence[str], storage_options: dict | None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in file_names:
        fs, path = open_fs(join_url(output_url, name), storage_options)
        tensors.update(safetensors.torch.load(fs.cat_file(path)))
    return tensors


def _split_deltas(tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> tuple[dict, dict]:
    """({weight: (B, A)}, {name: dense v}) of one expert from its factor tensors; ``kinds``:
    {tensor: "factors" | "dense"} as the records say."""
    factors, dense = {}, {}
    for tensor, kind in kinds.items():
        if kind == "factors":
            factors[tensor] = (tensors[tensor + ".B"], tensors[tensor + ".A"])
        else:
            dense[tensor] = tensors[tensor]
    return factors, dense


def _module_kinds(model_url: str, names: list[str], storage_options: dict) -> dict[str, str] | None:
    """{module path: "linear" | "embedding" | "other"} from the architecture of the model's config.json
    (the base's, which the shared model keeps) built on the meta device, or None when transformers
    (or the architecture) is not available."""
    fs, path = open_fs(join_url(model_url, "config.json"), storage_options)
    if not fs.exists(path):
        return None
    try:
        import transformers

        config_dict = json.loads(fs.cat_file(path))
        config = transformers.AutoConfig.for_model(**config_dict)
        with torch.device("meta"):
            model = _model_class(config)(config)
    except Exception as exc:  # no transformers, unknown architecture: fall back on the tensor names
        LOG.warning("cannot build the shared model's architecture (%s); LoRA targets follow the tensor names", exc)
        return None
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if not set(n for n in names if n.endswith(".weight")) <= params | {n for n, _ in model.named_buffers()}:
        LOG.warning("tensor names do not match %s's parameters; LoRA targets follow the tensor names",
                    type(model).__name__)
        return None
    return {path: "linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding) else "other"
            for path, m in model.named_modules(remove_duplicate=False)}


def _write_adapter(output_url: str, directory: str, factor_files: list[str], records, names: list[str],
                   modules: dict[str, str] | None, storage_options: dict) -> tuple[list[OutputFile], dict]:
    """experts/<name>/adapter/: the expert's factors as a PEFT LoRA adapter over θ*."""
    tensors = _read_safetensors(output_url, factor_files, storage_options)
    factors, dense = _split_deltas(tensors, {rec.tensor: rec.kind for rec in records})
    not_lora = []
    for name in list(factors):
        path = name.removesuffix(".weight")
        kind = modules.get(path) if modules is not None else ("linear" if name.endswith(".weight") else "other")
        if not name.endswith(".weight") or kind not in ("linear", "embedding"):
            not_lora.append(name)  # a 2-D parameter LoRA cannot adapt (not a Linear/Embedding weight)
            del factors[name]
    for name in [n for n, v in dense.items() if v.dim() != 1]:
        not_lora.append(name)  # e.g. a conv kernel's delta: LoRA carries matrices and (bias) vectors only
        del dense[name]
    if not factors:
        LOG.warning("%s: no factors LoRA can carry; no adapter written", directory)
        return [], {"dir": None, "omitted": sorted(not_lora + list(dense))}
    if modules is not None:
        embeddings = [p for p, kind in modules.items() if kind == "embedding"]
    else:
        embeddings = [n.removesuffix(".weight") for n in factors if "embed" in n.rsplit(".", 2)[-2] or n.endswith(("wte.weight", "wpe.weight"))]
    coverage = lora_coverage(names, factors, dense, embedding_modules=embeddings)
    state, config = export_lora_adapter(names, factors, dense, base_model_name_or_path=join_url(output_url, SHARED_DIR),
                                        embedding_modules=embeddings)
    files = []
    for name, data in ((ADAPTER_WEIGHTS, safetensors.torch.save(state, metadata={"format": "pt"})),
                       (ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())):
        relative = f"{directory}/{ADAPTER_DIR}/{name}"
        _put(join_url(output_url, relative), data, storage_options)
        files.append(OutputFile(name=relative, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    counts: dict[str, int] = {}
    for how in coverage.values():
        counts[how] = counts.get(how, 0) + 1
    omitted = sorted([n for n, how in coverage.items() if how == COVERAGE_OMITTED] + not_lora)
    return files, {"dir": f"{directory}/{ADAPTER_DIR}", "coverage": counts, "omitted": omitted, "r": config["r"]}


# --- loading ------------------------------------------------------------------------------------

def read_twin_manifest(output_url: str, *, storage_options: dict | None = None) -> Manifest:
    """The manifest of a committed twin run (refuses other outputs)."""
    manifest = read_manifest(output_url, storage_options=storage_options)
    if manifest.method.get("method") != "twin" or "twin" not in manifest.extra:
        raise ValueError(f"{output_url} holds a {manifest.method.get('method')} run, not a twin run; "
                         "run a config with merge_method: twin first")
    return manifest


@contextlib.contextmanager
def local_shared_dir(output_url: str, manifest: Manifest, *, storage_options: dict | None = None) -> Iterator[str]:
    """A local directory holding shared/: the output's own folder when it is local, else a
    temporary copy of the files the manifest lists under shared/ (removed afterwards)."""
    fs, root = open_fs(join_url(output_url, SHARED_DIR), storage_options)
    if is_local(fs):
        yield root
        return
    tmp = tempfile.mkdtemp(prefix="mergefleet-shared-")
    try:
        for f in manifest.files:
            if f.name.startswith(SHARED_DIR + "/"):
                _, src = open_fs(join_url(output_url, f.name), storage_options)
                Path(tmp, f.name.removeprefix(SHARED_DIR + "/")).write_bytes(fs.cat_file(src))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return _AutoFromConfig


class _AutoFromConfig:
    """AutoModel for a config without a known architecture (constructor and from_pretrained)."""

    def __new__(cls, config):
        import transformers

        return transformers.AutoModel.from_config(config)

    @staticmethod
    def from_pretrained(directory, **kwargs):
        import transformers

        return transformers.AutoModel.from_pretrained(directory, **kwargs)


def load_shared_model(directory: str) -> nn.Module:
    """θ* as its transformers class (config.json's architecture, AutoModel otherwise), in the dtype
    its weights are stored in (not config.json's torch_dtype, which is the base's), eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    return _model_class(config).from_pretrained(directory, local_files_only=True, dtype=stored_dtype(directory)).eval()


def stored_dtype(directory: str) -> torch.dtype:
    """The dtype most of a local HF directory's floating-point weights are stored in."""
    index = Path(directory, INDEX_JSON)
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    counts = Counter(info.dtype for f in files for info in read_header(str(Path(directory, f))).tensors.values()
                     if info.dtype in FLOAT_DTYPES)
    return DTYPES[counts.most_common(1)[0][0]] if counts else torch.float32


def load_tokenizer(output_url: str, *, storage_options: dict | None = None):
    """The tokenizer copied into shared/ from the base (pad token set to EOS when it has none)."""
    import transformers

    manifest = read_twin_manifest(output_url, storage_options=storage_options)
    with local_shared_dir(output_url, manifest, storage_options=storage_options) as directory:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{output_url}/{SHARED_DIR} has no usable tokenizer ({exc}); the base model's "
                             "tokenizer files are copied there when the base has them") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_router(output_url: str, *, storage_options: dict | None = None) -> Router | None:
    """The router trained for this output, or None when there is none."""
    files = {}
    for name in (ROUTER_WEIGHTS_FILE, ROUTER_CONFIG_FILE):
        fs, path = open_fs(join_url(output_url, ROUTER_DIR, name), storage_options)
        if not fs.exists(path):
            return None
        files[name] = fs.cat_file(path)
    return router_from_files(files)


def load_expert_deltas(output_url: str, manifest: Manifest, *, storage_options: dict | None = None) -> tuple[dict, dict]:
    """({expert: {weight: (B, A)}}, {expert: {name: dense v}}) from the factor files."""
    factors, dense = {}, {}
    for expert in manifest.extra["twin"]["experts"]:
        tensors = _read_safetensors(output_url, expert["factor_files"], storage_options)
        factors[expert["name"]], dense[expert["name"]] = _split_deltas(
            tensors, {name: t["kind"] for name, t in expert["tensors"].items()})
    return factors, dense


def load_twin(output_url: str, *, router: bool | None = None, storage_options: dict | None = None) -> TwinModel:
    """θ* (transformers, from shared/), every expert's factors and, when trained, the router, as a
    ``TwinModel`` for dynamic inference. ``router``: True requires one, False leaves it out, None
    (default) uses it when router/ exists.

    Dense deltas the twin layers cannot apply (e.g. on an RMSNorm) are left out with a warning and
    listed in ``twin.omitted_deltas`` ({expert: [names]}), as the PEFT adapters leave them out.
    """
    manifest = read_twin_manifest(output_url, storage_options=storage_options)
    with local_shared_dir(output_url, manifest, storage_options=storage_options) as directory:
        model = load_shared_model(directory)
    factors, dense = load_expert_deltas(output_url, manifest, storage_options=storage_options)
    omitted = {}
    for expert, deltas in dense.items():
        dropped = sorted(name for name in deltas if not _twin_layers_apply(model, name))
        for name in dropped:
            del deltas[name]
        if dropped:
            omitted[expert] = dropped
    if omitted:
        LOG.warning("dense deltas the twin layers cannot apply are left out: %s", omitted)
    trained = load_router(output_url, storage_options=storage_options) if router is not False else None
    if router and trained is None:
        raise ValueError(f"{output_url} has no router yet; run `mergefleet twin train-router {output_url} --data DATA.jsonl`")
    if trained is not None and trained.tasks != [e["name"] for e in manifest.extra["twin"]["experts"]]:
        raise ValueError(f"the router's tasks {trained.tasks} are not this run's experts; train the router again")
    twin = TwinModel(model, factors, dense, router=trained)
    twin.omitted_deltas = omitted
    return twin


def _twin_layers_apply(model: nn.Module, name: str) -> bool:
    """Whether TwinModel applies a dense delta to this parameter (Linear bias, LayerNorm weight/bias)."""
    path, _, param = name.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return True  # let TwinModel name the missing module
    return (isinstance(module, nn.Linear) and param == "bias") or (
        isinstance(module, nn.LayerNorm) and param in ("weight", "bias"))


# --- router training and prediction ------------------------------------------------------------

def train_twin_router(output_url: str, data_url: str, *, epochs: int = 20, seed: int = 0, lr: float = 1e-3,
                      batch_size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.1,
                      storage_options: dict | None = None) -> dict:
    """Train the router on features of the shared model for labelled inputs (JSONL: text, task =
    an expert name); writes router/router.safetensors, router_config.json and metrics.json. The test
    split is only evaluated, after the checkpoint was chosen on the validation split."""
    import transformers

    manifest = read_twin_manifest(output_url, storage_options=storage_options)
    experts = [e["name"] for e in manifest.extra["twin"]["experts"]]
    fs, path = open_fs(data_url, storage_options)
    examples = parse_examples(fs.cat_file(path).decode("utf-8").splitlines())
    unknown = sorted({e.task for e in examples} - set(experts))
    if unknown:
        raise ValueError(f"{data_url}: tasks {unknown} are not experts of this run; label every example with "
                         f"one of {experts}")
    split = split_examples(examples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    missing = sorted(set(experts) - {e.task for e in split.train})
    if missing:
        LOG.warning("no training examples for experts %s: the router will not learn to pick them", missing)
    with local_shared_dir(output_url, manifest, storage_options=storage_options) as directory:
        model = load_shared_model(directory)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    parts = {"train": split.train, "val": split.val, "test": split.test}
    features = {k: extract_features(model, tokenizer, [e.text for e in v]) if v else None for k, v in parts.items()}
    labels = {k: labels_for(v, experts) for k, v in parts.items()}
    if features["val"] is None:
        raise ValueError(f"{data_url}: the validation split is empty; give more examples or a larger --val-fraction")
    router, metrics = train_router(features["train"], labels["train"], features["val"], labels["val"], epochs=epochs,
                                   lr=lr, seed=seed, tasks=experts, batch_size=batch_size)
    test = evaluate_router(router, features["test"], labels["test"]) if features["test"] is not None else None
    metrics = {**metrics, "test": test, "data": data_url, "seed": seed, "lr": lr, "batch_size": batch_size,
               "split": {k: len(v) for k, v in parts.items()}, "dropped_texts": len(split.dropped),
               "tasks": experts, "run_id": manifest.run_id}
    for name, data in {**router_files(router),
                       ROUTER_METRICS: (json.dumps(metrics, indent=2) + "\n").encode()}.items():
        _put(join_url(output_url, ROUTER_DIR, name), data, storage_options)
    return metrics


def predict(twin: TwinModel, tokenizer, texts: Sequence[str], *, mode: str = "router",
            weights: Sequence[float] | None = None, max_length: int = 512) -> dict:
    """Run the twin model on ``texts``: the expert weights used per text, and per text the model's
    output (a causal LM: the predicted next token; otherwise the mean-pooled last hidden state)."""
    if mode == "fixed":
        if weights is None:
            raise ValueError(f"mode fixed needs weights, one per expert: {twin.experts}")
        twin.set_weights(torch.tensor(list(weights), dtype=torch.float32))
    else:
        twin.set_mode(mode)
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    inputs = dict(batch)
    if "position_ids" in inspect.signature(twin.model.forward).parameters:
        # per-sample weights need the batch as the first dimension of every activation; a model's
        # default (1, seq) position ids would feed a batch of one to a factored position embedding
        inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand(len(texts), -1)
    with torch.no_grad():
        used = twin.expert_weights(**inputs).expand(len(texts), -1)
        output = twin(**inputs)
    mask = inputs.get("attention_mask")
    results = []
    logits = getattr(output, "logits", None)
    for i, text in enumerate(texts):
        item = {"text": text, "weights": [round(float(w), 6) for w in used[i]],
                "top_expert": twin.experts[int(used[i].argmax())]}
        if logits is not None:
            last = int(mask[i].sum()) - 1 if mask is not None else logits.shape[1] - 1
            token = int(logits[i, last].argmax())
            item["next_token_id"], item["next_token"] = token, tokenizer.decode([token])
        else:
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None:
                hidden = output[0]
            pooled = mean_pool(hidden[i:i + 1], None if mask is None else mask[i:i + 1])[0]
            item["embedding"] = [round(float(x), 6) for x in pooled]
        results.append(item)
    return {"experts": list(twin.experts), "mode": mode, "results": results}
