"""Config parsing: mergekit's YAML forms, docs/algorithms.md defaults, and errors that name the key."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config, parse_bytes, resolve_method

MERGEKIT_TIES = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: 0.7
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: 0.3
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
  lambda: 0.9
  weight: 0.5
dtype: float16
"""


def _ties(**extra):
    cfg = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
    cfg.update(extra)
    return cfg


def test_mergekit_ties_config_parses(tmp_path):
    path = tmp_path / "ties.yml"
    path.write_text(MERGEKIT_TIES)
    for source in (path, str(path)):
        config = load_config(source)
        method = resolve_method(config)
        assert method.method == "ties"
        assert method.weights == (1.0, 0.3, 0.5)  # per-model weights, the global weight as the fallback
        assert method.densities == (0.7, 0.5, 0.33)
        assert method.lam == 0.9
        assert method.normalize is True
        assert config.parameters.int8_mask is True
        assert config.output_dtype == "F16"
        assert config.base_model == "TheBloke/Llama-2-13B-fp16"
        assert method.trim_scope == "tensor" and method.zero_sign == "positive" and method.sign_method == "sum"


def test_short_yaml_text_parses():
    config = load_config("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    assert resolve_method(config).weights == (1.0, 1.0)


def test_long_yaml_text_parses():
    text = "# " + "A merge of three experts fine-tuned from one base model. " * 6 + "\n" + MERGEKIT_TIES
    config = load_config(text)
    assert config.merge_method == "ties"


def test_defaults_resolved():
    ties = resolve_method(load_config(_ties()))
    assert ties.normalize is True and ties.lam == 1.0 and ties.densities == (1.0, 1.0) and ties.weights == (1.0, 1.0)  # mergekit
    assert ties.trim_scope == "tensor" and ties.zero_sign == "positive" and ties.sign_method == "sum"
    ta = resolve_method(load_config({**_ties(), "merge_method": "task_arithmetic"}))
    assert ta.normalize is False and ta.lam == 1.0 and ta.densities == (1.0, 1.0)
    lin = resolve_method(load_config({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}))
    assert lin.normalize is True and lin.weights == (1.0, 1.0)
    glob = resolve_method(load_config(_ties(parameters={"trim_scope": "global"})))
    assert glob.zero_sign == "majority"
    explicit = resolve_method(load_config(_ties(parameters={"trim_scope": "global", "zero_sign": "positive"})))
    assert explicit.zero_sign == "positive"
    normalized_ta = resolve_method(load_config({**_ties(), "merge_method": "task_arithmetic", "parameters": {"normalize": True}}))
    assert normalized_ta.normalize is True


def test_density_precedence_and_lambda_spellings():
    cfg = _ties(models=[{"model": "a", "parameters": {"density": 0.9}}, {"model": "b"}], parameters={"density": 0.4})
    assert resolve_method(load_config(cfg)).densities == (0.9, 0.4)
    assert resolve_method(load_config(_ties(parameters={"lambda": 0.35}))).lam == 0.35
    assert resolve_method(load_config(_ties(parameters={"lam": 0.35}))).lam == 0.35


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    return str(info.value)


@pytest.mark.parametrize("cfg, key", [
    (_ties(tokenizer_sauce="base"), "'tokenizer_sauce'"),
    (_ties(parameters={"densty": 0.3}), "'parameters.densty'"),
    (_ties(models=[{"model": "a", "parameters": {"wieght": 1}}]), "'models.0.parameters.wieght'"),
    (_ties(models=[{"model": "a", "revision": "main"}]), "'models.0.revision'"),
])
def test_unknown_keys_named(cfg, key):
    message = _error(cfg)
    assert "unknown key" in message and key in message


@pytest.mark.parametrize("params", [
    {"density": [1, 0.7, 0.1]},
    {"weight": [0, 0.3, 0.7, 1]},
    {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
])
def test_gradient_parameters_are_kept_as_given(params):
    """mergekit's gradients and filters (tests/test_parameter_settings.py evaluates them per tensor)."""
    per_model = load_config(_ties(models=[{"model": "a", "parameters": params}]))
    assert per_model.record()["models"][0]["parameters"] == params
    top = load_config(_ties(parameters=params))
    assert top.record()["parameters"][next(iter(params))] == next(iter(params.values()))


@pytest.mark.parametrize("params, key", [
    ({"density": [1, 1.7]}, "models.0.parameters.density"),  # every value inside is validated
    ({"density": [[0.1, 0.2]]}, "models.0.parameters.density"),
    ({"weight": [{"filtr": "mlp", "value": 0.5}]}, "models.0.parameters.weight"),
    ({"density": []}, "models.0.parameters.density"),
])
def test_bad_gradient_parameters_name_the_key(params, key):
    assert key in _error(_ties(models=[{"model": "a", "parameters": params}]))


def test_linear_base_model_not_among_models_errors():
    message = _error({"merge_method": "linear", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]})
    assert "'base'" in message and "base_model" in message
    ok = load_config({"merge_method": "linear", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]})
    assert [m.model for m in ok.models] == ["a", "b"] and ok.base_model == "a"


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_missing_base_errors(method):
    message = _error({"merge_method": method, "models": [{"model": "a"}]})
    assert "base_model" in message and method in message


@pytest.mark.parametrize("text", ["merge_method: [ties\nmodels: a", "models:\n  - model: a\n - bad: indent\n", "{unclosed"])
def test_invalid_yaml_errors(text):
    message = _error(text)
    assert "YAML" in message or "mapping" in message


def test_non_mapping_and_invalid_values_error(tmp_path):
    assert "mapping" in _error("- a\n- b\n")
    assert "merge_method" in _error(_ties(merge_method="dare_tiez"))
    assert "'models'" in _error({"merge_method": "ties", "base_model": "b"})
    assert "models" in _error(_ties(models=[]))
    assert "density" in _error(_ties(parameters={"density": 0}))
    assert "density" in _error(_ties(parameters={"density": 1.5}))
    assert "dtype" in _error(_ties(dtype="float8"))
    assert "exclude" in _error(_ties(exclude=["(unclosed"]))
    assert "shards" in _error(_ties(shards=0))
    assert "shards" in _error(_ties(shards="lots"))
    assert "normalize" in _error({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                                        {"model": "b", "parameters": {"weight": -1}}]})


def test_missing_config_file_says_so(tmp_path):
    message = _error(str(tmp_path / "merge.yml"))
    assert "not found" in message or "no such" in message.lower() or "does not exist" in message


def test_config_hash_ignores_output_and_is_canonical():
    a = load_config(_ties(output="/tmp/x"))
    b = load_config(_ties(output="s3://bucket/y"))
    c = load_config(_ties(parameters={"lambda": 0.5}))
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_frozen():
    config = load_config(_ties())
    with pytest.raises(Exception):
        config.merge_method = "linear"


@pytest.mark.parametrize("value, expected", [
    (123, 123), ("4GB", 4 * 10**9), ("512MiB", 512 * 1024**2), ("1e9", 10**9), ("2kB", 2000), ("1.5 GiB", 3 * 1024**3 // 2)])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


def test_parse_bytes_rejects():
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("four gigs")


def test_nested_error_does_not_claim_models_is_empty():
    message = _error(_ties(models=[{"model": "a", "parameters": {"wieght": 1}}]))
    assert "at least 1 item" not in message
