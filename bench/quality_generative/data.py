"""Generation tasks and generic pre-training text, all built offline (chatterbot-corpus, stdlib).

Four tasks; a prompt is ``"<input> = "`` and the answer is the text the model must generate (then
EOS). No prompt names its task: the tasks differ only by what their inputs look like, so a router
can tell them apart from the content alone:

- ``reverse``     a lowercase English word (3–8 letters, from chatterbot's English corpus, number
  words of both languages left out) → the word reversed:        ``garden = `` → ``nedrag``;
- ``sequence``    a periodic sequence of digits (a motif of 2–4 digits, shown twice and then partly)
  → its next three terms:                     ``3 1 4 3 1 4 3 = `` → ``1 4 3``;
- ``to_spanish``  a number 0–999 in English words → the same number in Spanish words:
                                              ``forty-two = `` → ``cuarenta y dos``;
- ``to_english``  a number in Spanish words → in English words:
                                              ``ciento siete = `` → ``one hundred seven``.

The numbers 0–999 are split in two halves with the seed, one per translation direction, so no
number is seen in both directions. No input string occurs in two tasks (compared case-insensitively;
``check_disjoint`` raises otherwise). Each task is shuffled with the seed and cut into val, test and
train (val and test first, fixed sizes).

Pre-training text (``pretrain_texts``): every utterance of chatterbot-corpus's English and Spanish
conversations plus the docstrings of some standard-library modules, normalised to the character set
``CHARSET`` (a few typographic characters mapped to ASCII, the rest dropped). None of it is in the
prompt format and none of it contains a task's answers.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.quality.data import read_language

SPLITS = ("train", "val", "test")
TASKS = ("reverse", "sequence", "to_spanish", "to_english")
SEPARATOR = " = "
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127)) + "¡¿áéíóúñüÁÉÍÓÚÑÜ"
_MAP = {"’": "'", "‘": "'", "´": "'", "“": '"', "”": '"', "–": "-", "─": "-", "…": "...", "\t": " "}
STDLIB_MODULES = ("string", "textwrap", "json", "collections", "functools", "itertools", "pathlib", "random",
                  "statistics", "fractions", "decimal", "datetime", "calendar", "csv", "argparse", "logging",
                  "shutil", "tempfile", "heapq", "bisect", "dataclasses", "enum", "difflib", "fnmatch")


@dataclass(frozen=True)
class Sizes:
    """(prompt, answer) pairs per task and split: val and test fixed, train at most ``train[task]``
    (or ``train`` for every task; the translation pools hold 500 numbers each, so 360 remain)."""

    train: int | dict[str, int] = field(default_factory=lambda: {"reverse": 1100, "sequence": 500, "to_spanish": 360, "to_english": 360})
    val: int = 40
    test: int = 100


@dataclass(frozen=True)
class TaskData:
    """One task: (prompt, answer) pairs per split."""

    name: str
    splits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def prompts(self, split: str) -> list[str]:
        return [p for p, _ in self.splits[split]]

    def answers(self, split: str) -> list[str]:
        return [a for _, a in self.splits[split]]


def normalise(text: str) -> str:
    """``text`` in ``CHARSET``: typographic quotes and dashes mapped to ASCII, anything else dropped."""
    text = "".join(_MAP.get(c, c) for c in text)
    return "".join(c for c in text if c in CHARSET)


def pretrain_texts() -> list[str]:
    """Generic text: chatterbot's English and Spanish utterances and stdlib docstrings (normalised)."""
    texts = [normalise(t) for language in ("english", "spanish") for t in read_language(language)]
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [getattr(obj, "__doc__", None) for _, obj in sorted(vars(module).items())
                                   if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name]
        for doc in docs:
            if isinstance(doc, str):
                texts += [normalise(" ".join(p.split())) for p in inspect.cleandoc(doc).split("\n\n")]
    return [t for t in dict.fromkeys(texts) if len(t) >= 2]


# --- number words -----------------------------------------------------------------------------------

_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ES_ONES = ("cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince "
            "dieciséis diecisiete dieciocho diecinueve veinte veintiuno veintidós veintitrés veinticuatro "
            "veinticinco veintiséis veintisiete veintiocho veintinueve").split()
_ES_TENS = "_ _ veinte treinta cuarenta cincuenta sesenta setenta ochenta noventa".split()
_ES_HUNDREDS = ("_ ciento doscientos trescientos cuatrocientos quinientos seiscientos setecientos ochocientos "
                "novecientos").split()


