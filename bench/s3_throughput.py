"""The pipeline's input GB/s on a real S3 server beside the store's own ranged-read GB/s; prints
JSON and a Markdown table.

    .venv/bin/python bench/s3_throughput.py --hidden 1024 --layers 8 --experts 3 --json s3.json

Synthetic Llama-shaped bf16 checkpoints (bench/run.py's builder) are uploaded to SeaweedFS
(`weed mini`, started as the tests start it: tests/s3_server.py) and merged through a 2-node
``ray.cluster_utils.Cluster`` (tests/conftest.py) with inputs and output on S3. Beside each run,
the store's own rates are measured by Ray tasks on the same cluster with the same client (the
pipeline's fsspec / s3fs filesystem): ranged reads replay the very GETs the plan's shard tasks make
(same sizes, one task per shard, as many at once as the pipeline runs), and multipart writes put
each shard's bytes in the pieces the pipeline writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import psutil  # noqa: E402
import ray  # noqa: E402
from conftest import two_node_cluster  # noqa: E402
from s3_server import start_s3_server  # noqa: E402

from bench.run import add_model_arguments, build_inputs, merge_yaml  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.coordinator import run_merge  # noqa: E402
from pipeline.planner import build_plan  # noqa: E402
from workers.chunks import READ_CONCURRENCY, chunk_numel, row_ranges  # noqa: E402
from workers.specs import ShardSpec  # noqa: E402
from workers.storage import open_fs  # noqa: E402
from workers.tensor_io import REMOTE_PART_BYTES, itemsize, remote_gets  # noqa: E402

BUCKET = "mergefleet-bench"
METHODS = ("linear", "ties")  # ties: per-tensor, density 0.2 (bench/run.py's merge_yaml)


def shard_gets(spec: ShardSpec, limit: int | None = None) -> list[tuple[str, int, int]]:
    """(file URL, start, end) of every ranged GET the shard's task makes, in its order: each
    tensor's row chunks of each input it reads (a copy reads its source only), split as
    RangeReader splits them (``limit``: at another GET size)."""
    gets = []
    for task in spec.tensors:
        infos = task.inputs if task.action == "merge" else task.inputs[:1]
        for rows in row_ranges(task):
            for info in infos:
                row_bytes = chunk_numel(info, (0, 1)) * itemsize(info.dtype)
                start, nbytes = info.start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
                gets += [(info.file_url, lo, hi) for lo, hi in remote_gets(start, nbytes, limit)]
    return gets


def shard_pieces(spec: ShardSpec) -> list[int]:
    """Byte sizes of the writes the shard's task makes: each merged or copied row chunk."""
    return [chunk_numel(t.inputs[0], rows) * itemsize(t.out_dtype) for t in spec.tensors for rows in row_ranges(t)]


@ray.remote(num_cpus=1)
def store_read(gets: list[tuple[str, int, int]], concurrency: int) -> tuple[int, float]:
    """The store alone: the GETs through the pipeline's client, ``concurrency`` at a time; (bytes, s)."""
    fs, _ = open_fs(gets[0][0])
    paths = {url: open_fs(url)[1] for url, _, _ in gets}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        got = sum(pool.map(lambda g: len(fs.cat_file(paths[g[0]], start=g[1], end=g[2])), gets))
    return got, time.perf_counter() - t0


@ray.remote(num_cpus=1)
def store_write(url: str, pieces: list[int], part_bytes: int) -> tuple[int, float]:
    """The store alone: a multipart upload of ``pieces`` (bytes each) through the pipeline's client
    in parts of ``part_bytes``, no header; (bytes, s)."""
    blob = memoryview(os.urandom(max(pieces)))
    fs, path = open_fs(url)
    t0 = time.perf_counter()
    with fs.open(path, "wb", block_size=part_bytes) as f:
        for n in pieces:
            f.write(blob[:n])
    seconds = time.perf_counter() - t0
    fs.rm(path)
    return sum(pieces), seconds


class CpuMeter:
    """User + system CPU seconds used so far by the S3 server, and by everything the run spends
    (the server, this driver, every process of the cluster's nodes and their Ray workers; a process
    that exits keeps what it was last seen to use)."""

    def __init__(self, server_pid: int, cluster):
        self.server, self.cluster = psutil.Process(server_pid), cluster
        self._seen: dict[int, float] = {}

    def _processes(self) -> list[psutil.Process]:
        found = {p.pid: p for p in (self.server, psutil.Process())}
        for node in self.cluster.list_all_nodes():
            for _, process in node.live_processes():
                with contextlib.suppress(psutil.NoSuchProcess):
                    root = psutil.Process(process.pid)
                    found.update({p.pid: p for p in (root, *root.children(recursive=True))})
        return list(found.values())

    def read(self) -> tuple[float, float]:
        """(server, all) CPU seconds."""
        for p in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                self._seen[p.pid] = sum(p.cpu_times()[:2])
        return self._seen[self.server.pid], sum(self._seen.values())


