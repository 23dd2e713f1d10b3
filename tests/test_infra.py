"""The deployment files under infra/ agree with each other and with the package.

Static checks parse every manifest and compare the fields that must match across files
(image, Ray version, `mergefleet run` command and config mount, GPU resources, S3
secret). The Ray Job checks start a local Ray head with `ray start --block`, submit a
driver through `ray job submit` the way the CronJob does, and poll it to the end.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"

CONFIGMAP_YAML = "kuberay/configmap.yaml"
RAYCLUSTER_YAML = "kuberay/raycluster.yaml"
RAYJOB_YAML = "kuberay/rayjob.yaml"
CRONJOB_YAML = "schedule/cronjob.yaml"
LAUNCHER_YAML = "ray/cluster.yaml"
DOCKERFILE = "docker/Dockerfile"

CONFIG_KEY = "merge.yaml"  # the ConfigMap key that holds the merge recipe
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
OPTIONAL_S3_ENV = {"AWS_ENDPOINT_URL"}  # the others must be present in the Secret
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------- reading the files


def load_docs(rel: str) -> list[dict]:
    """Every YAML document in infra/<rel>, empty documents dropped."""
    with open(INFRA / rel) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_one(rel: str, kind: str) -> dict:
    docs = [doc for doc in load_docs(rel) if doc.get("kind") == kind]
    assert len(docs) == 1, f"infra/{rel}: expected one {kind}, found {len(docs)}"
    return docs[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    text = (INFRA / DOCKERFILE).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def dockerfile_image() -> str:
    """The image reference the Dockerfile declares in its io.mergefleet.image label."""
    labels = " ".join(args for instr, args in dockerfile_instructions() if instr == "LABEL")
    match = re.search(r'io\.mergefleet\.image="([^"]+)"', labels)
    assert match, "infra/docker/Dockerfile: no LABEL io.mergefleet.image=\"REGISTRY/NAME:TAG\""
    return match.group(1)


def dockerfile_ray_version() -> str:
    for instr, args in dockerfile_instructions():
        match = re.match(r"RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", args)
        if instr == "ARG" and match:
            return match.group(1)
    raise AssertionError("infra/docker/Dockerfile: no ARG RAY_IMAGE=rayproject/ray:X.Y.Z-...")


def project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def ray_cluster_specs() -> dict[str, dict]:
    """The two KubeRay cluster specs: the long-lived RayCluster and the RayJob's own."""
    return {
        RAYCLUSTER_YAML: load_one(RAYCLUSTER_YAML, "RayCluster")["spec"],
        RAYJOB_YAML: load_one(RAYJOB_YAML, "RayJob")["spec"]["rayClusterSpec"],
    }


def head_container(cluster_spec: dict) -> dict:
    containers = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    return containers[0]  # KubeRay runs Ray in the first container


def worker_containers(cluster_spec: dict) -> list[dict]:
    return [
        group["template"]["spec"]["containers"][0] for group in cluster_spec["workerGroupSpecs"]
    ]


def images_in(node) -> list[str]:
    """Every `image:` value anywhere in a parsed manifest."""
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [image for value in node.values() for image in images_in(value)]
    if isinstance(node, list):
        return [image for value in node for image in images_in(value)]
    return []


def config_path_on_head(cluster_spec: dict) -> str:
    """Where the head container sees the merge recipe from the ConfigMap."""
    configmap_name = load_one(CONFIGMAP_YAML, "ConfigMap")["metadata"]["name"]
    pod = cluster_spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", []) if "configMap" in v}
    for mount in head_container(cluster_spec).get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None or volume["configMap"]["name"] != configmap_name:
            continue
        assert "subPath" not in mount, "a subPath mount would not see ConfigMap updates"
        items = {item["key"]: item["path"] for item in volume["configMap"].get("items", [])}
        return f"{mount['mountPath'].rstrip('/')}/{items.get(CONFIG_KEY, CONFIG_KEY)}"
    raise AssertionError(f"head container does not mount ConfigMap {configmap_name!r}")


