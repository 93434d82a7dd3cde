"""Save, kill, resume: 6 steps straight == 3 steps, checkpoint, new process, 3 steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from learner_fixtures import rows, tiny_policy

from embr_rl.core.config import AlgoConfig, LearnerConfig
from learner.learner import Learner, init_distributed, shutdown_distributed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def _learner() -> Learner:
    cfg = LearnerConfig(
        batch_size=8,
        micro_batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        total_steps=6,
        lr_schedule="cosine",
        zero_stage=1,
        weight_decay=0.01,
    )
    return Learner(cfg, AlgoConfig(name="embr_c", num_mc_samples=2), tiny_policy(), seed=5)


def _train(learner: Learner, steps: range) -> None:
    for s in steps:
        learner.train_step(rows(s))


def save_then_die(ckpt: str, threads: int) -> None:
    """Run in a fresh interpreter: train steps 0..2, save, then SIGKILL (no clean shutdown)."""
    torch.set_num_threads(threads)
    init_distributed()
    learner = _learner()
    _train(learner, range(3))
    learner.save(ckpt)
    os.kill(os.getpid(), signal.SIGKILL)


def resume_child(ckpt: str, out: str, threads: int) -> None:
    """Run in a fresh interpreter: load the checkpoint, train steps 3..5, save parameters."""
    torch.set_num_threads(threads)
    init_distributed()
    learner = _learner()
    assert learner.load(ckpt) == 3
    _train(learner, range(3, 6))
    torch.save(learner.full_state(), out)
    learner.close()
    shutdown_distributed()


def _child(call: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]))
    code = f"import test_learner_resume as t; t.{call}"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
    )


def test_resume_in_new_process_is_bit_for_bit(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    init_distributed()
    try:
        straight = _learner()
        _train(straight, range(6))
        expected = straight.full_state()
        straight.close()
    finally:
        shutdown_distributed()

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "resumed.pt")
    killed = _child(f"save_then_die({ckpt!r}, {threads})")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "ckpt" / "hf" / "model.safetensors").is_file()
    resumed_run = _child(f"resume_child({ckpt!r}, {out!r}, {threads})")
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    resumed = torch.load(out)
    assert set(resumed) == set(expected)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
