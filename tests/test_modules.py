"""mergekit's modules: per-module recipes, lowered to slices module by module (pipeline/modules.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import start_embedded_ray
from helpers import read_output, run_pipeline
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.coordinator import run_merge
from pipeline.modules import LLAVA, QWEN_VL, architecture_of
from pipeline.planner import build_plan
from pipeline.samples import build_sample_models, write_model
from pipeline.settings import with_config_values
from workers.tensor_io import resolve_model

transformers = pytest.importorskip("transformers")

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
         "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 40,
         "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return build_sample_models(tmp_path_factory.mktemp("llamas"), n_experts=2, dtype=torch.float32, config=LLAMA)


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory):
    """A tiny Qwen2-VL saved by transformers (2 text layers, 3 vision blocks) and two experts of it."""
    root = tmp_path_factory.mktemp("qwen_vl")
    torch.manual_seed(0)
    text = {"hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 64, "max_position_embeddings": 32,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}}
    vision = {"depth": 3, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2,
              "temporal_patch_size": 1, "spatial_merge_size": 1, "in_channels": 3}
    model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(text_config=text, vision_config=vision))
    model.save_pretrained(root / "base")
    base = load_file(str(root / "base" / "model.safetensors"))
    config = json.loads((root / "base" / "config.json").read_text())
    g = torch.Generator().manual_seed(1)
    experts = [{n: t + torch.randn(t.shape, generator=g) * 0.1 for n, t in base.items()} for _ in range(2)]
    dirs = [write_model(root / f"e{i}", e, config) for i, e in enumerate(experts)]
    return dirs, experts, config


def _same_output(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def _shard_bytes(plan) -> list[bytes]:
    return [(Path(plan.output_url) / s.file_name).read_bytes() for s in plan.shards]


def test_default_module_models_equal_top_level_models(llamas, tmp_path):
    """A module's parameters sit between the models' and the top level's: a filter of the module's that
    matches nothing leaves the key to the top level, as one filter list written at the top level does."""
    base, (a, b) = llamas
    models = [{"model": str(a), "parameters": {"density": [0.2, 0.8]}}, {"model": str(b), "parameters": {"density": 0.6}}]
    common = {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "shards": 1}
    modular = {**common, "output": str(tmp_path / "modules"), "parameters": {"weight": 1.0, "lambda": [1.0, 0.5]},
               "modules": {"default": {"models": models, "parameters": {"weight": [{"filter": "mlp", "value": 0.5}]}}}}
    plain = {**common, "output": str(tmp_path / "plain"), "models": models,
             "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}], "lambda": [1.0, 0.5]}}
    got, modular_plan = run_pipeline(modular)
    expected, plain_plan = run_pipeline(plain)
    _same_output(got, expected)
    assert _shard_bytes(modular_plan) == _shard_bytes(plain_plan)
    assert with_config_values(LLAMA, modular_plan.config_updates) == LLAMA
    weights = {t.name: (t.options or modular_plan.method).weights for t in modular_plan.tensors}
    assert weights["model.layers.1.mlp.up_proj.weight"] == (0.5, 0.5)  # the module's filter
    assert weights["model.layers.1.self_attn.q_proj.weight"] == (1.0, 1.0)  # the top level's, where it matches nothing


def test_default_module_slices_equal_top_level_slices(llamas, tmp_path):
    _, (a, b) = llamas
    slices = [{"sources": [{"model": str(a), "layer_range": [0, 2]}]}, {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]
    common = {"merge_method": "passthrough", "dtype": "float32", "shards": 1}
    got, modular_plan = run_pipeline({**common, "output": str(tmp_path / "m"), "modules": {"default": {"slices": slices}}})
    expected, plain_plan = run_pipeline({**common, "output": str(tmp_path / "s"), "slices": slices})
    _same_output(got, expected)
    assert _shard_bytes(modular_plan) == _shard_bytes(plain_plan)
    assert modular_plan.config_updates == plain_plan.config_updates == {"num_hidden_layers": 4}


def _linear(tensors, weights):
    return sum(t * w for t, w in zip(tensors, weights)) / sum(weights)


def test_qwen2_vl_modules_merge_by_their_own_recipes(qwen_vl, tmp_path):
    """Text decoder by models:, vision tower by slices (four blocks from three), projector by models:, each
    with its own weights; the vision blocks alone are renumbered and vision_config.depth alone is updated."""
    start_embedded_ray()
    (a, b), (ea, eb), _ = qwen_vl
    config = {"merge_method": "linear", "dtype": "float32", "output": str(tmp_path / "out"),
              "parameters": {"weight": 1.0},
              "modules": {
                  "text_decoder": {"models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 3.0}}]},
                  "vision_tower": {"parameters": {"weight": [{"filter": "attn", "value": 3.0}]}, "slices": [
                      {"sources": [{"model": str(a), "layer_range": [0, 3], "parameters": {"weight": 1.0}},
                                   {"model": str(b), "layer_range": [0, 3]}]},
                      {"sources": [{"model": str(a), "layer_range": [2, 3], "parameters": {"weight": 1.0}},
                                   {"model": str(b), "layer_range": [0, 1]}]}]},
                  "multi_modal_projector": {"parameters": {"weight": 2.0},
                                            "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b)}]},
              }}
    run_merge(load_config(config), progress=False)
    out = tmp_path / "out"
    merged = read_output(out)
    blocks = [(0, 0), (1, 1), (2, 2), (2, 0)]  # output block j: (block of a, block of b)
    expected = {}
    for name, t in ea.items():
        if name.startswith("visual.merger."):
            expected[name] = _linear([t, eb[name]], [1.0, 2.0])
        elif name.startswith("visual.blocks."):
            if name.startswith("visual.blocks.0."):
                for j, (ia, ib) in enumerate(blocks):
                    rest = name.removeprefix("visual.blocks.0.")
                    expected[f"visual.blocks.{j}.{rest}"] = _linear(
                        [ea[f"visual.blocks.{ia}.{rest}"], eb[f"visual.blocks.{ib}.{rest}"]], [1.0, 3.0 if "attn" in rest else 1.0])
        elif name.startswith("visual."):
            expected[name] = _linear([t, eb[name]], [1.0, 1.0])
        else:
            expected[name] = _linear([t, eb[name]], [1.0, 3.0])
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    written = json.loads((out / "config.json").read_text())
    assert written["vision_config"]["depth"] == 4 and written["text_config"]["num_hidden_layers"] == 2
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(model.model.visual.blocks) == 4
    assert torch.equal(model.model.visual.blocks[3].attn.qkv.weight, merged["visual.blocks.3.attn.qkv.weight"])


def test_top_level_gradients_run_over_each_modules_layers(qwen_vl, tmp_path):
    """Top-level models: merge every module (as mergekit lowers them); a gradient's t counts the layers
    of the tensor's own module: text layer 1 of 2 has t = 1, vision block 1 of 3 has t = 0.5."""
    (a, b), _, _ = qwen_vl
    plan = build_plan(load_config({"merge_method": "linear", "output": str(tmp_path / "out"), "models": [
        {"model": str(a)}, {"model": str(b), "parameters": {"weight": [1.0, 3.0]}}]}))
    weights = {t.name: (t.options or plan.method).weights for t in plan.tensors}
    assert weights["model.layers.1.mlp.up_proj.weight"] == (1.0, 3.0)
    assert weights["visual.blocks.1.mlp.fc1.weight"] == (1.0, 2.0)
    assert weights["visual.blocks.2.mlp.fc1.weight"] == (1.0, 3.0)
    assert weights["visual.merger.mlp.0.weight"] == weights["model.embed_tokens.weight"] == (1.0, 1.0)


