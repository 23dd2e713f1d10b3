"""Tokens/s of Twin generation against the plain shared model's, on the same prompts; prints JSON.

    .venv/bin/python bench/twin_generate.py --hidden 512 --layers 8 --experts 4 --rank-ratio 0.1

A Llama-shaped base (random weights) and ``--experts`` perturbed copies are merged by
``merge_method: twin`` through the pipeline (factors of rank ``rank-ratio``·min(m, n)); a router
with random weights mixes every expert per prompt (router mode: every factor column is computed).
Both models generate ``--new-tokens`` greedy tokens for one batch of ``--batch`` left-padded prompts
of mixed lengths (no EOS, so every sample runs to the end), best of ``--repeat`` runs each,
alternating, after one warm-up run of each. Reported: tokens/s of each and their ratio (goal: twin ≥ 0.6× shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.coordinator import connect_ray, run_merge  # noqa: E402
from twin.inference import TwinModel  # noqa: E402
from twin.load import load_expert_deltas, load_shared_model, local_shared_dir, read_twin_manifest  # noqa: E402
from twin.router import Router  # noqa: E402


def build_twin(workdir: Path, args) -> tuple[Path, int]:
    """The twin output over a random Llama and perturbed experts; (output, hidden size)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                      tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    dirs = [workdir / "base"]
    base.save_pretrained(dirs[0])
    for i in range(args.experts):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        dirs.append(workdir / f"expert{i}")
        expert.save_pretrained(dirs[-1])
    out = workdir / "twin"
    run_merge(load_config({"merge_method": "twin", "base_model": str(dirs[0]), "output": str(out),
                           "models": [{"model": str(d)} for d in dirs[1:]],
                           "parameters": {"rank_ratio": args.rank_ratio}}), progress=False)
    return out, args.hidden


def prompts(args) -> dict[str, torch.Tensor]:
    """``batch`` left-padded prompts of lengths spread over [prompt/2, prompt]."""
    generator = torch.Generator().manual_seed(1)
    lengths = [args.prompt // 2 + (i * args.prompt // 2) // max(1, args.batch - 1) for i in range(args.batch)]
    ids = torch.zeros(args.batch, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(2, args.vocab, (n,), generator=generator)
        mask[i, -n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def tokens_per_s(generate, inputs: dict, args) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       pad_token_id=0)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0] / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank-ratio", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="longest prompt, tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    connect_ray(None)
    with tempfile.TemporaryDirectory(prefix="mergefleet-twin-generate-") as tmp:
        out, hidden = build_twin(Path(tmp), args)
        manifest = read_twin_manifest(str(out))
        factors, dense = load_expert_deltas(str(out), manifest)
        tasks = [e["name"] for e in manifest.extra["twin"]["experts"]]
        with local_shared_dir(str(out), manifest) as directory:
            shared, model = load_shared_model(directory), load_shared_model(directory)
        twin = TwinModel(model, factors, dense, router=Router(hidden, tasks))
        inputs = prompts(args)
        rates = {"shared": [], "twin": []}
        tokens_per_s(shared.generate, inputs, args), tokens_per_s(twin.generate, inputs, args)  # warm-up, not counted
        for _ in range(args.repeat):
            rates["shared"].append(tokens_per_s(shared.generate, inputs, args))
            rates["twin"].append(tokens_per_s(twin.generate, inputs, args))
        weights = twin.last_weights
    best = {k: max(v) for k, v in rates.items()}
    report = {"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "load_1min": os.getloadavg()[0]},
              "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "experts": args.experts,
                        "rank_ratio": args.rank_ratio},
              "batch": args.batch, "new_tokens": args.new_tokens,
              "experts_mixed_per_prompt": int((weights > 0).sum(-1).min()),
              "shared_tokens_per_s": round(best["shared"], 1), "twin_tokens_per_s": round(best["twin"], 1),
              "twin_over_shared": round(best["twin"] / best["shared"], 3),
              "runs": {k: [round(r, 1) for r in v] for k, v in rates.items()}}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
