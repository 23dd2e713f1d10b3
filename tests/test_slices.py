"""mergekit's slices: a passthrough frankenmerge stacks layer ranges, renumbered, and loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import start_embedded_ray
from helpers import read_output
from safetensors.torch import load_file

from manifests.verify import verify_output
from pipeline.config import ConfigError, load_config
from pipeline.coordinator import run_merge
from pipeline.samples import build_sample_models

transformers = pytest.importorskip("transformers")

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
          "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 40,
          "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    start_embedded_ray()
    root = tmp_path_factory.mktemp("slices")
    _, experts = build_sample_models(root / "in", n_experts=2, dtype=torch.float32, config=CONFIG)
    return experts


def test_passthrough_frankenmerge_stacks_and_renumbers_layers(llamas, tmp_path):
    a, b = llamas
    config = {"merge_method": "passthrough", "dtype": "float32", "output": str(tmp_path / "out"),
              "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]}
    run_merge(load_config(config), progress=False)
    out = tmp_path / "out"
    merged = read_output(out)
    src = {"a": load_file(str(a / "model.safetensors")), "b": load_file(str(b / "model.safetensors"))}
    layers = [("a", 0), ("a", 1), ("b", 1), ("b", 2)]
    for new, (model, old) in enumerate(layers):
        for name, tensor in src[model].items():
            if f"layers.{old}." in name:
                assert torch.equal(merged[name.replace(f"layers.{old}.", f"layers.{new}.")], tensor), name
    assert torch.equal(merged["model.embed_tokens.weight"], src["a"]["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], src["b"]["lm_head.weight"])
    assert torch.equal(merged["model.norm.weight"], src["b"]["model.norm.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert len(model.model.layers) == 4
    assert torch.equal(model.model.layers[2].mlp.up_proj.weight, src["b"]["model.layers.1.mlp.up_proj.weight"])
    assert verify_output(str(out)) == []


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "A", "layer_range": [0, 1]},
                                                             {"model": "B", "layer_range": [0, 2]}]}]},
     "span different numbers of layers"),
    ({"merge_method": "passthrough", "models": [{"model": "A"}],
      "slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}]}]}, "exactly one of models:, slices: or modules:"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "A", "layer_range": [2, 1]}]}]},
     "0 <= first <= end"),
])
def test_slice_refusals(config, message, tmp_path):
    from pipeline.planner import build_plan

    with pytest.raises(ConfigError, match=message):
        build_plan(load_config({**config, "output": str(tmp_path / "out")}))


def test_layer_range_beyond_the_model_is_refused(llamas, tmp_path):
    from pipeline.planner import build_plan

    config = {"merge_method": "passthrough", "output": str(tmp_path / "out"),
              "slices": [{"sources": [{"model": str(llamas[0]), "layer_range": [0, 5]}]}]}
    with pytest.raises(ConfigError, match="it has 3 layers"):
        build_plan(load_config(config))


def test_slerp_over_slices_as_mergekit_configs_write_it(llamas, tmp_path):
    """The usual mergekit slerp config: two models' full layer ranges in one slice, t a gradient over
    that slice's layers; equal to the same merge written with models:."""
    a, b = llamas
    parameters = {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]}
    sliced = {"merge_method": "slerp", "base_model": str(a), "dtype": "float32", "parameters": parameters,
              "output": str(tmp_path / "sliced"),
              "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}, {"model": str(b), "layer_range": [0, 3]}]}]}
    plain = {"merge_method": "slerp", "base_model": str(a), "dtype": "float32", "parameters": parameters,
             "output": str(tmp_path / "plain"), "models": [{"model": str(a)}, {"model": str(b)}]}
    run_merge(load_config(sliced), progress=False)
    run_merge(load_config(plain), progress=False)
    got, expected = read_output(tmp_path / "sliced"), read_output(tmp_path / "plain")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           load_file(str(b / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"])


def test_two_slices_merged_from_shifted_ranges(llamas, tmp_path):
    """Slices of several sources: layer first + j of each source merges into output layer offset + j."""
    a, b = llamas
    config = {"merge_method": "linear", "dtype": "float32", "output": str(tmp_path / "out"),
              "slices": [{"sources": [{"model": str(a), "layer_range": [0, 1]}, {"model": str(b), "layer_range": [1, 2]}]},
                         {"sources": [{"model": str(a), "layer_range": [2, 3]}, {"model": str(b), "layer_range": [2, 3]}]}]}
    run_merge(load_config(config), progress=False)
    merged = read_output(tmp_path / "out")
    src = {"a": load_file(str(a / "model.safetensors")), "b": load_file(str(b / "model.safetensors"))}
    name = "model.layers.{}.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name.format(0)], (src["a"][name.format(0)] + src["b"][name.format(1)]) / 2)
    torch.testing.assert_close(merged[name.format(1)], (src["a"][name.format(2)] + src["b"][name.format(2)]) / 2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2
