"""Start a local cluster as ``embr_rl.run`` does and classify every socket it listens on.

Run by tests/integration/test_cluster_security.py in a fresh process (its own ``HOME``, no
``RAY_AUTH_MODE``), which prints one JSON list: ``[ip, port, process, kind]`` per listening
socket of this process and its children, ``kind`` being ``loopback``, ``auth`` (refuses a
request without the token), ``metrics`` (a read-only Prometheus page) or ``open``.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request

import grpc
import psutil
import ray

from embr_rl.config import load_config
from embr_rl.run import start_ray

# One real method per Ray gRPC service: token auth answers UNAUTHENTICATED before dispatch.
GRPC_METHODS = [
    "/ray.rpc.JobInfoGcsService/GetAllJobInfo",
    "/ray.rpc.NodeManagerService/GetResourceLoad",
    "/ray.rpc.CoreWorkerService/NumPendingTasks",
    "/ray.rpc.ReporterService/GetTraceback",
    "/ray.rpc.ObjectManagerService/FreeObjects",
    "/ray.rpc.ObjectManagerService/Pull",
]


def _external_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def classify(host: str, port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=3) as resp:
            body = resp.read(64)
        return "metrics" if body.startswith(b"# HELP") else "open"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return "auth"
        return "open"
    except Exception:
        pass  # not HTTP/1: gRPC
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in GRPC_METHODS:
            call = channel.unary_unary(
                method, request_serializer=lambda x: x, response_deserializer=lambda b: b
            )
            try:
                call(b"", timeout=3)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return "auth"
    return "open"


def main() -> None:
    port = int(sys.argv[1])
    cfg = load_config(None, [f"cluster.dashboard_port={port}", "cluster.num_cpus=1"])
    start_ray(cfg)
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    time.sleep(3)  # agents and metrics servers come up after the first task
    me = psutil.Process()
    tree = {p.pid: p for p in me.children(recursive=True)} | {me.pid: me}
    external = _external_ip()
    rows = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in tree:
            continue
        ip, lport = conn.laddr.ip, conn.laddr.port
        try:
            name = tree[conn.pid].name()
        except psutil.Error:
            name = "?"
        if ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            kind = "loopback"
        else:
            host = external if ip in ("0.0.0.0", "::") else ip.removeprefix("::ffff:")
            kind = classify(host, lport)
        rows.append([ip, lport, name, kind])
    ray.shutdown()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