def mergefleet_run(command: str, env: dict[str, str] | None = None) -> tuple[str, dict]:
    """(config path, {option: value}) of the `mergefleet run` call in a shell command.

    `${NAME}` references are replaced from env; backslash-newlines are joined.
    """
    command = re.sub(r"\\\n", " ", command)
    command = re.sub(r"\$\{(\w+)\}", lambda m: (env or {}).get(m.group(1), m.group(0)), command)
    words = shlex.split(command)
    for i in range(len(words) - 1):
        if words[i] == "mergefleet" and words[i + 1] == "run":
            config, rest = words[i + 2], words[i + 3 :]
            options = {rest[j]: rest[j + 1] for j in range(len(rest) - 1) if rest[j].startswith("--")}
            return config, options
    raise AssertionError(f"no `mergefleet run CONFIG` in {command!r}")


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def secret_refs(container: dict) -> dict[str, tuple[str, str, bool]]:
    """{env name: (secret name, key, optional)} for the secretKeyRef env of a container."""
    refs = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs[entry["name"]] = (ref["name"], ref["key"], bool(ref.get("optional", False)))
    return refs


# ---------------------------------------------------------------- static checks


def test_every_manifest_parses_with_kind_and_api_version():
    for path in sorted(INFRA.rglob("*.yaml")):
        rel = str(path.relative_to(INFRA))
        docs = load_docs(rel)
        assert docs, f"infra/{rel} has no YAML document"
        if rel == LAUNCHER_YAML:
            continue  # Ray cluster launcher config, not a Kubernetes object
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"infra/{rel}: missing apiVersion/kind"
            assert doc.get("metadata", {}).get("name"), f"infra/{rel}: {doc['kind']} has no name"


def test_image_is_the_same_everywhere_and_tagged_with_the_package_version():
    image = dockerfile_image()
    assert image.rsplit(":", 1)[1] == project()["project"]["version"], (
        f"image tag of {image!r} differs from the version in pyproject.toml; bump both together"
    )
    for rel, minimum in [(RAYCLUSTER_YAML, 2), (RAYJOB_YAML, 2), (CRONJOB_YAML, 1)]:
        found = images_in(load_docs(rel))
        assert len(found) >= minimum, f"infra/{rel}: expected >= {minimum} images, found {found}"
        assert set(found) == {image}, f"infra/{rel} uses {sorted(set(found))}, Dockerfile builds {image!r}"
    assert load_docs(LAUNCHER_YAML)[0]["docker"]["image"] == image


def test_ray_version_of_the_image_matches_the_kuberay_specs():
    ray_version = dockerfile_ray_version()
    for rel, spec in ray_cluster_specs().items():
        assert spec["rayVersion"] == ray_version, f"infra/{rel}: rayVersion vs Dockerfile RAY_IMAGE"


def test_dockerfile_installs_cuda_torch_and_the_package():
    instructions = dockerfile_instructions()
    froms = [args for instr, args in instructions if instr == "FROM"]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a}
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[-1])
    assert re.match(r"(rayproject/ray:.*-gpu|nvidia/cuda:)", base), f"base image {base!r} has no CUDA"
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert "download.pytorch.org/whl/cu" in args.get("TORCH_INDEX_URL", "") and "TORCH_INDEX_URL" in runs
    assert re.search(r"pip install [^&;]*\.(\s|$)", runs), "Dockerfile does not `pip install .`"
    copied = {Path(a.split()[-2]).name for i, a in instructions if i == "COPY"}
    packages = [p.rstrip("*") for p in project()["tool"]["setuptools"]["packages"]["find"]["include"]]
    for needed in ["pyproject.toml", *packages]:
        assert needed in copied, f"Dockerfile does not COPY {needed}, so `pip install .` misses it"
    assert not any(i in {"ENTRYPOINT", "CMD"} for i, _ in instructions), (
        "KubeRay and the launcher run `ray start` themselves; keep the base image's entrypoint"
    )


def test_configmap_holds_a_ties_recipe():
    configmap = load_one(CONFIGMAP_YAML, "ConfigMap")
    recipe = yaml.safe_load(configmap["data"][CONFIG_KEY])
    assert {"merge_method", "base_model", "models", "parameters", "dtype", "output"} <= set(recipe)
    assert recipe["merge_method"] == "ties"
    assert recipe["dtype"] in {"float32", "float16", "bfloat16"}
    assert len(recipe["models"]) >= 2
    for entry in recipe["models"]:
        assert entry["model"] != recipe["base_model"]
        assert {"weight", "density"} <= set(entry["parameters"])
        assert 0 < entry["parameters"]["density"] <= 1
    assert recipe["output"].startswith("s3://")


def test_rayjob_runs_mergefleet_on_the_mounted_config():
    rayjob = load_one(RAYJOB_YAML, "RayJob")["spec"]
    config, options = mergefleet_run(rayjob["entrypoint"])
    assert config == config_path_on_head(rayjob["rayClusterSpec"])
    assert options.get("--address") == "auto"
    assert options.get("--output", "").startswith("s3://")
    assert rayjob["shutdownAfterJobFinishes"] is True


