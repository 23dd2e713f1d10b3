"""Merging the generative experts through mergefleet's pipeline and scoring them by exact match.

The plain merges reuse bench/quality's loop (``run_merges``: every candidate through
``pipeline.coordinator.run_merge`` on the embedded Ray, λ and density picked on the mean validation
exact match, only the pick scored on test) with this benchmark's base, loader and scorer. The grids
(``GRID``) contain no plain averaging except the ``linear`` row itself.

Twin-Merging: a ``merge_method: twin`` run (shared θ* = task arithmetic λ 0.29, the paper's and
mergefleet's default; rank 0.1 · min(m, n) factors of every θ_t − θ*), its router trained by
``train_twin_router`` on the experts' training prompts only (checkpoint picked on a held-out fifth of
them), then ``TwinModel.generate`` — the router runs once per prompt and its weights stay fixed
while decoding; no task identity is given. Beside it: the router's top-1 expert only (``hard``), the
oracle (the true task's one-hot weights) and θ* alone (``shared/`` loaded as a plain Llama).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from bench.quality.merges import Grid, accuracies, run_merges, twin_merge
from bench.quality_generative import model as M
from bench.quality_generative.data import TaskData

LOG = logging.getLogger(__name__)

GRID = Grid(ta_lambdas=(0.3, 0.5, 0.7, 1.0), ties_lambdas=(0.6, 1.0, 1.4), ties_densities=(0.2, 0.5),
            twin_rank_ratio=0.1, router_epochs=20)
QUICK_GRID = Grid(ta_lambdas=(0.5,), ties_lambdas=(1.0,), ties_densities=(0.5,), twin_rank_ratio=0.1, router_epochs=10)
PLAIN_ROWS = ("average", "task_arithmetic", "ties_tensor")  # TIES with mergefleet's default per-tensor trim


class Scorer:
    """Each task's val and test prompts and answers: per-example exact match of any model's greedy
    generation (``correct(model, split)``). Every call's predictions and mean character similarity
    (over tasks; ``model.similarity``) are kept in ``calls``."""

    def __init__(self, tokenizer, tasks: dict[str, TaskData], *, max_new_tokens: int = 40) -> None:
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.data = {(t, s): (tasks[t].prompts(s), tasks[t].answers(s)) for t in tasks for s in ("val", "test")}
        self.max_new_tokens = max_new_tokens
        self.calls: list[dict] = []

    def predictions(self, model, task: str, split: str, on_batch=None) -> list[str]:
        return M.generate(model, self.tokenizer, self.data[(task, split)][0], max_new_tokens=self.max_new_tokens,
                          on_batch=on_batch)

    def score(self, predictions: list[str], task: str, split: str) -> list[int]:
        return M.correct(predictions, self.data[(task, split)][1])

    def correct(self, model, split: str) -> dict[str, list[int]]:
        out, predicted = {}, {}
        for task in self.tasks:
            predicted[task] = self.predictions(model, task, split)
            out[task] = self.score(predicted[task], task, split)
        sims = [sum(M.similarity(predicted[t], self.data[(t, split)][1])) / len(predicted[t]) for t in self.tasks]
        self.calls.append({"split": split, "predictions": predicted, "similarity": sum(sims) / len(sims)})
        return out


def plain_merges(experts: dict[str, Path], scorer: Scorer, work: Path, grid: Grid, base: Path,
                 only: tuple[str, ...] = PLAIN_ROWS) -> dict[str, dict]:
    """Average, task arithmetic and TIES through the pipeline, picked on the mean validation exact
    match (ties, e.g. all at 0, broken by the mean character similarity), scored on test; each row
    also gets its test generations (``test_predictions``)."""
    first_call = len(scorer.calls)
    rows = run_merges(experts, scorer, work, grid, only=only, base=base, load=M.load_model,
                      tiebreak=lambda: scorer.calls[-1]["similarity"])
    tests = [c for c in scorer.calls[first_call:] if c["split"] == "test"]
    for entry, call in zip(rows.values(), tests, strict=True):  # run_merges scores the picks on test, in row order
        entry["test_predictions"] = call["predictions"]
    return rows


def run_twin(experts: dict[str, Path], tasks: dict[str, TaskData], scorer: Scorer, work: Path, grid: Grid, seed: int,
             base: Path) -> dict[str, dict]:
    """Twin-Merging through the pipeline (module docstring): router, hard, oracle and θ*-only rows."""
    from twin.load import load_tokenizer, load_twin
    from twin.train import train_twin_router

    output, manifest, wall = twin_merge(experts, work, grid, base)
    data = work / "router_train.jsonl"
    data.write_text("".join(json.dumps({"text": prompt, "task": name}, ensure_ascii=False) + "\n"
                            for name in tasks for prompt in tasks[name].prompts("train")), encoding="utf-8")
    t0 = time.perf_counter()
    router_metrics = train_twin_router(str(output), str(data), epochs=grid.router_epochs, seed=seed,
                                       val_fraction=0.2, test_fraction=0.0)
    router_s = round(time.perf_counter() - t0, 1)
    twin = load_twin(str(output), router=True)
    tokenizer = load_tokenizer(str(output))
    tokenizer.padding_side = "left"
    task_index = {name: i for i, name in enumerate(twin.experts)}

    rows = {key: {} for key in ("twin_router", "twin_hard", "twin_oracle")}
    predictions = {key: {} for key in rows}
    routed_right, mean_weight, misrouted = {}, {}, []
    for task in scorer.tasks:
        prompts, answers = scorer.data[(task, "test")]
        weights = torch.zeros(len(prompts), len(twin.experts))

        def keep(indices: list[int], weights: torch.Tensor = weights) -> None:
            weights[torch.tensor(indices)] = twin.last_weights.detach().float().cpu().reshape(len(indices), -1)

        for key, mode in (("twin_router", "router"), ("twin_hard", "hard")):
            twin.set_mode(mode)
            predicted = M.generate(twin, tokenizer, prompts, max_new_tokens=scorer.max_new_tokens,
                                   on_batch=keep if mode == "router" else None)
            rows[key][task] = M.correct(predicted, answers)
            predictions[key][task] = predicted
            if mode == "router":
                routed_right[task] = (weights.argmax(-1) == task_index[task]).int().tolist()
                misrouted += [{"prompt": prompts[i], "task": task, "top": twin.experts[int(weights[i].argmax())],
                               "weight": round(float(weights[i].max()), 3)}
                              for i, right in enumerate(routed_right[task]) if not right]
                mean_weight[task] = [round(float(w), 4) for w in weights.mean(0)]
        twin.set_weights([1.0 if i == task_index[task] else 0.0 for i in range(len(twin.experts))])
        predicted = M.generate(twin, tokenizer, prompts, max_new_tokens=scorer.max_new_tokens)
        rows["twin_oracle"][task] = M.correct(predicted, answers)
        predictions["twin_oracle"][task] = predicted
    shared_correct = scorer.correct(M.load_model(output / "shared"), "test")

    stored = {"shared": M.dir_bytes(output / "shared"),
              "factors": sum(M.dir_bytes(output / "experts" / n, "factors*.safetensors") for n in experts),
              "router": M.dir_bytes(output / "router")}
    rel_errors = [t["rel_error"] for e in manifest.extra["twin"]["experts"] for t in e["tensors"].values()
                  if t.get("kind") == "factors" and t.get("rel_error") is not None]
    common = {"output": str(output), "wall_s": wall, "router_s": router_s,
              "parameters": {"shared": "task_arithmetic λ=0.29", "rank_ratio": grid.twin_rank_ratio},
              "omitted_deltas": {e: len(v) for e, v in getattr(twin, "omitted_deltas", {}).items()},
              "factor_rel_error_mean": round(sum(rel_errors) / len(rel_errors), 4) if rel_errors else None}
    router_info = {"test_accuracy": accuracies(routed_right), "mean_weights": mean_weight, "experts": list(twin.experts),
                   "misrouted": misrouted,
                   "train": {k: router_metrics.get(k) for k in ("best_epoch", "val_accuracy", "train_accuracy", "split")}}
    out = {
        "twin_router": {**common, "stored_bytes": sum(stored.values()), "stored_split": stored, "router": router_info},
        "twin_hard": {**common, "stored_bytes": sum(stored.values())},
        "twin_oracle": {**common, "stored_bytes": stored["shared"] + stored["factors"]},
        "twin_shared_only": {**common, "stored_bytes": stored["shared"], "test_correct": shared_correct,
                             "test_predictions": scorer.calls[-1]["predictions"]},
    }
    for key, correct in rows.items():
        out[key].update(test_correct=correct, test_predictions=predictions[key])
    for entry in out.values():
        entry["test"] = accuracies(entry["test_correct"])
    return out
