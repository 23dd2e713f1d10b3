"""Smoke test of the generative quality benchmark (bench/quality_generative): real text, tiny sizes.

The tasks (disjoint, seeded, prompts that do not name the task), the character tokenizer (round
trip, left padding, saved and reloaded with a checkpoint) and one pre-training step plus a two-step
fine-tune and greedy scoring of a 1-layer Llama: proves the data/model path runs offline. The merges
(the pipeline, twin) are left to ``run.py --quick``. Skips without chatterbot-corpus or transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("chatterbot_corpus")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.quality_generative import data as D  # noqa: E402
from bench.quality_generative import model as M  # noqa: E402


def test_tasks_are_disjoint_seeded_and_well_formed():
    tasks = D.build_tasks(0)
    D.check_disjoint(tasks)
    assert list(tasks) == list(D.TASKS)
    for task in tasks.values():
        assert all(task.splits[s] for s in D.SPLITS)
        assert all(p.endswith(D.SEPARATOR) and a and set(p + a) <= set(D.CHARSET) for p, a in task.splits["train"])
    assert D.spanish_number(342) == "trescientos cuarenta y dos" and D.english_number(342) == "three hundred forty-two"
    assert D.spanish_number(100) == "cien" and D.spanish_number(22) == "veintidós"
    assert not D.NUMBER_WORDS & set(D.word_pool())  # "once", "seven", ... are translation inputs only
    again, other = D.build_tasks(0), D.build_tasks(1)
    assert again["sequence"].splits == tasks["sequence"].splits
    assert other["to_spanish"].splits != tasks["to_spanish"].splits
    to_spanish = {p.removesuffix(D.SEPARATOR) for s in D.SPLITS for p, _ in tasks["to_spanish"].splits[s]}
    to_english = {a for s in D.SPLITS for _, a in tasks["to_english"].splits[s]}
    assert to_spanish and not to_spanish & to_english  # each number is translated in one direction only
    texts = D.pretrain_texts()
    assert len(texts) > 1000 and all(set(t) <= set(D.CHARSET) for t in texts)


def test_tokenizer_pretrain_finetune_generate(tmp_path):
    torch.set_num_threads(1)
    tokenizer = M.build_tokenizer()
    ids = tokenizer("dieciséis = ")["input_ids"]
    assert ids[0] == M.BOS and len(ids) == 1 + len("dieciséis = ") and M.UNK not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "dieciséis = "
    batch = tokenizer(["ab = ", "abcd = "], padding=True)
    assert batch["input_ids"][0][:2] == [M.PAD, M.PAD] and batch["attention_mask"][0][:2] == [0, 0]  # left padding

    model = M.new_model(len(tokenizer), M.ModelSize(hidden=32, layers=1, heads=2, intermediate=64))
    metrics = M.pretrain(model, tokenizer, D.pretrain_texts()[:200], steps=1, batch_size=4, seq_len=32)
    assert metrics["final_loss"] > 0
    task = D.build_tasks(0, D.Sizes(train=8, val=4, test=4))["reverse"]
    expert = M.finetune(model, tokenizer, task.splits["train"], task.splits["val"], steps=2, seed=0, batch_size=4,
                        checks=1, max_new_tokens=8)
    assert expert.metrics["best_step"] == 2 and 0.0 <= expert.metrics["val_exact"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), expert.model.parameters()))  # a copy was tuned

    directory = tmp_path / "expert"
    M.save_checkpoint(directory, expert.model, tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in directory.iterdir()}
    assert json.loads((directory / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded, tok = M.load_model(directory), M.load_tokenizer(directory)
    prompts = task.prompts("test")
    answers = M.generate(reloaded, tok, prompts, max_new_tokens=8)
    assert answers == [M.generate(expert.model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]  # padding-invariant
    assert len(M.correct(answers, task.answers("test"))) == 4
