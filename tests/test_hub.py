"""Hugging Face Hub inputs from an offline cache (HF_HUB_OFFLINE=1, no network): hf://org/name@rev
and bare org/name resolve to the cached snapshot, the run works, the manifest pins the commit."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from helpers import make_models, merge_reference, read_output

from manifests.verify import verify_output
from pipeline.config import load_config
from pipeline.coordinator import run_merge
from pipeline.planner import build_plan
from workers import hub
from workers.tensor_io import CheckpointError, resolve_model


def cache_model(cache, repo_id: str, model_dir, *, ref: str = "main") -> str:
    """Lay ``model_dir``'s files out as huggingface_hub's cache does (refs/<ref> -> snapshots/<commit>/)."""
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return commit


@pytest.fixture
def hub_models(tmp_path, monkeypatch):
    """A base and 3 experts in an offline Hub cache under tmp_path: (refs, commits, base, experts)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, expert_dirs, base, experts = make_models(tmp_path / "src")
    commits = {"mf-test/base": cache_model(cache, "mf-test/base", base_dir)}
    for i, d in enumerate(expert_dirs):
        commits[f"mf-test/expert-{i}"] = cache_model(cache, f"mf-test/expert-{i}", d)
    return commits, base, experts


def test_references_parse():
    assert hub.parse_reference("hf://org/name") == ("org/name", None)
    assert hub.parse_reference("hf://org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_reference("org/name@main") == ("org/name", "main")
    assert hub.parse_reference("s3://bucket/model") is None
    assert hub.parse_reference("/models/base") is None
    assert hub.parse_reference("./org/name") is None
    with pytest.raises(CheckpointError, match="hf://ORG/NAME"):
        hub.parse_reference("hf://just-a-name")


def test_existing_local_path_wins_over_hub(tmp_path, monkeypatch):
    make_models(tmp_path / "org", n_experts=1)
    monkeypatch.chdir(tmp_path)
    assert hub.parse_reference("org/base") is None  # a local directory of that name
    assert resolve_model("org/base").revision is None


def test_hub_inputs_resolve_run_and_pin_the_commit(hub_models, tmp_path, ray_local):
    commits, base, experts = hub_models
    refs = ["mf-test/expert-0", "hf://mf-test/expert-1@main", f"hf://mf-test/expert-2@{commits['mf-test/expert-2']}"]
    out = tmp_path / "out"
    config = load_config({
        "merge_method": "ties", "base_model": "hf://mf-test/base", "output": str(out), "dtype": "float32",
        "models": [{"model": r, "parameters": {"weight": w, "density": d}}
                   for r, w, d in zip(refs, (1.0, 0.5, 2.0), (0.5, 0.3, 0.8))]})
    plan = build_plan(config)
    expected_urls = [f"hf://{repo}@{commit}" for repo, commit in commits.items()]
    assert [i.url for i in plan.inputs] == expected_urls
    assert [i.revision for i in plan.inputs] == list(commits.values())

    manifest = run_merge(config, progress=False)
    assert [i["url"] for i in manifest.inputs] == expected_urls  # the manifest pins every commit
    assert verify_output(str(out)) == []
    merged = read_output(out)
    for name, b in base.items():
        if b.is_floating_point():
            want = merge_reference("ties", b, [e[name] for e in experts], weights=[1.0, 0.5, 2.0],
                                   densities=[0.5, 0.3, 0.8], dtype=torch.float32)
            assert torch.equal(merged[name], want), name
    assert (out / "config.json").exists()  # side files come from the cached snapshot


def test_missing_hub_model_is_a_clear_error(hub_models):
    with pytest.raises(CheckpointError) as info:
        resolve_model("hf://mf-test/not-cached")
    assert "mf-test/not-cached" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(CheckpointError, match="mf-test/base@v9"):
        resolve_model("hf://mf-test/base@v9")
