"""mergefleet command line: run | plan | verify | status | report | demo | twin (train-router, predict, generate).

Exit status: 0 success; 1 `verify` found problems; 2 the command could not run (bad config or
arguments, storage / credential errors, a missing output, any other error: one line
``mergefleet: error: ...`` on stderr, the traceback only with -v); 130 interrupted (Ctrl-C)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from pipeline import mergefleet_version

LOG = logging.getLogger("mergefleet")

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
RUN_INTERRUPTED = "interrupted; nothing was published. Rerun the same command to resume (finished shards are kept)."
RUN_INTERRUPTED_OVERWRITE = ("interrupted; nothing was published. Rerun the same command without --overwrite "
                             "to resume (finished shards are kept).")


class CommandError(Exception):
    """A command could not run; the message is complete (it names the URL) and is printed as it is."""


def _while_ray_starts(args, work, *work_args):
    """``work(*work_args)``; in the command (``args.ray_first``) in a thread while this (main) thread
    starts or joins Ray (ray.init hangs in any other thread): the imports of the pipeline and torch
    and the config, ~1.5 s here, no longer wait for Ray's ~3 s. ``main()`` called in a process of
    its own keeps the order: a bad config or input fails before any Ray starts."""
    if not args.ray_first:
        return work(*work_args)
    from pipeline.ray_watchdog import connect_ray

    with ThreadPoolExecutor(max_workers=1) as background:
        done = background.submit(work, *work_args)
        connect_ray(getattr(args, "address", None))
        return done.result()


def _cmd_run(args) -> int:
    if args.out and args.output and args.out != args.output:
        raise ValueError(f"two outputs given: {args.out} (positional) and --output {args.output}; give one")
    config = _while_ray_starts(args, _load_run_config, args.config)
    from pipeline.coordinator import run_merge

    manifest = run_merge(config, output_url=args.out or args.output, address=args.address,
                         overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(_summary(manifest), indent=2))
    return 0


def _load_run_config(path: str):
    """The merge config, with the run's modules imported (the coordinator, the workers, torch)."""
    import pipeline.coordinator  # noqa: F401
    from pipeline.config import load_config

    return load_config(path)


def _cmd_plan(args) -> int:
    from pipeline.config import load_config
    from pipeline.planner import build_plan

    summary = build_plan(load_config(args.config), output_url=args.output or "<output>").summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"method {summary['method']['method']}  plan {summary['plan_hash'][:12]}  "
          f"{summary['tensors']} tensors ({summary['merged']} merged, {summary['copied']} copied)  "
          f"read {summary['input_bytes'] / 1e9:.3f} GB  write {summary['output_bytes'] / 1e9:.3f} GB")
    for s in summary["shards"]:
        chunked = f"  row-chunked: {len(s['chunked'])}" if s["chunked"] else ""
        print(f"  {s['file']}  {s['tensors']:5d} tensors  {s['bytes'] / 1e6:10.1f} MB{chunked}")
    return 0


def _storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of --storage-option; VALUE is parsed as YAML (so ``false`` is a bool and
    ``{"region_name": "us-east-1"}`` a mapping). Errors never echo the value: it may be a secret."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:8333")
    if not value.strip():
        return key, ""
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or type(exc).__name__
        raise argparse.ArgumentTypeError(f"{key}: the value is not a YAML / JSON value ({reason}); "
                                         "quote it to pass a string, e.g. key='a: b'") from None


def _storage_options(args) -> dict | None:
    """The `storage:` section of --config, then each --storage-option over it (explicit options win)."""
    options: dict[str, Any] = {}
    if args.config:
        from pipeline.config import load_config

        options.update(load_config(args.config).storage)
    options.update(dict(args.storage_option or []))
    return options or None


