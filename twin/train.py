"""Train a twin output's router on labelled inputs (features of the shared model), and store it
under router/. docs/algorithms.md §5.7."""

from __future__ import annotations

import json
import logging

from twin.load import load_shared_model, local_shared_dir, read_twin_manifest
from twin.router import evaluate_router, extract_features, labels_for, parse_examples, router_files, split_examples, train_router
from workers.attachments import ROUTER_DIR, ROUTER_RECORD, attachment_record
from workers.storage import Location, open_fs

LOG = logging.getLogger(__name__)


def train_twin_router(output_url: str, data_url: str, *, epochs: int = 20, seed: int = 0, lr: float = 1e-3,
                      batch_size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.1,
                      storage_options: dict | None = None) -> dict:
    """Train the router on features of the shared model for labelled inputs (JSONL: text, task =
    an expert name); writes router/router.safetensors, router_config.json and, last, metrics.json
    (also the record binding them to this run: workers/attachments.py). The test
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
    output = Location(output_url, storage_options or {})
    files = router_files(router)
    for name, data in files.items():
        output.put(f"{ROUTER_DIR}/{name}", data)
    metrics = {**metrics, **attachment_record(files, manifest.run_id)}  # the record binding them to this run
    output.put(ROUTER_RECORD, (json.dumps(metrics, indent=2) + "\n").encode())  # last
    return metrics
