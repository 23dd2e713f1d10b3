"""Twin-Merging router (docs/algorithms.md §5.7): data split, features, MLP, training, storage.

- Data: JSONL lines ``{"text": ..., "task": ...}``. ``split_examples`` makes train / validation
  / test splits that share no text: duplicate texts with one task are kept once, texts seen with
  two or more tasks are dropped (and reported), and each task is split on its own with a seeded
  shuffle, so every task shows up in every split it is big enough for.
- Features: the mean over non-padding tokens of the shared model's last hidden state.
- Router: d → 2d → 2d → T, each hidden layer Linear → BatchNorm → LeakyReLU → Dropout(0.5).
- Training: Adam on cross-entropy; the checkpoint kept is the epoch with the best validation
  accuracy, the lower validation loss breaking ties. The test split is never looked at here.
- Storage: ``router_state`` / ``router_from_state`` convert to and from (tensors, config) and
  ``router_files`` / ``router_from_files`` to and from the bytes of ``router.safetensors`` and
  ``router_config.json``; the caller writes them wherever it writes (fsspec).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

LOG = logging.getLogger(__name__)

ROUTER_WEIGHTS_FILE = "router.safetensors"
ROUTER_CONFIG_FILE = "router_config.json"
ROUTER_FORMAT = "mergefleet-twin-router"
ROUTER_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Example:
    """One router training example: an input text and the task (expert) it belongs to."""

    text: str
    task: str


@dataclass(frozen=True)
class Split:
    """Disjoint train / validation / test examples, and the texts dropped for carrying two tasks."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    dropped: list[str] = field(default_factory=list)


def parse_examples(lines: Iterable[str | bytes]) -> list[Example]:
    """Examples from JSONL lines (blank lines skipped); raises on a line without text or task."""
    examples = []
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"line {number}: not JSON ({error}); expected {{\"text\": ..., \"task\": ...}}") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not isinstance(record.get("task"), str):
            raise ValueError(f"line {number}: expected an object with string fields 'text' and 'task', got {line.strip()[:200]!r}")
        examples.append(Example(text=record["text"], task=record["task"]))
    return examples


