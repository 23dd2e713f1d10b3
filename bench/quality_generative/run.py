#!/usr/bin/env python
"""Generative quality benchmark: Twin-Merging and the static merges on a small causal LM. One
command, offline, CPU.

    .venv/bin/python bench/quality_generative/run.py [--quick] [--seeds 3] --out DIR

Needs the test extras plus ``chatterbot-corpus`` (text). Once per run:

0. A character tokenizer and a 4-layer Llama (hidden 192, untied lm_head) pre-trained from scratch
   on generic text (chatterbot's English and Spanish conversations, stdlib docstrings), saved as
   ``DIR/base`` (reused by a later run with the same pre-training settings).

Per seed (the seed fixes the data split and the fine-tuning order):

1. Four generation tasks whose prompts do not name the task (``data.py``), written to
   ``DIR/seed<k>/data/<task>/{train,val,test}.jsonl`` with ``sizes.json``.
2. One expert per task: the whole model fine-tuned on the answers, checkpoint picked on validation
   exact match (``model.py``), saved as an HF safetensors directory (``DIR/seed<k>/experts/<task>``), and
   scored on every task.
3. Merges through ``run_merge`` (``merges.py``): average, task arithmetic (λ on validation), TIES
   (λ, density on validation), Twin-Merging (router only at test time; plus the router's top-1,
   the oracle and θ* alone). Every model is scored by exact match of its greedy generation.

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

from bench.quality.merges import Grid  # noqa: E402
from bench.quality.run import _jsonable, start_ray  # noqa: E402
from bench.quality_generative import data as D  # noqa: E402
from bench.quality_generative import model as M  # noqa: E402
from bench.quality_generative.merges import GRID, PLAIN_ROWS, QUICK_GRID, Scorer, plain_merges, run_twin  # noqa: E402
from bench.quality_generative.report import markdown, summarize  # noqa: E402

LOG = logging.getLogger("bench.quality_generative")
PRETRAIN_RECORD = "pretrain.json"


@dataclass(frozen=True)
class Options:
    seeds: tuple[int, ...] = (0, 1, 2)
    size: M.ModelSize = M.ModelSize()
    pretrain_steps: int = 600  # batches of 32 windows of 64 characters
    steps: int = 400  # fine-tuning steps per expert (batches of 32), validated 5 times; the best check is kept
    lr: float = 3e-3
    batch_size: int = 32
    sizes: D.Sizes = field(default_factory=D.Sizes)
    tasks: tuple[str, ...] | None = None  # default: all four
    max_new_tokens: int = 40
    grid: Grid = GRID
    merge_rows: tuple[str, ...] = PLAIN_ROWS
    twin: bool = True
    cross: bool = True  # score every expert on every task (else each on its own only)
    keep_models: bool = False  # keep expert and merged checkpoints (else deleted after each seed)


QUICK = Options(seeds=(0,), pretrain_steps=300, steps=150, sizes=D.Sizes(train=300, val=20, test=50), grid=QUICK_GRID,
                max_new_tokens=32)


def twin_generate_available() -> bool:
    """Whether twin/ has landed its generation API (``TwinModel.generate``)."""
    try:
        from twin.inference import TwinModel
    except ImportError:
        return False
    return hasattr(TwinModel, "generate")


def pretrained_base(out: Path, opts: Options) -> tuple[Path, dict]:
    """``out/base``: tokenizer + pre-trained model, reused when its record matches these settings."""
    directory = out / "base"
    settings = {"size": dataclasses.asdict(opts.size), "steps": opts.pretrain_steps, "seed": 0, "charset": D.CHARSET}
    record_path = directory / PRETRAIN_RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            LOG.info("reusing the pre-trained base %s (%s steps)", directory, opts.pretrain_steps)
            return directory, {**record, "reused": True}
    t0 = time.perf_counter()
    tokenizer = M.build_tokenizer()
    model = M.new_model(len(tokenizer), opts.size, seed=0)
    texts = D.pretrain_texts()
    metrics = M.pretrain(model, tokenizer, texts, steps=opts.pretrain_steps, seed=0, log=LOG.info)
    shutil.rmtree(directory, ignore_errors=True)
    M.save_checkpoint(directory, model, tokenizer)
    record = {"settings": settings, "metrics": metrics, "texts": len(texts),
              "parameters": sum(p.numel() for p in model.parameters()), "wall_s": round(time.perf_counter() - t0, 1)}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    LOG.info("pre-trained the base: %s parameters, loss %.3f (%.0f s)", record["parameters"], metrics["final_loss"], record["wall_s"])
    return directory, {**record, "reused": False}


def run_seed(seed: int, out: Path, opts: Options, base_dir: Path) -> dict:
    """Everything for one seed; returns its JSON-ready record."""
    t_seed = time.perf_counter()
    tokenizer, base = M.load_tokenizer(base_dir), M.load_model(base_dir)
    tasks = D.build_tasks(seed, opts.sizes, tasks=opts.tasks)
    D.check_disjoint(tasks)
    sizes = D.write_tasks(tasks, out / "data", seed)
    scorer = Scorer(tokenizer, tasks, max_new_tokens=opts.max_new_tokens)
    timings: dict[str, float] = {}
    rows: dict[str, dict] = {"expert": _row()}
    experts = {}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        expert = M.finetune(base, tokenizer, task.splits["train"], task.splits["val"], steps=opts.steps, seed=seed,
                            lr=opts.lr, batch_size=opts.batch_size, max_new_tokens=opts.max_new_tokens)
        experts[name] = out / "experts" / name  # the directory name is the twin run's expert name
        M.save_checkpoint(experts[name], expert.model, tokenizer)
        timings[f"expert_{name}_s"] = round(time.perf_counter() - t0, 1)
        on = scorer.tasks if opts.cross else [name]
        cross = {"test": {}, "test_correct": {}, "stored_bytes": M.dir_bytes(experts[name]), "test_predictions": {}}
        for other in on:
            predicted = scorer.predictions(expert.model, other, "test")
            cross["test_correct"][other] = scorer.score(predicted, other, "test")
            cross["test"][other] = sum(cross["test_correct"][other]) / len(predicted)
            cross["test_predictions"][other] = predicted
        if opts.cross:
            rows[f"expert_{name}"] = cross
        for key in ("test_correct", "test", "test_predictions"):
            rows["expert"][key][name] = cross[key][name]
        rows["expert"]["training"][name] = expert.metrics
        LOG.info("seed %d %s: expert test %.3f (step %d, val %.3f; %.0f s)", seed, name, cross["test"][name],
                 expert.metrics["best_step"], expert.metrics["val_exact"], timings[f"expert_{name}_s"])
        del expert
    rows["expert"]["stored_bytes"] = sum(M.dir_bytes(p) for p in experts.values())
    rows["expert"]["parameters"] = {t: m["best_step"] for t, m in rows["expert"]["training"].items()}
    base_correct = scorer.correct(base, "test")
    rows["base"] = {"test_correct": base_correct, "test": {t: sum(c) / len(c) for t, c in base_correct.items()},
                    "test_predictions": scorer.calls[-1]["predictions"], "stored_bytes": M.dir_bytes(base_dir)}

    t0 = time.perf_counter()
    rows.update(plain_merges(experts, scorer, out / "merges", opts.grid, base_dir, only=opts.merge_rows))
    timings["merges_s"] = round(time.perf_counter() - t0, 1)
    for key in opts.merge_rows:
        LOG.info("seed %d %s %s: test %s", seed, key, rows[key]["parameters"],
                 {t: round(v, 3) for t, v in rows[key]["test"].items()})
    if opts.twin:
        t0 = time.perf_counter()
        rows.update(run_twin(experts, tasks, scorer, out / "merges", opts.grid, seed, base_dir))
        timings["twin_s"] = round(time.perf_counter() - t0, 1)
        for key in ("twin_router", "twin_hard", "twin_oracle", "twin_shared_only"):
            LOG.info("seed %d %s: test %s", seed, key, {t: round(v, 3) for t, v in rows[key]["test"].items()})
    timings["seed_s"] = round(time.perf_counter() - t_seed, 1)
    if not opts.keep_models:
        shutil.rmtree(out / "experts", ignore_errors=True)
        shutil.rmtree(out / "merges", ignore_errors=True)
    answers = {t: scorer.data[(t, "test")][1] for t in scorer.tasks}
    record = {"seed": seed, "sizes": sizes, "answers": answers, "rows": rows, "timings": timings}
    (out / "seed.json").write_text(json.dumps(record, ensure_ascii=False) + "\n")
    return record


def run(opts: Options, out: Path) -> dict:
    """Pre-training, all seeds, then the summary; writes results.json and table.md under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    start_ray()
    t0 = time.perf_counter()
    base_dir, pretrain = pretrained_base(out, opts)
    seeds = [run_seed(seed, out / f"seed{seed}", opts, base_dir) for seed in opts.seeds]
    summary = summarize(seeds)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["pretrain"] = pretrain
    summary["options"] = _jsonable(dataclasses.asdict(opts))
    load = os.getloadavg()
    table = markdown(summary) + (
        f"\nRuntime {summary['wall_s'] / 60:.1f} min on {os.cpu_count()} CPU cores (load average at the end "
        f"{load[0]:.1f} / {load[2]:.1f} over 1 / 15 min; {len(opts.seeds)} seed(s), {opts.steps} fine-tuning steps per expert, "
        f"pre-training {opts.pretrain_steps} steps{' reused' if pretrain['reused'] else ''}).\n")
    (out / "results.json").write_text(json.dumps({"summary": summary, "seeds": seeds}, indent=1, ensure_ascii=False) + "\n")
    (out / "table.md").write_text(table)
    return {"summary": summary, "seeds": seeds, "table": table}


