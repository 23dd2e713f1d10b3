"""mergekit's tokenizer keys: where the output's tokenizer comes from, and its chat template.

- ``tokenizer_source: base | <model>`` (or ``tokenizer: {source: …}``): the tokenizer files of that
  model are copied, not the reference model's. Merging keeps every embedding row where it is, so
  this is only right when all the merged models share that vocabulary: the plan compares their
  tokenizer files and refuses when they differ (mergekit would remap embedding rows by token;
  mergefleet does not yet). ``union`` (mergekit's default when the key is given without a source)
  is refused for the same reason, with what to write instead.
- ``chat_template``: ``auto`` takes the template most of the input models' tokenizers carry; a
  Jinja text is used as given; it is written into the output's ``tokenizer_config.json``
  (``chat_template``), where transformers reads it, and a copied ``chat_template.jinja`` is dropped
  so that it cannot override it. mergekit's named templates (``chatml``, ``llama3``, …) are its own
  bundled files: give their text instead.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from pipeline.config import ConfigError, MergeConfig
from pipeline.modules import model_names
from workers.storage import join_url, open_fs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json")


def tokenizer_source(config: MergeConfig) -> str | None:
    """The model (as the config names it) whose tokenizer the output gets, or None (the reference's)."""
    source = config.tokenizer_source
    if config.tokenizer is not None:
        if source is not None:
            raise ConfigError("tokenizer_source and tokenizer both name a tokenizer; give one (tokenizer.source)")
        source = config.tokenizer.source
    if source is None:
        return None
    if source == "union":
        raise ConfigError("tokenizer source union builds a merged vocabulary and remaps the embedding rows, which "
                          "mergefleet does not do yet; when the models share a vocabulary use tokenizer_source: base "
                          "(or a model's name), otherwise merge with mergekit")
    if source == "base":
        if not config.base_model:
            raise ConfigError("tokenizer_source: base needs base_model")
        return config.base_model
    if source not in {config.base_model, *(m.model for m in config.models), *model_names(config)}:
        raise ConfigError(f"tokenizer_source {source!r} is not one of the merged models; name base, or a model "
                          "exactly as it is listed under models: (or slices: or modules:)")
    return source


def check_shared_vocabulary(source_dir: str, model_dirs: dict[str, str], storage_options: dict) -> None:
    """Refuse a tokenizer source whose vocabulary files differ from a merged model's."""
    wanted = _vocabulary(source_dir, storage_options)
    for name, directory in model_dirs.items():
        found = _vocabulary(directory, storage_options)
        differing = sorted(f for f in set(wanted) | set(found) if found and wanted.get(f) != found.get(f))
        if differing:
            raise ConfigError(f"model {name!r} has other tokenizer files ({differing}) than the tokenizer source; "
                              "merged embedding rows would then mean other tokens. Merge models that share a "
                              "vocabulary, or leave tokenizer_source out")


def _vocabulary(directory: str, storage_options: dict) -> dict[str, str]:
    fs, root = open_fs(directory, storage_options)
    found = {}
    for name in VOCABULARY_FILES:
        path = join_url(root, name)
        if fs.exists(path):
            found[name] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    return found


def chat_template_text(config: MergeConfig, model_dirs: list[str], storage_options: dict) -> str | None:
    """The chat template to write, or None to leave the copied tokenizer's as it is."""
    template = config.chat_template
    if not template:
        return None
    if template == "auto":
        found = [t for t in (_template_of(d, storage_options) for d in model_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if "{" not in template or len(template) < 20:
        raise ConfigError(f"chat_template {template!r} is neither auto nor a Jinja template; mergekit's named "
                          "templates are its own files: give the template's text")
    return template


def _template_of(directory: str, storage_options: dict) -> str | None:
    fs, root = open_fs(directory, storage_options)
    jinja = join_url(root, "chat_template.jinja")
    if fs.exists(jinja):
        return fs.cat_file(jinja).decode().strip()
    path = join_url(root, "tokenizer_config.json")
    if not fs.exists(path):
        return None
    template = json.loads(fs.cat_file(path)).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one, as mergekit does
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) else None


def with_chat_template(tokenizer_config: bytes, template: str) -> bytes:
    """tokenizer_config.json with ``chat_template`` set."""
    data = json.loads(tokenizer_config) if tokenizer_config else {}
    data["chat_template"] = template
    return json.dumps(data, indent=2).encode()