def _message(exc: BaseException) -> str:
    """The one-line message of an error: its text for the usual error types (as printed since the
    start, so ConfigError / pydantic messages read the same), else prefixed with its type."""
    text = str(exc)
    if isinstance(exc, (CommandError, ValueError, RuntimeError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cannot_run(url: str, exc: Exception) -> CommandError:
    message = _message(exc)
    return CommandError(message if url in message else f"{url}: {message}")


def _read_output(args, read):
    """``read(OUTPUT, storage_options=...)``; an output it cannot look at (nothing there, storage
    errors) is the command's error, naming the URL. A bad --config fails first, with its own message."""
    storage_options = _storage_options(args)
    try:
        return read(args.output, storage_options=storage_options)
    except Exception as exc:
        raise _cannot_run(args.output, exc) from exc


def _cmd_status(args) -> int:
    from pipeline.resume import output_status

    print(json.dumps(_read_output(args, output_status), indent=2))
    return EXIT_OK


def _cmd_verify(args) -> int:
    from manifests.verify import verify_output

    problems = _read_output(args, verify_output)  # problems found are returned, not raised
    for p in problems:
        print(f"FAIL {p}")
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return EXIT_PROBLEMS if problems else EXIT_OK


def _cmd_report(args) -> int:
    from pipeline.report import figures, render_html, report_summary

    summary = _read_output(args, report_summary)
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    plots = figures(summary)
    Path(args.out).write_text(render_html(summary, plots), encoding="utf-8")
    print(f"{args.out}: {len(plots)} plots ({', '.join(name for name, _, _ in plots)})")
    return EXIT_OK


def demo_workdir(output: str | Path, workdir: str | Path | None = None) -> Path:
    """Where `mergefleet demo` puts its sample models and merge.yaml: ``workdir``, else
    ``<output>-work`` beside the output (out/demo -> out/demo-work)."""
    if workdir:
        return Path(workdir).resolve()
    out = Path(output).resolve()
    return out.with_name(out.name + "-work")


def _cmd_demo(args) -> int:
    output = args.output or ("out/demo-twin" if args.twin else "out/demo")
    work = demo_workdir(output, args.workdir)
    if args.twin:
        from pipeline.demo_twin import run_twin_demo

        print(json.dumps(run_twin_demo(output, work, overwrite=args.overwrite, progress=not args.no_progress), indent=2))
        return 0
    config_path, n_experts = _while_ray_starts(args, _demo_config, output, work)
    print(f"sample base + {n_experts} experts in {work / 'models'}; config {config_path}")
    from pipeline.config import load_config
    from pipeline.coordinator import run_merge

    manifest = run_merge(load_config(config_path), overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(_summary(manifest), indent=2))
    return 0


def _demo_config(output: str, work: Path) -> tuple[Path, int]:
    """The demo's merge.yaml in ``work`` over its sample models, and the number of experts."""
    import pipeline.coordinator  # noqa: F401  (the run's modules, while Ray starts)
    from pipeline.samples import ensure_sample_models, write_if_changed

    # built once (seed 0) and then reused as they are, with the same config: a rerun on a complete
    # output is a no-op, on a partial one it resumes
    base, experts = ensure_sample_models(work / "models", n_experts=3, seed=0)
    config = {
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
        "parameters": {"normalize": True, "lambda": 1.0}, "dtype": "bfloat16",
        "output": str(Path(output).resolve()), "shards": 4,
    }
    return write_if_changed(work / "merge.yaml", yaml.safe_dump(config, sort_keys=False)), len(experts)


def _cmd_twin_train_router(args) -> int:
    from twin.train import train_twin_router

    metrics = train_twin_router(args.output, args.data, epochs=args.epochs, seed=args.seed, lr=args.lr,
                                batch_size=args.batch_size, val_fraction=args.val_fraction,
                                test_fraction=args.test_fraction)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


def _fixed_weights(args) -> list[float] | None:
    """--weights as numbers; it goes with --mode fixed, which needs it."""
    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.strip("[]").split(",")]
        except ValueError:
            raise ValueError(f"--weights {args.weights!r}: give one number per expert, comma-separated (e.g. 1,0,0)") from None
    if (args.mode == "fixed") != (weights is not None):
        raise ValueError("--weights goes with --mode fixed (and fixed mode needs --weights)")
    return weights


def _cmd_twin_predict(args) -> int:
    from twin.load import load_tokenizer, load_twin, predict

    weights = _fixed_weights(args)
    twin = load_twin(args.output, router=args.mode != "fixed" or None)
    result = predict(twin, load_tokenizer(args.output), args.text, mode=args.mode, weights=weights)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_twin_generate(args) -> int:
    from twin.load import generate_texts, load_tokenizer, load_twin, read_prompts

    weights = _fixed_weights(args)
    prompts = list(args.prompt or []) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeat it) or --prompts-file F.jsonl")
    twin = load_twin(args.output, router=args.mode != "fixed" or None)
    results = generate_texts(twin, load_tokenizer(args.output), prompts, mode=args.mode, weights=weights,
                             top_k=args.top_k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    for result in results:
        print(json.dumps(result) if args.json else result["text"])
    return 0


def _summary(manifest) -> dict:
    return {"output_files": [f.name for f in manifest.files], "run_id": manifest.run_id, "method": manifest.method,
            "tensors": manifest.n_tensors, "output_bytes": manifest.output_bytes, "bytes_read": manifest.bytes_read,
            "timings": {k: v for k, v in manifest.timings.items() if k != "shards"}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergefleet", description="Distributed merging of fine-tuned experts on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"mergefleet {mergefleet_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="plan, merge on Ray and publish the output",
                         description="Plan, merge on Ray and publish the output. The same config on an output it "
                                     "already completed is a no-op; on a partial output it resumes.",
                         epilog="exit status:\n  0  published (or already complete); prints the manifest summary\n"
                                "  2  could not run: bad config, bad input, storage error, output holds another run\n"
                                "  130  interrupted (Ctrl-C): nothing published; rerun to resume",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", help="merge YAML (mergekit format)")
    run.add_argument("out", nargs="?", help="output URL, as mergekit-yaml CONFIG OUT takes it (same as --output)")
    run.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    run.add_argument("--output", help="output URL (overrides `output:` in the config)")
    run.add_argument("--overwrite", action="store_true", help="replace an output that already holds a run")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)
    plan = sub.add_parser("plan", help="print the shard plan and exit")
    plan.add_argument("config")
    plan.add_argument("--output")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_cmd_plan)
    verify = sub.add_parser(
        "verify", help="re-read every output tensor and check the manifest (exit 0 ok, 1 problems, 2 could not run)",
        description="Re-read every file and tensor of a published output and check them against its manifest.",
        epilog="exit status:\n  0  the output is intact (prints OK)\n"
               "  1  verification found problems (one FAIL line each)\n"
               "  2  verify could not run: no such output, storage or credential error, bad --config / --storage-option",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("output", help="output URL of a run")
    _add_storage_arguments(verify)
    verify.set_defaults(func=_cmd_verify)
    status = sub.add_parser(
        "status", help="show whether a run at OUTPUT_URL is complete, or its done / missing shards (exit 0, 2 could not run)",
        description="Print, as JSON, whether the run at OUTPUT_URL is complete, or the done / missing shards of a partial run.",
        epilog="exit status:\n  0  the status was printed (complete, partial or empty)\n"
               "  2  status could not run: no such output, storage or credential error, bad --config / --storage-option",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("output", help="output URL of a run")
    _add_storage_arguments(status)
    status.set_defaults(func=_cmd_status)
    report = sub.add_parser(
        "report", help="the run's merge diagnostics and timings as one self-contained HTML page (or --json)",
        description="Plot a published run's per-tensor merge diagnostics (per layer and module), the experts' "
                    "cosines, global-trim thresholds, Twin errors and storage, and each shard's timeline and "
                    "memory, from its manifest alone, into one HTML page with the images inline.",
        epilog="exit status:\n  0  written (or printed)\n"
               "  2  report could not run: no manifest, storage or credential error, bad --config / --storage-option",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("output", help="output URL of a run")
    report.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    report.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    _add_storage_arguments(report)
    report.set_defaults(func=_cmd_report)
    demo = sub.add_parser("demo", help="build sample experts and TIES-merge them on embedded Ray (--twin: Twin-merge, "
                                        "train the router and predict)",
                          description="Build a small Llama-shaped base and 3 experts (seed 0) in WORKDIR/models "
                                      "unless they are there, write WORKDIR/merge.yaml and TIES-merge them into OUTPUT. "
                                      "A rerun is a no-op on a complete output (it prints the same manifest "
                                      "summary) and resumes a partial one; an output holding another run is "
                                      "refused unless --overwrite. With --twin: a base with a character tokenizer "
                                      "and 3 experts fine-tuned on sample tasks (count, alphabet, repeat), "
                                      "WORKDIR/tasks.jsonl and WORKDIR/twin.yaml; then the twin merge, the router "
                                      "trained on tasks.jsonl, and each task's prompt routed and continued (JSON).")
    demo.add_argument("--twin", action="store_true", help="the Twin-Merging walk-through: merge, router, prediction "
                                                          "(default output out/demo-twin)")
    demo.add_argument("--output", help="output directory (default out/demo, with --twin out/demo-twin)")
    demo.add_argument("--workdir", help="where the sample models and the config go (default: OUTPUT-work beside "
                                        "the output, e.g. out/demo-work); built once, then reused (delete "
                                        "WORKDIR/models to rebuild them)")
    demo.add_argument("--overwrite", action="store_true", help="replace an output that already holds a run")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)
    twin = sub.add_parser("twin", help="Twin-Merging: train the router of a twin run, predict or generate with it")
    twin_sub = twin.add_subparsers(dest="twin_command", required=True)
    train = twin_sub.add_parser("train-router", help="train the router on the shared model's features; writes OUTPUT/router/")
    train.add_argument("output", help="output URL of a twin run")
    train.add_argument("--data", required=True, help="JSONL of {\"text\": ..., \"task\": EXPERT_NAME} (local path or URL)")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the batches")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--val-fraction", type=float, default=0.1, help="per task; checkpoints are selected on it")
    train.add_argument("--test-fraction", type=float, default=0.1, help="per task; only evaluated, at the end")
    train.set_defaults(func=_cmd_twin_train_router)
    predict = twin_sub.add_parser("predict", help="run θ* + Σ w_t(x)·B_t A_t on texts; print the weights and outputs as JSON")
    predict.add_argument("output", help="output URL of a twin run")
    predict.add_argument("--text", action="append", required=True, help="an input text (repeat for a batch)")
    predict.add_argument("--mode", choices=("router", "hard", "fixed", "top_k"), default="router",
                         help="router: softmax of the router; hard: its top-1 expert; fixed: --weights")
    predict.add_argument("--weights", help="fixed mode: one weight per expert in manifest order, e.g. 1,0,0")
    predict.set_defaults(func=_cmd_twin_predict)
    generate = twin_sub.add_parser("generate", help="generate text from prompts with a causal-LM twin run, each "
                                                    "prompt routed once and its weights held while decoding")
    generate.add_argument("output", help="output URL of a twin run")
    generate.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    generate.add_argument("--prompts-file", help="JSONL of {\"text\": PROMPT} (the router's data file works: its "
                                                 "task is ignored); after the --prompt ones")
    generate.add_argument("--mode", choices=("router", "hard", "fixed", "top_k"), default="router",
                          help="router: softmax of the router; hard: its top-1; top_k: its top --top-k, "
                               "renormalised; fixed: --weights")
    generate.add_argument("--top-k", type=int, default=None, help="experts mixed in top_k mode (default 2)")
    generate.add_argument("--weights", help="fixed mode: one weight per expert in manifest order, e.g. 1,0,0")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    generate.add_argument("--json", action="store_true", help="one JSON line per prompt, in order: prompt, text, "
                                                             "token_ids (generated only), weights")
    generate.set_defaults(func=_cmd_twin_generate)
    return parser


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="merge YAML whose `storage:` section gives the storage options")
    parser.add_argument("--storage-option", action="append", type=_storage_option, metavar="KEY=VALUE",
                        help="an fsspec / s3fs storage option, as `storage:` in a config would give it (repeat; "
                             "VALUE is YAML: use_ssl=false is a bool, 'client_kwargs={\"region_name\": \"us-east-1\"}' "
                             "a mapping; quote a string that looks like a number); wins over --config")


