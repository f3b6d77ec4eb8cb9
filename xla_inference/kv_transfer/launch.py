"""`xla-inference disagg-serve`: a prefill server (kv_producer), a decode server
(kv_consumer) and the proxy in front of them (kv_transfer/proxy.py), on this machine; the
vLLM arguments after `--` go to both servers.

    xla-inference disagg-serve --port 8000 --decode-tp 2 -- --model DIR --max-model-len 2048

Clients talk to the proxy (http://HOST:PORT/v1). Ctrl-C stops all three."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request


def server_command(role: str, port: int, kv_port: int, tp: int, vllm_args: list[str],
                   lease_s: float) -> list[str]:
    transfer = dict(kv_connector="XlaNetworkConnector", kv_role=role, kv_port=kv_port,
                    kv_connector_extra_config={"lease_seconds": lease_s})
    return [sys.executable, "-m", "xla_inference.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--tensor-parallel-size", str(tp), *vllm_args,
            "--kv-transfer-config", json.dumps(transfer)]


def _wait_healthy(procs: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = dict(procs)
    while waiting:
        for url, proc in list(waiting.items()):
            if proc.poll() is not None:
                raise SystemExit(f"xla-inference disagg-serve: the server for {url} exited "
                                 f"with {proc.returncode}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        del waiting[url]
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise SystemExit(f"xla-inference disagg-serve: {list(waiting)} not healthy after "
                             f"{timeout_s:.0f}s")
        time.sleep(1)


def _stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="xla-inference disagg-serve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="the proxy's address")
    parser.add_argument("--port", type=int, default=8000, help="the proxy's port")
    parser.add_argument("--prefill-port", type=int, default=8100)
    parser.add_argument("--decode-port", type=int, default=8200)
    parser.add_argument("--kv-port", type=int, default=14579,
                        help="the prefill server's KV port")
    parser.add_argument("--prefill-tp", type=int, default=1)
    parser.add_argument("--decode-tp", type=int, default=1)
    parser.add_argument("--lease-seconds", type=float, default=60.0)
    parser.add_argument("--startup-timeout", type=float, default=1800.0)
    ns = parser.parse_args(argv[:split])
    vllm_args = argv[split + 1:]
    servers = {}
    for role, port, tp in (("kv_producer", ns.prefill_port, ns.prefill_tp),
                           ("kv_consumer", ns.decode_port, ns.decode_tp)):
        servers[f"http://127.0.0.1:{port}"] = subprocess.Popen(
            server_command(role, port, ns.kv_port, tp, vllm_args, ns.lease_seconds),
            start_new_session=True)
    try:
        _wait_healthy(servers, ns.startup_timeout)
        from xla_inference.kv_transfer.proxy import main as proxy_main

        prefill, decode = servers
        print(f"xla-inference disagg-serve: prefill {prefill}, decode {decode}, proxy "
              f"http://{ns.host}:{ns.port}/v1", flush=True)
        proxy_main(["--prefill", prefill, "--decode", decode, "--host", ns.host,
                    "--port", str(ns.port)])
    finally:
        _stop(list(servers.values()))


if __name__ == "__main__":
    main()
