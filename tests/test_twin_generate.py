"""Twin-Merging for causal LMs: ``TwinModel.generate`` against transformers' ``generate`` on the
experts themselves.

Tiny generated Llama (RMSNorm, untied lm_head), Qwen2 (q/k/v biases) and GPT-2 (Conv1D, LayerNorm,
tied embeddings) experts, merged by ``merge_method: twin`` at full rank (every v_t stored exactly):
with one-hot ``fixed`` weights on expert t, greedy generation gives expert t's tokens; a batch mixing
experts gives each prompt its own tokens; the router runs once per prompt while decoding with a KV
cache; experts that differ only in their norm weights generate differently, and each as itself.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import start_embedded_ray

from pipeline.config import load_config
from pipeline.coordinator import run_merge
from twin.inference import TwinModel
from twin.load import load_expert_deltas, load_shared_model, load_twin, local_shared_dir, read_twin_manifest
from twin.router import Router

transformers = pytest.importorskip("transformers")

VOCAB, PAD = 64, 0
FULL_RANK = {"rank_ratio": 1.0, "svd": "exact"}
PROMPTS = [[5, 9, 3, 17, 2, 44], [7, 7, 1], [30, 12, 8, 8, 50, 2, 11, 9], [3, 60]]


def _config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        initializer_range=0.3, pad_token_id=PAD)
    if kind == "qwen2":
        return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        initializer_range=0.3, pad_token_id=PAD)
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   initializer_range=0.3, pad_token_id=PAD)


def _causal_lm(config):
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def _perturbed(model, seed: int, *, only: str | None = None):
    """A copy with every parameter (or those whose name contains ``only``) moved by random noise."""
    expert = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in expert.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=generator) * (0.5 if only else 0.1))
    return expert


def _save(model, directory: Path) -> Path:
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(directory)
    return directory


def _twin_run(root: Path, kind: str, *, only: str | None = None, n_experts: int = 3):
    """(twin output, expert models) of a full-rank twin merge of ``n_experts`` perturbed experts."""
    torch.manual_seed({"llama": 0, "qwen2": 1, "gpt2": 2}[kind])
    base = _causal_lm(_config(kind))
    experts = [_perturbed(base, 10 + i, only=only) for i in range(n_experts)]
    base_dir = _save(base, root / "base")
    expert_dirs = [_save(e, root / f"expert{i}") for i, e in enumerate(experts)]
    out = root / "twin"
    run_merge(load_config({"merge_method": "twin", "base_model": str(base_dir), "output": str(out),
                           "models": [{"model": str(d)} for d in expert_dirs], "parameters": FULL_RANK}),
              progress=False)
    return out, experts


def _left_padded(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def _generate(model, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, **{"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD, **kwargs})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    start_embedded_ray()
    root = tmp_path_factory.mktemp("twin-generate")
    return {kind: _twin_run(root / kind, kind) for kind in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_one_hot_generation_equals_the_expert(runs, kind):
    out, experts = runs[kind]
    twin = load_twin(str(out))
    inputs = _left_padded(PROMPTS)
    shared = _generate(twin.model, inputs)
    for t, expert in enumerate(experts):
        twin.set_weights(torch.nn.functional.one_hot(torch.tensor(t), len(experts)).float())
        got = twin.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        expected = _generate(expert, inputs)
        assert torch.equal(got, expected), f"{kind} expert {t}"
        assert not torch.equal(got, shared)  # the expert's deltas matter
        assert twin.last_weights.shape == (len(PROMPTS), len(experts))


def test_beam_search_and_sampling_follow_the_expert(runs):
    out, experts = runs["llama"]
    twin = load_twin(str(out))
    twin.set_weights([0.0, 1.0, 0.0])
    inputs = _left_padded(PROMPTS[:2])
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(twin.generate(**inputs, **beams), _generate(experts[1], inputs, **beams))
    torch.manual_seed(5)
    sampled = twin.generate(**inputs, max_new_tokens=6, do_sample=True, pad_token_id=PAD, num_return_sequences=2)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = experts[1].generate(**inputs, max_new_tokens=6, do_sample=True, pad_token_id=PAD, num_return_sequences=2)
    assert torch.equal(sampled, expected)


def test_a_mixed_batch_generates_each_prompt_as_alone(runs):
    out, experts = runs["qwen2"]
    twin = load_twin(str(out))
    routes = [0, 2, 1, 2]
    twin.set_weights(torch.nn.functional.one_hot(torch.tensor(routes), len(experts)).float())
    batch = twin.generate(**_left_padded(PROMPTS), max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    new = batch[:, -8:]
    for i, (prompt, t) in enumerate(zip(PROMPTS, routes)):
        twin.set_weights(torch.nn.functional.one_hot(torch.tensor(t), len(experts)).float())
        alone = twin.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        assert torch.equal(new[i], alone[0, -8:]), f"prompt {i}"
        assert torch.equal(alone, _generate(experts[t], {"input_ids": torch.tensor([prompt])}))


def _counting_router(d: int, tasks: list[str]) -> tuple[Router, list[int]]:
    router = Router(d, tasks).eval()
    calls: list[int] = []
    forward = router.forward

    def counted(features):
        calls.append(features.shape[0])
        return forward(features)

    router.forward = counted
    return router, calls


@pytest.mark.parametrize("mode", ["router", "hard", "top_k"])
def test_router_runs_once_per_prompt_with_a_kv_cache(runs, mode):
    out, experts = runs["llama"]
    manifest = read_twin_manifest(str(out))
    factors, dense = load_expert_deltas(str(out), manifest)
    tasks = [e["name"] for e in manifest.extra["twin"]["experts"]]
    with local_shared_dir(str(out), manifest) as directory:
        model = load_shared_model(directory)
    router, calls = _counting_router(model.config.hidden_size, tasks)
    torch.manual_seed(0)
    for module in router.modules():  # a router that prefers different experts for different prompts
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    twin = TwinModel(model, factors, dense, router=router)
    twin.set_mode(mode, top_k=2)
    forwards = []
    model.base_model.register_forward_hook(lambda *_: forwards.append(1))  # the backbone: routing runs it alone
    inputs = _left_padded(PROMPTS)
    got = twin.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert calls == [len(PROMPTS)]  # one routing for the batch, none per decoding step
    assert len(forwards) == 1 + 8  # the routing forward, then one forward per new token (the cache)
    weights = twin.last_weights
    assert torch.allclose(weights.sum(-1), torch.ones(len(PROMPTS)))
    if mode != "router":
        assert ((weights > 0).sum(-1) <= (1 if mode == "hard" else 2)).all() and (weights == 0).any()
    for i, prompt in enumerate(PROMPTS):  # the same prompt alone routes and generates the same
        alone = twin.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        torch.testing.assert_close(twin.last_weights[0], weights[i], rtol=1e-5, atol=1e-6)
        assert torch.equal(alone[0, -8:], got[i, -8:])


def test_experts_differing_only_in_norm_weights(tmp_path):
    start_embedded_ray()
    out, experts = _twin_run(tmp_path, "llama", only="norm", n_experts=2)
    manifest = read_twin_manifest(str(out))
    for expert in manifest.extra["twin"]["experts"]:
        kinds = {name: t["kind"] for name, t in expert["tensors"].items() if "norm" in name}
        assert kinds and set(kinds.values()) == {"dense"}
    twin = load_twin(str(out))
    inputs = _left_padded(PROMPTS)
    outputs = []
    for t, expert in enumerate(experts):
        twin.set_weights(torch.nn.functional.one_hot(torch.tensor(t), 2).float())
        outputs.append(twin.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=PAD))
        assert torch.equal(outputs[-1], _generate(expert, inputs))
    assert not torch.equal(*outputs)


def test_an_unknown_norm_is_refused_by_name():
    class ScaledNorm(torch.nn.Module):  # a 1-D weight but neither RMSNorm form
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight * 2

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), ScaledNorm())
    with pytest.raises(ValueError, match=r"'1' is a ScaledNorm .*computes neither"):
        TwinModel(model, {}, {"x": {"1.weight": torch.zeros(4)}})


def _char_tokenizer(directory: Path):
    """A character-level tokenizer over a–z and space, with pad and eos, saved in ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "</s>": 1, **{c: i + 2 for i, c in enumerate(" abcdefghijklmnopqrstuvwxyz")}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_cli_generate_and_router_training_on_prompts(runs, tmp_path, capsys):
    import json

    from pipeline.cli import main

    out, experts = runs["llama"]
    tokenizer = _char_tokenizer(out / "shared")  # the base had none; a real run copies the base's
    prompts = ["hello there", "abc", "sort these letters"]
    assert main(["twin", "generate", str(out), "--prompt", prompts[0], "--prompt", prompts[1], "--prompt", prompts[2],
                 "--mode", "fixed", "--weights", "0,0,1", "--max-new-tokens", "5", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    for line in lines:
        ids = tokenizer(line["prompt"], return_tensors="pt")["input_ids"]
        expected = _generate(experts[2], {"input_ids": ids}, max_new_tokens=5)[0, ids.shape[1]:].tolist()
        assert line["token_ids"] == expected[:len(line["token_ids"])] and line["weights"] == [0.0, 0.0, 1.0]
        assert line["text"] == tokenizer.decode(line["token_ids"], skip_special_tokens=True)

    data = tmp_path / "tasks.jsonl"
    words = ["abc", "hello", "zebra", "quiet", "mango", "river", "stone", "light", "cloud", "piano"]
    data.write_text("".join(json.dumps({"text": f"{w} {w}" if t == "expert0" else w[::-1], "task": t}) + "\n"
                            for w in words for t in ("expert0", "expert1", "expert2")))
    assert main(["twin", "train-router", str(out), "--data", str(data), "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(["twin", "generate", str(out), "--prompts-file", str(data), "--mode", "top_k", "--top-k", "1",
                 "--max-new-tokens", "3"]) == 0
    texts = capsys.readouterr().out.splitlines()
    assert len(texts) == 3 * len(words)


def test_a_router_is_bound_to_its_run(runs, tmp_path):
    """verify accepts the router trained for the output's run; a changed, stale or unrecorded one is
    refused by load_twin and reported by verify; --overwrite takes the old run's router with it."""
    import json
    import shutil

    from manifests.verify import verify_output
    from twin.train import train_twin_router

    out = tmp_path / "twin"
    shutil.copytree(runs["llama"][0], out)
    _char_tokenizer(out / "shared")
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({"text": w * (i + 1), "task": f"expert{i}"}) + "\n"
                            for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op") for i in range(3)))
    train_twin_router(str(out), str(data), epochs=1)
    assert verify_output(str(out)) == [] and load_twin(str(out)).router is not None
    weights = out / "router" / "router.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-4] + b"\0\0\0\0")
    assert any("sha256 differs" in p for p in verify_output(str(out)))
    with pytest.raises(ValueError, match="changed since training"):
        load_twin(str(out))
    weights.write_bytes(original)
    record = out / "router" / "metrics.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "run_id": "an-older-run"}))
    with pytest.raises(ValueError, match="trained for run an-older-run.*stale"):
        load_twin(str(out))
    record.unlink()
    assert any("without router/metrics.json" in p for p in verify_output(str(out)))

    manifest = read_twin_manifest(str(out))
    train_twin_router(str(out), str(data), epochs=1)  # bound again, then the output is overwritten
    for added in (out / "shared").glob("tokenizer*"):  # ours, not the run's: --overwrite would keep (and refuse) them
        added.unlink()
    config = {**manifest.config, "output": str(out), "parameters": {**manifest.config["parameters"], "rank_ratio": 0.5}}
    run_merge(load_config(config), overwrite=True, progress=False)
    assert not (out / "router").exists() or not any((out / "router").iterdir())
    assert verify_output(str(out)) == [] and load_twin(str(out)).router is None
