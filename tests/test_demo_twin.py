"""`mergefleet demo --twin` end to end: from an empty directory to a routed prediction, then a rerun
that reuses every input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.cli import main
from pipeline.demo_twin import TASK_PROMPTS, TASKS, task_texts
from twin.load import load_tokenizer, load_twin, predict


def _demo_twin(capsys, out: Path) -> dict:
    assert main(["demo", "--twin", "--output", str(out), "--no-progress"]) == 0
    first, _, summary = capsys.readouterr().out.partition("\n")
    assert first.startswith(f"sample base (with a tokenizer) + {len(TASKS)} experts fine-tuned on "), first
    return json.loads(summary)


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(root.rglob("*"))}


def test_demo_twin_from_nothing_to_a_routed_prediction(tmp_path, capsys, ray_local):
    out, work = tmp_path / "demo-twin", tmp_path / "demo-twin-work"
    summary = _demo_twin(capsys, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-twin", "demo-twin-work"]  # no .partial left
    assert sorted(p.name for p in work.iterdir()) == ["models", "tasks.jsonl", "twin.yaml"]
    for model in ("base", *TASKS):
        assert (work / "models" / model / "tokenizer.json").is_file(), model

    assert summary["experts"] == list(TASKS)
    assert [p["prompt"] for p in summary["predictions"]] == list(TASK_PROMPTS.values())
    for task, prediction in zip(TASKS, summary["predictions"]):
        assert list(prediction["weights"]) == list(TASKS) and abs(sum(prediction["weights"].values()) - 1) < 1e-4
        assert prediction["top_expert"] == task, prediction
        assert prediction["continuation"], prediction

    # the router sends the sample texts to their own task's expert, better than chance
    twin, tokenizer = load_twin(str(out), router=True), load_tokenizer(str(out))
    texts = {task: task_texts(task) for task in TASKS}
    assert not set.intersection(*map(set, texts.values()))  # no text belongs to two tasks
    routed = predict(twin, tokenizer, [t for task in TASKS for t in texts[task]])["results"]
    labels = [task for task in TASKS for _ in texts[task]]
    accuracy = sum(r["top_expert"] == label for r, label in zip(routed, labels)) / len(labels)
    assert accuracy > 1 / len(TASKS), accuracy

    # a rerun reuses the inputs untouched (the merge is a no-op) and predicts the same
    stats = _stats(work)
    again = _demo_twin(capsys, out)
    assert _stats(work) == stats
    assert again["run_id"] == summary["run_id"] and again["predictions"] == summary["predictions"]


def test_demo_twin_without_transformers_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["demo", "--twin", "--output", str(tmp_path / "demo-twin"), "--no-progress"]) == 2
    assert "pip install -e '.[twin]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
