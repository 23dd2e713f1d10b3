"""Twin-Merging's publish hook: per expert, its factor index, its PEFT adapter over θ*, and the
manifest's ``extra.twin`` record (ranks, errors, storage). Also what loading a twin output needs
of the layout (folder names, reading factor files, the architecture's class).

The adapters are assembled after the shard tasks, from the factor files read back (they are small:
r·(m+n) per matrix). LoRA cannot carry norm deltas (nor biases next to an embedding adapter): they
are listed as ``omitted``. docs/algorithms.md §5.6.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import safetensors.torch
import torch
from torch import nn

from workers.attachments import ROUTER_DIR
from workers.kernels.peft_export import COVERAGE_OMITTED, export_lora_adapter, lora_coverage
from workers.methods.base import Published
from workers.methods.twin_shard import FactorRecord
from workers.publishing import put_file, tensor_rows, write_index
from workers.results import OutputFile, ShardResult
from workers.storage import Location, join_url, open_fs

LOG = logging.getLogger(__name__)

SHARED_DIR = "shared"
EXPERTS_DIR = "experts"
FACTOR_INDEX = "factors.safetensors.index.json"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def publish(plan, results: list[ShardResult], modules: dict[str, str] | None) -> Published:
    """Each expert's factor index and adapter, and the manifest's ``extra.twin`` (shared/ is the
    coordinator's, as for any method). ``modules``: the architecture's module kinds
    (``module_kinds``), which the adapters target."""
    options, out = plan.method, plan.output
    rows, files = [], []
    names = [t.name for t in plan.tensors]
    expert_urls = [i.url for i in plan.inputs if i.role != "base"]
    checkpoint_bytes = {i.url: i.nbytes for i in plan.inputs}
    experts = []
    for e, expert in enumerate(options.experts):
        directory = f"{EXPERTS_DIR}/{expert}"
        factor_rows = []
        for r in results:
            ff = r.extra_files[e]
            files.append(OutputFile(name=ff.file_name, size=ff.file_size, sha256=ff.file_sha256))
            factor_rows += tensor_rows(ff.file_name, ff.tensors, "twin")
        rows += factor_rows
        files.append(write_index(out, factor_rows, directory=directory, index_name=FACTOR_INDEX))
        records = [FactorRecord(**rec) for r in results for rec in r.records if rec["expert"] == expert]
        adapter_files, adapter_record = _write_adapter(out, directory, [r.extra_files[e].file_name for r in results],
                                                       records, names, modules)
        files += adapter_files
        factor_bytes = sum(rec.stored_bytes for rec in records)
        dense_bytes = sum(rec.dense_bytes for rec in records)
        experts.append({
            "name": expert, "url": expert_urls[e], "dir": directory, "index": f"{directory}/{FACTOR_INDEX}",
            "factor_files": [r.extra_files[e].file_name for r in results],
            "factor_bytes": factor_bytes, "dense_bytes": dense_bytes,
            "storage_ratio": factor_bytes / dense_bytes if dense_bytes else None,
            "checkpoint_bytes": checkpoint_bytes.get(expert_urls[e]),
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
    return Published(rows=rows, files=files, extra={"twin": record})


def read_safetensors(output: Location, file_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every tensor of these files below the output (small files: factors, adapters)."""
    tensors: dict[str, torch.Tensor] = {}
    for name in file_names:
        fs, path = output.fs(name)
        tensors.update(safetensors.torch.load(fs.cat_file(path)))
    return tensors


def split_deltas(tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> tuple[dict, dict]:
    """({weight: (B, A)}, {name: dense v}) of one expert from its factor tensors; ``kinds``:
    {tensor: "factors" | "dense"} as the records say."""
    factors, dense = {}, {}
    for tensor, kind in kinds.items():
        if kind == "factors":
            factors[tensor] = (tensors[tensor + ".B"], tensors[tensor + ".A"])
        else:
            dense[tensor] = tensors[tensor]
    return factors, dense


def module_kinds(plan) -> dict[str, str] | None:
    """{module path: "linear" | "embedding" | "other"} from the architecture of the model's config.json
    (the base's, which the shared model keeps) built on the meta device, or None when transformers
    (or the architecture) is not available."""
    names = [t.name for t in plan.tensors]
    fs, path = open_fs(join_url(plan.side_files_from, "config.json"), plan.storage_options)
    if not fs.exists(path):
        return None
    try:
        import transformers

        config_dict = json.loads(fs.cat_file(path))
        config = transformers.AutoConfig.for_model(**config_dict)
        with torch.device("meta"):
            model = model_class(config)(config)
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


def _write_adapter(output: Location, directory: str, factor_files: list[str], records, names: list[str],
                   modules: dict[str, str] | None) -> tuple[list[OutputFile], dict]:
    """experts/<name>/adapter/: the expert's factors as a PEFT LoRA adapter over θ*."""
    tensors = read_safetensors(output, factor_files)
    factors, dense = split_deltas(tensors, {rec.tensor: rec.kind for rec in records})
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
    state, config = export_lora_adapter(names, factors, dense, base_model_name_or_path=output.join(SHARED_DIR),
                                        embedding_modules=embeddings)
    files = []
    for name, data in ((ADAPTER_WEIGHTS, safetensors.torch.save(state, metadata={"format": "pt"})),
                       (ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())):
        files.append(put_file(output, f"{directory}/{ADAPTER_DIR}/{name}", data))
    counts: dict[str, int] = {}
    for how in coverage.values():
        counts[how] = counts.get(how, 0) + 1
    omitted = sorted([n for n, how in coverage.items() if how == COVERAGE_OMITTED] + not_lora)
    return files, {"dir": f"{directory}/{ADAPTER_DIR}", "coverage": counts, "omitted": omitted, "r": config["r"]}


def model_class(config):
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
