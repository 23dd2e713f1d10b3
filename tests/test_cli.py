"""The command line: storage options of verify / status, exit codes (0 ok, 1 problems, 2 could not
run, 130 interrupted), one-line errors without tracebacks, and a demo whose rerun is a no-op."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import make_models

import manifests.verify
import pipeline.coordinator
import pipeline.resume
from pipeline import cli
from pipeline.cli import main
from pipeline.config import load_config

S3_OPTIONS = ["--storage-option", "endpoint_url=http://127.0.0.1:8333", "--storage-option", "use_ssl=false",
              "--storage-option", 'client_kwargs={"region_name": "us-east-1"}', "--storage-option", "key='0123'"]
S3_PARSED = {"endpoint_url": "http://127.0.0.1:8333", "use_ssl": False,
             "client_kwargs": {"region_name": "us-east-1"}, "key": "0123"}


def _ties(base, experts, out, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "output": str(out), "shards": 2,
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts], **extra}


def _write_config(tmp_path, config: dict, name: str = "merge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _config_file(tmp_path, **extra) -> Path:
    """A valid merge YAML over tiny models (nothing is run from it unless a test runs it)."""
    base, experts, *_ = make_models(tmp_path / "in")
    return _write_config(tmp_path, _ties(base, experts, tmp_path / "out", **extra))


def _capture(monkeypatch, module, name, result):
    """Replace module.name with a stub that records its calls and returns ``result`` (or raises it)."""
    calls = []

    def stub(url, **kwargs):
        calls.append((url, kwargs))
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(module, name, stub)
    return calls


def _main(argv) -> int:
    """main(argv), where a KeyboardInterrupt it lets through fails the test (instead of stopping pytest)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")


