"""Merging the experts through mergefleet's real pipeline and scoring the results.

Every merged encoder comes from ``pipeline.coordinator.run_merge`` on the embedded Ray (the same
code path as ``mergefleet run``). λ and density are picked on the validation splits (mean
validation accuracy over tasks, each task with its own expert head); only the picked merge is
scored on test. Twin-Merging: a ``merge_method: twin`` run (shared θ* = task arithmetic, λ 0.29 as
in the paper, plus truncated-SVD factors of each expert's exclusive knowledge), its router trained by
``train_twin_router`` on the experts' training texts only, then ``TwinModel`` with the router's
soft weights — the true task is never given. The oracle feeds the true task's one-hot weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.quality.data import TaskData
from bench.quality.model import Batches, base_dir, dir_bytes, features, load_encoder, mean_pool, tokenize

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """Validation grids (none of them contains plain averaging)."""

    ta_lambdas: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
    ties_lambdas: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2, 1.4)
    ties_densities: tuple[float, ...] = (0.2, 0.5)
    twin_rank_ratio: float = 0.1  # the paper's default: r = 0.1 · min(m, n)
    router_epochs: int = 20


QUICK_GRID = Grid(ta_lambdas=(0.3, 0.5), ties_lambdas=(0.8, 1.2), ties_densities=(0.2,), router_epochs=10)


class Scorer:
    """Each task's tokenized val and test texts, labels and expert head: accuracy of any encoder."""

    def __init__(self, tokenizer, tasks: dict[str, TaskData], heads: dict[str, nn.Linear]) -> None:
        self.tasks = list(tasks)
        self.heads = heads
        self.tokens = {(t, s): tokenize(tokenizer, tasks[t].texts(s)) for t in tasks for s in ("val", "test")}
        self.labels = {(t, s): torch.tensor(tasks[t].targets(s)) for t in tasks for s in ("val", "test")}

    def correct(self, encoder: nn.Module, split: str) -> dict[str, list[int]]:
        """Per task, 1/0 per example (in split order): the task's head on ``encoder``'s features."""
        out = {}
        for task in self.tasks:
            with torch.no_grad():
                predicted = self.heads[task](features(encoder, self.tokens[(task, split)])).argmax(-1)
            out[task] = (predicted == self.labels[(task, split)]).int().tolist()
        return out


