"""Starting servers in tests: a free local port, and waiting for /health."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, log_path: Path, timeout_s: float) -> float:
    """Poll url/health until it answers 200; -> seconds it took. Fails with the log's tail
    if the process exits first or the time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n"
                                 f"{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"server not healthy after {timeout_s}s:\n{log_path.read_text()[-4000:]}")


def stop_server(proc) -> None:
    """SIGINT to the server's process group (started with start_new_session=True), then
    SIGKILL if it has not exited within a minute."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
