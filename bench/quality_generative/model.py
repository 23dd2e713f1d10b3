"""The character tokenizer, the small Llama, pre-training, expert fine-tuning and greedy generation.

- **Tokenizer**: one token per character of ``data.CHARSET`` (a ``tokenizers`` BPE model with no
  merges, so every character is its own token, and a ``Fuse`` decoder), ``<pad>`` 0, ``<s>`` 1 (put
  in front of every text by the post-processor), ``</s>`` 2, ``<unk>`` 3; wrapped as a transformers
  ``PreTrainedTokenizerFast`` with left padding (generation) and saved with every checkpoint.
- **Model**: ``LlamaForCausalLM`` (RMSNorm, SwiGLU, rotary positions, untied ``lm_head``), by default
  4 layers, hidden 192, 4 heads, MLP 512, float32: 1.8 M parameters.
- **Pre-training**: next-token loss on windows of the generic text (``data.pretrain_texts``, joined
  in a seeded order), AdamW, warm-up then cosine decay.
- **Experts**: the whole model fine-tuned on ``prompt + answer + </s>`` with the loss on the answer
  and EOS only (AdamW lr 3e-3, no weight decay, warm-up then linear decay, batches of 32, the same
  number of steps for every task); of the validation checks at even intervals the one with the best
  validation exact match is kept (lower validation loss breaks ties).
- **Scoring**: greedy generation (``generate(..., do_sample=False)``) from the left-padded prompts;
  the text up to the first ``</s>``, stripped, must equal the answer exactly.

Checkpoints are HF safetensors directories: ``save_pretrained`` of the model and of the tokenizer
(config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
"""

from __future__ import annotations

import copy
import difflib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.quality.model import dir_bytes  # noqa: F401  (re-exported: storage per method)
from bench.quality_generative.data import CHARSET

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 128


def build_tokenizer(charset: str = CHARSET):
    """A character-level ``PreTrainedTokenizerFast`` (see the module docstring)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in charset:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False)
    if (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) != (PAD, BOS, EOS):
        raise AssertionError("special token ids moved")
    return tokenizer


def load_tokenizer(directory: Path):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer


def new_model(vocab_size: int, size: ModelSize = ModelSize(), *, seed: int = 0) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=False, rms_norm_eps=1e-5,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = PAD
    return model


def load_model(directory: Path) -> nn.Module:
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32).eval()


def save_checkpoint(directory: Path, model: nn.Module, tokenizer) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def _schedule(optimizer, total: int, warmup: int, kind: str):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretrain(model: nn.Module, tokenizer, texts: Sequence[str], *, steps: int, batch_size: int = 32, seq_len: int = 64,
             lr: float = 3e-3, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Next-token training on random windows of the texts joined by newlines (BOS + seq_len chars)."""
    rng = random.Random(seed)
    order = list(texts)
    rng.shuffle(order)
    stream = torch.tensor(tokenizer("\n".join(order), add_special_tokens=False)["input_ids"])
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = _schedule(optimizer, steps, max(1, steps // 20), "cosine")
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,))
        ids = torch.stack([torch.cat([torch.tensor([BOS]), stream[s:s + seq_len]]) for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"pre-train step {step + 1}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "chars": len(stream),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}


# --- fine-tuning ---------------------------------------------------------------------------------

def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(ids of <s> prompt answer </s>, number of prompt tokens incl. <s>) per pair."""
    out = []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append((p + a + [EOS], len(p)))
    return out


def collate(encoded: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels only on the answer and EOS."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), PAD)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def answer_loss(model: nn.Module, encoded: Sequence[tuple[list[int], int]], batch_size: int = 128) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum", ignore_index=-100))
        count += int((labels != -100).sum())
    return total / max(1, count)


@dataclass
class Expert:
    model: nn.Module
    metrics: dict


def finetune(base: nn.Module, tokenizer, train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]], *,
             steps: int, seed: int, lr: float = 3e-3, batch_size: int = 32, checks: int = 5,
             max_new_tokens: int = 40) -> Expert:
    """Full fine-tune of a copy of ``base`` for ``steps`` batches (the training pairs reshuffled on
    every pass), validated ``checks`` times at even intervals; the best check is kept (module docstring)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    encoded = encode_pairs(tokenizer, train)
    val_encoded = encode_pairs(tokenizer, val)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps, max(1, steps // 20), "linear")
    every = max(1, steps // checks)
    best, best_state, history = (-1.0, float("inf")), None, []
    order: list[int] = []
    total, seen = 0.0, 0
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(encoded)).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        batch = collate([encoded[i] for i in chosen])
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(chosen)
        seen += len(chosen)
        if step % every == 0 or step == steps:
            val_acc = exact_match(generate(model, tokenizer, [p for p, _ in val], max_new_tokens=max_new_tokens),
                                  [a for _, a in val])
            val_loss = answer_loss(model, val_encoded)
            history.append({"step": step, "train_loss": round(total / seen, 4), "val_exact": round(val_acc, 4),
                            "val_loss": round(val_loss, 4)})
            total, seen = 0.0, 0
            if (val_acc, -val_loss) > (best[0], -best[1]):
                best = (val_acc, val_loss)
                best_state = (copy.deepcopy(model.state_dict()), step)
            model.train()
    model.load_state_dict(best_state[0])
    model.eval()
    return Expert(model, {"best_step": best_state[1], "val_exact": best[0], "steps": steps,
                          "epochs": round(steps * batch_size / len(encoded), 1), "history": history})


# --- generation ----------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 40, batch_size: int = 128,
             on_batch: Callable[[list[int]], None] | None = None) -> list[str]:
    """Greedy answers (text up to the first </s>) in prompt order. ``model`` is anything with
    transformers' ``generate``; prompts are batched by length and left-padded. ``on_batch(indices)``
    runs after each batch's ``generate`` with the prompt indices of that batch (e.g. to read a twin
    model's ``last_weights``)."""
    if hasattr(model, "eval"):
        model.eval()
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
        if on_batch is not None:
            on_batch(indices)
        for row, i in zip(out[:, enc["input_ids"].shape[1]:].tolist(), indices):
            if EOS in row:
                row = row[:row.index(EOS)]
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    return answers


def correct(predictions: Sequence[str], answers: Sequence[str]) -> list[int]:
    """1 where the stripped generation equals the answer exactly, else 0."""
    return [int(p.strip() == a) for p, a in zip(predictions, answers, strict=True)]


def similarity(predictions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Character similarity of each stripped generation to its answer (difflib's ratio, 0..1): a
    graded view next to exact match, for models that get the form but not every character right."""
    return [difflib.SequenceMatcher(None, p.strip(), a, autojunk=False).ratio()
            for p, a in zip(predictions, answers, strict=True)]


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    c = correct(predictions, answers)
    return sum(c) / len(c)
