"""Text-classification tasks from data that ships in wheels (chatterbot-corpus, vaderSentiment).

Four tasks whose inputs never overlap (one text, one task, one label):

- ``topic_en``  English chatterbot utterances, categories grouped into 4 topics, only texts VADER
  finds not clearly polar (|compound| < 0.3), so the sentiment task keeps the polar ones;
- ``sentiment_en`` English chatterbot utterances VADER labels positive (compound ≥ 0.3) or
  negative (≤ −0.3);
- ``topic_es``  Spanish chatterbot utterances, categories grouped into 4 topics;
- ``langid``    which of 8 languages an utterance is in (none of them English or Spanish, so no
  text of another task could carry a language label too).

A text is compared case- and space-insensitively; one that would carry two labels (within a task
or across tasks) is dropped and counted. Each (task, label) is capped, shuffled with the seed and
split per label into train / val / test, so every split has every label.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")
POLAR = 0.3  # |VADER compound| at or above which an English text is polar (sentiment task)

TOPIC_EN = {
    "computing": ("ai", "coding", "computers", "tech_support"),
    "quiz": ("trivia",),
    "culture": ("literature", "movies", "history", "politics", "sports", "food", "money", "science", "health", "gossip"),
    "chat": ("conversations", "greetings", "botprofile", "emotion", "psychology", "humor"),
}
TOPIC_ES = {
    "ia": ("IA",),
    "emociones": ("emociones",),
    "psicologia": ("psicologia",),
    "charla": ("conversations", "greetings", "perfilbot", "origen"),
}
LANGUAGES = ("french", "german", "italian", "portuguese", "dutch", "swedish", "indonesian", "turkish")


@dataclass(frozen=True)
class Sizes:
    """How many texts to keep and how to split them."""

    per_label: dict[str, int] = field(default_factory=lambda: {"topic_en": 150, "sentiment_en": 200, "topic_es": 150, "langid": 100})
    val_fraction: float = 0.15
    test_fraction: float = 0.25


@dataclass(frozen=True)
class TaskData:
    """One task: its label names and (text, label index) pairs per split."""

    name: str
    labels: list[str]
    splits: dict[str, list[tuple[str, int]]]

    def texts(self, split: str) -> list[str]:
        return [text for text, _ in self.splits[split]]

    def targets(self, split: str) -> list[int]:
        return [label for _, label in self.splits[split]]


def corpus_dir() -> Path:
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).parent / "data"


def read_category(language: str, category: str) -> list[str]:
    """Every utterance (stripped, deduplicated, in file order) of one chatterbot corpus file."""
    import yaml

    data = yaml.safe_load((corpus_dir() / language / f"{category}.yml").read_text(encoding="utf-8"))
    seen: dict[str, None] = {}
    for conversation in data.get("conversations") or []:
        for utterance in conversation:
            if isinstance(utterance, str) and utterance.strip():
                seen.setdefault(" ".join(utterance.split()), None)
    return list(seen)


def read_language(language: str) -> list[str]:
    texts: dict[str, None] = {}
    for path in sorted((corpus_dir() / language).glob("*.yml")):
        texts.update(dict.fromkeys(read_category(language, path.stem)))
    return list(texts)


def candidates() -> list[tuple[str, str, str]]:
    """(task, label, text) for every candidate example, before dropping, capping and splitting."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    rows = []
    for label, categories in TOPIC_EN.items():
        for category in categories:
            for text in read_category("english", category):
                compound = vader.polarity_scores(text)["compound"]
                if compound >= POLAR:
                    rows.append(("sentiment_en", "positive", text))
                elif compound <= -POLAR:
                    rows.append(("sentiment_en", "negative", text))
                else:
                    rows.append(("topic_en", label, text))
    for label, categories in TOPIC_ES.items():
        rows += [("topic_es", label, text) for category in categories for text in read_category("spanish", category)]
    for language in LANGUAGES:
        rows += [("langid", language, text) for text in read_language(language)]
    return rows


