"""`mergefleet report OUTPUT`: a run's merge diagnostics and timings as one self-contained HTML page
(plots embedded as base64 PNG, no network), or as JSON. It reads only the manifest (manifest.json
and manifest.parquet, through fsspec: local or s3://); docs/diagnostics.md defines what it shows.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections import defaultdict

from manifests.reader import read_manifest, read_tensor_table
from workers.diagnostics import ratio

MODULE_KINDS = ("q", "k", "v", "qkv", "o", "mlp", "embeddings", "norms", "other")
_KIND_PATTERNS = [  # first match wins, on the tensor name after its layer index (embeddings: the whole name)
    ("norms", r"norm|(^|\.)ln_?\w*\."),
    ("embeddings", r"embed|(^|\.)(wte|wpe|lm_head)\."),
    ("qkv", r"qkv|c_attn|query_key_value|w_pack"),
    ("q", r"(^|\.)(q_proj|query|wq)\."),
    ("k", r"(^|\.)(k_proj|key|wk)\."),
    ("v", r"(^|\.)(v_proj|value|wv)\."),
    ("mlp", r"mlp|ffn|feed_forward|gate_proj|up_proj|down_proj|(^|\.)fc\d|c_fc|intermediate|(^|\.)w[123]\.|experts?\."),
    ("o", r"(^|\.)(o_proj|out_proj|wo)\.|attn\.c_proj|attention\.output\.dense"),
]
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def module_of(name: str) -> tuple[int | None, str]:
    """(layer index or None, module kind) parsed from a tensor name, e.g.
    model.layers.3.self_attn.q_proj.weight -> (3, "q")."""
    match = _LAYER.search(name)
    rest = name[match.end():] if match else name
    for kind, pattern in _KIND_PATTERNS:
        if re.search(pattern, rest if kind != "embeddings" else name):
            return (int(match.group(1)) if match else None), kind
    return (int(match.group(1)) if match else None), "other"


def _groups(rows: list[dict]) -> list[dict]:
    """The task-vector rows summed per (layer, module kind): exact counts, fractions from them."""
    by_group: dict = defaultdict(list)
    for row in rows:
        if row.get("kept") is not None:
            by_group[module_of(row["name"])].append(row)
    groups = []
    for (layer, kind), members in sorted(by_group.items(), key=lambda g: (g[0][0] is None, g[0][0] or 0,
                                                                            MODULE_KINDS.index(g[0][1]))):
        n = len(members[0]["kept"])
        if any(len(r["kept"]) != n for r in members):
            continue
        elements = sum(r["elements"] for r in members)
        kept = [sum(r["kept"][t] for r in members) for t in range(n)]
        elected = [r for r in members if r["sign_conflicts"] is not None]
        norms = [math.sqrt(math.fsum(r["tau_norm"][t] ** 2 for r in members)) for t in range(n)]
        merged = math.sqrt(math.fsum(r["merged_norm"] ** 2 for r in members))
        groups.append({
            "layer": layer, "module": kind, "tensors": len(members), "elements": elements, "kept": kept,
            "kept_fraction": ratio(sum(kept), n * elements),
            "kept_fraction_per_expert": [ratio(k, elements) for k in kept],
            "sign_conflict_rate": (ratio(sum(sum(r["sign_conflicts"]) for r in elected),
                                          sum(sum(r["kept"]) for r in elected)) if elected else None),
            "none_kept_fraction": ratio(sum(r["none_kept"] for r in members), elements),
            "norm_ratio": ratio(merged, sum(norms) / n) if n else None,
        })
    return groups


def _twin(twin: dict | None) -> dict | None:
    """The twin records of manifest.json (per expert and tensor: rank, error, bytes) as a table,
    with the energy kept (1 − rel_error²: the factors are an orthogonal projection of v)."""
    if not twin:
        return None
    tensors = []
    for expert in twin["experts"]:
        for name, rec in sorted(expert["tensors"].items()):
            layer, kind = module_of(name)
            error = rec["rel_error"]
            tensors.append({"expert": expert["name"], "tensor": name, "layer": layer, "module": kind,
                            "kind": rec["kind"], "rank": rec["rank"], "rel_error": error,
                            "energy": 1.0 - error * error if rec["kind"] == "factors" else 1.0,
                            "stored_bytes": rec["stored_bytes"], "dense_bytes": rec["dense_bytes"]})
    experts = [{k: e.get(k) for k in ("name", "factor_bytes", "dense_bytes", "storage_ratio", "checkpoint_bytes")}
               for e in twin["experts"]]
    return {"factor_bytes": twin.get("factor_bytes"), "dense_bytes": twin.get("dense_bytes"),
            "storage_ratio": twin.get("storage_ratio"), "experts": experts, "tensors": tensors}


def report_summary(output_url: str, *, storage_options: dict | None = None) -> dict:
    """What the report shows, as JSON-able data, from the run's manifest alone."""
    manifest = read_manifest(output_url, storage_options=storage_options)
    table, _ = read_tensor_table(output_url, manifest, storage_options=storage_options)
    rows = table.to_pylist()
    angles = [{"tensor": r["name"], "layer": module_of(r["name"])[0], "angle": r["slerp_angle"]}
              for r in rows if r.get("slerp_angle") is not None]
    trim = manifest.extra.get("global_trim")
    return {
        "output": output_url, "run_id": manifest.run_id, "created": manifest.created,
        "mergefleet_version": manifest.mergefleet_version, "method": manifest.method.get("method"),
        "tensors": manifest.n_tensors, "output_bytes": manifest.output_bytes, "bytes_read": manifest.bytes_read,
        "diagnostics": manifest.extra.get("diagnostics"),
        "groups": _groups(rows),
        "global_trim": trim["experts"] if trim else None,
        "slerp_angles": angles or None,
        "twin": _twin(manifest.extra.get("twin")),
        "wall_clock": manifest.timings.get("wall_clock"),
        "shards": manifest.timings.get("shards", []),
    }