def test_cronjob_submits_mergefleet_to_the_raycluster():
    raycluster = load_one(RAYCLUSTER_YAML, "RayCluster")
    cronjob = load_one(CRONJOB_YAML, "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    script = " ".join(container.get("command", []) + container.get("args", []))
    env = container_env(container)
    config, options = mergefleet_run(script, env)
    assert config == config_path_on_head(raycluster["spec"])
    assert options.get("--address") == "auto"
    assert options.get("--output", "").startswith("s3://")

    words = shlex.split(re.sub(r"\\\n", " ", script))
    submit = words.index("submit")
    assert words[submit - 2 : submit] == ["ray", "job"], "the CronJob should run `ray job submit`"
    address = words[words.index("--address", submit) + 1]
    address = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], address)
    ports = {p.get("name"): p["containerPort"] for p in head_container(raycluster["spec"])["ports"]}
    expected = f"http://{raycluster['metadata']['name']}-head-svc:{ports['dashboard']}"
    assert address == expected, "the CronJob must target the RayCluster's dashboard Service"


def test_workers_request_gpus_and_the_head_does_not():
    for rel, spec in ray_cluster_specs().items():
        assert GPU not in head_container(spec).get("resources", {}).get("limits", {}), rel
        for group, container in zip(spec["workerGroupSpecs"], worker_containers(spec)):
            resources = container["resources"]
            assert int(resources["limits"][GPU]) >= 1, f"infra/{rel}: group {group['groupName']}"
            gpus = resources["limits"][GPU]
            assert resources.get("requests", {}).get(GPU, gpus) == gpus, "GPU requests must equal limits"
            tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
            assert GPU in tolerated, f"infra/{rel}: GPU workers must tolerate the {GPU} taint"
    launcher = load_docs(LAUNCHER_YAML)[0]
    node_types = launcher["available_node_types"]
    assert node_types[launcher["head_node_type"]]["resources"].get("CPU") == 0
    workers = [t for name, t in node_types.items() if name != launcher["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)


def test_s3_secret_is_wired_the_same_into_every_ray_pod():
    """Driver (head) and shard tasks (workers) both touch object storage."""
    expected = None
    for rel, spec in ray_cluster_specs().items():
        for container in [head_container(spec), *worker_containers(spec)]:
            refs = secret_refs(container)
            assert set(S3_ENV) <= set(refs), f"infra/{rel} {container['name']}: env {sorted(refs)}"
            for name in S3_ENV:
                secret, key, optional = refs[name]
                assert key == name and optional == (name in OPTIONAL_S3_ENV), (rel, name, refs[name])
            expected = expected or refs
            assert refs == expected, f"infra/{rel} {container['name']} uses another Secret"
    secret_name = next(iter(expected.values()))[0]
    readme = (INFRA / "README.md").read_text()
    assert f"kubectl create secret generic {secret_name}" in readme


def test_rayjob_cluster_is_the_raycluster_with_fixed_workers():
    long_lived, one_off = ray_cluster_specs().values()
    assert one_off["headGroupSpec"] == long_lived["headGroupSpec"]
    for a, b in zip(one_off["workerGroupSpecs"], long_lived["workerGroupSpecs"], strict=True):
        assert a["groupName"] == b["groupName"] and a["template"] == b["template"]


def test_launcher_installs_the_synced_checkout_and_starts_ray():
    launcher = load_docs(LAUNCHER_YAML)[0]
    mounted = [remote for remote, local in launcher["file_mounts"].items() if local == "."]
    assert mounted, "cluster.yaml should sync the checkout (file_mounts REMOTE: .)"
    assert any("pip install" in c and mounted[0] in c for c in launcher["setup_commands"])
    assert any("ray start --head" in c for c in launcher["head_start_ray_commands"])
    assert any("ray start --address=" in c for c in launcher["worker_start_ray_commands"])


def test_readme_describes_every_infra_file():
    readme = (INFRA / "README.md").read_text()
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and path.name != "README.md":
            rel = str(path.relative_to(INFRA))
            assert rel in readme, f"infra/README.md does not mention {rel}"


# ---------------------------------------------------------------- Ray Job on a local head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RAY), *args], env=ray_env(), capture_output=True, text=True, timeout=timeout
    )


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop only the Ray processes this test started (never `ray stop`, which would kill
    every Ray cluster on the machine, other test sessions' included)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # leftovers of our process group
    except ProcessLookupError:
        pass
    import psutil  # a Ray dependency

    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            if proc.info["uids"].real == os.getuid() and temp_dir in " ".join(proc.info["cmdline"] or []):
                proc.kill()  # a process that names our unique temp dir is ours
        except (psutil.Error, TypeError):
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head with the job API, as `ray job submit` sees a cluster; yields its
    dashboard URL."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must be short
    dashboard_port = free_port()
    command = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--include-dashboard=true",
        # 2 logical CPUs: room for a coordinator actor next to the shard tasks.
        "--num-cpus=2", "--num-gpus=0",
        f"--object-store-memory={100 * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            command, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while not http_ok(f"{url}/api/jobs/"):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray head did not come up at {url}:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        stop_head(head, temp_dir)


def run_ray_job(url: str, entrypoint: list[str], *, deadline_s: float = 180) -> tuple[str, str]:
    """Submit `entrypoint` with `ray job submit --no-wait` and poll it until it ends;
    returns (final status, job logs). Polling goes through the job SDK, whose statuses
    are an enum (the CLI's `ray job status` prints prose)."""
    from ray.job_submission import JobSubmissionClient

    job_id = f"test-infra-{uuid.uuid4().hex[:8]}"
    submitted = ray_cli(
        "job", "submit", "--address", url, "--submission-id", job_id, "--no-wait", "--", *entrypoint
    )
    assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout}\n{submitted.stderr}"
    client = JobSubmissionClient(url)
    deadline = time.monotonic() + deadline_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    return str(status.value), client.get_job_logs(job_id)


def test_ray_job_submit_runs_a_driver_on_the_cluster(ray_head, tmp_path):
    """The submission path of the CronJob, with a stand-in driver that connects with
    address="auto" (as `mergefleet run --address auto` does) and runs a task."""
    marker = tmp_path / "driver-ran.txt"
    driver = (
        "import ray, sys; ray.init(address='auto'); "
        "f = ray.remote(lambda: 6 * 7); "
        f"open({str(marker)!r}, 'w').write(str(ray.get(f.remote())))"
    )
    status, logs = run_ray_job(ray_head, [sys.executable, "-c", driver])
    assert status == "SUCCEEDED", f"job ended {status}; logs:\n{logs}"
    assert marker.read_text() == "42"


def write_tiny_checkpoint(directory: Path, tensors: dict) -> Path:
    """An HF-layout checkpoint: model.safetensors + config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "vocab_size": 64}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def why_mergefleet_cli_is_missing() -> str | None:
    if shutil.which("mergefleet", path=str(VENV_BIN)) is None:
        return f"no `mergefleet` console script in {VENV_BIN} (pip install -e . once pipeline/cli.py exists)"
    try:
        import pipeline.cli  # noqa: F401
    except ImportError as error:
        return f"pipeline.cli does not import yet: {error}"
    return None


def test_mergefleet_run_as_a_ray_job_writes_a_manifest(request, tmp_path):
    """`mergefleet run CONFIG --address auto`, as the RayJob and CronJob run it, on a tiny
    base + 2 experts, submitted with `ray job submit` to a local head."""
    reason = why_mergefleet_cli_is_missing()
    if reason:
        pytest.skip(reason)
    import torch

    generator = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (64, 16), "model.layers.0.mlp.up_proj.weight": (32, 16),
              "model.layers.0.mlp.down_proj.weight": (16, 32), "model.norm.weight": (16,)}  # fmt: skip
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    base_dir = write_tiny_checkpoint(tmp_path / "base", base)
    expert_dirs = [
        write_tiny_checkpoint(
            tmp_path / f"expert{i}",
            {name: t + 0.1 * torch.randn(t.shape, generator=generator) for name, t in base.items()},
        )
        for i in range(2)
    ]
    output = tmp_path / "merged"
    recipe = {
        "merge_method": "ties",
        "base_model": str(base_dir),
        "models": [{"model": str(d), "parameters": {"weight": 1.0, "density": 0.5}} for d in expert_dirs],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "output": str(output),
    }
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))

    url = request.getfixturevalue("ray_head")
    mergefleet = shutil.which("mergefleet", path=str(VENV_BIN))
    status, logs = run_ray_job(url, [mergefleet, "run", str(config), "--address", "auto"])
    assert status == "SUCCEEDED", f"job ended {status}; logs:\n{logs}"
    assert (output / "manifest.json").is_file(), f"no manifest.json in {sorted(output.rglob('*'))}"
    json.loads((output / "manifest.json").read_text())

    from safetensors import safe_open

    merged = {}
    for shard in output.rglob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            merged.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        assert tensor.shape == base[name].shape and tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
