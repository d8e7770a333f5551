"""A real Milvus standalone server (the PyPI `milvus` package's binary) for tests and benchmarks.

It runs in a network namespace of its own holding only loopback (`unshare -n`), with every component's
address set to 127.0.0.1, so nothing it does reaches any other address; `netns_bridge.py` forwards one
port of this machine's 127.0.0.1 to its gRPC port (19530 inside). Stopping is SIGTERM to the whole process
group, then SIGKILL after a bounded wait: no process is left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

GRPC_PORT = 19530  # inside the namespace: every port there is free, so the package's defaults are used
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")
BRIDGE = Path(__file__).with_name("netns_bridge.py")
TOKEN = "root:Milvus"  # the server's own default credentials when authorization is on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusServer:
    """`with MilvusServer(folder) as server:` → `milvus://127.0.0.1:{server.port}`."""

    def __init__(self, folder: Path, authorization: bool = False, start_timeout: float = 180.0):
        self.folder, self.authorization, self.start_timeout = Path(folder), authorization, start_timeout
        self.port = free_port()
        self.server = self.bridge = None

    @property
    def uri(self) -> str:
        return f"milvus://127.0.0.1:{self.port}"

    def start(self) -> MilvusServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        extra = [f"--extra-config={c}.ip=127.0.0.1" for c in COMPONENTS]
        if self.authorization:  # the package parses this flag with bool(): any value given, even "false", is on
            extra.append("--authorization-enabled=true")
        server = subprocess.list2cmdline([sys.executable, "-c", "import milvus; milvus.main()", "--data", str(self.folder / "data"), *extra])
        log = open(self.folder / "server.log", "ab")
        self.server = subprocess.Popen(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {server}"],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.bridge = subprocess.Popen([sys.executable, str(BRIDGE), str(self.server.pid), f"{self.port}:{GRPC_PORT}"],
                                       stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        if self.bridge.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the namespace bridge did not start (see {self.folder / 'server.log'})")
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"Milvus exited with {self.server.returncode} (see {self.folder / 'server.log'})")
            try:
                client = MilvusClient(uri=f"http://127.0.0.1:{self.port}", token=TOKEN, timeout=3)
                client.list_collections()
                client.close()
                return
            except Exception:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"Milvus did not answer within {self.start_timeout:.0f} s (see {self.folder / 'server.log'})")

    def kill(self) -> None:
        """kill -9 the server (every process in its group), as a crash would; the bridge goes too."""
        self._signal_all(signal.SIGKILL, wait=10)

    def stop(self, grace: float = 10.0) -> None:
        self._signal_all(signal.SIGTERM, wait=grace)
        self._signal_all(signal.SIGKILL, wait=10)

    def _signal_all(self, sig: int, wait: float) -> None:
        """Signal each process group (the server binary is a grandchild) and wait until none of it is alive."""
        groups = [p.pid for p in (self.server, self.bridge) if p is not None]
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(_alive(group) for group in groups) and time.monotonic() < deadline:
            for proc in (self.server, self.bridge):
                if proc is not None:
                    proc.poll()
            time.sleep(0.2)

    def __enter__(self) -> MilvusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(group: int) -> bool:
    """Whether a process of this group still runs (zombies, which only wait to be reaped, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False