def per_gb(before: tuple[float, float], after: tuple[float, float], gb: float) -> dict:
    """CPU seconds per GB between two CpuMeter readings: the server's, and everything's."""
    return {"server": round((after[0] - before[0]) / gb, 2), "all": round((after[1] - before[1]) / gb, 2)}


def read_rate(plan, cpu: CpuMeter, *, concurrency: int = READ_CONCURRENCY, get_bytes: int | None = None) -> dict:
    """The store's ranged-read GB/s: the plan's GETs (``get_bytes`` at most each, None: as the
    pipeline), one task per shard, as many at once as the cluster runs shard tasks, ``concurrency``
    GETs in flight in each; and the CPU seconds it costs per GB."""
    cpu0, t0 = cpu.read(), time.perf_counter()
    reads = ray.get([store_read.remote(shard_gets(s, get_bytes), concurrency) for s in plan.shards])
    wall, cpu1 = time.perf_counter() - t0, cpu.read()
    gb = sum(b for b, _ in reads) / 1e9
    return {"store_read_gb": round(gb, 3), "store_read_s": round(wall, 3), "store_read_gb_per_s": round(gb / wall, 3),
            "store_read_cpu_s_per_gb": per_gb(cpu0, cpu1, gb)}


def write_rate(plan, cpu: CpuMeter, *, part_bytes: int = REMOTE_PART_BYTES) -> dict:
    """The store's multipart write GB/s per writer: every shard's output in the pieces the pipeline
    writes, parts of ``part_bytes``, as many writers at once as the cluster runs shard tasks; and
    the CPU seconds it costs per GB."""
    cpu0 = cpu.read()
    writes = ray.get([store_write.remote(plan.output.join(f"store-write-{s.index}"), shard_pieces(s), part_bytes)
                      for s in plan.shards])
    cpu1 = cpu.read()
    gb = sum(b for b, _ in writes) / 1e9
    return {"store_write_gb_per_s_per_writer": round(gb / sum(t for _, t in writes), 3),
            "store_write_cpu_s_per_gb": per_gb(cpu0, cpu1, gb)}


def sweep(plan, cpu: CpuMeter) -> list[dict]:
    """The store alone, in one run: GET sizes × GETs in flight per task, then part sizes."""
    rows = [{"get_mib": mib, "concurrency": c, "load_1min": round(os.getloadavg()[0], 2),
             **read_rate(plan, cpu, concurrency=c, get_bytes=mib * 2**20)}
            for mib in (8, 16, 64) for c in (1, 2, 4, 8)]
    rows += [{"part_mib": mib, "load_1min": round(os.getloadavg()[0], 2),
              **write_rate(plan, cpu, part_bytes=mib * 2**20)} for mib in (5, 8, 16, 50)]
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    return rows


def run_pipeline(config, cpu: CpuMeter) -> dict:
    """One merge on the cluster, S3 in and out: wall, bytes, stage split, the write rate per task
    and the CPU seconds per GB read."""
    cpu0, t0 = cpu.read(), time.perf_counter()
    manifest = run_merge(config, overwrite=True, progress=False)
    wall, cpu1 = time.perf_counter() - t0, cpu.read()
    stages, read_gb = manifest.timings["stages"], manifest.bytes_read / 1e9
    return {"wall_s": round(wall, 3), "input_gb": round(read_gb, 3),
            "pipeline_gb_per_s": round(read_gb / wall, 3),
            "output_gb": round(manifest.output_bytes / 1e9, 3),
            "output_gb_per_s": round(manifest.output_bytes / 1e9 / wall, 3),
            "write_gb_per_s_per_task": round(manifest.output_bytes / 1e9 / max(1e-9, stages.get("write", 0.0)), 3),
            "stages_s": {k: round(v, 2) for k, v in stages.items()}, "shards": len(manifest.timings["shards"]),
            "pipeline_cpu_s_per_gb": per_gb(cpu0, cpu1, read_gb)}


def upload(fs, models: list[Path]) -> list[str]:
    """Put each model directory under s3://BUCKET/in/; their URLs."""
    fs.mkdir(BUCKET)
    for model in models:
        fs.put(str(model), f"{BUCKET}/in/{model.name}", recursive=True)
    return [f"s3://{BUCKET}/in/{m.name}" for m in models]


def method_config(name: str, urls: list[str], args):
    """The bench's merge of the uploaded models (bench/run.py's YAML), output on S3."""
    return load_config({**merge_yaml(name, urls[0], urls[1:]), "output": f"s3://{BUCKET}/out-{name}",
                        "memory_budget": args.memory_budget, **({"shards": args.shards} if args.shards else {})})