# --- plots ------------------------------------------------------------------------------------------

def _short(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _layer_heatmap(groups: list[dict], key: str, title: str, label: str):
    """A module kind × layer heatmap of one group value ("—": tensors outside the layers)."""
    from matplotlib.figure import Figure

    kinds = [k for k in MODULE_KINDS if any(g["module"] == k for g in groups)]
    layers = sorted({g["layer"] for g in groups if g["layer"] is not None})
    columns = layers + ([None] if any(g["layer"] is None for g in groups) else [])
    values = [[math.nan] * len(columns) for _ in kinds]
    for g in groups:
        if g[key] is not None:
            values[kinds.index(g["module"])][columns.index(g["layer"])] = g[key]
    figure = Figure(figsize=(max(5.0, 0.45 * len(columns) + 2.5), 0.45 * len(kinds) + 1.6))
    axes = figure.subplots()
    image = axes.imshow(values, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(columns)), [str(c) if c is not None else "—" for c in columns])
    axes.set_yticks(range(len(kinds)), kinds)
    axes.set_xlabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=label)
    return figure


def _cosine(diagnostics: dict):
    from matplotlib.figure import Figure

    cosine = [[math.nan if c is None else c for c in row] for row in diagnostics["cosine"]]
    names = [_short(e) for e in diagnostics.get("experts") or []] or [f"expert {t}" for t in range(len(cosine))]
    figure = Figure(figsize=(1.1 * len(names) + 2.5, 1.0 * len(names) + 1.5))
    axes = figure.subplots()
    image = axes.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_yticks(range(len(names)), names)
    for a, row in enumerate(cosine):
        for b, value in enumerate(row):
            axes.text(b, a, f"{value:.3f}", ha="center", va="center", fontsize=8,
                      color="white" if abs(value) > 0.5 else "black")
    axes.set_title("cosine of the experts' task vectors (whole model)")
    figure.colorbar(image, ax=axes)
    return figure


