"""Check each method's memory model: the bytes per element a shard task really holds against
``bytes_per_element``, the figure the planner sizes row chunks and Ray's memory request by.

    .venv/bin/python bench/calibrate_memory.py --experts 3 --methods ties dare_ties della

Per method and per kernel mode (compiled, and eager as ``MERGEFLEET_COMPILE=0`` or a failed compile
runs it), a fresh Python process (no Ray) merges a 1M-element tensor first (its kernels compile:
that memory is the worker's, counted in ``start_rss_anon_mb``), then one [rows, cols] bf16 tensor
of a base and ``--experts`` experts as a single chunk, and reads that task's peak RssAnon less its
RssAnon at the start. That difference per element is set beside the
method's model; ``ratio`` = measured / model must stay below 1 (the worker's own memory, Python,
torch and the loaded kernels, is ``process_reserve``'s). JSON lines out, one per method and mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TENSOR = "model.layers.0.mlp.down_proj.weight"


def build_inputs(workdir: Path, experts: int, rows: int, cols: int) -> list[Path]:
    """A base and ``experts`` experts of one random bf16 tensor each (reused when they exist)."""
    return [*_models(workdir / "warm", experts, max(1, (1 << 20) // cols), cols),
            *_models(workdir / "measured", experts, rows, cols)]


def _models(workdir: Path, experts: int, rows: int, cols: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    models = [workdir / "base", *(workdir / f"expert{i}" for i in range(experts))]
    marker = workdir / "inputs.json"
    spec = {"experts": experts, "rows": rows, "cols": cols}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return models
    generator = torch.Generator().manual_seed(0)
    for model in models:
        model.mkdir(parents=True, exist_ok=True)
        tensor = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
        save_file({TENSOR: tensor}, str(model / "model.safetensors"))
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    marker.write_text(json.dumps(spec))
    return models


def measure(method: str, models: list[Path]) -> dict:
    """In this (fresh) process: merge the small tensor (its kernels compile), then the measured one,
    and return the figures of the second."""
    sys.path.insert(0, str(ROOT / "bench"))
    from run import merge_yaml

    from pipeline.config import load_config
    from pipeline.planner import build_plan
    from workers.memory import release_free_memory
    from workers.methods import get_method
    from workers.shard_task import run_shard

    half = len(models) // 2
    for inputs in (models[:half], models[half:]):  # the warm-up, then the measured run
        with tempfile.TemporaryDirectory(prefix="mergefleet-calibrate-") as out:
            config = load_config({**merge_yaml(method, inputs[0], inputs[1:]), "output": out, "memory_budget": "64GB"})
            spec = build_plan(config).shards[0]
            task = spec.tensors[0]
            result = run_shard(spec)
        release_free_memory()
    elements = task.shape[0] * task.shape[1]
    measured = (result.peak_rss_anon - result.start_rss_anon) / elements
    model = get_method(config.merge_method).bytes_per_element(task)
    return {"method": method, "compiled": spec.compile_kernels,
            "inputs": len(task.inputs), "measured_bytes_per_element": round(measured, 1),
            "model_bytes_per_element": model, "ratio": round(measured / model, 3),
            "start_rss_anon_mb": result.start_rss_anon >> 20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", help="registered methods (default: every mergekit method)")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--modes", nargs="+", choices=("compiled", "eager"), default=["compiled", "eager"])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mergefleet-calibrate"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this method
    args = parser.parse_args()
    models = build_inputs(Path(args.workdir), args.experts, args.rows, args.cols)
    if args.one:
        print(json.dumps(measure(args.one, models)), flush=True)
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from run import MERGEKIT_METHODS

    methods = args.methods or list(MERGEKIT_METHODS)
    over = 0
    for mode in args.modes:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MERGEFLEET_COMPILE": "always" if mode == "compiled" else "0"}
        for method in methods:
            child = subprocess.run([sys.executable, __file__, "--one", method, "--experts", str(args.experts),
                                    "--rows", str(args.rows), "--cols", str(args.cols), "--workdir", args.workdir],
                                   cwd=ROOT, env=env, capture_output=True, text=True)
            if child.returncode:
                raise RuntimeError(f"{method} ({mode}) failed: {child.stderr[-2000:]}")
            row = json.loads(child.stdout.strip().splitlines()[-1])
            over += row["ratio"] >= 1
            print(json.dumps(row), flush=True)
    print(json.dumps({"over_model": over}))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
