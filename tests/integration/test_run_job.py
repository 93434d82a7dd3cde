"""The main job under ``ray job submit`` on a local ``ray start`` cluster: outputs and metrics,
a killed rollout worker, and stop-then-resume.

One cluster for the module (2 CPUs, its own ports and temp dir); one tiny base model
pre-trained once; every job joins the cluster through ``RAY_ADDRESS`` as a user's would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from embr_rl.telemetry import read_jsonl

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = [
    # configs/demo.yaml starts from the shipped base model; these tests pre-train a tiny one.
    "model.path=builtin",
    "model.builtin.hidden_size=32",
    "model.builtin.num_layers=1",
    "model.builtin.num_heads=2",
    "model.builtin.intermediate_size=64",
]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.gcs, self.dash, self.metrics = _port(), _port(), _port()
        self.temp = Path(f"/tmp/embr_ray_{os.getpid()}")
        self.env = dict(os.environ)
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",
            RAY_AUTH_MODE="disabled",
            RAY_metrics_report_interval_ms="1000",
            RAY_DEDUP_LOGS="0",
        )
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def ray(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, cwd=REPO, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> None:
        self.ray(
            "start", "--head", f"--port={self.gcs}", "--num-cpus=2", "--num-gpus=0",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
            f"--metrics-export-port={self.metrics}", f"--temp-dir={self.temp}",
            # Own agent ports: the test session's in-process Ray holds the defaults.
            f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
            f"--runtime-env-agent-port={_port()}", f"--ray-client-server-port={_port()}",
            "--include-dashboard=true", "--disable-usage-stats",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop this cluster's processes only (`ray stop` would stop every Ray on the machine,
        including the test session's own instance)."""
        import psutil

        mine = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if str(self.temp) in " ".join(proc.info["cmdline"] or []):
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for proc in mine:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(mine, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        shutil.rmtree(self.temp, ignore_errors=True)

    def submit(self, run_dir: Path, *overrides: str, stop_wait_s: int = 60) -> str:
        """``ray job submit --no-wait``; returns the submission id."""
        runtime_env = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(stop_wait_s)}}
        args = (
            "job", "submit", "--address", self.address, "--working-dir", ".", "--no-wait",
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "-m", "embr_rl.run", "configs/demo.yaml", *self.overrides(run_dir),
            *overrides,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # right after `ray start` the head's job agent may not be up yet
            proc = self.ray(*args, check=False)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)
        if proc.returncode != 0:
            raise AssertionError(f"ray job submit failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        for line in (proc.stdout + proc.stderr).splitlines():
            if "raysubmit_" in line:
                return "raysubmit_" + line.split("raysubmit_", 1)[1].split()[0].strip("'\".,")
        raise AssertionError(f"no submission id in:\n{proc.stdout}\n{proc.stderr}")

    def overrides(self, run_dir: Path) -> list[str]:
        return [
            f"logging.run_dir={run_dir}",
            f"pretrain.output_dir={self.root / 'base_model'}",
            *TINY,
            "rollout.prompts_per_batch=4",
            "rollout.group_size=4",
            "learner.batch_size=16",
            "learner.micro_batch_size=8",
            "learner.lr=1e-4",
            "algo.num_mc_samples=2",
            "eval.limit=16",
            "eval.batch_size=16",
            "buffer.max_staleness=null",
            # The workers stream (the demo itself runs sync): one learner thread beside them.
            "algo.mode=online",
            "learner.num_threads=null",
            "logging.tensorboard=false",
            "cluster.dashboard=false",
        ]

    def status(self, job: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.address).get_job_status(job)).split(".")[-1]

    def logs(self, job: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address).get_job_logs(job)

    def wait(self, job: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(job)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(1)
        raise AssertionError(f"job {job} still running after {timeout}s:\n{self.logs(job)[-3000:]}")

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            return r.read().decode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("job")
    c = Cluster(root)
    pre = subprocess.run(
        [sys.executable, "-m", "embr_rl.pretrain", str(REPO / "configs" / "demo_base.yaml"),
         f"logging.run_dir={root}", f"pretrain.output_dir={root / 'base_model'}",
         "pretrain.max_steps=20", "pretrain.batch_size=16", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**c.env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert pre.returncode == 0, pre.stderr[-2000:]
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, job: str, cluster: Cluster
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if cluster.status(job) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    raise AssertionError(f"never saw {what}; job log:\n{cluster.logs(job)[-4000:]}")


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "learner/loss" in r]


def test_job_submit_writes_outputs_and_exports_metrics(cluster: Cluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = cluster.submit(run_dir, "learner.total_steps=10", "eval.every=5", "checkpoint.every=5")
    wanted = {"ray_embr_buffer_size", "ray_embr_learner_loss", "ray_embr_eval_accuracy"}
    seen: set[str] = set()

    def scraped_all() -> bool:
        text = cluster.scrape()
        seen.update(
            ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln.startswith("ray_embr_")
        )
        return wanted <= seen

    _wait_for(scraped_all, 240, f"metrics {wanted} on the metrics port", job, cluster)
    assert cluster.wait(job) == "SUCCEEDED", cluster.logs(job)[-4000:]

    assert (run_dir / "config.yaml").is_file() and (run_dir / "reward.png").is_file()
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert _steps(run_dir) == list(range(1, 11))
    evals = [r["step"] for r in recs if "eval/accuracy" in r]
    assert evals == [0, 5, 10]
    final = run_dir / "checkpoints" / "step_00000010"
    state = json.loads((final / "state.json").read_text())
    assert state["step"] == 10 and state["version"] >= 10
    assert (final / "learner" / "hf" / "model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["eval/accuracy_after"] is not None
    logs = cluster.logs(job)
    assert "joined the Ray cluster" in logs and "| eval accuracy at step 0" in logs


def test_killed_rollout_worker_is_restarted_and_no_row_is_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = cluster.submit(
        run_dir, "learner.total_steps=400", "eval.every=0", "checkpoint.every=0",
        "eval.at_start=false", "buffer.capacity=1000000",
    )  # fmt: skip
    _wait_for(lambda: len(_steps(run_dir)) >= 3, 240, "3 learner steps", job, cluster)
    pids = json.loads((run_dir / "actors.json").read_text())["rollout_workers"]
    os.kill(pids[0], signal.SIGKILL)
    assert cluster.wait(job) == "SUCCEEDED", cluster.logs(job)[-4000:]
    logs = cluster.logs(job)
    assert "rollout worker 0 failed" in logs
    assert "rollout worker 0 restarted" in logs and "re-synced to policy version" in logs
    events = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event")]
    restarted = [e for e in events if e["event"] == "worker_restarted"]
    assert len(restarted) == 1 and restarted[0]["worker"] == 0 and restarted[0]["pid"] != pids[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["worker_restarts"] == 1 and summary["steps"] == 400
    # Every row the driver saw accepted is in the final buffer copy (no eviction, no staleness).
    rows = pq.read_table(run_dir / "checkpoints" / "step_00000400" / "buffer.parquet").num_rows
    assert rows == summary["samples"] > 0


def test_stop_then_resume_continues_step_buffer_and_prompts(
    cluster: Cluster, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = ("learner.total_steps=40", "eval.every=0", "checkpoint.every=3", "eval.at_start=false")
    job = cluster.submit(run_dir, *args)
    _wait_for(
        lambda: list((run_dir / "checkpoints").glob("step_*/state.json")), 240,
        "a checkpoint", job, cluster,
    )  # fmt: skip
    cluster.ray("job", "stop", "--address", cluster.address, job)
    assert cluster.wait(job) == "STOPPED"
    logs = cluster.logs(job)
    assert "SIGTERM received" in logs, logs[-3000:]
    latest = sorted((run_dir / "checkpoints").glob("step_*/state.json"))[-1]
    saved = json.loads(latest.read_text())
    saved_rows = pq.read_table(latest.parent / "buffer.parquet").num_rows
    assert 3 <= saved["step"] < 40 and saved["stream"]["position"] > 0

    again = cluster.submit(run_dir, *args, "checkpoint.resume=auto")
    assert cluster.wait(again) == "SUCCEEDED", cluster.logs(again)[-4000:]
    resumed = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == saved["step"]
    assert resumed[0]["buffer_rows"] == saved_rows
    text = cluster.logs(again)
    assert f"resumed from {latest.parent}: step {saved['step']}" in text
    assert f"prompt position {saved['stream']['position']}" in text
    after = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "learner/loss" in r]
    first_after = after[after.index(saved["step"]) + 1] if saved["step"] in after else None
    assert first_after == saved["step"] + 1
    final = json.loads((run_dir / "checkpoints" / "step_00000040" / "state.json").read_text())
    assert final["step"] == 40 and final["samples"] > saved["samples"]
    assert final["stream"]["position"] > saved["stream"]["position"]


def test_killed_evaluator_fails_the_run_and_no_accuracy_is_made_up(
    cluster: Cluster, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = cluster.submit(
        run_dir, "learner.total_steps=25", "eval.every=0", "checkpoint.every=0",
    )  # fmt: skip
    _wait_for(lambda: len(_steps(run_dir)) >= 3, 240, "3 learner steps", job, cluster)
    actors = json.loads((run_dir / "actors.json").read_text())
    assert actors["buffer"] > 0 and len(actors["learner_ranks"]) == 1
    os.kill(actors["evaluator"], signal.SIGKILL)
    assert cluster.wait(job) == "FAILED", cluster.logs(job)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 25 and summary["eval/final_missing"] is True
    assert summary["eval/accuracy_before"] is not None and summary["eval/accuracy_after"] is None
    assert "was not evaluated" in cluster.logs(job)