def _thresholds(experts: list[dict]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.2 * len(experts) + 3, 3.2))
    axes = figure.subplots()
    names = [_short(e["expert"]) for e in experts]
    bars = axes.bar(names, [e["threshold"] for e in experts], color="tab:blue")
    for bar, e in zip(bars, experts):
        axes.annotate(f"kept {e['kept'] / e['d']:.1%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    axes.set_ylabel("|τ| threshold")
    axes.set_title("global trim: one threshold per expert over the whole model")
    return figure


def _twin_per_layer(twin: dict, key: str, title: str, label: str):
    """Per expert, the mean of a factorized tensors' value per layer."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.5, 3.2))
    axes = figure.subplots()
    for expert in [e["name"] for e in twin["experts"]]:
        per_layer: dict = defaultdict(list)
        for t in twin["tensors"]:
            if t["expert"] == expert and t["kind"] == "factors" and t["layer"] is not None:
                per_layer[t["layer"]].append(t[key])
        layers = sorted(per_layer)
        axes.plot(layers, [sum(per_layer[la]) / len(per_layer[la]) for la in layers], marker="o", label=expert)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("layer")
    axes.set_ylabel(label)
    axes.set_title(title)
    axes.legend(fontsize=8)
    return figure


def _twin_storage(twin: dict):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.3 * len(twin["experts"]) + 3, 3.2))
    axes = figure.subplots()
    names = [e["name"] for e in twin["experts"]]
    x = range(len(names))
    axes.bar([i - 0.2 for i in x], [e["dense_bytes"] / 1e6 for e in twin["experts"]], 0.4, label="dense v_t")
    axes.bar([i + 0.2 for i in x], [e["factor_bytes"] / 1e6 for e in twin["experts"]], 0.4, label="stored (factors)")
    axes.set_xticks(list(x), names)
    axes.set_ylabel("MB")
    axes.set_title(f"Twin storage against dense (ratio {twin['storage_ratio']:.3f})" if twin["storage_ratio"]
                   else "Twin storage against dense")
    axes.legend(fontsize=8)
    return figure


def _timeline(shards: list[dict], wall_clock: dict | None):
    """A bar per shard task from its start to its end (the mark: its first tensor written)."""
    from matplotlib.figure import Figure

    timed = [s for s in shards if s.get("started_at")]
    origin = (wall_clock or {}).get("started") or min(s["started_at"] for s in timed)
    figure = Figure(figsize=(7.0, 0.28 * len(timed) + 1.5))
    axes = figure.subplots()
    for s in timed:
        axes.broken_barh([(s["started_at"] - origin, s["finished_at"] - s["started_at"])], (s["index"] - 0.4, 0.8),
                         color="tab:green")
        if s.get("first_tensor_at"):
            axes.plot([s["first_tensor_at"] - origin] * 2, [s["index"] - 0.4, s["index"] + 0.4], color="black")
    if wall_clock and wall_clock.get("ray_ready"):
        axes.axvline(wall_clock["ray_ready"] - origin, color="grey", linestyle="--", label="Ray ready")
        axes.legend(fontsize=8)
    axes.set_xlabel("seconds since the run started")
    axes.set_ylabel("shard")
    axes.invert_yaxis()
    axes.set_title("shard tasks (bar: start to end; tick: first tensor written)")
    return figure


def _memory(shards: list[dict]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(5.0, 0.4 * len(shards) + 2.5), 3.2))
    axes = figure.subplots()
    index = [s["index"] for s in shards]
    axes.bar([i - 0.2 for i in index], [s["planned_bytes"] / 1e9 for s in shards], 0.4, label="planned")
    axes.bar([i + 0.2 for i in index], [(s.get("peak_rss_anon") or 0) / 1e9 for s in shards], 0.4, label="peak RssAnon")
    axes.plot(index, [(s.get("start_rss_anon") or 0) / 1e9 for s in shards], "k_", markersize=12,
              label="RssAnon at the start")
    axes.set_xticks(index)
    axes.set_xlabel("shard")
    axes.set_ylabel("GB")
    axes.set_title("peak memory of each task against its plan")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def _angles(angles: list[dict]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.0))
    axes = figure.subplots()
    axes.hist([math.degrees(a["angle"]) for a in angles], bins=30, color="tab:purple")
    axes.set_xlabel("angle between the two models, degrees")
    axes.set_ylabel("tensors")
    axes.set_title("slerp: the angle per tensor")
    return figure


def figures(summary: dict) -> list[tuple[str, str, bytes]]:
    """(id, caption, PNG) of every plot the summary has data for."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("the report's plots need matplotlib: pip install 'mergefleet[report]' "
                           "(--json needs nothing more)") from None
    made = []
    groups, twin, diagnostics = summary["groups"], summary["twin"], summary["diagnostics"] or {}
    if any(g["sign_conflict_rate"] is not None for g in groups):
        made.append(("sign-conflict-rate", "kept values against the elected sign, per layer and module",
                     _layer_heatmap(groups, "sign_conflict_rate", "sign-conflict rate among kept values", "rate")))
    if groups:
        made.append(("kept-fraction", "fraction of τ the trim keeps (mean over experts), per layer and module",
                     _layer_heatmap(groups, "kept_fraction", "kept fraction", "fraction")))
        made.append(("norm-ratio", "‖τ_m‖ / mean ‖τ_t‖ (τ_m = θ − θ₀ as written), per layer and module",
                     _layer_heatmap(groups, "norm_ratio", "‖τ_m‖ / mean ‖τ_t‖", "ratio")))
    if diagnostics.get("cosine") and len(diagnostics["cosine"]) > 1:
        made.append(("expert-cosine", "expert × expert cosine of the task vectors", _cosine(diagnostics)))
    if summary["global_trim"]:
        made.append(("global-trim-thresholds", "global-trim threshold per expert", _thresholds(summary["global_trim"])))
    if summary["slerp_angles"]:
        made.append(("slerp-angle", "slerp's angle per tensor", _angles(summary["slerp_angles"])))
    if twin and any(t["kind"] == "factors" and t["layer"] is not None for t in twin["tensors"]):
        made.append(("twin-error", "Twin: relative error ‖v − BA‖ / ‖v‖ per layer and expert",
                     _twin_per_layer(twin, "rel_error", "Twin: relative error of the factors", "‖v − BA‖ / ‖v‖")))
        made.append(("twin-energy", "Twin: energy kept per layer and expert",
                     _twin_per_layer(twin, "energy", "Twin: energy kept (1 − error²)", "energy kept")))
    if twin and twin["dense_bytes"]:
        made.append(("twin-storage", "Twin: stored bytes against dense", _twin_storage(twin)))
    if any(s.get("started_at") for s in summary["shards"]):
        made.append(("shard-timeline", "shard tasks over time", _timeline(summary["shards"], summary["wall_clock"])))
    if summary["shards"]:
        made.append(("shard-memory", "peak memory against planned, per shard", _memory(summary["shards"])))
    return [(name, caption, _png(figure)) for name, caption, figure in made]


