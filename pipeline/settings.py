"""mergekit's parameter settings beyond one number: gradients and filters, evaluated per tensor.

A setting is a scalar; a gradient (a list of numbers, interpolated linearly over the layers: at a
layer's position t ∈ [0, 1] the value is (1 − f)·v[i] + f·v[i + 1], i = ⌊t·(n − 1)⌋; a list of
booleans or strings picks v[⌊t·(n − 1)⌋]); or a list of conditions ``{filter: TEXT, value: SETTING}``,
the first whose filter is a substring of the tensor's name (or is missing or ``*``) applying. A
condition that matches nothing leaves the key to the next scope (per model, then the module's in a
``modules:`` config, then the top level, then the method's default), as in mergekit. Layer i of n
has t = i / (n − 1) (1 when n = 1); a tensor outside the layers (embeddings, final norm, head) has
t = 0.
"""

from __future__ import annotations

import re
from typing import Any

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def is_setting(value: Any) -> bool:
    """A gradient, a condition or a list of conditions (anything but a single value)."""
    return isinstance(value, list) or (isinstance(value, dict) and "value" in value)


def leaves(value: Any, key: str) -> list:
    """Every single value inside a setting (to validate each as the parameter's type); errors name ``key``."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [value]
    if not value:
        raise ValueError(f"{key}: an empty list; give a number, a gradient [a, b, …] or conditions")
    found = []
    for item in value:
        if isinstance(item, dict):
            if set(item) - {"filter", "value"} or "value" not in item:
                raise ValueError(f"{key}: a condition is {{filter: PART_OF_A_TENSOR_NAME, value: …}}, got {item!r}")
            found += leaves(item["value"], key)
        elif isinstance(item, list):
            raise ValueError(f"{key}: a gradient holds single values, got the list {item!r} inside it")
        else:
            found.append(item)
    return found


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """The setting's value for ``tensor`` at layer position ``t`` (None: no condition matched)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(v, dict) for v in setting):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i = int(scaled)
        j = min(len(setting) - 1, i + 1)
        frac = scaled - i
        return (1 - frac) * setting[i] + frac * setting[j]
    for condition in setting:
        pattern = condition.get("filter") if isinstance(condition, dict) else None
        if pattern is None or pattern == "*" or pattern in tensor:
            return evaluate(condition["value"] if isinstance(condition, dict) else condition, tensor, t)
    return None


def layer_position(tensor: str, n_layers: int) -> float:
    """t of a tensor: i / (n − 1) for layer i of n (1 when n = 1), 0 outside the layers."""
    match = LAYER.search(tensor)
    if match is None:
        return 0.0
    return int(match.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def layer_count(model_config: dict, tensor_names, keys: tuple[str, ...] = LAYER_COUNT_KEYS) -> int:
    """The number of layers: the first of ``keys`` config.json has (dotted: nested, e.g.
    ``vision_config.depth``), else one more than the largest layer index of ``tensor_names`` (0: none)."""
    for key in keys:
        value = config_value(model_config, key)
        if isinstance(value, int):
            return value
    indices = [int(m.group(1)) for m in map(LAYER.search, tensor_names) if m]
    return max(indices) + 1 if indices else 0


def config_value(model_config: dict, key: str) -> Any:
    """config.json's value at a dotted key (``text_config.num_hidden_layers``), or None."""
    value: Any = model_config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def with_config_values(model_config: dict, updates: dict[str, Any]) -> dict:
    """config.json with each dotted key of ``updates`` set (its nested mappings copied, not changed)."""
    result = dict(model_config)
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        result[head] = with_config_values(result.get(head) or {}, {rest: value}) if rest else value
    return result


def falling_back(setting: Any, fallback: Any) -> Any:
    """``setting`` with ``fallback`` deciding where none of its conditions matches: one setting for
    two scopes (a module's parameters over the top-level ones, as mergekit resolves them)."""
    conditions = [setting] if isinstance(setting, dict) else setting
    if not isinstance(conditions, list) or not any(isinstance(c, dict) for c in conditions):
        return setting  # a number or a gradient always gives a value
    return [*conditions, {"value": fallback}]