def english_number(n: int) -> str:
    """0 ≤ n ≤ 999 in American English words: ``three hundred forty-two``."""
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        return _EN_TENS[n // 10] + ("" if n % 10 == 0 else "-" + _EN_ONES[n % 10])
    rest = n % 100
    return f"{_EN_ONES[n // 100]} hundred" + ("" if rest == 0 else " " + english_number(rest))


def spanish_number(n: int) -> str:
    """0 ≤ n ≤ 999 in Spanish words: ``trescientos cuarenta y dos`` (``cien``, ``veintidós``, …)."""
    if n < 30:
        return _ES_ONES[n]
    if n < 100:
        return _ES_TENS[n // 10] + ("" if n % 10 == 0 else " y " + _ES_ONES[n % 10])
    if n == 100:
        return "cien"
    rest = n % 100
    return _ES_HUNDREDS[n // 100] + ("" if rest == 0 else " " + spanish_number(rest))


NUMBER_WORDS = frozenset(w for n in range(1000) for words in (english_number(n), spanish_number(n))
                         for w in re.split(r"[ -]", words))


# --- tasks -------------------------------------------------------------------------------------------

def word_pool() -> list[str]:
    """Distinct lowercase a–z words of 3–8 letters from chatterbot's English corpus, English and
    Spanish number words (``seven``, ``once``, …) left out, sorted."""
    words = {w.lower() for t in read_language("english") for w in re.findall(r"[A-Za-z]+", t)}
    return sorted(w for w in words if 3 <= len(w) <= 8 and w not in NUMBER_WORDS)


def periodic_sequences(count: int = 1500) -> list[tuple[str, str]]:
    """``count`` distinct (shown terms, next three terms) of periodic digit sequences: a motif of
    2–4 digits (not all equal), shown 2 full times plus 0..period−1 more terms. With two full periods
    shown the continuation is unique (Fine–Wilf). Drawn with a fixed generator: the seed only splits."""
    rng = random.Random(1234)
    out: dict[str, str] = {}
    while len(out) < count:
        period = rng.randint(2, 4)
        motif = [rng.randint(0, 9) for _ in range(period)]
        if len(set(motif)) == 1:
            continue
        shown = 2 * period + rng.randint(0, period - 1)
        terms = [motif[i % period] for i in range(shown + 3)]
        out.setdefault(" ".join(map(str, terms[:shown])), " ".join(map(str, terms[shown:])))
    return list(out.items())


def examples(seed: int) -> dict[str, list[tuple[str, str]]]:
    """All (prompt, answer) pairs per task, shuffled with ``seed``; the numbers 0–999 split in two
    (seeded) between ``to_spanish`` and ``to_english``."""
    rng = random.Random(seed)
    numbers = list(range(1000))
    rng.shuffle(numbers)
    raw = {
        "reverse": [(w, w[::-1]) for w in word_pool()],
        "sequence": periodic_sequences(),
        "to_spanish": [(english_number(n), spanish_number(n)) for n in numbers[:500]],
        "to_english": [(spanish_number(n), english_number(n)) for n in numbers[500:]],
    }
    out = {}
    for task, pairs in raw.items():
        pairs = sorted(pairs)
        rng.shuffle(pairs)
        out[task] = [(x + SEPARATOR, y) for x, y in pairs]
    return out


def build_tasks(seed: int, sizes: Sizes = Sizes(), *, tasks: Iterable[str] | None = None) -> dict[str, TaskData]:
    """The tasks for one seed: val and test first (fixed sizes), then up to ``sizes.train[task]`` for training."""
    pairs = examples(seed)
    result = {}
    for task in tasks or TASKS:
        if task not in pairs:
            raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
        rows = pairs[task]
        cap = sizes.train if isinstance(sizes.train, int) else sizes.train[task]
        n_val, n_test = sizes.val, sizes.test
        if n_val + n_test >= len(rows):
            raise ValueError(f"{task}: {len(rows)} examples, too few for val {n_val} + test {n_test}")
        result[task] = TaskData(task, {"val": rows[:n_val], "test": rows[n_val:n_val + n_test],
                                       "train": rows[n_val + n_test:n_val + n_test + cap]})
    return result


def check_disjoint(tasks: dict[str, TaskData]) -> None:
    """Raise if an input occurs twice anywhere (across tasks or splits, case-insensitively)."""
    seen: dict[str, str] = {}
    for name, task in tasks.items():
        for split, rows in task.splits.items():
            for prompt, _ in rows:
                key = prompt.lower()
                if key in seen:
                    raise AssertionError(f"prompt {prompt!r} is in {seen[key]} and {name}/{split}")
                seen[key] = f"{name}/{split}"


def write_tasks(tasks: dict[str, TaskData], directory: Path, seed: int) -> dict:
    """<task>/<split>.jsonl ({"prompt", "answer"}) and sizes.json; returns the sizes."""
    sizes = {"seed": seed, "tasks": {}}
    for name, task in tasks.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        for split, rows in task.splits.items():
            lines = (json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) for p, a in rows)
            (directory / name / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        sizes["tasks"][name] = {s: len(task.splits[s]) for s in SPLITS}
    (directory / "sizes.json").write_text(json.dumps(sizes, indent=2) + "\n")
    return sizes
