"""mergekit habits: its defaults, its README's configs, its CLI, and refusals that say what mergekit has."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import start_embedded_ray
from helpers import make_models, merge_reference, read_output

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.coordinator import run_merge


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    start_embedded_ray()
    return make_models(tmp_path_factory.mktemp("compat") / "in", n_experts=2, seed=21)


def test_base_listed_under_models_is_the_base(models, tmp_path):
    """mergekit's README pattern: the base under models: without parameters is not a weighted expert,
    so with normalize it does not enter Σw (it did here before: τ was 0.75x mergekit's)."""
    base_dir, expert_dirs, base, experts = models
    config = yaml.safe_load(f"""
models:
  - model: {base_dir}
  - model: {expert_dirs[0]}
    parameters: {{weight: 0.5}}
  - model: {expert_dirs[1]}
    parameters: {{weight: 1.0}}
merge_method: task_arithmetic
base_model: {base_dir}
parameters: {{normalize: true, lambda: 0.8}}
dtype: float32
output: {tmp_path / 'out'}
""")
    manifest = run_merge(load_config(config), progress=False)
    assert tuple(manifest.method["weights"]) == (0.5, 1.0)
    merged = read_output(tmp_path / "out")
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        expected = merge_reference("task_arithmetic", b, [e[name] for e in experts], weights=[0.5, 1.0], lam=0.8,
                                   normalize=True, dtype=torch.float32)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)


def test_ties_without_density_keeps_everything_as_mergekit(models, tmp_path, caplog):
    base_dir, expert_dirs, base, experts = models
    config = {"merge_method": "ties", "base_model": str(base_dir), "dtype": "float32", "output": str(tmp_path / "out"),
              "models": [{"model": str(base_dir)}, *({"model": str(e), "parameters": {"weight": 1.0}} for e in expert_dirs)]}
    with caplog.at_level("WARNING"):
        manifest = run_merge(load_config(config), progress=False)
    assert tuple(manifest.method["densities"]) == (1.0, 1.0) and "density: 0.2" in caplog.text
    merged = read_output(tmp_path / "out")
    for name, b in base.items():
        if b.is_floating_point():
            expected = merge_reference("ties", b, [e[name] for e in experts], weights=[1.0, 1.0], densities=[1.0, 1.0],
                                       dtype=torch.float32)
            assert torch.equal(merged[name], expected), name


def test_only_the_base_listed_is_an_error(models):
    base_dir, *_ = models
    with pytest.raises(ConfigError, match="lists only the base model"):
        from workers.methods import get_method

        get_method("ties").resolve(load_config({"merge_method": "ties", "base_model": str(base_dir),
                                                "models": [{"model": str(base_dir)}]}))


def test_positional_output_as_mergekit_yaml_takes_it(models, tmp_path, capsys):
    base_dir, expert_dirs, *_ = models
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(e)} for e in expert_dirs]}))
    assert main(["run", str(path), str(tmp_path / "positional"), "--no-progress"]) == 0
    assert (tmp_path / "positional" / "manifest.json").exists()
    assert main(["run", str(path), str(tmp_path / "a"), "--output", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "two outputs given" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("mergefleet ")


@pytest.mark.parametrize("config, expected", [
    ({"parameters": {"densty": 0.3}}, "unknown key 'parameters.densty': neither mergekit nor mergefleet has it; "
                                      "did you mean 'density'?"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}], "parameters": {}}]},
     "unknown key 'slices.0.parameters': mergekit has it; mergefleet does not support it yet"),
    ({"otput": "x"}, "did you mean 'output'?"),
    ({"parameters": {"rank": 4}}, "parameters.rank is an option of twin, not of ties; it needs merge_method: twin"),
])
def test_refused_keys_say_who_has_them_and_suggest(config, expected):
    with pytest.raises(ConfigError) as info:
        load_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], **config})
    assert expected in str(info.value)


# --- tokenizer keys ---------------------------------------------------------------------------------

def _tokenizer_models(root):
    """A base and two experts with tokenizer files; expert e1 carries its own chat template."""
    import json

    base_dir, expert_dirs, *_ = make_models(root, n_experts=2, seed=23)
    for d in (base_dir, *expert_dirs):
        (d / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}')
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8, "tag": d.name}))
    (expert_dirs[1] / "tokenizer_config.json").write_text(json.dumps(
        {"tag": "e1", "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))
    return base_dir, expert_dirs


def test_tokenizer_source_and_chat_template(tmp_path):
    import json

    start_embedded_ray()
    base_dir, expert_dirs = _tokenizer_models(tmp_path / "in")
    common = {"merge_method": "task_arithmetic", "base_model": str(base_dir),
              "models": [{"model": str(e)} for e in expert_dirs]}
    run_merge(load_config({**common, "output": str(tmp_path / "a"), "tokenizer_source": str(expert_dirs[1])}),
              progress=False)
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["tag"] == "e1"
    run_merge(load_config({**common, "output": str(tmp_path / "b"), "tokenizer": {"source": "base"},
                           "chat_template": "auto"}), progress=False)
    written = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert written["tag"] == "base" and written["chat_template"].startswith("{% for m in messages %}")
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    run_merge(load_config({**common, "output": str(tmp_path / "c"), "chat_template": template}), progress=False)
    assert json.loads((tmp_path / "c" / "tokenizer_config.json").read_text())["chat_template"] == template


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer_source": "union"}, "union builds a merged vocabulary"),
    ({"tokenizer": {}}, "union builds a merged vocabulary"),
    ({"tokenizer": {"source": "base", "pad_to_multiple_of": 64}}, "tokenizer.pad_to_multiple_of"),
    ({"tokenizer_source": "someone/else"}, "not one of the merged models"),
    ({"chat_template": "chatml"}, "named templates are its own files"),
])
def test_tokenizer_refusals(tmp_path, extra, message):
    from pipeline.planner import build_plan

    base_dir, expert_dirs = _tokenizer_models(tmp_path / "in")
    config = {"merge_method": "task_arithmetic", "base_model": str(base_dir), "output": str(tmp_path / "out"),
              "models": [{"model": str(e)} for e in expert_dirs], **extra}
    with pytest.raises(ConfigError, match=message):
        build_plan(load_config(config))


def test_tokenizer_source_with_another_vocabulary_is_refused(tmp_path):
    from pipeline.planner import build_plan

    base_dir, expert_dirs = _tokenizer_models(tmp_path / "in")
    (expert_dirs[0] / "tokenizer.json").write_text('{"model": {"vocab": {"a": 1, "b": 0}}}')
    config = {"merge_method": "task_arithmetic", "base_model": str(base_dir), "output": str(tmp_path / "out"),
              "models": [{"model": str(e)} for e in expert_dirs], "tokenizer_source": "base"}
    with pytest.raises(ConfigError, match="other tokenizer files.*tokenizer.json"):
        build_plan(load_config(config))


def test_model_plus_lora_is_refused_with_how_to_merge_it():
    with pytest.raises(ConfigError, match="model\\+LoRA form.*merge_and_unload"):
        load_config({"merge_method": "linear", "models": [{"model": "org/base+org/lora"}]})
