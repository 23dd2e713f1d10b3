"""Load a published twin output for dynamic inference: θ* (transformers), every expert's factors,
the router; and predict with it. docs/algorithms.md §5.8."""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from manifests.reader import read_manifest
from manifests.schema import INDEX_JSON, Manifest
from twin.inference import TwinModel
from twin.router import ROUTER_CONFIG_FILE, ROUTER_WEIGHTS_FILE, Router, mean_pool, router_from_files
from workers.attachments import ROUTER_DIR, attachment_problems
from workers.methods.twin_publish import SHARED_DIR, model_class, read_safetensors, split_deltas
from workers.storage import Location, is_local, join_url, open_fs
from workers.tensor_io import DTYPES, FLOAT_DTYPES, read_header


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


def load_shared_model(directory: str) -> nn.Module:
    """θ* as its transformers class (config.json's architecture, AutoModel otherwise), in the dtype
    its weights are stored in (not config.json's torch_dtype, which is the base's), eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    return model_class(config).from_pretrained(directory, local_files_only=True, dtype=stored_dtype(directory)).eval()


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


def load_router(output_url: str, manifest: Manifest, *, storage_options: dict | None = None) -> Router | None:
    """The router trained for this output's run, or None when there is none; a router of another
    run, or changed since training, is refused (workers/attachments.py)."""
    output = Location(output_url, storage_options or {})
    files = {}
    for name in (ROUTER_WEIGHTS_FILE, ROUTER_CONFIG_FILE):
        fs, path = output.fs(ROUTER_DIR, name)
        if fs.exists(path):
            files[name] = fs.cat_file(path)
    if not files:
        return None
    read = {f"{ROUTER_DIR}/{name}": data for name, data in files.items()}
    problems = attachment_problems(output, list(read), manifest.run_id, read)
    if problems:
        raise ValueError(f"{output_url}: " + "; ".join(problems))
    return router_from_files(files)  # names a missing one


def load_expert_deltas(output_url: str, manifest: Manifest, *, storage_options: dict | None = None) -> tuple[dict, dict]:
    """({expert: {weight: (B, A)}}, {expert: {name: dense v}}) from the factor files."""
    factors, dense = {}, {}
    for expert in manifest.extra["twin"]["experts"]:
        tensors = read_safetensors(Location(output_url, storage_options or {}), expert["factor_files"])
        factors[expert["name"]], dense[expert["name"]] = split_deltas(
            tensors, {name: t["kind"] for name, t in expert["tensors"].items()})
    return factors, dense


def load_twin(output_url: str, *, router: bool | None = None, storage_options: dict | None = None) -> TwinModel:
    """θ* (transformers, from shared/), every expert's factors and, when trained, the router, as a
    ``TwinModel`` for dynamic inference. ``router``: True requires one, False leaves it out, None
    (default) uses it when router/ exists. Every stored delta is applied (norms and biases
    included); one the twin layers cannot apply is an error naming it.
    """
    manifest = read_twin_manifest(output_url, storage_options=storage_options)
    with local_shared_dir(output_url, manifest, storage_options=storage_options) as directory:
        model = load_shared_model(directory)
    factors, dense = load_expert_deltas(output_url, manifest, storage_options=storage_options)
    trained = load_router(output_url, manifest, storage_options=storage_options) if router is not False else None
    if router and trained is None:
        raise ValueError(f"{output_url} has no router yet; run `mergefleet twin train-router {output_url} --data DATA.jsonl`")
    if trained is not None and trained.tasks != [e["name"] for e in manifest.extra["twin"]["experts"]]:
        raise ValueError(f"the router's tasks {trained.tasks} are not this run's experts; train the router again")
    return TwinModel(model, factors, dense, router=trained)


def choose_weights(twin: TwinModel, mode: str, weights: Sequence[float] | None = None, top_k: int | None = None) -> None:
    """Set how ``twin`` weighs its experts: a router mode, or "fixed" with one weight per expert."""
    if mode == "fixed":
        if weights is None:
            raise ValueError(f"mode fixed needs weights, one per expert: {twin.experts}")
        twin.set_weights(torch.tensor(list(weights), dtype=torch.float32))
    else:
        twin.set_mode(mode, top_k=top_k)


def predict(twin: TwinModel, tokenizer, texts: Sequence[str], *, mode: str = "router",
            weights: Sequence[float] | None = None, max_length: int = 512) -> dict:
    """Run the twin model on ``texts``: the expert weights used per text, and per text the model's
    output (a causal LM: the predicted next token; otherwise the mean-pooled last hidden state)."""
    choose_weights(twin, mode, weights)
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


def read_prompts(data_url: str, *, storage_options: dict | None = None) -> list[str]:
    """Prompts from JSONL lines with a "text" (the router's data file, whose "task" is ignored)."""
    fs, path = open_fs(data_url, storage_options)
    prompts = []
    for number, line in enumerate(fs.cat_file(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{data_url} line {number}: not JSON ({error}); expected {{\"text\": ...}}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{data_url} line {number}: expected an object with a string field 'text', got {line[:200]!r}")
        prompts.append(record["text"])
    return prompts


def generate_texts(twin: TwinModel, tokenizer, prompts: Sequence[str], *, mode: str = "router",
                   weights: Sequence[float] | None = None, top_k: int | None = None, max_new_tokens: int = 64,
                   batch_size: int = 8, **generate_kwargs) -> list[dict]:
    """Generate from each prompt (greedy unless ``generate_kwargs`` say otherwise), batches of
    ``batch_size`` padded on the left, each prompt routed once. Per prompt, in order: the prompt,
    the generated text, its token ids (prompt excluded, cut after the first EOS) and the weights used."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    choose_weights(twin, mode, weights, top_k)
    tokenizer.padding_side = "left"
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
               **generate_kwargs}
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        encoded = tokenizer(batch, return_tensors="pt", padding=True)
        sequences = twin.generate(**encoded, **options)
        for prompt, ids, used in zip(batch, sequences[:, encoded["input_ids"].shape[1]:].tolist(), twin.last_weights):
            if tokenizer.eos_token_id in ids:
                ids = ids[:ids.index(tokenizer.eos_token_id) + 1]
            results.append({"prompt": prompt, "text": tokenizer.decode(ids, skip_special_tokens=True),
                            "token_ids": ids, "weights": [round(float(w), 6) for w in used]})
    return results
