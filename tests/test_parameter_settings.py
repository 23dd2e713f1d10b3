"""mergekit's gradients and filters: evaluated per tensor (layer position, name), merged with them."""

from __future__ import annotations

import pytest
import torch
from conftest import start_embedded_ray
from helpers import merge_reference, read_output
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.coordinator import run_merge
from pipeline.samples import build_sample_models
from pipeline.settings import evaluate, layer_count, layer_position


@pytest.mark.parametrize("setting, tensor, t, expected", [
    (0.4, "x", 0.3, 0.4),
    ([0.0, 1.0], "x", 0.25, 0.25),
    ([0.0, 1.0, 0.0], "x", 0.75, 0.5),
    ([0.2, 0.4, 0.8], "x", 1.0, 0.8),
    ([True, False], "x", 0.4, True),
    ([True, False], "x", 1.0, False),
    ([{"filter": "mlp", "value": 0.3}, {"value": 0.9}], "model.layers.0.mlp.up_proj.weight", 0.0, 0.3),
    ([{"filter": "mlp", "value": 0.3}, {"value": 0.9}], "model.layers.0.self_attn.q_proj.weight", 0.0, 0.9),
    ([{"filter": "mlp", "value": [0.0, 1.0]}], "layers.1.mlp.w", 0.5, 0.5),
    ([{"filter": "mlp", "value": 0.3}], "attn", 0.0, None),  # nothing matches: the next scope decides
    ({"filter": "*", "value": 2.0}, "anything", 0.0, 2.0),
])
def test_evaluate(setting, tensor, t, expected):
    assert evaluate(setting, tensor, t) == pytest.approx(expected) if expected is not None else \
        evaluate(setting, tensor, t) is None


def test_layer_positions():
    assert layer_position("model.layers.3.mlp.up_proj.weight", 5) == 0.75
    assert layer_position("model.embed_tokens.weight", 5) == 0.0 and layer_position("h.0.attn.w", 1) == 1.0
    assert layer_count({"num_hidden_layers": 7}, []) == 7
    assert layer_count({}, ["transformer.h.0.w", "transformer.h.11.w"]) == 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    start_embedded_ray()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
              "intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 3,
              "vocab_size": 40, "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    base, experts = build_sample_models(tmp_path_factory.mktemp("settings") / "in", n_experts=2,
                                        dtype=torch.float32, config=config)
    tensors = lambda d: load_file(str(d / "model.safetensors"))  # noqa: E731
    return base, experts, tensors(base), [tensors(e) for e in experts]


def test_ties_with_a_density_gradient_and_a_weight_filter(llama, tmp_path):
    base_dir, expert_dirs, base, experts = llama
    config = {"merge_method": "ties", "base_model": str(base_dir), "dtype": "float32", "output": str(tmp_path / "out"),
              "models": [{"model": str(expert_dirs[0]), "parameters": {
                             "density": [0.2, 0.8], "weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}},
                         {"model": str(expert_dirs[1]), "parameters": {"density": 0.6, "weight": 0.7}}],
              "parameters": {"lambda": [1.0, 0.5]}, "shards": 3}
    manifest = run_merge(load_config(config), progress=False)
    assert manifest.config["models"][0]["parameters"]["density"] == [0.2, 0.8]
    merged = read_output(tmp_path / "out")
    for name, b in base.items():
        t = layer_position(name, 3)
        weights = [0.5 if "mlp" in name else 1.0, 0.7]
        densities = [0.2 + 0.6 * t, 0.6]
        expected = merge_reference("ties", b, [e[name] for e in experts], weights=weights, densities=densities,
                                   lam=1.0 - 0.5 * t, dtype=torch.float32)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    own = manifest.extra["tensor_options"]
    assert "model.embed_tokens.weight" not in own or own["model.embed_tokens.weight"]["lam"] == 1.0
    assert own["model.layers.2.mlp.up_proj.weight"]["weights"] == [0.5, 0.7]


def test_gradients_give_the_same_bytes_for_any_shard_count(llama, tmp_path):
    base_dir, expert_dirs, *_ = llama
    outs = []
    for shards in (1, 5):
        config = {"merge_method": "task_arithmetic", "base_model": str(base_dir), "shards": shards,
                  "output": str(tmp_path / f"out{shards}"), "parameters": {"lambda": [0.2, 1.0, 0.4]},
                  "models": [{"model": str(e), "parameters": {"weight": [{"filter": "attn", "value": 2.0}]}}
                             for e in expert_dirs]}
        run_merge(load_config(config), progress=False)
        outs.append({k: v.numpy().tobytes() for k, v in read_output(tmp_path / f"out{shards}").items()})
    assert outs[0] == outs[1]


def test_gradients_refused_where_they_cannot_apply(llama):
    base_dir, expert_dirs, *_ = llama
    from pipeline.planner import build_plan

    with pytest.raises(ConfigError, match="trim_scope: global takes one density"):
        build_plan(load_config({"merge_method": "ties", "base_model": str(base_dir), "output": "/tmp/x-unused",
                                "parameters": {"trim_scope": "global", "density": [0.2, 0.5]},
                                "models": [{"model": str(e)} for e in expert_dirs]}))
    with pytest.raises(ConfigError, match="not supported by merge_method twin"):
        load_config({"merge_method": "twin", "base_model": str(base_dir),
                     "models": [{"model": str(expert_dirs[0]), "parameters": {"weight": [1.0, 0.5]}}]})