def build_tasks(seed: int, sizes: Sizes = Sizes(), *, tasks: Iterable[str] | None = None) -> tuple[dict[str, TaskData], dict]:
    """The tasks for one seed, and a report of what was dropped and kept."""
    rows = candidates()
    keys: dict[str, set[tuple[str, str]]] = {}
    for task, label, text in rows:
        keys.setdefault(_key(text), set()).add((task, label))
    ambiguous = {key for key, owners in keys.items() if len(owners) > 1}
    by_label: dict[tuple[str, str], dict[str, None]] = {}
    for task, label, text in rows:
        if _key(text) not in ambiguous:
            by_label.setdefault((task, label), {}).setdefault(text, None)
    wanted = list(tasks) if tasks is not None else ["topic_en", "sentiment_en", "topic_es", "langid"]
    rng = random.Random(seed)
    result, report = {}, {"seed": seed, "dropped_ambiguous": len(ambiguous), "tasks": {}}
    for task in wanted:
        labels = sorted(label for t, label in by_label if t == task)
        if not labels:
            raise ValueError(f"unknown task {task!r}; tasks are topic_en, sentiment_en, topic_es, langid")
        splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
        for index, label in enumerate(labels):
            texts = sorted({t: None for t in by_label[(task, label)]}, key=_key)
            rng.shuffle(texts)
            texts = texts[: sizes.per_label[task]]
            n_val, n_test = round(len(texts) * sizes.val_fraction), round(len(texts) * sizes.test_fraction)
            splits["val"] += [(t, index) for t in texts[:n_val]]
            splits["test"] += [(t, index) for t in texts[n_val:n_val + n_test]]
            splits["train"] += [(t, index) for t in texts[n_val + n_test:]]
        for split in splits.values():
            rng.shuffle(split)
        result[task] = TaskData(task, labels, splits)
        report["tasks"][task] = {"labels": labels, **{s: len(v) for s, v in splits.items()},
                                 "per_label": {s: [sum(1 for _, y in v if y == i) for i in range(len(labels))]
                                               for s, v in splits.items()}}
    return result, report


def subsample(tasks: dict[str, TaskData], *, train: int, val: int, test: int) -> dict[str, TaskData]:
    """The first examples of each split (already shuffled): for the quick mode and the smoke test."""
    limits = {"train": train, "val": val, "test": test}
    return {name: TaskData(name, t.labels, {s: t.splits[s][:limits[s]] for s in SPLITS}) for name, t in tasks.items()}


def write_tasks(tasks: dict[str, TaskData], directory: Path, report: dict) -> dict:
    """<task>/<split>.jsonl ({"text", "label", "label_name"}) and sizes.json; returns the sizes."""
    sizes = {"seed": report["seed"], "dropped_ambiguous": report["dropped_ambiguous"], "tasks": {}}
    for name, task in tasks.items():
        (directory / name).mkdir(parents=True, exist_ok=True)
        for split, rows in task.splits.items():
            lines = (json.dumps({"text": t, "label": y, "label_name": task.labels[y]}, ensure_ascii=False) for t, y in rows)
            (directory / name / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        sizes["tasks"][name] = {"labels": task.labels, **{s: len(task.splits[s]) for s in SPLITS}}
    (directory / "sizes.json").write_text(json.dumps(sizes, indent=2) + "\n")
    return sizes


def check_disjoint(tasks: dict[str, TaskData]) -> None:
    """Raise if any text shows up twice anywhere (across tasks or splits)."""
    seen: dict[str, str] = {}
    for name, task in tasks.items():
        for split, rows in task.splits.items():
            for text, _ in rows:
                if _key(text) in seen:
                    raise AssertionError(f"text {text!r} is in {seen[_key(text)]} and {name}/{split}")
                seen[_key(text)] = f"{name}/{split}"


def _key(text: str) -> str:
    return " ".join(text.lower().split())