def _row() -> dict:
    return {"test": {}, "test_correct": {}, "test_predictions": {}, "training": {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (base, data, results.json, table.md)")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 300/20/50 examples per task, 300 pre-training steps, 150 fine-tuning steps, small grids (a few minutes)")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1); default 3, --quick 1")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per expert (default 400, --quick 40)")
    parser.add_argument("--pretrain-steps", type=int, help="pre-training steps (default 600, --quick 300)")
    parser.add_argument("--no-twin", action="store_true", help="skip Twin-Merging")
    parser.add_argument("--no-cross", action="store_true", help="score each expert on its own task only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine two threads wait on each other)")
    parser.add_argument("--keep-models", action="store_true", help="keep the expert and merged checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "ray", "pipeline", "workers", "httpx", "twin.router"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("workers.kernels.peft_export").setLevel(logging.ERROR)  # RMSNorm deltas are not in the PEFT adapters
    torch.set_num_threads(args.threads)
    opts = QUICK if args.quick else Options()
    changes: dict = {"keep_models": args.keep_models, "cross": not args.no_cross}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.pretrain_steps is not None:
        changes["pretrain_steps"] = args.pretrain_steps
    if args.no_twin or not twin_generate_available():
        if not args.no_twin:
            LOG.warning("twin.inference.TwinModel has no generate() yet: Twin-Merging rows skipped")
        changes["twin"] = False
    result = run(dataclasses.replace(opts, **changes), args.out)
    print(result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