def test_text_slices_renumber_only_the_text_layers(qwen_vl, tmp_path):
    """A module's slices renumber its own layers; a module not listed is left out of the output, as in mergekit."""
    (a, b), (ea, _), config = qwen_vl
    plan = build_plan(load_config({
        "merge_method": "passthrough", "output": str(tmp_path / "out"),
        "modules": {"text_decoder": {"slices": [{"sources": [{"model": str(a), "layer_range": [1, 2]}]}]},
                    "multi_modal_projector": {"models": [{"model": str(b)}]}}}))
    names = {t.name: t.inputs[0] for t in plan.tensors}
    assert "model.layers.0.mlp.up_proj.weight" in names and not any(n.startswith("model.layers.1.") for n in names)
    assert names["model.layers.0.mlp.up_proj.weight"] == resolve_model(str(a)).tensors["model.layers.1.mlp.up_proj.weight"]
    assert not any(n.startswith(("visual.blocks.", "visual.patch_embed.")) for n in names)
    assert set(plan.ignored_tensors) == {n for n in ea if n.startswith("visual.") and not n.startswith("visual.merger.")}
    assert plan.config_updates == {"text_config.num_hidden_layers": 1}
    assert with_config_values(config, plan.config_updates)["text_config"] == {**config["text_config"], "num_hidden_layers": 1}


