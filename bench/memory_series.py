"""Peak anonymous memory per shard task as the model grows (0.25B, 0.5B, 1B Llama shapes).

    .venv/bin/python bench/memory_series.py --experts 4 --memory-budget 1GB 4GB --json memory.json

Each size is built, merged with per-tensor TIES under each budget (in a fresh local Ray, as one
batch job per model would run), measured and deleted before the next. memory_budget bounds a task's whole process (its ~0.3 GB of Python, torch and Ray included):
the series shows each task's peak RssAnon under its planned bytes and flat once the model's
tensors outgrow the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import build_inputs, run_one  # noqa: E402

from pipeline.coordinator import connect_ray  # noqa: E402

SIZES = {  # name: (hidden, layers, intermediate) with vocab 32000
    "0.25B": (1024, 16, 2816),
    "0.5B": (1536, 16, 4096),
    "1B": (2048, 16, 5632),
    "2B": (2560, 24, 6912),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.25B", "0.5B", "1B"], choices=list(SIZES))
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--memory-budget", nargs="+", default=["1GB", "4GB"])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mergefleet-memory"))
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = []
    for size in args.sizes:
        ray.shutdown()  # fresh worker processes per size, as one batch job per model would have
        connect_ray(None)
        hidden, layers, intermediate = SIZES[size]
        workdir = Path(args.workdir) / size
        for budget in args.memory_budget:
            options = SimpleNamespace(hidden=hidden, layers=layers, intermediate=intermediate, vocab=32000,
                                      experts=args.experts, memory_budget=budget, shards=None)
            base, experts = build_inputs(workdir, options)
            result = run_one(args.method, base, experts, workdir / "out", options)
            rows.append({"size": size, "memory_budget": budget, **result})
            print(json.dumps(rows[-1]), file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(rows, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    print("\n| size | input GB | budget | planned per task GB | peak RssAnon per task GB | at task start GB | tasks over plan | wall s |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['size']} | {r['input_gb']} | {r['memory_budget']} | {r['planned_gb']} | {r['peak_rss_anon_gb']} | "
              f"{r['start_rss_anon_gb']} | {r['tasks_over_plan']} | {r['wall_s']} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
