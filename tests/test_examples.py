"""Every config under examples/ runs on the demos' sample models (built here under tmp_path, with
the configs' out/demo-work/ and out/demo-twin-work/ pointed there) and its output verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from manifests.verify import verify_output
from pipeline.config import load_config
from pipeline.coordinator import run_merge
from pipeline.demo_twin import DEMO_TWIN_PARAMETERS, TASKS, ensure_twin_sample_models, tasks_jsonl
from pipeline.samples import ensure_sample_models

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
WORK_DIRS = ("out/demo-work/", "out/demo-twin-work/")  # where `mergefleet demo` and `demo --twin` put their inputs


@pytest.fixture(scope="module")
def work_root(tmp_path_factory) -> Path:
    """A root holding demo-work/models and demo-twin-work/models (the twin experts barely fine-tuned:
    only their layout matters here)."""
    root = tmp_path_factory.mktemp("examples")
    ensure_sample_models(root / "demo-work" / "models")
    ensure_twin_sample_models(root / "demo-twin-work" / "models", steps=1)
    return root


def _config_text(example: Path, root: Path) -> str:
    text = example.read_text()
    for work in WORK_DIRS:
        text = text.replace(work, f"{root}/{work.removeprefix('out/')}")
    assert "out/" not in yaml.safe_dump(yaml.safe_load(text)), f"{example.name} names an input the demos do not build"
    return text


def test_every_method_family_has_an_example():
    configs = [yaml.safe_load(e.read_text()) for e in EXAMPLES]
    methods = {c["merge_method"] for c in configs}
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp", "model_stock",
            "passthrough", "twin"} <= methods
    assert any(c.get("parameters", {}).get("trim_scope") == "global" for c in configs)
    assert any("random_seed" in c.get("parameters", {}) for c in configs if c["merge_method"] == "dare_ties")
    assert any("slices" in c for c in configs if c["merge_method"] == "passthrough")
    assert all("output" not in c for c in configs)  # the output is the command's: mergefleet run CONFIG OUT


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_and_verifies(example, work_root, tmp_path, ray_local):
    out = tmp_path / "out"
    manifest = run_merge(load_config(_config_text(example, work_root)), output_url=str(out), progress=False)
    assert verify_output(str(out)) == []
    if manifest.method["method"] == "twin":  # the demo's merge, whose router's tasks.jsonl labels these experts
        assert yaml.safe_load(example.read_text())["parameters"] == DEMO_TWIN_PARAMETERS
        assert [e["name"] for e in manifest.extra["twin"]["experts"]] == list(TASKS)
        assert {json.loads(line)["task"] for line in tasks_jsonl().splitlines()} == set(TASKS)
