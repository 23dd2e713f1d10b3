"""Twin exclusive factors at a fixed rank: mergefleet vs mergekit-extract-lora, time per expert and error.

    .venv/bin/python bench/twin_factors.py --rank 32 --experts 4 --mergekit-extract-lora /path/to/mergekit-extract-lora

The bench/run.py synthetic Llama; mergefleet runs `merge_method: twin` over --experts experts with
a shared model equal to the base (task arithmetic, λ = 0), so v_t = θ_t − θ_base, exactly what
mergekit-extract-lora factorizes for one expert. Time per expert: mergefleet's whole run (the
shared model, every expert's factors, adapters and manifest) divided by the number of experts,
against one mergekit-extract-lora run. Error: each tensor's ‖v − BA‖_F / ‖v‖_F from the manifest
against the exact truncated SVD's (computed here for the first expert's layer-0 matrices and
embedding), which must stay within --error-bound. mergefleet runs --runs times, each on a fresh
local Ray (cold workers, compilation included), and the best counts; mergekit runs once. The JSON
holds both rows, the speed-up per expert, the error check and the 1-minute load before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import ray
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import add_model_arguments, build_inputs, warm_page_cache  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.coordinator import connect_ray, run_merge  # noqa: E402


def load(model_dir: Path, name: str) -> torch.Tensor:
    index = model_dir / "model.safetensors.index.json"
    files = [model_dir / json.loads(index.read_text())["weight_map"][name]] if index.exists() else [model_dir / "model.safetensors"]
    with safe_open(str(files[0]), "pt") as f:
        return f.get_tensor(name).float()


def exact_error(v: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(v.double())
    return float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def timed_twin_run(config: dict) -> tuple[float, object, float]:
    """(seconds, manifest, load before) of one twin run on a fresh local Ray (RAY_ADDRESS=local: a
    bare ray.init() would join whatever cluster /tmp/ray/ray_current_cluster names, e.g. a test's)."""
    ray.shutdown()
    os.environ.setdefault("RAY_ADDRESS", "local")
    connect_ray(None)
    load_before = load_1m()
    t0 = time.perf_counter()
    manifest = run_merge(load_config(config), overwrite=True, progress=False)
    return time.perf_counter() - t0, manifest, load_before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--experts", type=int, default=4, help="experts in the twin run (at most 4, the built inputs)")
    parser.add_argument("--runs", type=int, default=2, help="mergefleet runs; the best counts")
    parser.add_argument("--error-bound", type=float, default=1.05, help="largest error allowed, as a multiple of the exact SVD's")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mergefleet-bench"))
    parser.add_argument("--mergekit-extract-lora", default=shutil.which("mergekit-extract-lora"))
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workdir = Path(args.workdir)
    options = SimpleNamespace(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                              vocab=args.vocab, experts=4)
    base, experts = build_inputs(workdir, options)
    experts, expert = experts[: args.experts], experts[0]
    warm_page_cache([base, *experts])
    out = workdir / "twin-out"
    config = {"merge_method": "twin", "base_model": str(base), "output": str(out),
              "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
              "parameters": {"shared": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.0}},
                             "rank": args.rank, "svd": "auto"}}
    runs = [timed_twin_run(config) for _ in range(args.runs)]
    ours, manifest, _ = min(runs, key=lambda run: run[0])
    tensors = manifest.extra["twin"]["experts"][0]["tensors"]
    checked = ["model.embed_tokens.weight"] + [n for n in tensors if n.startswith("model.layers.0.") and tensors[n]["kind"] == "factors"]
    ratios = {}
    for name in checked:
        v = load(expert, name) - load(base, name)
        ratios[name] = round(tensors[name]["rel_error"] / exact_error(v, args.rank), 4)
    row = {"tool": "mergefleet", "rank": args.rank, "experts": len(experts), "wall_s": round(ours, 2),
           "wall_s_per_expert": round(ours / len(experts), 2), "runs_s": [round(run[0], 2) for run in runs],
           "load_1m_before": [run[2] for run in runs], "stages_s": manifest.timings["stages"],
           "error_vs_exact_max": max(ratios.values()), "error_bound": args.error_bound,
           "error_within_bound": max(ratios.values()) <= args.error_bound, "error_vs_exact": ratios}
    report = {"inputs": vars(options), "results": [row]}
    if args.mergekit_extract_lora:
        lora_out = workdir / "mergekit-lora"
        shutil.rmtree(lora_out, ignore_errors=True)
        load_before = load_1m()
        t0 = time.perf_counter()
        subprocess.run([args.mergekit_extract_lora, "--model", str(expert), "--base-model", str(base),
                        "--out-path", str(lora_out), "--max-rank", str(args.rank)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs = time.perf_counter() - t0
        report["results"].append({"tool": "mergekit-extract-lora", "rank": args.rank, "experts": 1,
                                  "wall_s": round(theirs, 2), "wall_s_per_expert": round(theirs, 2),
                                  "load_1m_before": load_before})
        row["speedup_per_expert_vs_mergekit"] = round(theirs / row["wall_s_per_expert"], 1)
    report["load_1m_after"] = load_1m()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if row["error_within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
