"""LLaDA and Dream, natively, through the real pipeline on tiny snapshots laid out as the
hub's: the shipped real-model configs build a learner (gradient checkpointing, LoRA), and
the demo's job runs end to end on them (cached rollouts, EMBR-U and d1 learner steps, LoRA
broadcast, evaluation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embr_rl.core.config import load_config
from embr_rl.core.experience import rows_from_dicts
from learner.learner import Learner, init_distributed, shutdown_distributed
from tests.hub_snapshots import dream_snapshot, llada_snapshot

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1].parent
REAL_CONFIGS = sorted([*REPO.glob("configs/llada8b_*.yaml"), *REPO.glob("configs/dream7b_*.yaml")])


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {"llada": llada_snapshot(root / "llada"), "dream": dream_snapshot(root / "dream")}


def _rows(mask_id: int, n: int = 4) -> object:
    g = torch.Generator().manual_seed(0)
    ids = [i for i in range(5, 40) if i != mask_id]
    pick = lambda k: [ids[j] for j in torch.randint(0, len(ids), (k,), generator=g)]  # noqa: E731
    return rows_from_dicts(
        [
            {
                "sample_id": f"s{i}",
                "prompt_id": f"p{i // 2}",
                "prompt_ids": pick(4),
                "completion_ids": pick(8),
                "reward": float(i % 2),
                "policy_version": 0,
                "task": "toy",
            }
            for i in range(n)
        ]
    )


def test_there_are_real_model_configs() -> None:
    names = {p.name for p in REAL_CONFIGS}
    assert {"llada8b_gsm8k.yaml", "dream7b_gsm8k.yaml"} <= names


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: p.stem)
def test_shipped_real_model_config_builds_a_learner(snapshots: dict[str, Path], path: Path) -> None:
    shipped = load_config(path)
    assert shipped.model.gradient_checkpointing and shipped.model.implementation == "auto"
    family = "llada" if "llada" in shipped.model.path.lower() else "dream"
    cfg = load_config(
        path,
        [
            f"model.path={snapshots[family]}",
            "model.device=cpu",
            "model.dtype=float32",
            "model.lora.r=4",
            "learner.num_ranks=1",
            "learner.precision=fp32",
            "learner.batch_size=4",
            "learner.micro_batch_size=2",
            "algo.num_mc_samples=1",
        ],
    )
    init_distributed()
    try:
        learner = Learner.from_config(cfg)
        try:
            base = learner.policy.base_model.model
            assert type(base).__name__ == (
                "LLaDANativeModel" if family == "llada" else "DreamNativeModel"
            )
            assert base.gradient_checkpointing and base.training
            adapted = {
                n.split(".lora_A")[0].rsplit(".", 1)[-1]
                for n, _ in learner.policy.named_parameters()
                if "lora_A" in n
            }
            assert adapted == set(cfg.model.lora.target_modules)
            metrics = learner.train_step(_rows(learner.models.mask_id))
            assert metrics["learner/step"] == 1.0
            assert all(v == v for v in metrics.values())  # no NaN
        finally:
            learner.close()
    finally:
        shutdown_distributed()


SMALL = [
    "task.arith.num_test=6",
    "eval.batch_size=6",
    "eval.gen_length=8",
    "eval.block_length=8",
    "eval.steps=4",
    "rollout.prompts_per_batch=2",
    "rollout.group_size=2",
    "rollout.num_workers=1",
    "rollout.gen_length=16",
    "rollout.block_length=8",
    "rollout.steps=8",
    "rollout.cache=dual",
    "rollout.threshold=0.9",
    "learner.batch_size=4",
    "learner.micro_batch_size=2",
    "learner.total_steps=2",
    "algo.num_mc_samples=1",
    "model.lora.enabled=true",
    "model.lora.r=4",
    "model.lora.target_modules=[q_proj,k_proj,v_proj]",
    "model.dtype=float32",
    "model.device=cpu",
    "eval.every=0",
    "checkpoint.every=0",
    "cluster.dashboard=false",
    "logging.tensorboard=false",
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "algo"), [("llada", "embr_u"), ("dream", "d1")])
def test_demo_job_runs_on_a_native_snapshot(
    snapshots: dict[str, Path], tmp_path: Path, family: str, algo: str
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "embr_rl.run",
            str(REPO / "configs" / "demo.yaml"),
            f"logging.run_dir={tmp_path}",
            f"model.path={snapshots[family]}",
            f"algo.name={algo}",
            *SMALL,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "no key/value cache" not in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval/steps"] == [0, 2]
    assert 0.0 <= summary["eval/accuracy_after"] <= 1.0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    learner_steps = [m for m in metrics if "learner/loss" in m]
    assert len(learner_steps) == 2
    assert all(m["learner/loss"] == m["learner/loss"] for m in learner_steps)
    # Each step says where its time went (driver and learner rank).
    for key in ("time/step_s", "time/data_wait_s", "time/learner_s", "time/learner_compute_s"):
        assert all(key in m for m in learner_steps), key
    # The learner broadcast its trained adapter (learner.sync_every=1: once per step).
    assert max(m.get("sync/version", 0.0) for m in metrics) >= 1