def accuracies(correct: dict[str, list[int]]) -> dict[str, float]:
    return {task: sum(c) / len(c) for task, c in correct.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def merge(method: str, parameters: dict, experts: dict[str, Path], output: Path, base: Path | None = None) -> dict:
    """One merge through the pipeline (embedded Ray); returns the manifest's timings. ``base``: the
    base model's directory (default MiniLM's, ``base_dir()``)."""
    from pipeline.config import load_config
    from pipeline.coordinator import run_merge

    config = {"merge_method": method, "models": [{"model": str(path)} for path in experts.values()],
              "parameters": parameters, "dtype": "float32", "output": str(output)}
    if method != "linear":  # linear averages the experts (mergekit: no base model)
        config["base_model"] = str(base or base_dir())
    t0 = time.perf_counter()
    manifest = run_merge(load_config(config), progress=False, overwrite=True)
    return {"wall_s": round(time.perf_counter() - t0, 3), "run_id": manifest.run_id}


def candidates(grid: Grid) -> list[tuple[str, str, dict]]:
    """(row, method, parameters) of every merge to try."""
    out = [("average", "linear", {})]
    out += [("task_arithmetic", "task_arithmetic", {"lambda": lam}) for lam in grid.ta_lambdas]
    for scope in ("tensor", "global"):
        out += [(f"ties_{scope}", "ties", {"lambda": lam, "density": d, "trim_scope": scope})
                for d, lam in itertools.product(grid.ties_densities, grid.ties_lambdas)]
    return out


def run_merges(experts: dict[str, Path], scorer: Scorer, work: Path, grid: Grid,
               only: tuple[str, ...] | None = None, *, base: Path | None = None,
               load=load_encoder, tiebreak=None) -> dict[str, dict]:
    """Every candidate merged and scored on validation; per row the best one scored on test.
    ``only``: the rows to run (default all: average, task_arithmetic, ties_tensor, ties_global).
    ``base`` and ``load`` (directory -> model) default to MiniLM; ``scorer`` is anything with
    ``correct(model, split) -> {task: [1/0, ...]}`` (bench/quality_generative passes its own), and
    ``tiebreak()``, when given, a number about the validation call just made that breaks ties of the
    mean validation accuracy (higher wins; the first candidate wins otherwise)."""
    rows: dict[str, dict] = {}
    for row, method, params in candidates(grid):
        if only is not None and row not in only:
            continue
        output = work / f"{row}_{_tag(params)}"
        timing = merge(method, params, experts, output, base)
        encoder = load(output)
        val = accuracies(scorer.correct(encoder, "val"))
        entry = {"parameters": params, "val": val, "val_mean": mean(val.values()), **timing}
        if tiebreak is not None:
            entry["val_tiebreak"] = tiebreak()
        LOG.info("%s %s: val %.4f%s (%.1f s)", row, params, entry["val_mean"],
                 f" (tie-break {entry['val_tiebreak']:.4f})" if tiebreak is not None else "", timing["wall_s"])
        best = rows.get(row)
        if best is None or _rank(entry) > _rank(best):
            if best is not None:
                shutil.rmtree(best["output"], ignore_errors=True)
            rows[row] = {**entry, "output": output, "encoder": encoder, "grid": (best or {}).get("grid", []) + [entry]}
        else:
            rows[row]["grid"].append(entry)
            shutil.rmtree(output, ignore_errors=True)
    for row, best in rows.items():
        best["test_correct"] = scorer.correct(best.pop("encoder"), "test")
        best["test"] = accuracies(best["test_correct"])
        best["stored_bytes"] = dir_bytes(best["output"])
        best["output"] = str(best["output"])
        best["grid"] = [{k: v for k, v in e.items() if k in ("parameters", "val_mean", "val_tiebreak", "wall_s")}
                        for e in best["grid"]]
    return rows


def _rank(entry: dict) -> tuple[float, float]:
    """Order of two validation entries: mean accuracy, then the tie-break (0 when none)."""
    return entry["val_mean"], entry.get("val_tiebreak", 0.0)


def twin_merge(experts: dict[str, Path], work: Path, grid: Grid, base: Path) -> tuple[Path, object, float]:
    """(output, manifest, wall s) of a ``merge_method: twin`` run over the experts (named by task)."""
    from pipeline.config import load_config
    from pipeline.coordinator import run_merge

    output = work / "twin"
    config = {"merge_method": "twin", "base_model": str(base), "dtype": "float32", "output": str(output),
              "models": [{"model": str(path)} for path in experts.values()],
              "parameters": {"rank_ratio": grid.twin_rank_ratio}}
    t0 = time.perf_counter()
    manifest = run_merge(load_config(config), progress=False, overwrite=True)
    wall = round(time.perf_counter() - t0, 3)
    names = [e["name"] for e in manifest.extra["twin"]["experts"]]
    if names != list(experts):
        raise RuntimeError(f"twin run named the experts {names}, expected {list(experts)} (the expert directories are named by task)")
    return output, manifest, wall


def run_twin(experts: dict[str, Path], tasks: dict[str, TaskData], scorer: Scorer, work: Path, grid: Grid, seed: int) -> dict[str, dict]:
    """Twin-Merging through the pipeline: twin run, router on training texts, dynamic inference."""
    from twin.load import load_twin
    from twin.train import train_twin_router

    output, manifest, wall = twin_merge(experts, work, grid, base_dir())
    # the router learns from the experts' training texts only; its checkpoint is picked on a held-out
    # fifth of them, so neither the validation nor the test split is seen
    data = work / "router_train.jsonl"
    data.write_text("".join(json.dumps({"text": text, "task": name}, ensure_ascii=False) + "\n"
                            for name in tasks for text in tasks[name].texts("train")), encoding="utf-8")
    router_metrics = train_twin_router(str(output), str(data), epochs=grid.router_epochs, seed=seed,
                                       val_fraction=0.2, test_fraction=0.0)
    twin = load_twin(str(output), router=True)
    task_index = {name: i for i, name in enumerate(twin.experts)}

    routed, oracle, shared, routed_right = {}, {}, {}, {}
    for task in scorer.tasks:
        tokens, head = scorer.tokens[(task, "test")], scorer.heads[task]
        labels = scorer.labels[(task, "test")]
        one_hot = torch.nn.functional.one_hot(torch.tensor(task_index[task]), len(twin.experts)).float()
        twin.set_mode("router")
        picked = _in_order(tokens, [twin.expert_weights(**b).argmax(-1) for b in tokens.batches])
        routed_right[task] = (picked == task_index[task]).int().tolist()
        routed[task] = _correct(head, features(twin, tokens), labels)
        twin.set_weights(one_hot)
        oracle[task] = _correct(head, features(twin, tokens), labels)
        shared[task] = _correct(head, _shared_features(twin, tokens), labels)
    stored = {"shared": dir_bytes(output / "shared"),
              "factors": sum(dir_bytes(output / "experts" / n, "factors*.safetensors") for n in experts),
              "router": dir_bytes(output / "router")}
    common = {"output": str(output), "wall_s": wall, "parameters": {"shared": "task_arithmetic λ=0.29", "rank_ratio": grid.twin_rank_ratio}}
    return {
        "twin_router": {**common, "test_correct": routed, "test": accuracies(routed), "stored_bytes": sum(stored.values()),
                        "stored_split": stored, "router": {"test_accuracy": accuracies(routed_right),
                                                           "train": {k: router_metrics[k] for k in ("best_epoch", "val_accuracy", "train_accuracy", "split")}}},
        "twin_oracle": {**common, "test_correct": oracle, "test": accuracies(oracle), "stored_bytes": stored["shared"] + stored["factors"]},
        "twin_shared_only": {**common, "test_correct": shared, "test": accuracies(shared), "stored_bytes": stored["shared"]},
    }


def _correct(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return (head(feats).argmax(-1) == labels).int().tolist()


def _in_order(tokens: Batches, parts: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat(parts)
    out = torch.empty_like(flat)
    out[torch.tensor(tokens.order)] = flat
    return out


@torch.no_grad()
def _shared_features(twin, tokens: Batches) -> torch.Tensor:
    pooled = []
    for batch in tokens.batches:
        pooled.append(mean_pool(twin.shared_forward(**batch).last_hidden_state, batch["attention_mask"]).float())
    return _in_order(tokens, pooled)


def _tag(params: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in params.items()) or "plain"
