"""Small Llama-shaped checkpoints (a base and experts) in Hugging Face layout, for the demo and tests."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 512,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama checkpoint with this config."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def write_model(directory: Path, tensors: dict[str, torch.Tensor], config: dict, *, max_file_bytes: int | None = None) -> Path:
    """Save tensors as HF safetensors (sharded with an index when ``max_file_bytes`` is set) plus config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = list(tensors)
    if not max_file_bytes:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    groups, size = [[]], 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + nbytes > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def build_sample_models(root: Path, *, n_experts: int = 3, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        config: dict | None = None, max_file_bytes: int | None = None) -> tuple[Path, list[Path]]:
    """A random base and ``n_experts`` experts (base + sparse task vectors); returns their directories."""
    config = dict(config or LLAMA_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(config)
    base = {n: (torch.randn(s, generator=generator) * 0.02 + (1.0 if len(s) == 1 else 0.0)) for n, s in shapes.items()}
    base_dir = write_model(root / "base", {n: t.to(dtype) for n, t in base.items()}, config, max_file_bytes=max_file_bytes)
    expert_dirs = []
    for e in range(n_experts):
        expert = {}
        for n, t in base.items():
            delta = torch.randn(t.shape, generator=generator) * 0.005
            delta *= torch.rand(t.shape, generator=generator) < 0.5  # task vectors overlap partially
            expert[n] = (t + delta).to(dtype)
        expert_dirs.append(write_model(root / f"expert{e}", expert, config, max_file_bytes=max_file_bytes))
    return base_dir, expert_dirs


def ensure_sample_models(root: Path, *, n_experts: int = 3, seed: int = 0, **kwargs) -> tuple[Path, list[Path]]:
    """``build_sample_models`` into ``root`` unless they are already there (``build_once``); returns their directories."""
    names = ["base", *(f"expert{e}" for e in range(n_experts))]
    base, *experts = build_once(root, names, lambda d: build_sample_models(d, n_experts=n_experts, seed=seed, **kwargs))
    return base, experts


def build_once(root: Path, names: Sequence[str], build: Callable[[Path], object]) -> list[Path]:
    """Unless ``root`` holds the models ``names`` (subdirectories with a config.json), ``build(directory)``
    makes them there; returns their directories.

    A rerun reuses the very files (a rewrite, even of the same bytes, changes their mtime and
    inode, which a run takes as changed inputs). They appear whole or not at all: built in a
    sibling ``<root>.partial`` (removed on failure, or by the next call), then renamed into place."""
    root = Path(root)
    directories = [root / name for name in names]
    if root.exists():
        missing = [d.name for d in directories if not (d / "config.json").is_file()]
        if missing:
            raise FileExistsError(f"{root} exists but lacks the sample model(s) {missing}; delete it to rebuild them")
        return directories
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        build(partial)
        os.replace(partial, root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directories


def write_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` unless it already holds exactly that (a rerun leaves the file untouched)."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path
