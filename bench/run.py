"""Benchmark mergefleet (and mergekit, when given) on synthetic Llama-shaped checkpoints; prints
JSON and a Markdown table.

    .venv/bin/python bench/run.py --hidden 1024 --layers 8 --experts 4 --mergekit /path/to/mergekit-yaml

Every method runs on the same inputs and the same YAML in one invocation, so the ratios between
rows are comparable on a noisy machine. Inputs are built once under --workdir and reused.
mergekit runs as a subprocess (`mergekit-yaml CONFIG OUT`); its peak RssAnon is sampled from /proc.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.coordinator import connect_ray, run_merge  # noqa: E402
from pipeline.samples import LLAMA_CONFIG, build_sample_models  # noqa: E402
from workers.methods import REGISTRY  # noqa: E402

METHODS = {
    "linear": {"merge_method": "linear"},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.4}},
    "ties": {"merge_method": "ties"},
    "ties_global": {"merge_method": "ties", "parameters": {"trim_scope": "global"}},
}


MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                    "della", "della_linear", "sce", "slerp", "nuslerp", "multislerp", "karcher", "model_stock",
                    "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough")  # mergekit 0.1.5's methods
MERGEKIT_EQUIVALENT = {"ties_global": "ties"}  # mergekit has no global-scope TIES: compare with its TIES


def build_inputs(workdir: Path, args) -> tuple[Path, list[Path]]:
    marker = workdir / "inputs.json"
    spec = {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate, "vocab": args.vocab,
            "experts": args.experts}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return workdir / "models" / "base", [workdir / "models" / f"expert{i}" for i in range(args.experts)]
    shutil.rmtree(workdir / "models", ignore_errors=True)
    config = {**LLAMA_CONFIG, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
              "intermediate_size": args.intermediate, "vocab_size": args.vocab}
    base, experts = build_sample_models(workdir / "models", n_experts=args.experts, config=config,
                                        max_file_bytes=2 * 1024**3)
    marker.write_text(json.dumps(spec))
    return base, experts


def warm_page_cache(models: list[Path]) -> None:
    """Read every input file once, so the first tool timed does not pay for a cold page cache."""
    for model in models:
        for path in sorted(model.glob("*.safetensors")):
            with open(path, "rb") as f:
                while f.read(64 * 1024 * 1024):
                    pass


def method_preset(name: str) -> dict:
    """The bench's config for a preset (METHODS) or any registered method by name; a method whose
    models take a density runs at 0.5, one with required parameters gets them from METHOD_EXTRAS."""
    if name in METHODS:
        return METHODS[name]
    from workers.methods import get_method

    get_method(name)  # an unknown name fails here, naming the known ones
    return {"merge_method": name, **METHOD_EXTRAS.get(name, {})}


METHOD_EXTRAS = {  # required parameters, and how many experts a method takes (mergekit's rules)
    "slerp": {"parameters": {"t": 0.5}, "experts": 1}, "nearswap": {"parameters": {"t": 0.5}, "experts": 1},
    "arcee_fusion": {"experts": 1}, "nuslerp": {"experts": 2}, "passthrough": {"experts": 1, "no_base": True},
}


def merge_yaml(name: str, base: Path, experts: list[Path]) -> dict:
    """The mergekit-format config both tools run."""
    from workers.methods import get_method

    method = dict(method_preset(name))
    experts = experts[:method.pop("experts", len(experts))]
    no_base = method.pop("no_base", False)
    accepted = get_method(method["merge_method"]).model_parameters.model_fields
    density = {"density": 0.2} if method["merge_method"] == "ties" else {} if name in METHODS else {"density": 0.5}
    per_model = {k: v for k, v in {"weight": 1.0, **density}.items() if k in accepted}
    config = {**method, "dtype": "bfloat16", "models": [{"model": str(e), "parameters": per_model} for e in experts]}
    if method["merge_method"] == "linear":
        config["models"].insert(0, {"model": str(base), "parameters": {"weight": 1.0}})
    elif not no_base:
        config["base_model"] = str(base)
    return config


def _peak_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def run_mergekit(name: str, base: Path, experts: list[Path], out: Path, mergekit: str) -> dict:
    """Run mergekit-yaml on the same config; wall time and peak RssAnon of its process."""
    import yaml

    config_path = out.parent / f"mergekit-{name}.yaml"
    config_path.write_text(yaml.safe_dump(merge_yaml(name, base, experts)))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([mergekit, str(config_path), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _peak_anon(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"mergekit failed: {proc.stderr.read().decode()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"tool": "mergekit", "method": name, "wall_s": round(wall, 3), "peak_rss_anon_gb": round(peak / 1e9, 3)}


def run_one(name: str, base: Path, experts: list[Path], out: Path, args) -> dict:
    config = {**merge_yaml(name, base, experts), "output": str(out), "memory_budget": args.memory_budget,
              "diagnostics": not args.no_diagnostics}
    if args.shards:
        config["shards"] = args.shards
    config = load_config(config)
    t0 = time.perf_counter()
    manifest = run_merge(config, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    input_bytes = sum(i["bytes"] for i in manifest.inputs)
    shutil.rmtree(out, ignore_errors=True)
    shards = manifest.timings["shards"]

    def most(key):  # the largest value over the run's tasks, in GB
        values = [s.get(key) or 0 for s in shards]
        return round(max(values) / 1e9, 3) if any(values) else None

    return {"tool": "mergefleet", "method": name, "wall_s": round(wall, 3), "peak_rss_anon_gb": most("peak_rss_anon"),
            "planned_gb": most("planned_bytes"), "start_rss_anon_gb": most("start_rss_anon"),
            "tasks_over_plan": sum((s.get("peak_rss_anon") or 0) > s.get("planned_bytes", 0) for s in shards),
            "input_gb": round(input_bytes / 1e9, 3),
            "input_gb_per_s": round(input_bytes / 1e9 / wall, 3),
            "bytes_read_gb": round((manifest.bytes_read + manifest.extra.get("global_trim", {}).get("scan_bytes_read", 0)) / 1e9, 3),
            "stages_s": manifest.timings["stages"], "prepass_s": manifest.timings.get("prepass"),
            # the per-tensor diagnostics' share of the tasks' time (docs/diagnostics.md)
            "diagnostics_share": round(manifest.timings["stages"].get("diagnostics", 0.0)
                                       / max(1e-9, sum(s["seconds"] for s in shards)), 4),
            "shards": len(shards)}


def run_as_typed(name: str, base: Path, experts: list[Path], out: Path, args, compile_cache: str | None = None) -> dict:
    """``mergefleet run CONFIG OUT`` in a fresh process (its own embedded Ray), as a user types it;
    the wall time and where the fixed cost goes, from the manifest's wall-clock stamps (Unix
    seconds) and manifest.json's mtime (the commit). ``compile_cache``: the inductor cache the
    workers use (``TORCHINDUCTOR_CACHE_DIR``; default: the environment's)."""
    import yaml

    config = {**merge_yaml(name, base, experts), "memory_budget": args.memory_budget}
    if args.shards:
        config["shards"] = args.shards
    config_path = out.parent / f"mergefleet-{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    shutil.rmtree(out, ignore_errors=True)
    load = round(os.getloadavg()[0], 2)  # the machine's 1-minute load as the command starts
    launched = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config_path), str(out), "--no-progress"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                               **({"TORCHINDUCTOR_CACHE_DIR": compile_cache} if compile_cache else {})})
    exited = time.time()
    if proc.returncode:
        raise RuntimeError(f"mergefleet run failed: {proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    committed = (out / "manifest.json").stat().st_mtime
    shards, clock = manifest["timings"]["shards"], manifest["timings"]["wall_clock"]
    first_task = min(s["started_at"] for s in shards)
    first_tensor = min((s["first_tensor_at"] for s in shards if s["first_tensor_at"]), default=first_task)
    last_shard = max(s["finished_at"] for s in shards)
    shutil.rmtree(out, ignore_errors=True)
    breakdown = {"command_to_ray_ready": clock["ray_ready"] - launched, "ray_ready_to_first_task": first_task - clock["ray_ready"],
                 "first_task_to_first_tensor": first_tensor - first_task, "last_shard_to_commit": committed - last_shard,
                 "commit_to_exit": exited - committed}
    return {"tool": "mergefleet run (as typed)", "method": name, "wall_s": round(exited - launched, 3), "load_1m": load,
            "fixed_cost_s": round((first_tensor - launched) + (exited - last_shard), 3),
            "fixed_cost_breakdown_s": {k: round(v, 3) for k, v in breakdown.items()}}


def run_cold_and_warm(name: str, base: Path, experts: list[Path], out: Path, args) -> list[dict]:
    """The command as typed with an empty inductor cache (a fresh directory), then again with what
    that run left in it; the cold row carries ``cold_over_warm``."""
    cache = tempfile.mkdtemp(prefix="mergefleet-bench-inductor-")
    try:
        cold, warm = (run_as_typed(name, base, experts, out, args, cache) for _ in range(2))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    cold["tool"], warm["tool"] = "mergefleet run (as typed, cold compile cache)", "mergefleet run (as typed, then warm)"
    cold["cold_over_warm"] = round(cold["wall_s"] / warm["wall_s"], 3)
    return [cold, warm]


def ratios(rows: list[dict]) -> dict:
    """The ratios the performance goals are stated in, from this invocation's rows: TIES over linear
    and global over per-tensor TIES (in Ray, best runs), and each cold run over its warm one."""
    walls = {r["method"]: r["wall_s"] for r in rows if r["tool"] == "mergefleet"}
    found = {f"{a}_over_{b}": round(walls[a] / walls[b], 3)
             for a, b in [("ties", "linear"), ("ties_global", "ties"), ("task_arithmetic", "linear")]
             if a in walls and b in walls}
    found.update({f"{r['method']}_cold_over_warm": r["cold_over_warm"] for r in rows if "cold_over_warm" in r})
    return found


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic Llama's shape (defaults: the 0.17B model of the README's table)."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--methods", "--method", nargs="+", default=list(METHODS),
                        help=f"presets {list(METHODS)}, any registered method's name, or all (the presets and "
                             "every registered method)")
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--memory-budget", default="4GB")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method (the fastest is reported)")
    parser.add_argument("--no-diagnostics", action="store_true", help="merge with `diagnostics: false` (to compare)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mergefleet-bench"))
    parser.add_argument("--as-typed", action="store_true",
                        help="also time `mergefleet run CONFIG OUT` in a fresh process per method, with the fixed "
                             "cost's breakdown (command → Ray ready → first task → first tensor; last shard → "
                             "manifest committed → exit)")
    parser.add_argument("--cold", action="store_true",
                        help="also time the command as typed with an empty inductor cache, then warm with what it "
                             "left there (the cold-start ratio)")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                        help="mergekit-yaml executable to compare with (default: the one on PATH, if any)")
    args = parser.parse_args()
    if "all" in args.methods:  # twin has its own bench (bench/twin_factors.py)
        args.methods = list(dict.fromkeys([*METHODS, *(name for name in REGISTRY if name != "twin")]))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    base, experts = build_inputs(workdir, args)
    build_s = time.perf_counter() - t0
    warm_page_cache([base, *experts])
    # the commands as typed run first, while this process holds no Ray: a second Ray on the machine
    # holds the dashboard agent's port, and the command's agent retries it for ~3.4 s before ray.init returns
    typed_runs = {name: min((run_as_typed(name, base, experts, workdir / f"typed-{name}", args)
                             for _ in range(args.repeat)), key=lambda r: r["wall_s"])
                  for name in (args.methods if args.as_typed else ())}
    cold_runs = {name: run_cold_and_warm(name, base, experts, workdir / f"cold-{name}", args)
                 for name in (args.methods if args.cold else ())}
    connect_ray(None)
    rows, references = [], {}
    for name in args.methods:
        runs = [run_one(name, base, experts, workdir / f"out-{name}", args) for _ in range(args.repeat)]
        ours = min(runs, key=lambda r: r["wall_s"])
        rows.append(ours)
        print(json.dumps(ours), file=sys.stderr)
        typed = typed_runs.get(name)
        for row in filter(None, [typed, *cold_runs.get(name, ())]):
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        mergekit_name = MERGEKIT_EQUIVALENT.get(name, name)
        if args.mergekit and mergekit_name in MERGEKIT_METHODS and mergekit_name not in references:
            references[mergekit_name] = run_mergekit(mergekit_name, base, experts, workdir / f"mergekit-{name}",
                                                     args.mergekit)
            rows.append(references[mergekit_name])
            print(json.dumps(rows[-1]), file=sys.stderr)
        if mergekit_name in references:
            for row in filter(None, (ours, typed)):
                row["speedup_vs_mergekit"] = round(references[mergekit_name]["wall_s"] / row["wall_s"], 2)
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "inputs": {"hidden": args.hidden, "layers": args.layers, "experts": args.experts, "build_s": round(build_s, 1)},
              "results": rows, "ratios": ratios(rows)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    print("\n| tool | method | wall s | input GB/s | peak RssAnon GB | read | convert | kernel | write | vs mergekit |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        s = r.get("stages_s", {})
        print(f"| {r['tool']} | {r['method']} | {r['wall_s']} | {r.get('input_gb_per_s', '')} | {r.get('peak_rss_anon_gb')} | "
              f"{s.get('read', '')} | {s.get('convert', '')} | {s.get('kernel', '')} | {s.get('write', '')} | "
              f"{r.get('speedup_vs_mergekit', '')} |", file=sys.stderr)
    print("\nratios: " + ", ".join(f"{k} {v}" for k, v in report["ratios"].items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
