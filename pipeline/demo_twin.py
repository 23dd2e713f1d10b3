"""`mergefleet demo --twin`: from nothing to a routed prediction.

In the work dir, built once and then reused: ``models/base``, a tiny random Llama with a
character-level tokenizer, and one expert per sample task (``models/count``, ``models/alphabet``,
``models/repeat``: the directory names are the twin run's expert names), each fully fine-tuned from
the base for a few seconds; ``tasks.jsonl``, the router's examples; ``twin.yaml``, the merge. Then
the twin merge into the output, the router trained on tasks.jsonl, and per task a prompt routed
(the expert weights) and continued (a short greedy generation).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from pipeline.samples import LLAMA_CONFIG, build_once, write_if_changed, write_model

CHARACTERS = " 0123456789abcdefghijklmnopqrstuvwxyz"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("stone", "river", "light", "cloud", "piano", "mango", "zebra", "quiet", "tiger", "lemon", "ocean", "wheat")
TASK_PROMPTS = {"count": "2 3 4", "alphabet": "m n o", "repeat": "river river"}  # expert (= task) name: demo prompt
TASKS = tuple(TASK_PROMPTS)
FINE_TUNE_STEPS = 150  # a few seconds per expert on one CPU thread
# examples/twin.yaml's (tests/test_examples.py): rank_ratio 0.5, as these experts are fully fine-tuned from a
# random base, their exclusive parts far from low-rank (the default 0.1 garbles the alphabet expert's output)
DEMO_TWIN_PARAMETERS = {"shared": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.29}}, "rank_ratio": 0.5}


def task_texts(task: str) -> list[str]:
    """Every sample text of a task, in a fixed order: its expert's fine-tuning data and the router's examples.
    count: ascending digits (mod 10); alphabet: ascending letters; repeat: one word repeated."""
    if task == "count":
        return [" ".join(str((start + i) % 10) for i in range(n)) for start in range(10) for n in range(4, 10)]
    if task == "alphabet":
        return [" ".join(LETTERS[start:start + n]) for start in range(15) for n in range(4, 8)]
    if task == "repeat":
        return [" ".join([word] * n) for word in WORDS for n in range(2, 7)]
    raise ValueError(f"unknown sample task {task!r}; the demo's tasks are {list(TASKS)}")


def tasks_jsonl() -> str:
    """The router's examples: one {"text", "task"} line per sample text of every task."""
    return "".join(json.dumps({"text": text, "task": task}) + "\n" for task in TASKS for text in task_texts(task))


def char_tokenizer():
    """A character-level tokenizer over ``CHARACTERS`` with <pad> (id 0, also what other characters read as)
    and </s> (id 1)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARACTERS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread (a model this small trains several times faster than on contended threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fine_tune(model, tokenizer, texts: list[str], *, steps: int, seed: int, lr: float = 3e-3, batch_size: int = 32):
    """Fully fine-tune a causal LM in place on ``texts`` (each followed by EOS): ``steps`` AdamW steps
    on seeded random batches. Returns the model, in eval mode."""
    encoded = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in encoded])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in encoded])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(texts), (batch_size,), generator=generator)
        labels = ids[rows].masked_fill(mask[rows] == 0, -100)  # no loss on the padding
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def build_twin_sample_models(root: Path, *, steps: int = FINE_TUNE_STEPS, seed: int = 0) -> None:
    """``root/base`` (random, seed ``seed``) and ``root/<task>`` for every task, each with the tokenizer."""
    import transformers

    tokenizer = char_tokenizer()
    config = {**LLAMA_CONFIG, "vocab_size": len(tokenizer), "torch_dtype": "float32", "bos_token_id": None,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        models = {"base": base, **{task: fine_tune(copy.deepcopy(base), tokenizer, task_texts(task), steps=steps,
                                                   seed=seed + 1 + i) for i, task in enumerate(TASKS)}}
    for name, model in models.items():
        write_model(root / name, {n: t.detach().contiguous() for n, t in model.state_dict().items()}, config)
        tokenizer.save_pretrained(root / name)


def ensure_twin_sample_models(root: Path, **kwargs) -> tuple[Path, list[Path]]:
    """``build_twin_sample_models`` into ``root`` unless they are already there (``build_once``)."""
    base, *experts = build_once(root, ["base", *TASKS], lambda directory: build_twin_sample_models(directory, **kwargs))
    return base, experts


def twin_config(base: Path, experts: list[Path], output: Path) -> dict:
    """The demo's twin merge of ``experts`` over ``base`` into ``output``."""
    return {"merge_method": "twin", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "parameters": DEMO_TWIN_PARAMETERS, "dtype": "float32", "output": str(output)}


def run_twin_demo(output: str | Path, work: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Build (or reuse) the inputs in ``work``, twin-merge them into ``output``, train the router, and
    route and continue each task's prompt. Returns the summary the CLI prints."""
    _require_twin_extra()
    from pipeline.config import load_config
    from pipeline.coordinator import run_merge
    from twin.load import generate_texts, load_tokenizer, load_twin, predict
    from twin.train import train_twin_router

    output = Path(output).resolve()
    base, experts = ensure_twin_sample_models(work / "models")
    data = write_if_changed(work / "tasks.jsonl", tasks_jsonl())
    config_text = yaml.safe_dump(twin_config(base, experts, output), sort_keys=False)
    config_path = write_if_changed(work / "twin.yaml", config_text)
    print(f"sample base (with a tokenizer) + {len(experts)} experts fine-tuned on {', '.join(TASKS)} in "
          f"{work / 'models'}; config {config_path}; router data {data}")
    manifest = run_merge(load_config(config_path), overwrite=overwrite, progress=progress)
    prompts = list(TASK_PROMPTS.values())
    with one_thread():
        metrics = train_twin_router(str(output), str(data))
        twin, tokenizer = load_twin(str(output), router=True), load_tokenizer(str(output))
        routed = predict(twin, tokenizer, prompts)["results"]
        generated = generate_texts(twin, tokenizer, prompts, max_new_tokens=12)
    return {
        "output": str(output), "run_id": manifest.run_id, "experts": list(twin.experts),
        "router": {"val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test"]["accuracy"]},
        "predictions": [{"prompt": r["text"], "top_expert": r["top_expert"],
                         "weights": dict(zip(twin.experts, r["weights"])), "continuation": g["text"]}
                        for r, g in zip(routed, generated)],
    }


def _require_twin_extra() -> None:
    """Refuse, with the install command, when the twin extra's transformers (and its tokenizers) is missing."""
    for module in ("transformers", "tokenizers"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise RuntimeError(f"mergefleet demo --twin needs {module} (the twin extra); install it with: "
                               ".venv/bin/pip install -e '.[twin]'") from None