def split_examples(
    examples: Iterable[Example], *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> Split:
    """Split by text with a fixed seed; the result does not depend on the order of ``examples``.

    Per task: n_val = round(n · val_fraction), n_test = round(n · test_fraction), the rest trains.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be >= 0 and sum below 1"
        )
    tasks_of_text: dict[str, set[str]] = {}
    for example in examples:
        tasks_of_text.setdefault(example.text, set()).add(example.task)
    dropped = sorted(text for text, tasks in tasks_of_text.items() if len(tasks) > 1)
    if dropped:
        LOG.warning("dropping %d texts labelled with more than one task", len(dropped))
    texts_of_task: dict[str, list[str]] = {}
    for text, tasks in tasks_of_text.items():
        if len(tasks) == 1:
            texts_of_task.setdefault(next(iter(tasks)), []).append(text)

    train, val, test = [], [], []
    rng = random.Random(seed)
    for task in sorted(texts_of_task):
        texts = sorted(texts_of_task[task])
        rng.shuffle(texts)
        n_val, n_test = round(len(texts) * val_fraction), round(len(texts) * test_fraction)
        val += [Example(text, task) for text in texts[:n_val]]
        test += [Example(text, task) for text in texts[n_val : n_val + n_test]]
        train += [Example(text, task) for text in texts[n_val + n_test :]]
    return Split(train=train, val=val, test=test, dropped=dropped)


def task_names(examples: Iterable[Example]) -> list[str]:
    """The sorted task names: index i is router output i."""
    return sorted({example.task for example in examples})


def labels_for(examples: Sequence[Example], tasks: Sequence[str]) -> torch.Tensor:
    """int64 labels (indices into ``tasks``) of ``examples``."""
    index = {task: i for i, task in enumerate(tasks)}
    unknown = sorted({example.task for example in examples} - index.keys())
    if unknown:
        raise ValueError(f"tasks {unknown} are not among the router's tasks {list(tasks)}")
    return torch.tensor([index[example.task] for example in examples], dtype=torch.int64)


class Router(nn.Module):
    """MLP from shared-model features (d) to one logit per task (T)."""

    def __init__(
        self,
        d: int,
        tasks: Sequence[str],
        *,
        hidden_sizes: Sequence[int] | None = None,
        dropout: float = 0.5,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if d < 1 or len(tasks) < 1 or len(set(tasks)) != len(tasks):
            raise ValueError(f"a router needs d >= 1 and distinct task names, got d={d}, tasks={list(tasks)}")
        self.d = d
        self.tasks = list(tasks)
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [2 * d, 2 * d]
        self.dropout = dropout
        self.negative_slope = negative_slope
        layers: list[nn.Module] = []
        width = d
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(negative_slope), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, len(self.tasks)))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

    def config(self) -> dict:
        """The JSON-ready ``router_config.json`` content."""
        return {
            "format": ROUTER_FORMAT,
            "version": ROUTER_FORMAT_VERSION,
            "d": self.d,
            "num_tasks": len(self.tasks),
            "tasks": list(self.tasks),
            "hidden_sizes": list(self.hidden_sizes),
            "dropout": self.dropout,
            "negative_slope": self.negative_slope,
            "features": "mean over non-padding tokens of the shared model's last hidden state",
        }


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of ``hidden`` (batch, seq, d), counting only positions where the mask is 1."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def last_hidden_state(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden state (batch, seq, d) of a transformers model, base or with a head: a head
    model's backbone (``base_model``) runs alone, so a causal LM computes no logits for the prompt.
    Position ids follow the attention mask (as transformers' ``generate`` sets them), so a token's
    state is the same whether its text is padded on the left, on the right, or not at all."""
    backbone = getattr(model, "base_model", model)
    mask = inputs.get("attention_mask")
    if mask is not None and "position_ids" not in inputs and "position_ids" in inspect.signature(backbone.forward).parameters:
        inputs = {**inputs, "position_ids": (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)}
    hidden = getattr(backbone(**inputs), "last_hidden_state", None)
    return hidden if hidden is not None else model(**inputs, output_hidden_states=True).hidden_states[-1]


def extract_features(
    model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 32, *, max_length: int = 512
) -> torch.Tensor:
    """float32 features (len(texts), d): mean-pooled last hidden state of ``model`` (put in eval mode)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    features = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = {key: value.to(device) for key, value in batch.items()}
            hidden = last_hidden_state(model, batch)
            features.append(mean_pool(hidden, batch.get("attention_mask")).float().cpu())
    if not features:
        raise ValueError("no texts to extract features from")
    return torch.cat(features)


def evaluate_router(router: Router, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{"accuracy", "loss"} of ``router`` (in eval mode) on one split."""
    router.eval()
    with torch.no_grad():
        logits = router(features.to(_dtype_of(router)))
        return {
            "accuracy": float((logits.argmax(dim=-1) == labels).double().mean()),
            "loss": float(F.cross_entropy(logits, labels)),
        }


def train_router(
    features_train: torch.Tensor,
    labels_train: torch.Tensor,
    features_val: torch.Tensor,
    labels_val: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    tasks: Sequence[str] | None = None,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    hidden_sizes: Sequence[int] | None = None,
) -> tuple[Router, dict]:
    """Train a router; returns it (eval mode, best-validation-accuracy weights) and the metrics.

    ``tasks`` names the label indices (default "0", "1", ...). Deterministic for a seed: the
    global RNG (init, dropout, shuffling) is seeded inside ``torch.random.fork_rng`` and restored after.
    Metrics: best_epoch (1-based), val_accuracy and val_loss at that epoch, train_accuracy of the
    kept weights, and per-epoch history.
    """
    n, d = features_train.shape
    if n < 2 or len(labels_train) != n:
        raise ValueError(f"need at least 2 training examples with one label each, got {n} features, {len(labels_train)} labels")
    if len(features_val) == 0 or len(features_val) != len(labels_val) or features_val.shape[1:] != (d,):
        raise ValueError(
            f"validation split: {tuple(features_val.shape)} features, {len(labels_val)} labels; "
            f"need at least one example of dimension {d} (checkpoints are selected on it)"
        )
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm needs two samples per batch), got {batch_size}")
    num_tasks = len(tasks) if tasks is not None else int(max(labels_train.max(), labels_val.max())) + 1
    tasks = list(tasks) if tasks is not None else [str(i) for i in range(num_tasks)]
    if int(labels_train.max()) >= num_tasks or int(labels_val.max()) >= num_tasks:
        raise ValueError(f"labels go up to {int(max(labels_train.max(), labels_val.max()))}, but there are {num_tasks} tasks")
    features_train, features_val = features_train.float(), features_val.float()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = Router(d, tasks, hidden_sizes=hidden_sizes)
        optimizer = torch.optim.Adam(router.parameters(), lr=lr, weight_decay=weight_decay)
        best_state, best = None, {"val_accuracy": -1.0, "val_loss": float("inf")}
        history = []
        for epoch in range(1, epochs + 1):
            router.train()
            total_loss = 0.0
            for batch in _batches(torch.randperm(n), batch_size):
                logits = router(features_train[batch])
                loss = F.cross_entropy(logits, labels_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(batch)
            val = evaluate_router(router, features_val, labels_val)
            history.append({"epoch": epoch, "train_loss": total_loss / n, "val_accuracy": val["accuracy"], "val_loss": val["loss"]})
            LOG.info("router epoch %d/%d: train loss %.4f, val accuracy %.4f", epoch, epochs, total_loss / n, val["accuracy"])
            if (val["accuracy"], -val["loss"]) > (best["val_accuracy"], -best["val_loss"]):
                best_state = copy.deepcopy(router.state_dict())
                best = {"best_epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
    if best_state is None:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    router.load_state_dict(best_state)
    router.eval()
    metrics = {**best, "train_accuracy": evaluate_router(router, features_train, labels_train)["accuracy"],
               "epochs": epochs, "history": history}
    return router, metrics


def router_state(router: Router) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for router.safetensors, router_config.json dict)."""
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in router.state_dict().items()}
    return tensors, router.config()


def router_from_state(tensors: Mapping[str, torch.Tensor], config: Mapping) -> Router:
    """The router (eval mode) from its tensors and config."""
    if config.get("format") != ROUTER_FORMAT or config.get("version") != ROUTER_FORMAT_VERSION:
        raise ValueError(
            f"router config has format {config.get('format')!r} version {config.get('version')!r}; "
            f"this mergefleet reads {ROUTER_FORMAT!r} version {ROUTER_FORMAT_VERSION}"
        )
    if len(config["tasks"]) != config["num_tasks"]:
        raise ValueError(f"router config lists {len(config['tasks'])} tasks but num_tasks is {config['num_tasks']}")
    router = Router(
        config["d"],
        config["tasks"],
        hidden_sizes=config["hidden_sizes"],
        dropout=config["dropout"],
        negative_slope=config["negative_slope"],
    )
    router.load_state_dict(dict(tensors), strict=True)
    router.eval()
    return router


def router_files(router: Router) -> dict[str, bytes]:
    """{file name: bytes} of router.safetensors and router_config.json, for the caller to write."""
    tensors, config = router_state(router)
    return {
        ROUTER_WEIGHTS_FILE: safetensors.torch.save(tensors, metadata={"format": "pt"}),
        ROUTER_CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    }


def router_from_files(files: Mapping[str, bytes]) -> Router:
    """The router from the bytes ``router_files`` produced (as read back from storage)."""
    missing = [name for name in (ROUTER_WEIGHTS_FILE, ROUTER_CONFIG_FILE) if name not in files]
    if missing:
        raise ValueError(f"router files {missing} are missing; a router directory holds {ROUTER_WEIGHTS_FILE} and {ROUTER_CONFIG_FILE}")
    return router_from_state(
        safetensors.torch.load(files[ROUTER_WEIGHTS_FILE]), json.loads(files[ROUTER_CONFIG_FILE])
    )


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Mini-batches of ``order``; a last batch of one joins the previous one (BatchNorm needs 2)."""
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
