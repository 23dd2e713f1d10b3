"""Aggregate per-seed results: mean ± std over seeds, normalized accuracy, paired bootstrap, Markdown."""

from __future__ import annotations

import statistics

import numpy as np

ROWS = [  # (key, label)
    ("expert", "Fine-tuned experts (one encoder per task)"),
    ("probe", "Linear probe on the frozen base"),
    ("base_heads", "Base encoder + expert heads (no-merge floor)"),
    ("average", "Average (linear)"),
    ("task_arithmetic", "Task arithmetic"),
    ("ties_tensor", "TIES, per-tensor trim"),
    ("ties_global", "TIES, global trim"),
    ("twin_shared_only", "Twin shared θ* alone (TA λ 0.29)"),
    ("twin_router", "Twin-Merging (router, no task id)"),
    ("twin_oracle", "Twin oracle (true task's factors)"),
]
COMPARISONS = [  # (a, b): is a better than b?
    ("task_arithmetic", "average"),
    ("ties_tensor", "task_arithmetic"),
    ("ties_global", "task_arithmetic"),
    ("ties_global", "ties_tensor"),
    ("twin_router", "ties_tensor"),
    ("twin_router", "ties_global"),
    ("twin_router", "twin_shared_only"),
    ("expert", "twin_router"),
]


def summarize(seeds: list[dict], rows: list[tuple[str, str]] = ROWS,
              comparisons: list[tuple[str, str]] = COMPARISONS) -> dict:
    """Per row: per-task and average accuracy and normalized accuracy, mean and std over seeds.
    ``rows`` (key, label) and ``comparisons`` (a, b) default to this benchmark's."""
    tasks = list(seeds[0]["rows"]["expert"]["test"])
    summary = {"tasks": tasks, "seeds": [s["seed"] for s in seeds], "rows": {}}
    for key, label in rows:
        present = [s for s in seeds if key in s["rows"]]
        if not present:
            continue
        per_seed = []
        for s in present:
            acc = s["rows"][key]["test"]
            expert = s["rows"]["expert"]["test"]
            per_seed.append({**{t: acc[t] for t in tasks}, "avg": _mean(acc[t] for t in tasks),
                             "norm": _mean(acc[t] / expert[t] for t in tasks if expert[t] > 0)})
        row = {"label": label, "n_seeds": len(per_seed),
               **{col: _stats([p[col] for p in per_seed]) for col in [*tasks, "avg", "norm"]},
               "stored_bytes": statistics.mean(s["rows"][key]["stored_bytes"] for s in present),
               "picked": [s["rows"][key].get("parameters") for s in present]}
        summary["rows"][key] = row
    routers = [s["rows"]["twin_router"]["router"]["test_accuracy"] for s in seeds if "twin_router" in s["rows"]]
    if routers:
        summary["router_accuracy"] = {t: _stats([r[t] for r in routers]) for t in tasks}
        summary["router_accuracy"]["avg"] = _stats([_mean(r[t] for t in tasks) for r in routers])
    summary["comparisons"] = [c for c in (paired_bootstrap(seeds, a, b) for a, b in comparisons) if c]
    return summary


def paired_bootstrap(seeds: list[dict], a: str, b: str, *, resamples: int = 2000, seed: int = 0) -> dict | None:
    """Difference a − b of the average test accuracy (mean over seeds of the mean over tasks), with a
    95 % interval from resampling test examples within each (seed, task), both methods together."""
    pairs = [(s["rows"][a]["test_correct"], s["rows"][b]["test_correct"]) for s in seeds if a in s["rows"] and b in s["rows"]]
    if not pairs:
        return None
    rng = np.random.default_rng(seed)
    diffs = np.zeros(resamples)
    point = 0.0
    for ca, cb in pairs:
        for task in ca:
            x, y = np.asarray(ca[task], float), np.asarray(cb[task], float)
            d = x - y
            point += d.mean()
            idx = rng.integers(0, len(d), size=(resamples, len(d)))
            diffs += d[idx].mean(axis=1)
    n = len(pairs) * len(pairs[0][0])
    point, diffs = point / n, diffs / n
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"a": a, "b": b, "diff": float(point), "ci95": [float(low), float(high)],
            "verdict": "a > b" if low > 0 else "a < b" if high < 0 else "not separable"}


def markdown(summary: dict) -> str:
    tasks = summary["tasks"]
    n = len(summary["seeds"])
    lines = [f"Test accuracy (%), mean ± std over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, summary['seeds']))}); "
             "every encoder is scored on each task with **that task's own expert head** (heads are per task and never merged). "
             "Normalized = accuracy / the task's expert accuracy, averaged over tasks.", "",
             "| method | " + " | ".join(tasks) + " | avg | normalized | stored MB |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for key, row in summary["rows"].items():
        cells = [_pm(row[t]) for t in tasks] + [_pm(row["avg"]), _pm(row["norm"]), f"{row['stored_bytes'] / 1e6:.1f}"]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if "router_accuracy" in summary:
        r = summary["router_accuracy"]
        lines += ["", "Twin router accuracy on test (picks the true task's expert): "
                  + ", ".join(f"{t} {_pm(r[t])}" for t in tasks) + f"; average {_pm(r['avg'])}."]
    picked = {k: row["picked"] for k, row in summary["rows"].items() if any(row["picked"])}
    if picked:
        lines += ["", "Picked on validation (per seed): " + "; ".join(
            f"{k} {', '.join(_params(p) for p in v)}" for k, v in picked.items() if k.startswith(("task", "ties")))]
    if summary["comparisons"]:
        lines += ["", "Paired bootstrap over test sentences (all seeds; points of average accuracy, 95 % interval):", ""]
        for c in summary["comparisons"]:
            lines.append(f"- {c['a']} − {c['b']}: {100 * c['diff']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] → {c['verdict']}")
    return "\n".join(lines) + "\n"


def _params(p) -> str:
    if not isinstance(p, dict):
        return str(p)
    short = {"lambda": "λ", "density": "d", "trim_scope": None}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in p.items() if short.get(k, k))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")  # nan: e.g. no expert scored above 0


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def _pm(stat: dict) -> str:
    if len(stat["values"]) < 2:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
