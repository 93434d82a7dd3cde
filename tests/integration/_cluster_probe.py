"""Start a local cluster as ``embr_rl.run`` does and classify every socket it listens on.

Run by tests/integration/test_cluster_security.py in a fresh process (its own ``HOME``, no
``RAY_AUTH_MODE``), which prints one JSON list: ``[ip, port, process, kind]`` per listening
socket of this process and its children, ``kind`` being ``loopback``, ``auth`` (refuses a
request without the token), ``metrics`` (a read-only Prometheus page) or ``open``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

import grpc
import psutil

from embr_rl.core.config import load_config
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


def _http(url: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:
            return r.status, r.read(64)
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _grpc(channel: grpc.Channel, method: str, metadata: list[tuple[str, str]]) -> str:
    call = channel.unary_unary(method, request_serializer=lambda x: x, response_deserializer=bytes)
    try:
        call(b"", timeout=3, metadata=metadata)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def classify(host: str, port: int, token: str, cluster_id: str) -> str:
    """``auth`` when a request without the token is refused and the same one with it is not."""
    try:
        without, body = _http(f"http://{host}:{port}/", None)
    except Exception:
        without = None  # not HTTP/1: gRPC
    if without is not None:
        if without == 200 and body.startswith(b"# HELP"):
            return "metrics"
        return (
            "auth"
            if without == 401 and _http(f"http://{host}:{port}/", token)[0] != 401
            else "open"
        )
    ident = [("ray_cluster_id", cluster_id)]
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in GRPC_METHODS:
            refused = _grpc(channel, method, ident)
            if refused == "UNIMPLEMENTED":
                continue  # another service's method
            allowed = _grpc(channel, method, [*ident, ("authorization", f"Bearer {token}")])
            return "auth" if refused == "UNAUTHENTICATED" != allowed else "open"
    return "open"


def main() -> None:
    port = int(sys.argv[1])
    cfg = load_config(None, [f"cluster.dashboard_port={port}", "cluster.num_cpus=1"])
    assert "ray" not in sys.modules  # as under `python -m embr_rl.run`: Ray comes in with start_ray
    start_ray(cfg)
    import ray

    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    time.sleep(3)  # agents and metrics servers come up after the first task
    node = ray._private.worker.global_worker.node
    cluster_id = node.cluster_id.hex()
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    token = "no-token"
    if os.path.isfile(token_file):
        with open(token_file) as fh:
            token = fh.read().strip()
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
            kind = classify(host, lport, token, cluster_id)
        rows.append([ip, lport, name, kind])
    ray.shutdown()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
