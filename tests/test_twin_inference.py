"""twin/inference.py and workers/kernels/peft_export.py on a tiny random BertModel.

Batched per-sample Twin inference is checked against dense per-sample reconstruction in float64;
the exported LoRA adapter is loaded by peft and checked against Twin's fixed-weights mode.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from twin.inference import TwinModel  # noqa: E402
from twin.router import Router, mean_pool  # noqa: E402
from workers.kernels.peft_export import embedding_module_paths, export_lora_adapter, lora_coverage  # noqa: E402
from workers.kernels.twin import factorize  # noqa: E402

EXPERTS = ["sst2", "qnli", "mnli"]
FACTORED = {  # tensor name -> rank per expert (0: that expert has no factors for it)
    "embeddings.word_embeddings.weight": (2, 0, 3),
    "encoder.layer.0.attention.self.query.weight": (2, 3, 4),
    "encoder.layer.0.attention.self.value.weight": (1, 0, 2),
    "encoder.layer.0.intermediate.dense.weight": (3, 2, 1),
    "encoder.layer.1.output.dense.weight": (2, 2, 2),
    "pooler.dense.weight": (4, 1, 2),
}
DENSE = [
    "encoder.layer.0.attention.self.query.bias",
    "encoder.layer.0.intermediate.dense.bias",
    "encoder.layer.0.attention.output.LayerNorm.weight",
    "encoder.layer.0.attention.output.LayerNorm.bias",
    "encoder.layer.1.output.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
]


def tiny_bert(dtype=torch.float64, seed=0):
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config).to(dtype).eval()


def random_deltas(model, *, dtype, factored=FACTORED, dense=DENSE, scale=0.05, seed=1):
    """{expert: {name: (B, A)}}, {expert: {name: 1-D delta}} of the shapes of ``model``'s parameters."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    factors = {e: {} for e in EXPERTS}
    dense_deltas = {e: {} for e in EXPERTS}
    for name, ranks in factored.items():
        m, n = params[name].shape
        for expert, r in zip(EXPERTS, ranks):
            if r:
                factors[expert][name] = (
                    (scale * torch.randn(m, r, generator=g, dtype=torch.float64)).to(dtype),
                    torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype),
                )
    for name in dense:
        for expert in EXPERTS:
            dense_deltas[expert][name] = (scale * torch.randn(params[name].shape, generator=g, dtype=torch.float64)).to(dtype)
    return factors, dense_deltas


