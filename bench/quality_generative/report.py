"""Aggregate per-seed results (bench/quality's ``summarize`` and paired bootstrap with this
benchmark's rows) and write the Markdown table."""

from __future__ import annotations

import statistics

from bench.quality.report import _params, _pm, _stats
from bench.quality.report import summarize as _summarize
from bench.quality_generative.model import similarity


def rows_for(tasks: list[str]) -> list[tuple[str, str]]:
    return [("expert", "Fine-tuned experts (each on its own task)"),
            *[(f"expert_{t}", f"Expert `{t}` on every task") for t in tasks],
            ("base", "Pre-trained base (no fine-tuning)"),
            ("average", "Average (linear)"),
            ("task_arithmetic", "Task arithmetic"),
            ("ties_tensor", "TIES"),
            ("twin_shared_only", "Twin θ* alone (TA λ 0.29)"),
            ("twin_router", "Twin-Merging (router, no task id)"),
            ("twin_hard", "Twin, router's top-1 expert only"),
            ("twin_oracle", "Twin oracle (true task's one-hot)")]


COMPARISONS = [  # (a, b): is a better than b?
    ("task_arithmetic", "average"),
    ("ties_tensor", "task_arithmetic"),
    ("twin_router", "ties_tensor"),
    ("twin_router", "task_arithmetic"),
    ("twin_router", "twin_shared_only"),
    ("twin_router", "twin_hard"),
    ("twin_oracle", "twin_router"),
    ("expert", "twin_oracle"),
]


def summarize(seeds: list[dict]) -> dict:
    tasks = list(seeds[0]["rows"]["expert"]["test"])
    summary = _summarize(seeds, rows=rows_for(tasks), comparisons=COMPARISONS)
    for key, row in summary["rows"].items():  # mean character similarity over tasks, per seed
        per_seed = [statistics.mean(statistics.mean(similarity(s["rows"][key]["test_predictions"][t], s["answers"][t]))
                                    for t in tasks) for s in seeds if key in s["rows"]]
        row["similarity"] = _stats(per_seed)
    twin = [s["rows"]["twin_router"] for s in seeds if "twin_router" in s["rows"]]
    if twin:
        summary["twin"] = {"omitted_deltas": twin[0].get("omitted_deltas"),
                           "factor_rel_error_mean": [t.get("factor_rel_error_mean") for t in twin],
                           "stored_split": twin[0].get("stored_split")}
    return summary


def markdown(summary: dict) -> str:
    tasks = summary["tasks"]
    n = len(summary["seeds"])
    lines = [f"Exact match (%) of the greedy generation on test, mean ± std over {n} seed{'s' if n > 1 else ''} "
             f"({', '.join(map(str, summary['seeds']))}). Normalized = exact match / the task's expert's, averaged over tasks. "
             "Char sim = character similarity of the generation to the answer (difflib ratio, %), averaged over tasks: "
             "a graded view, not the metric.",
             "", "| method | " + " | ".join(tasks) + " | avg | normalized | char sim | stored MB |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for row in summary["rows"].values():
        cells = [_pm(row[t]) for t in tasks] + [_pm(row["avg"]), _pm(row["norm"]), _pm(row["similarity"]),
                                                 f"{row['stored_bytes'] / 1e6:.2f}"]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if "router_accuracy" in summary:
        r = summary["router_accuracy"]
        lines += ["", "Twin router accuracy on test (top weight on the true task's expert): "
                  + ", ".join(f"{t} {_pm(r[t])}" for t in tasks) + f"; average {_pm(r['avg'])}."]
    if "twin" in summary:
        t = summary["twin"]
        omitted = t.get("omitted_deltas") or {}
        lines += ["", "Twin factors: mean relative error ‖v − BA‖/‖v‖ over factored tensors "
                  + ", ".join(f"{e:.3f}" for e in t["factor_rel_error_mean"] if e is not None)
                  + " (per seed); deltas twin inference left out: "
                  + (", ".join(f"{k} {v}" for k, v in omitted.items()) or "none") + "."]
    picked = {k: row["picked"] for k, row in summary["rows"].items() if k.startswith(("task", "ties")) and any(row["picked"])}
    if picked:
        lines += ["", "Picked on validation (per seed): " + "; ".join(
            f"{k} {', '.join(_params(p) for p in v)}" for k, v in picked.items())]
    if summary["comparisons"]:
        lines += ["", "Paired bootstrap over test prompts (all seeds; points of average exact match, 95 % interval):", ""]
        for c in summary["comparisons"]:
            lines.append(f"- {c['a']} − {c['b']}: {100 * c['diff']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] → {c['verdict']}")
    return "\n".join(lines) + "\n"