def measure(name: str, urls: list[str], args, cpu: CpuMeter) -> dict:
    """A warm-up merge (worker processes, compiled kernels), then ``args.repeat`` pairs of the
    store's rates and a merge measured right after them; the pair of the fastest merge."""
    config = method_config(name, urls, args)
    plan = build_plan(config)
    fs, out = open_fs(config.output)
    run_merge(config, overwrite=True, progress=False)
    pairs = []
    for _ in range(args.repeat):
        pair = {"method": name, **read_rate(plan, cpu), **write_rate(plan, cpu), **run_pipeline(config, cpu),
                "load_1min": round(os.getloadavg()[0], 2)}
        pair["ratio"] = round(pair["pipeline_gb_per_s"] / pair["store_read_gb_per_s"], 3)
        pair["write_ratio"] = round(pair["write_gb_per_s_per_task"] / pair["store_write_gb_per_s_per_writer"], 3)
        pairs.append(pair)
        print(json.dumps(pair), file=sys.stderr)
    fs.rm(out, recursive=True)
    return {**min(pairs, key=lambda p: p["wall_s"]), "ratios": [p["ratio"] for p in pairs]}


def table(rows: list[dict]) -> str:
    header = ("| method | pipeline wall s | input GB read | pipeline input GB/s | store ranged-read GB/s | ratio "
              "| CPU s per GB read: pipeline / store (server's share) | write GB/s per task "
              "| store multipart write GB/s per writer | load |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, store = r["pipeline_cpu_s_per_gb"], r["store_read_cpu_s_per_gb"]
        lines.append(f"| {r['method']} | {r['wall_s']:.1f} | {r['input_gb']:.2f} | {r['pipeline_gb_per_s']:.3f} "
                     f"| {r['store_read_gb_per_s']:.3f} | {r['ratio']:.0%} "
                     f"| {ours['all']:.1f} ({ours['server']:.1f}) / {store['all']:.1f} ({store['server']:.1f}) "
                     f"| {r['write_gb_per_s_per_task']:.3f} | {r['store_write_gb_per_s_per_writer']:.3f} "
                     f"| {r['load_1min']:.1f} |")
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    reads = [r for r in rows if "get_mib" in r]
    writes = [r for r in rows if "part_mib" in r]
    lines = ["| GET MiB | GETs in flight per task | store ranged-read GB/s | CPU s per GB (server's share) | load |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['get_mib']} | {r['concurrency']} | {r['store_read_gb_per_s']:.3f} "
              f"| {r['store_read_cpu_s_per_gb']['all']:.1f} ({r['store_read_cpu_s_per_gb']['server']:.1f}) "
              f"| {r['load_1min']:.1f} |" for r in reads]
    lines += ["", "| part MiB | store multipart write GB/s per writer | CPU s per GB (server's share) | load |",
              "|---|---|---|---|"]
    lines += [f"| {r['part_mib']} | {r['store_write_gb_per_s_per_writer']:.3f} "
              f"| {r['store_write_cpu_s_per_gb']['all']:.1f} ({r['store_write_cpu_s_per_gb']['server']:.1f}) "
              f"| {r['load_1min']:.1f} |" for r in writes]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--memory-budget", default="4GB")
    parser.add_argument("--repeat", type=int, default=2,
                        help="pairs of store + pipeline measurements per method (the fastest merge's pair is kept)")
    parser.add_argument("--sweep", action="store_true",
                        help="also measure the store alone over GET sizes, GETs in flight per task and part sizes "
                             "(the first method's plan), to choose the pipeline's")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mergefleet-bench"))
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    base, experts = build_inputs(workdir, args)
    server_dir = Path(tempfile.mkdtemp(prefix="seaweedfs", dir=workdir))  # removed at the end: several GB
    server = start_s3_server(server_dir / "data")
    os.environ.update(server.env())  # before the cluster starts: its workers take the driver's environment
    cluster = two_node_cluster("mfs3")
    try:
        t0 = time.perf_counter()
        urls = upload(server.filesystem(), [base, *experts])
        upload_s = time.perf_counter() - t0
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        cpu = CpuMeter(server.process.pid, cluster)
        rows = [measure(name, urls, args, cpu) for name in args.methods]
        swept = sweep(build_plan(method_config(args.methods[0], urls, args)), cpu) if args.sweep else None
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.stop()
        shutil.rmtree(server_dir, ignore_errors=True)
    result = {"rows": rows, "sweep": swept, "upload_s": round(upload_s, 2), "nodes": 2,
              "model": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "vocab", "experts")}}
    print(json.dumps(result, indent=1))
    print(table(rows))
    if swept:
        print(sweep_table(swept))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