def test_mistral3_llava_layout(tmp_path):
    """A tiny Mistral3 as transformers saves it (language_model.model.layers.N, vision_tower.transformer.layers.N,
    multi_modal_projector.*): three text layers sliced from two, the nested text count updated; it loads."""
    start_embedded_ray()
    text = {"model_type": "mistral", "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 8, "num_hidden_layers": 2, "vocab_size": 64,
            "max_position_embeddings": 32}
    vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 2, "head_dim": 8, "image_size": 8, "patch_size": 2}
    torch.manual_seed(0)
    transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=text, vision_config=vision, spatial_merge_size=1, vision_feature_layer=-1)).save_pretrained(tmp_path / "a")
    a = str(tmp_path / "a")
    source = load_file(f"{a}/model.safetensors")
    config = {"merge_method": "passthrough", "dtype": "float32", "output": str(tmp_path / "out"), "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": a, "layer_range": [1, 2]}]},
                                    {"sources": [{"model": a, "layer_range": [0, 2]}]}]},
        "vision_tower": {"models": [{"model": a}]}, "multi_modal_projector": {"models": [{"model": a}]}}}
    run_merge(load_config(config), progress=False)
    merged = read_output(tmp_path / "out")
    layer = "language_model.model.layers.{}.mlp.up_proj.weight"
    assert [torch.equal(merged[layer.format(j)], source[layer.format(i)]) for j, i in enumerate([1, 0, 1])] == [True] * 3
    assert merged.keys() == source.keys() | {n.replace("layers.1.", "layers.2.") for n in source
                                             if n.startswith("language_model.model.layers.1.")}
    assert all(torch.equal(merged[n], t) for n, t in source.items() if not n.startswith("language_model.model.layers."))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["text_config"]["num_hidden_layers"] == 3 and written["vision_config"]["num_hidden_layers"] == 2
    model, info = transformers.Mistral3ForConditionalGeneration.from_pretrained(str(tmp_path / "out"),
                                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and len(model.model.language_model.layers) == 3


@pytest.mark.parametrize("name, module", [
    ("model.layers.3.mlp.up_proj.weight", "text_decoder"), ("lm_head.weight", "text_decoder"),
    ("model.language_model.norm.weight", "text_decoder"), ("visual.blocks.0.attn.qkv.weight", "vision_tower"),
    ("model.visual.patch_embed.proj.weight", "vision_tower"), ("visual.merger.mlp.0.weight", "multi_modal_projector"),
])
def test_qwen_vl_module_map(name, module):
    assert [m.name for m in QWEN_VL if m.owns(name)] == [module]


@pytest.mark.parametrize("name, module", [
    ("language_model.model.layers.0.self_attn.q_proj.weight", "text_decoder"), ("language_model.lm_head.weight", "text_decoder"),
    ("vision_tower.transformer.layers.1.attention.q_proj.weight", "vision_tower"),  # mistral3 (pixtral)
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "vision_tower"),  # gemma3 as mergekit names it
    ("vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower"),  # gemma3 as transformers 5 saves it
    ("multi_modal_projector.mm_input_projection_weight", "multi_modal_projector"),
])
def test_llava_module_map(name, module):
    assert [m.name for m in LLAVA if m.owns(name)] == [module]


