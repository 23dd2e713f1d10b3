"""`mergefleet report`: a TIES run (global trim) and a Twin run on small Llama-shaped checkpoints,
each reported from its manifest alone as one HTML page whose named plots are embedded images that
decode, and as JSON."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from conftest import start_embedded_ray
from matplotlib.image import imread

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.coordinator import run_merge
from pipeline.report import module_of
from pipeline.samples import build_sample_models

TASK_VECTOR_PLOTS = {"sign-conflict-rate", "kept-fraction", "norm-ratio", "expert-cosine", "shard-timeline",
                     "shard-memory"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    start_embedded_ray()
    root = tmp_path_factory.mktemp("report")
    base, experts = build_sample_models(root / "models", n_experts=3, seed=2)
    models = [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.4}} for e in experts]
    outputs = {"ties": root / "ties", "twin": root / "twin"}
    run_merge(load_config({"merge_method": "ties", "base_model": str(base), "models": models, "shards": 3,
                           "parameters": {"trim_scope": "global"}, "output": str(outputs["ties"])}), progress=False)
    run_merge(load_config({"merge_method": "twin", "base_model": str(base), "shards": 2,
                           "models": [{"model": str(e)} for e in experts], "parameters": {"rank": 4, "svd": "exact"},
                           "output": str(outputs["twin"])}), progress=False)
    return outputs


def _figures(page: str) -> dict[str, bytes]:
    """{figure id: PNG bytes} of the page's embedded images."""
    return {name: base64.b64decode(data) for name, data in
            re.findall(r'<figure id="([\w-]+)"><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)}


@pytest.mark.parametrize("run,expected", [
    ("ties", TASK_VECTOR_PLOTS | {"global-trim-thresholds"}),
    ("twin", TASK_VECTOR_PLOTS - {"sign-conflict-rate"} | {"twin-error", "twin-energy", "twin-storage"}),  # shared:
    # task arithmetic, which elects no sign
])
def test_report_embeds_the_named_plots_as_images_that_decode(runs, tmp_path, capsys, run, expected):
    page_path = tmp_path / f"{run}.html"
    assert main(["report", str(runs[run]), "--out", str(page_path)]) == 0
    page = page_path.read_text()
    figures = _figures(page)
    assert expected <= set(figures), sorted(figures)
    for name, png in figures.items():
        image = imread(io.BytesIO(png), format="png")
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, name
    assert "http://" not in page and "https://" not in page  # nothing fetched: the page stands alone
    assert page_path.name in capsys.readouterr().out


def test_report_json_summarises_the_diagnostics(runs, capsys):
    assert main(["report", str(runs["ties"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "ties" and len(summary["global_trim"]) == 3
    assert {g["module"] for g in summary["groups"]} >= {"q", "k", "v", "o", "mlp", "embeddings", "norms"}
    layered = [g for g in summary["groups"] if g["layer"] is not None]
    assert layered and all(0 <= g["kept_fraction"] <= 1 and 0 <= g["sign_conflict_rate"] <= 1 for g in layered)
    assert sum(g["elements"] for g in summary["groups"]) == summary["diagnostics"]["elements"]
    assert all(s["finished_at"] >= s["started_at"] > 0 for s in summary["shards"])

    assert main(["report", str(runs["twin"]), "--json"]) == 0
    twin = json.loads(capsys.readouterr().out)["twin"]
    factors = [t for t in twin["tensors"] if t["kind"] == "factors"]
    assert factors and all(t["rank"] == 4 and 0 <= t["energy"] <= 1 for t in factors)
    assert twin["factor_bytes"] == sum(t["stored_bytes"] for t in twin["tensors"])


def test_report_of_a_missing_output_cannot_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing"), "--json"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_module_of_parses_layer_and_module_kind():
    assert module_of("model.layers.3.self_attn.q_proj.weight") == (3, "q")
    assert module_of("model.layers.10.mlp.down_proj.weight") == (10, "mlp")
    assert module_of("model.layers.2.post_attention_layernorm.weight") == (2, "norms")
    assert module_of("transformer.h.1.attn.c_attn.weight") == (1, "qkv")
    assert module_of("lm_head.weight") == (None, "embeddings")
    assert module_of("model.norm.weight") == (None, "norms")


def test_report_reads_the_manifest_alone_through_fsspec(runs, capsys):
    """Only manifest.json and manifest.parquet, from any fsspec URL (here memory://, as s3:// would be)."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for name in ("manifest.json", "manifest.parquet"):
        memory.pipe(f"/report-run/{name}", (runs["ties"] / name).read_bytes())
    assert main(["report", "memory://report-run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == "memory://report-run" and summary["groups"]