# --- the page ---------------------------------------------------------------------------------------

def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("—" if value is None else str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _experts_table(diagnostics: dict) -> str:
    n = len(diagnostics["kept"])
    names = diagnostics.get("experts") or [f"expert {t}" for t in range(n)]
    conflicts = diagnostics.get("sign_conflicts")
    return _table(["expert", "‖τ_t‖", "kept", "kept fraction", "sign conflicts"],
                  [[names[t], diagnostics["tau_norm"][t], diagnostics["kept"][t], diagnostics["kept_fraction"][t],
                    conflicts[t] if conflicts else None] for t in range(n)])


def render_html(summary: dict, plots: list[tuple[str, str, bytes]]) -> str:
    """The self-contained page: the run, the model-wide diagnostics, every plot inline."""
    diagnostics = summary["diagnostics"] or {}
    run = _table(["output", "method", "run id", "created", "tensors", "output GB", "read GB"],
                 [[summary["output"], summary["method"], summary["run_id"], summary["created"], summary["tensors"],
                   summary["output_bytes"] / 1e9, summary["bytes_read"] / 1e9]])
    parts = [f"<h1>mergefleet report: {html.escape(summary['output'])}</h1>", run]
    if "kept" in diagnostics:
        parts += ["<h2>Task vectors, whole model</h2>",
                  _table(["tensors", "elements", "sign-conflict rate", "none kept", "‖τ_m‖ / mean ‖τ_t‖"],
                         [[diagnostics["task_vector_tensors"], diagnostics["elements"],
                           diagnostics["sign_conflict_rate"], diagnostics["none_kept_fraction"],
                           diagnostics["norm_ratio"]]]),
                  _experts_table(diagnostics)]
    elif not summary["twin"]:
        parts.append("<p>No task-vector diagnostics in this manifest (a method without them, or "
                     "<code>diagnostics: false</code>).</p>")
    if summary["twin"]:
        twin = summary["twin"]
        parts += ["<h2>Twin experts</h2>",
                  _table(["expert", "stored bytes", "dense bytes", "storage ratio", "checkpoint bytes"],
                         [[e["name"], e["factor_bytes"], e["dense_bytes"], e["storage_ratio"], e["checkpoint_bytes"]]
                          for e in twin["experts"]])]
    for name, caption, png in plots:
        data = base64.b64encode(png).decode()
        parts.append(f'<figure id="{name}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}figure{margin:2em 0}"
             "img{max-width:100%}figcaption{color:#555;font-size:90%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>mergefleet report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")