def _interrupted_message(args) -> str:
    if args.command in ("run", "demo"):
        return RUN_INTERRUPTED_OVERWRITE if getattr(args, "overwrite", False) else RUN_INTERRUPTED
    return "interrupted."


def main(argv: list[str] | None = None, *, ray_first: bool = False) -> int:
    """Run one command; ``ray_first``: the command's own process, where `run` and `demo` start Ray
    while they import and load the config (``console_main``)."""
    args = build_parser().parse_args(argv)
    args.ray_first = ray_first
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"mergefleet: {_interrupted_message(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line, no traceback (-v adds it): the message names the file, key or URL
        if args.verbose:
            traceback.print_exc()
        print(f"mergefleet: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR


def console_main() -> None:
    """The ``mergefleet`` command: ``main``, then exit. When this process started its own Ray, it
    exits at once instead of waiting for Ray's shutdown (1.5–2.5 s here): everything the command
    wrote is committed by then, and the watchdog reaps the embedded Ray's processes within seconds
    (pipeline/ray_watchdog.py)."""
    code = main(ray_first=True)
    if _runs_embedded_ray():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _runs_embedded_ray() -> bool:
    """Whether a Ray this process started (its GCS a child of this process) is up."""
    import psutil

    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        return False

    def is_gcs(process: psutil.Process) -> bool:
        try:
            return "gcs_server" in process.name()
        except psutil.Error:  # gone meanwhile
            return False

    return any(map(is_gcs, psutil.Process().children(recursive=True)))


if __name__ == "__main__":
    console_main()