def batch_inputs(batch=4, seq=7, seed=2):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 50, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    attention_mask[1, 5:] = 0  # some padding
    attention_mask[3, 3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def dense_model(base, factors, dense_deltas, weights):
    """θ* + Σ_t w_t v_t with every matrix rebuilt densely (the reference)."""
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for expert, w in zip(EXPERTS, weights):
            for name, (B, A) in factors.get(expert, {}).items():
                params[name] += float(w) * (B @ A)
            for name, delta in dense_deltas.get(expert, {}).items():
                params[name] += float(w) * delta
    return model


def test_batched_dynamic_inference_equals_per_sample_dense_reconstruction():
    base = tiny_bert()
    factors, dense_deltas = random_deltas(base, dtype=torch.float64)
    inputs = batch_inputs()
    weights = torch.tensor(
        [[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [0.7, -0.4, 0.9]], dtype=torch.float64
    )  # a different mix per sample (negative weights too)
    twin = TwinModel(copy.deepcopy(base), factors, dense_deltas)
    twin.set_weights(weights)
    with torch.no_grad():
        out = twin(**inputs)
        shared = base(**inputs)
    for i in range(len(weights)):
        reference = dense_model(base, factors, dense_deltas, weights[i])
        sample = {key: value[i : i + 1] for key, value in inputs.items()}
        with torch.no_grad():
            expected = reference(**sample)
        torch.testing.assert_close(out.last_hidden_state[i : i + 1], expected.last_hidden_state, rtol=0, atol=1e-10)
        torch.testing.assert_close(out.pooler_output[i : i + 1], expected.pooler_output, rtol=0, atol=1e-10)
        # the deltas matter: the output is not the shared model's
        assert (out.last_hidden_state[i] - shared.last_hidden_state[i]).abs().max() > 1e-3
    assert "embeddings.word_embeddings" in twin.wrapped and "encoder.layer.0.attention.output.LayerNorm" in twin.wrapped


def test_shared_forward_and_zero_weights_are_the_shared_model():
    base = tiny_bert()
    factors, dense_deltas = random_deltas(base, dtype=torch.float64)
    inputs = batch_inputs()
    twin = TwinModel(copy.deepcopy(base), factors, dense_deltas)
    with torch.no_grad():
        expected = base(**inputs).last_hidden_state
        assert torch.equal(twin.shared_forward(**inputs).last_hidden_state, expected)
        twin.set_weights([0.0, 0.0, 0.0])
        torch.testing.assert_close(twin(**inputs).last_hidden_state, expected, rtol=0, atol=1e-12)


def test_router_and_hard_modes_use_the_shared_models_features():
    base = tiny_bert()
    factors, dense_deltas = random_deltas(base, dtype=torch.float64)
    inputs = batch_inputs()
    torch.manual_seed(3)
    router = Router(32, EXPERTS).eval()
    twin = TwinModel(copy.deepcopy(base), factors, dense_deltas, router=router)
    with torch.no_grad():
        features = mean_pool(base(**inputs).last_hidden_state, inputs["attention_mask"])
        logits = router(features.float())
        soft = torch.softmax(logits, dim=-1)
        routed = twin(**inputs).last_hidden_state
        torch.testing.assert_close(twin.expert_weights(**inputs), soft)
        twin.set_mode("hard")
        hard = twin(**inputs).last_hidden_state
        twin.set_weights(soft.double())
        torch.testing.assert_close(routed, twin(**inputs).last_hidden_state, rtol=0, atol=1e-10)
        twin.set_weights(torch.nn.functional.one_hot(logits.argmax(-1), 3).double())
        torch.testing.assert_close(hard, twin(**inputs).last_hidden_state, rtol=0, atol=1e-10)


def test_sequential_of_linears():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    factors = {
        "a": {"0.weight": (torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64))},
        "b": {"2.weight": (torch.randn(3, 1, generator=g, dtype=torch.float64), torch.randn(1, 5, generator=g, dtype=torch.float64))},
    }
    dense = {"b": {"0.bias": torch.randn(5, generator=g, dtype=torch.float64)}}
    twin = TwinModel(copy.deepcopy(base), factors, dense)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [0.3, 0.6], [0.0, 2.0]], dtype=torch.float64)
    twin.set_weights(w)
    with torch.no_grad():
        out = twin(x)
    for i in range(3):
        W0 = base[0].weight + w[i, 0] * (factors["a"]["0.weight"][0] @ factors["a"]["0.weight"][1])
        b0 = base[0].bias + w[i, 1] * dense["b"]["0.bias"]
        W2 = base[2].weight + w[i, 1] * (factors["b"]["2.weight"][0] @ factors["b"]["2.weight"][1])
        expected = torch.tanh(x[i] @ W0.T + b0) @ W2.T + base[2].bias
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-12)


def test_unsupported_deltas_raise():
    base = tiny_bert()
    B, A = torch.zeros(32, 1, dtype=torch.float64), torch.zeros(1, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="lacks"):
        TwinModel(copy.deepcopy(base), {"x": {"bert.pooler.dense.weight": (B, A)}})
    with pytest.raises(ValueError, match="cannot apply"):
        TwinModel(copy.deepcopy(base), {"x": {"encoder.layer.0.attention.output.LayerNorm.weight": (B, A)}})
    with pytest.raises(ValueError, match="do not multiply"):
        TwinModel(copy.deepcopy(base), {"x": {"encoder.layer.0.intermediate.dense.weight": (B, A)}})
    twin = TwinModel(copy.deepcopy(base), {"x": {"pooler.dense.weight": (B, A)}})
    with pytest.raises(ValueError, match="set_weights"):
        twin(**batch_inputs())
    with pytest.raises(ValueError, match="needs a router"):
        twin.set_mode("router")
    with pytest.raises(ValueError, match="shape"):
        twin.set_weights([1.0, 0.0])


# --- PEFT export -------------------------------------------------------------------------------

LINEAR_ONLY = {name: ranks for name, ranks in FACTORED.items() if "embeddings" not in name}


def save_adapter(directory, state, config):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config))


def covered_deltas(dense_deltas, coverage):
    return {name: delta for name, delta in dense_deltas.items() if coverage[name] != "omitted"}


