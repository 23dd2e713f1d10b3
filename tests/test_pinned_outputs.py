"""Output bytes pinned across refactors: sha256 of every weight file and index a run writes.

The digests were taken from the code before the method registry existed (one run path for every
method); a change of shape must not change a byte. Each digest covers every ``*.safetensors`` and
``*.index.json`` under the output (paths relative to it), in sorted order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import start_embedded_ray
from helpers import make_models

from pipeline.config import load_config
from pipeline.coordinator import run_merge
from pipeline.samples import build_sample_models

PINNED = {
    "linear": "1cb2289889665b48f514af08b9d6f1e94d25e4f125ddbc8a1e4739604b6acd7b",
    "task_arithmetic": "f2c6817595c1ea20605fb32d10cd4ee4695e908f0675add4a0c44d5087203be4",
    "ties_tensor": "4979554fbdb9d8b8c5f6fa7334a1e434bc4f26e22b311ff8617aa1f4b7876c12",
    "ties_count_majority": "39850406e043fd7f563cfedcdaf7530327cee8c57988562010c9e0297863e99c",
    "ties_global": "f61d056de11b12446a5e53d42185e763e64648f3c22019bf7ccbb65d29b793d6",
    "twin_task_arithmetic": "55891f9ca27fe423a949c3fb3f371d826528eab23d78833689d81e4b896cf93b",
    "twin_ties_global": "412d8868e1e3b7ff68902bd4aabff7cac20077c1c2a3570dff65937416e4935d",
}


def _digest(out: Path) -> str:
    files = sorted(p for p in out.rglob("*") if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".index.json")))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(out)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _configs(root: Path) -> dict[str, dict]:
    base, experts, _, _ = make_models(root / "tiny", n_experts=3, dtype=torch.bfloat16, seed=7)
    lbase, lexperts = build_sample_models(root / "llama", n_experts=2, dtype=torch.bfloat16, seed=3)
    models = [{"model": str(e), "parameters": {"weight": w, "density": d}}
              for e, w, d in zip(experts, (1.0, 0.5, 0.8), (0.5, 0.3, 0.9))]
    weighted = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in models]
    chunked = {"memory_budget": 3000, "process_reserve": 0, "shards": 3}
    twin_models = [{"model": str(e)} for e in lexperts]
    return {
        "linear": {"merge_method": "linear", "models": weighted, "shards": 2},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 0.7},
                            "models": weighted, "dtype": "float32", **chunked},
        "ties_tensor": {"merge_method": "ties", "base_model": str(base), "models": models, **chunked},
        "ties_count_majority": {"merge_method": "ties", "base_model": str(base), "models": models, "shards": 2,
                                "parameters": {"sign_method": "count", "zero_sign": "majority", "normalize": False}},
        "ties_global": {"merge_method": "ties", "base_model": str(base), "models": models,
                        "parameters": {"trim_scope": "global", "lambda": 1.2}, **chunked},
        "twin_task_arithmetic": {"merge_method": "twin", "base_model": str(lbase), "models": twin_models, "shards": 3,
                                 "parameters": {"rank": 4, "svd": "exact"}},
        "twin_ties_global": {"merge_method": "twin", "base_model": str(lbase), "models": twin_models, "shards": 2,
                             "parameters": {"shared": {"merge_method": "ties", "parameters": {
                                 "trim_scope": "global", "density": 0.4}}, "rank_ratio": 0.25, "svd": "randomized"}},
    }


@pytest.fixture(scope="module")
def digests(tmp_path_factory):
    start_embedded_ray()
    root = tmp_path_factory.mktemp("pinned")
    found = {}
    for label, config in _configs(root).items():
        out = root / "out" / label
        run_merge(load_config({**config, "output": str(out)}), progress=False)
        found[label] = _digest(out)
    return found


@pytest.mark.parametrize("label", sorted(PINNED))
def test_output_bytes_unchanged(digests, label):
    assert digests[label] == PINNED[label], f"{label}: output bytes changed ({digests[label]})"