def test_architectures():
    assert architecture_of({"model_type": "mistral3"})[1] is LLAVA
    assert architecture_of({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}) == ("qwen2_5_vl", QWEN_VL)
    assert [m.name for m in architecture_of({"model_type": "llama", "rope_scaling": {"type": "x"}})[1]] == ["default"]
    assert architecture_of({"model_type": "t5", "is_encoder_decoder": True}) == ("t5", None)


def _plan_error(config: dict, tmp_path) -> str:
    with pytest.raises(ConfigError) as info:
        build_plan(load_config({**config, "output": str(tmp_path / "out")}))
    return str(info.value)


def test_module_the_architecture_lacks(llamas, qwen_vl, tmp_path):
    base, _ = llamas
    (a, _), _, _ = qwen_vl
    message = _plan_error({"merge_method": "linear", "modules": {"vision_tower": {"models": [{"model": str(base)}]}}},
                          tmp_path)
    assert "modules.vision_tower: llama has no module 'vision_tower'; its modules are default" in message
    message = _plan_error({"merge_method": "linear", "modules": {"default": {"models": [{"model": str(a)}]}}}, tmp_path)
    assert "qwen2_vl has no module 'default'; its modules are text_decoder, vision_tower, multi_modal_projector" in message


def test_unmapped_multi_module_model_and_top_level_slices(qwen_vl, tmp_path):
    (a, _), experts, config = qwen_vl
    llava = write_model(tmp_path / "llava", experts[0], {**config, "model_type": "llava", "architectures": []})
    message = _plan_error({"merge_method": "linear", "modules": {"text_decoder": {"models": [{"model": str(llava)}]}}},
                          tmp_path)
    assert "modules (text_decoder): the model (llava) is made of several parts (text_config, vision_config)" in message
    assert "gemma3, mistral3, qwen2_5_vl, qwen2_vl" in message
    message = _plan_error({"merge_method": "passthrough",
                           "slices": [{"sources": [{"model": str(a), "layer_range": [0, 1]}]}]}, tmp_path)
    assert "slices: qwen2_vl is made of the modules text_decoder, vision_tower, multi_modal_projector" in message
    assert "modules: {text_decoder: {slices: [...]}" in message


@pytest.mark.parametrize("extra, message", [
    ({"models": [{"model": "a"}], "modules": {"default": {"models": [{"model": "a"}]}}},
     "give exactly one of models:, slices: or modules: (as mergekit); this config gives models and modules"),
    ({"modules": {}}, "modules: is empty; list at least one module"),
    ({"modules": {"default": {"models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}}},
     "modules.default: give the module models: or slices: (one of them, not empty)"),
    ({"modules": {"default": {"modles": []}}}, "unknown key 'modules.default.modles'"),
    ({"modules": {"default": {"models": [{"model": "a"}], "parameters": {"rank": 4}}}},
     "modules.default: parameters.rank is an option of twin, not of ties"),
    ({"modules": {"default": {"models": [{"model": "a", "parameters": {"densty": 0.5}}]}}},
     "modules.default: unknown key 'models.0.parameters.densty'"),
    ({"modules": {"default": {"models": [{"model": "a"}], "parameters": {"density": [{"filter": "mlp", "value": []}]}}}},
     "modules.default: parameters.density: an empty list"),
])
def test_config_refusals(extra, message):
    with pytest.raises(ConfigError) as info:
        load_config({"merge_method": "ties", "base_model": "b", **extra})
    assert message in str(info.value)
