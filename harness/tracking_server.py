"""Start an ``mlflow server`` on a free loopback port for the duration of a block (local multi-worker sweeps)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.errors import HarnessError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"mlflow server exited with code {proc.returncode}; run it by hand to see why")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise HarnessError(f"mlflow server at {url} not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def local_server(backend_uri: str):
    """Yields a tracking URI. A SQLite store gets a server in front of it; other URIs are used as they are."""
    if not backend_uri.startswith("sqlite:///"):
        yield backend_uri
        return
    artifacts = Path(backend_uri.removeprefix("sqlite:///")).resolve().parent / "artifacts"
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
