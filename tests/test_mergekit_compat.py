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
    ({"slices": []}, "unknown key 'slices': mergekit has it; mergefleet does not support it yet"),
    ({"otput": "x"}, "did you mean 'output'?"),
    ({"parameters": {"rank": 4}}, "parameters.rank is an option of twin, not of ties; it needs merge_method: twin"),
])
def test_refused_keys_say_who_has_them_and_suggest(config, expected):
    with pytest.raises(ConfigError) as info:
        load_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], **config})
    assert expected in str(info.value)
