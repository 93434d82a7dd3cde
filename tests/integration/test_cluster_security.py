"""A cluster ``embr_rl.run`` starts for itself is its owner's: every socket it listens on
beyond loopback refuses a client without the token.

The probe (tests/integration/_cluster_probe.py) starts the cluster the way ``start_ray``
does, in a fresh process with its own ``HOME`` and no ``RAY_AUTH_MODE`` (the test session
itself runs Ray without authentication), and asks every listening socket of that process
tree for something without a token: an HTTP page or one real gRPC method per Ray service.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# Read-only Prometheus pages Ray 2.60 serves on every interface unless the node address is
# loopback, which it refuses (docs/deploy.md): the dashboard's, the autoscaler's, the agent's.
MAX_METRICS_PAGES = 3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_local_cluster_refuses_clients_without_the_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.pop("RAY_ADDRESS", None)
    env["HOME"] = str(tmp_path)
    env["PYTHONPATH"] = str(REPO)  # this checkout's embr_rl, whatever the venv points at
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "integration" / "_cluster_probe.py"), str(_port())],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    kinds = [kind for _, _, _, kind in rows]
    assert "open" not in kinds, [r for r in rows if r[3] == "open"]
    names = {name for _, _, name, kind in rows if kind == "auth"}
    assert {"gcs_server", "raylet"} <= names, rows  # the control plane is on and checks tokens
    assert kinds.count("metrics") <= MAX_METRICS_PAGES, rows
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file() and not token.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)