def _one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("mergefleet: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# -- 1. storage options of verify and status --------------------------------------------------------


def test_storage_option_values_are_yaml_scalars_or_mappings():
    assert cli._storage_option("use_ssl=false") == ("use_ssl", False)
    assert cli._storage_option("max_concurrency=4") == ("max_concurrency", 4)
    assert cli._storage_option("endpoint_url=http://h:9000/x?a=b") == ("endpoint_url", "http://h:9000/x?a=b")
    assert cli._storage_option('client_kwargs={"region_name": "eu-west-1"}') == ("client_kwargs", {"region_name": "eu-west-1"})
    assert cli._storage_option("client_kwargs={region_name: eu-west-1, verify: false}") == (
        "client_kwargs", {"region_name": "eu-west-1", "verify": False})
    assert cli._storage_option("secret='007'") == ("secret", "007")
    assert cli._storage_option("token=") == ("token", "")


@pytest.mark.parametrize("bad", ["no-equals-sign", "=value", 'client_kwargs={"unclosed": 1'])
def test_bad_storage_option_is_a_usage_error_that_does_not_echo_the_value(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "/nowhere", "--storage-option", bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--storage-option" in err and ("KEY=VALUE" in err or "YAML" in err)
    assert "unclosed" not in err and "no-equals-sign" not in err


@pytest.mark.parametrize("command, module, name, result", [
    ("verify", manifests.verify, "verify_output", []),
    ("status", pipeline.resume, "output_status", {"state": "empty"}),
])
def test_verify_and_status_pass_storage_options(tmp_path, monkeypatch, capsys, command, module, name, result):
    out = tmp_path / "out"
    out.mkdir()
    calls = _capture(monkeypatch, module, name, result)
    assert main([command, str(out), *S3_OPTIONS]) == 0, capsys.readouterr().err
    assert calls == [(str(out), {"storage_options": S3_PARSED})]


@pytest.mark.parametrize("command, module, name, result", [
    ("verify", manifests.verify, "verify_output", []),
    ("status", pipeline.resume, "output_status", {"state": "empty"}),
])
def test_config_storage_section_and_explicit_options_win(tmp_path, monkeypatch, capsys, command, module, name, result):
    storage = {"endpoint_url": "http://from-config:8333", "key": "config-key", "use_ssl": True,
               "client_kwargs": {"region_name": "eu-west-1"}}
    config = _config_file(tmp_path, storage=storage)
    assert load_config(config).storage == storage
    out = tmp_path / "out"
    out.mkdir()
    calls = _capture(monkeypatch, module, name, result)
    assert main([command, str(out), "--config", str(config)]) == 0, capsys.readouterr().err
    assert main([command, str(out), "--config", str(config), "--storage-option", "use_ssl=false",
                 "--storage-option", 'client_kwargs={"region_name": "us-east-1"}']) == 0
    assert calls == [(str(out), {"storage_options": storage}),
                     (str(out), {"storage_options": {**storage, "use_ssl": False,
                                                     "client_kwargs": {"region_name": "us-east-1"}}})]


def test_bad_config_of_verify_prints_the_config_error(tmp_path, capsys):
    path = _write_config(tmp_path, {"merge_method": "ties", "models": [], "storag": {}})
    with pytest.raises(ValueError) as expected:
        load_config(path)
    assert main(["verify", str(tmp_path), "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"mergefleet: error: {expected.value}\n"


def test_verify_and_status_on_s3_use_the_given_options(s3_server, ray_local, tmp_path, monkeypatch, capsys):
    """With no AWS_* environment, the output on S3 is reached only through --storage-option or --config;
    a wrong secret is exit 2 with the URL (and never the secret) in the message."""
    import s3fs

    base, experts, *_ = make_models(tmp_path / "in")
    out = tmp_path / "out"
    pipeline.coordinator.run_merge(load_config(_ties(base, experts, out)), progress=False)
    fs = s3_server.filesystem()
    fs.mkdir("mf-cli")
    fs.put(str(out), "mf-cli/run", recursive=True)
    url = "s3://mf-cli/run"

    for key in s3_server.env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    options = s3_server.storage_options()
    flags = ["--storage-option", f"endpoint_url={options['endpoint_url']}", "--storage-option", f"key={options['key']}",
             "--storage-option", f"secret={options['secret']}",
             "--storage-option", f'client_kwargs={json.dumps(options["client_kwargs"])}']
    capsys.readouterr()

    assert main(["verify", url, *flags]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == "OK"
    assert main(["status", url, *flags]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "complete"

    config = _write_config(tmp_path, _ties(base, experts, url, storage=options), "s3.yaml")
    assert main(["verify", url, "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "OK"

    for command in ("verify", "status"):
        assert main([command, url, "--config", str(config), "--storage-option", "secret=not-the-secret"]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        _one_error_line(captured.err, url)
        assert "not-the-secret" not in captured.err and options["secret"] not in captured.err


# -- 2. exit codes of verify and status ----------------------------------------------------------------


def test_verify_of_a_missing_output_is_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-output"
    assert main(["verify", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, str(missing))


def test_verify_problems_are_exit_1(tmp_path, monkeypatch, capsys):
    _capture(monkeypatch, manifests.verify, "verify_output", ["model-00001-of-00002.safetensors: sha256 differs"])
    assert main(["verify", str(tmp_path)]) == 1
    assert capsys.readouterr().out == "FAIL model-00001-of-00002.safetensors: sha256 differs\n1 problem(s)\n"


def test_verify_of_an_unfinished_output_is_a_problem(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["verify", str(tmp_path / "out")]) == 1
    assert "manifest.json" in capsys.readouterr().out


class NoCredentialsError(Exception):
    """Stands in for botocore's: not a ValueError, RuntimeError or OSError, no URL in its text."""

    def __str__(self):
        return "Unable to locate credentials"


@pytest.mark.parametrize("command, module, name", [
    ("verify", manifests.verify, "verify_output"),
    ("status", pipeline.resume, "output_status"),
])
@pytest.mark.parametrize("error", [NoCredentialsError(), PermissionError("Access Denied"), KeyError("Contents")])
def test_an_error_in_verify_or_status_is_exit_2_naming_the_url(tmp_path, monkeypatch, capsys, command, module, name, error):
    _capture(monkeypatch, module, name, error)
    assert main([command, str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, str(tmp_path), str(error))


def test_status_of_a_missing_output_is_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-output"
    assert main(["status", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_error_line(captured.err, str(missing))


def test_exit_codes_are_in_the_help(capsys):
    for command in ("verify", "status", "run"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "exit status" in text and "2  " in text, text
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = capsys.readouterr().out
    assert "0  the output is intact" in text and "1  verification found problems" in text


# -- 3. Ctrl-C -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, hint", [([], "Rerun the same command to resume"),
                                         (["--overwrite"], "Rerun the same command without --overwrite to resume")])
def test_interrupted_run_is_130_with_one_line(tmp_path, monkeypatch, capsys, extra, hint):
    config = _config_file(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.coordinator, "run_merge", interrupted)
    assert _main(["run", str(config), "--no-progress", *extra]) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("mergefleet: interrupted; nothing was published. ")
    assert hint in captured.err and "(finished shards are kept)." in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_interrupted_verify_is_130(tmp_path, monkeypatch, capsys):
    _capture(monkeypatch, manifests.verify, "verify_output", KeyboardInterrupt())
    assert _main(["verify", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "mergefleet: interrupted.\n"


def test_the_command_loads_its_config_while_ray_starts(tmp_path, monkeypatch, capsys):
    """In the command's own process (``ray_first``, as console_main runs it) `run` starts Ray in the
    main thread while another thread loads the config; main() called in-process starts no Ray first."""
    import threading

    import pipeline.ray_watchdog

    seen = {}
    load = cli._load_run_config
    monkeypatch.setattr(pipeline.ray_watchdog, "connect_ray", lambda address: seen.update(ray=threading.current_thread()))
    monkeypatch.setattr(cli, "_load_run_config", lambda path: seen.update(config=threading.current_thread()) or load(path))
    monkeypatch.setattr(pipeline.coordinator, "run_merge", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop")))
    config = _config_file(tmp_path)
    assert main(["run", str(config), "--no-progress"]) == 2 and "ray" not in seen
    assert main(["run", str(config), "--no-progress"], ray_first=True) == 2
    assert capsys.readouterr().err == "mergefleet: error: stop\n" * 2
    assert seen["ray"] is threading.main_thread() and seen["config"] is not threading.main_thread()


# -- 5. other errors reaching main -------------------------------------------------------------------------


def test_config_error_prints_as_before(tmp_path, capsys):
    path = _write_config(tmp_path, {"merge_method": "ties", "models": [{"model": "/x"}], "densty": 0.5})
    with pytest.raises(ValueError) as expected:
        load_config(path)
    assert main(["run", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"mergefleet: error: {expected.value}\n"


def test_pydantic_and_value_errors_print_their_text(tmp_path, monkeypatch, capsys):
    import pydantic

    with pytest.raises(pydantic.ValidationError) as validation:
        pydantic.TypeAdapter(int).validate_python("not a number")
    config = _config_file(tmp_path)
    for error in (validation.value, ValueError("a.weight: shape (3,) differs"), RuntimeError("shard 2 failed")):
        monkeypatch.setattr(pipeline.coordinator, "run_merge", lambda *a, _e=error, **k: (_ for _ in ()).throw(_e))
        assert main(["run", str(config), "--no-progress"]) == 2
        assert capsys.readouterr().err == f"mergefleet: error: {error}\n"


def test_other_exception_types_in_run_are_exit_2_with_their_type(tmp_path, monkeypatch, capsys):
    config = _config_file(tmp_path)
    for error, line in ((KeyError("lm_head.weight"), "KeyError: 'lm_head.weight'"),
                        (TypeError("unsupported operand"), "TypeError: unsupported operand"),
                        (NoCredentialsError(), "NoCredentialsError: Unable to locate credentials"),
                        (AssertionError(), "AssertionError")):
        monkeypatch.setattr(pipeline.coordinator, "run_merge", lambda *a, _e=error, **k: (_ for _ in ()).throw(_e))
        assert main(["run", str(config), "--no-progress"]) == 2
        assert capsys.readouterr().err == f"mergefleet: error: {line}\n"
    # -v adds the traceback
    assert main(["-v", "run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("mergefleet: error: AssertionError\n")


# -- 4. demo ------------------------------------------------------------------------------------------------


def _demo(capsys, *argv) -> tuple[int, dict | None, str]:
    code = _main(["demo", "--no-progress", *argv])
    captured = capsys.readouterr()
    summary = None
    if code == 0:
        first, _, rest = captured.out.partition("\n")
        assert first.startswith("sample base + 3 experts in "), captured.out
        summary = json.loads(rest)
    return code, summary, captured.err


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tree_stats(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(root.rglob("*"))}


def _demo_temp_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("mergefleet-demo-*"))


def test_demo_rerun_is_a_no_op_and_only_overwrite_replaces(tmp_path, capsys, ray_local):
    temp_before = _demo_temp_dirs()
    out, work = tmp_path / "demo", tmp_path / "demo-work"
    code, first, err = _demo(capsys, "--output", str(out))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "demo-work"]  # the work dir sits beside the output
    assert (work / "merge.yaml").exists() and (work / "models" / "base" / "model.safetensors").exists()
    inputs, stats = _tree_hashes(work), _tree_stats(work)
    manifest = (out / "manifest.json").read_bytes()
    assert json.loads(manifest)["run_id"] == first["run_id"]

    code, again, err = _demo(capsys, "--output", str(out))
    assert code == 0, err
    assert again["run_id"] == first["run_id"] and again["output_files"] == first["output_files"]
    assert (out / "manifest.json").read_bytes() == manifest  # nothing republished
    assert _tree_hashes(work) == inputs  # the same models and the same config, byte for byte ...
    assert _tree_stats(work) == stats  # ... not even rewritten (a run takes a new mtime / inode as a changed input)

    # another demo (other model paths, so another config) into the same output is refused ...
    code, _, err = _demo(capsys, "--output", str(out), "--workdir", str(tmp_path / "elsewhere"))
    assert code == 2 and "--overwrite" in err and str(out) in err
    assert (out / "manifest.json").read_bytes() == manifest
    # ... and replaces it with --overwrite
    code, replaced, err = _demo(capsys, "--output", str(out), "--workdir", str(tmp_path / "elsewhere"), "--overwrite")
    assert code == 0, err
    assert replaced["run_id"] != first["run_id"]
    assert (tmp_path / "elsewhere" / "merge.yaml").exists()
    assert _demo_temp_dirs() <= temp_before  # no temp dir left behind


def test_demo_workdir_default_is_beside_the_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.demo_workdir("out/demo") == tmp_path / "out" / "demo-work"
    assert cli.demo_workdir("out/demo/") == tmp_path / "out" / "demo-work"
    assert cli.demo_workdir("out/demo", "w") == tmp_path / "w"


def test_interrupted_demo_is_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.coordinator, "run_merge", interrupted)
    code, _, err = _demo(capsys, "--output", str(tmp_path / "demo"))
    assert code == 130 and "Rerun the same command to resume" in err and "Traceback" not in err


def test_sample_models_are_deterministic_built_whole_and_reused(tmp_path, monkeypatch):
    from pipeline import samples

    a_base, a_experts = samples.ensure_sample_models(tmp_path / "a" / "models")
    samples.ensure_sample_models(tmp_path / "b" / "models")
    assert [p.name for p in (a_base, *a_experts)] == ["base", "expert0", "expert1", "expert2"]
    assert _tree_hashes(tmp_path / "a" / "models") == _tree_hashes(tmp_path / "b" / "models")
    stats = _tree_stats(tmp_path / "a" / "models")
    assert samples.ensure_sample_models(tmp_path / "a" / "models") == (a_base, a_experts)
    assert _tree_stats(tmp_path / "a" / "models") == stats

    # a build that fails leaves nothing (no models dir, no .partial), and the next call builds afresh
    def fail(directory, *args, **kwargs):
        if directory.name == "expert1":
            raise OSError("disk full")
        return real(directory, *args, **kwargs)

    real = samples.write_model
    monkeypatch.setattr(samples, "write_model", fail)
    with pytest.raises(OSError, match="disk full"):
        samples.ensure_sample_models(tmp_path / "c" / "models")
    assert list((tmp_path / "c").iterdir()) == []
    monkeypatch.setattr(samples, "write_model", real)
    samples.ensure_sample_models(tmp_path / "c" / "models")
    assert _tree_hashes(tmp_path / "c" / "models") == _tree_hashes(tmp_path / "a" / "models")

    # a models dir missing a model is named, not silently patched
    import shutil

    shutil.rmtree(tmp_path / "c" / "models" / "expert2")
    with pytest.raises(FileExistsError, match="expert2"):
        samples.ensure_sample_models(tmp_path / "c" / "models")