@pytest.mark.parametrize("factored", [LINEAR_ONLY, FACTORED], ids=["linear-only", "with-embedding"])
def test_peft_adapter_equals_twin_fixed_mode(tmp_path, factored):
    peft = pytest.importorskip("peft")
    base = tiny_bert(torch.float32)
    names = list(base.state_dict())
    factors, dense_deltas = random_deltas(base, dtype=torch.float32, factored=factored, scale=0.2)
    inputs = batch_inputs()
    embeddings = embedding_module_paths(base)
    for index, expert in enumerate(EXPERTS):
        coverage = lora_coverage(names, factors[expert], dense_deltas[expert], embedding_modules=embeddings)
        state, config = export_lora_adapter(
            names, factors[expert], dense_deltas[expert], base_model_name_or_path="tiny-bert", embedding_modules=embeddings
        )
        # peft refuses lora_bias on an embedding: an adapter with one leaves the bias deltas out
        expect_bias = "embeddings.word_embeddings.weight" not in factors[expert]
        assert config["lora_bias"] is expect_bias and config["lora_alpha"] == config["r"]
        carried_bias = {n for n, how in coverage.items() if how == "lora_bias"}
        assert carried_bias == ({n for n in DENSE if n.endswith(".bias") and n.removesuffix(".bias") + ".weight" in factors[expert]} if expect_bias else set())
        assert all(coverage[n] == "omitted" for n in DENSE if "LayerNorm" in n)
        directory = tmp_path / expert
        save_adapter(directory, state, config)

        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
        lora_layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert len(lora_layers) == len(factors[expert])
        assert all(layer.scaling["default"] == 1.0 for layer in lora_layers)

        kept = {e: covered_deltas(dense_deltas[e], coverage) if e == expert else {} for e in EXPERTS}
        twin = TwinModel(copy.deepcopy(base), factors, kept)
        twin.set_weights(torch.nn.functional.one_hot(torch.tensor(index), len(EXPERTS)).float())
        with torch.no_grad():
            expected = twin(**inputs).last_hidden_state
            got = peft_model(**inputs).last_hidden_state
            assert (expected - base(**inputs).last_hidden_state).abs().max() > 1e-2
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_peft_export_config_and_keys():
    base = tiny_bert(torch.float32)
    names = list(base.state_dict())
    factors, dense_deltas = random_deltas(base, dtype=torch.float32)
    state, config = export_lora_adapter(
        names, factors["sst2"], dense_deltas["sst2"], base_model_name_or_path="org/model",
        embedding_modules=["embeddings.word_embeddings"],
    )
    prefix = "base_model.model."
    assert state[prefix + "encoder.layer.0.attention.self.query.lora_A.weight"].shape == (2, 32)
    assert state[prefix + "encoder.layer.0.attention.self.query.lora_B.weight"].shape == (32, 2)
    assert state[prefix + "embeddings.word_embeddings.lora_embedding_A"].shape == (2, 50)
    assert state[prefix + "embeddings.word_embeddings.lora_embedding_B"].shape == (32, 2)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert config["lora_dropout"] == 0.0 and config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == "org/model" and config["init_lora_weights"] is True
    # "dense" would also select attention.output.dense, which has no factors: full paths then
    assert "encoder.layer.0.attention.self.query" in config["target_modules"]
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert config["rank_pattern"]["encoder.layer.0.attention.self.query"] == 2
    assert "pooler.dense" not in config["rank_pattern"]  # rank 4 = r
    json.dumps(config)

    # factors on every query/key/value: the suffixes are enough
    qkv = {f"encoder.layer.{i}.attention.self.{p}.weight": (torch.zeros(32, 2), torch.zeros(2, 32))
           for i in range(2) for p in ("query", "key", "value")}
    _, config = export_lora_adapter(names, qkv)
    assert config["target_modules"] == ["key", "query", "value"] and config["rank_pattern"] == {}

    with pytest.raises(ValueError, match="not a tensor of the shared model"):
        export_lora_adapter(names, {"bert.pooler.dense.weight": (torch.zeros(32, 1), torch.zeros(1, 32))})
    with pytest.raises(ValueError, match="r >= 1"):
        export_lora_adapter(names, {"pooler.dense.weight": (torch.zeros(32, 0), torch.zeros(0, 32))})


def test_peft_export_takes_factors_from_factorize():
    base = tiny_bert(torch.float32)
    v = 0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    f = factorize(v, rank=3)
    state, config = export_lora_adapter(list(base.state_dict()), {"pooler.dense.weight": f})
    assert torch.equal(state["base_model.model.pooler.dense.lora_B.weight"], f.B)
    assert config["target_modules"] == ["pooler.dense"] or config["target_modules"] == ["dense"]


def test_batch_one_activation_broadcasts_over_per_sample_weights():
    """An activation shared by the batch (batch dim 1, like BERT's position embeddings) gets each
    sample's own mix: the output has the weights' batch size."""
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 8)
    factors = {e: {"0.weight": (torch.randn(10, 2), torch.randn(2, 8))} for e in ("e0", "e1")}
    twin = TwinModel(nn.Sequential(embedding), factors)
    twin.set_mode("fixed")
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    twin.set_weights(weights)
    ids = torch.tensor([[1, 2, 3]])
    out = twin(ids)
    assert out.shape == (3, 3, 8)
    for i in range(3):
        dense = embedding.weight + sum(weights[i, t] * (B @ A) for t, (B, A) in
                                       enumerate(f["0.weight"] for f in factors.values()))
        torch.testing.assert_close(out[i], dense[ids[0]], rtol=1e-5, atol=1e-5)
