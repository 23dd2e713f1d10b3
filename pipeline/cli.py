"""mergefleet command line: run | plan | verify | demo | twin (train-router, predict)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import yaml

LOG = logging.getLogger("mergefleet")


def _cmd_run(args) -> int:
    from pipeline.config import load_config
    from pipeline.coordinator import run_merge

    manifest = run_merge(load_config(args.config), output_url=args.output, address=args.address,
                         overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(_summary(manifest), indent=2))
    return 0


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


def _cmd_status(args) -> int:
    from pipeline.resume import output_status

    status = output_status(args.output)
    print(json.dumps(status, indent=2))
    return 0


def _cmd_verify(args) -> int:
    from manifests.verify import verify_output

    problems = verify_output(args.output)
    for p in problems:
        print(f"FAIL {p}")
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def _cmd_demo(args) -> int:
    from pipeline.config import load_config
    from pipeline.coordinator import run_merge
    from pipeline.samples import build_sample_models

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mergefleet-demo-"))
    base, experts = build_sample_models(work / "models", n_experts=3)
    config = {
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
        "parameters": {"normalize": True, "lambda": 1.0}, "dtype": "bfloat16",
        "output": str(Path(args.output).resolve()), "shards": 4,
    }
    (work / "merge.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"sample base + {len(experts)} experts in {work / 'models'}; config {work / 'merge.yaml'}")
    manifest = run_merge(load_config(work / "merge.yaml"), overwrite=True, progress=not args.no_progress)
    print(json.dumps(_summary(manifest), indent=2))
    return 0


def _cmd_twin_train_router(args) -> int:
    from twin.train import train_twin_router

    metrics = train_twin_router(args.output, args.data, epochs=args.epochs, seed=args.seed, lr=args.lr,
                                batch_size=args.batch_size, val_fraction=args.val_fraction,
                                test_fraction=args.test_fraction)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


def _cmd_twin_predict(args) -> int:
    from twin.load import load_tokenizer, load_twin, predict

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.strip("[]").split(",")]
        except ValueError:
            raise ValueError(f"--weights {args.weights!r}: give one number per expert, comma-separated (e.g. 1,0,0)") from None
    if (args.mode == "fixed") != (weights is not None):
        raise ValueError("--weights goes with --mode fixed (and fixed mode needs --weights)")
    twin = load_twin(args.output, router=args.mode != "fixed" or None)
    result = predict(twin, load_tokenizer(args.output), args.text, mode=args.mode, weights=weights)
    print(json.dumps(result, indent=2))
    return 0


def _summary(manifest) -> dict:
    return {"output_files": [f.name for f in manifest.files], "run_id": manifest.run_id, "method": manifest.method,
            "tensors": manifest.n_tensors, "output_bytes": manifest.output_bytes, "bytes_read": manifest.bytes_read,
            "timings": {k: v for k, v in manifest.timings.items() if k != "shards"}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergefleet", description="Distributed merging of fine-tuned experts on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="plan, merge on Ray and publish the output")
    run.add_argument("config", help="merge YAML (mergekit format)")
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
    verify = sub.add_parser("verify", help="re-read every output tensor and check the manifest (exit 0 ok, 1 not)")
    verify.add_argument("output", help="output URL of a run")
    verify.set_defaults(func=_cmd_verify)
    status = sub.add_parser("status", help="show whether a run at OUTPUT_URL is complete, or its done / missing shards")
    status.add_argument("output", help="output URL of a run")
    status.set_defaults(func=_cmd_status)
    demo = sub.add_parser("demo", help="build sample experts and TIES-merge them on embedded Ray")
    demo.add_argument("--output", default="out/demo", help="output directory (default out/demo)")
    demo.add_argument("--workdir", help="where the sample models go (default: a temp dir)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    twin = sub.add_parser("twin", help="Twin-Merging: train the router of a twin run, predict with it")
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
    predict.add_argument("--mode", choices=("router", "hard", "fixed"), default="router",
                         help="router: softmax of the router; hard: its top-1 expert; fixed: --weights")
    predict.add_argument("--weights", help="fixed mode: one weight per expert in manifest order, e.g. 1,0,0")
    predict.set_defaults(func=_cmd_twin_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"mergefleet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
