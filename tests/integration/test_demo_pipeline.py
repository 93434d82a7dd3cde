"""The main job end to end on a shrunken demo, run locally (it starts its own Ray cluster):
config -> pre-train -> cached base model -> actors -> training -> eval -> outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1].parent

SMALL = [
    # configs/demo.yaml starts from the shipped base model; these tests pre-train a tiny one.
    "model.path=builtin",
    "pretrain.max_steps=20",
    "pretrain.batch_size=16",
    "model.builtin.hidden_size=32",
    "model.builtin.num_layers=1",
    "model.builtin.num_heads=2",
    "model.builtin.intermediate_size=64",
    "task.arith.num_test=12",
    "eval.batch_size=6",
    "rollout.prompts_per_batch=2",
    "rollout.group_size=4",
    "learner.batch_size=8",
    "learner.micro_batch_size=4",
    "learner.total_steps=2",
    "algo.num_mc_samples=1",
    "eval.every=0",
    "checkpoint.every=0",
    "cluster.dashboard=false",
    "logging.tensorboard=false",
]


def _run(module: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            str(REPO / "configs" / "demo.yaml"),
            f"logging.run_dir={run_dir}",
            *SMALL,
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_run_pretrains_once_then_reuses_cached_base_model(tmp_path: Path) -> None:
    first = _run("embr_rl.run", tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "pre-training it" in first.stdout and "started a local Ray cluster" in first.stdout
    assert "accuracy" in first.stdout and "on 12 problems" in first.stdout
    base = tmp_path / "base_model"
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval/steps"] == [0, 2]
    assert 0.0 <= summary["eval/accuracy_before"] <= 1.0
    written = OmegaConf.load(tmp_path / "config.yaml")
    assert written.logging.run_dir == str(tmp_path) and written.pretrain.max_steps == 20
    assert len((tmp_path / "eval" / "step_00000000.jsonl").read_text().splitlines()) == 12
    assert (tmp_path / "reward.png").is_file()

    second = _run(
        "embr_rl.run",
        tmp_path,
        "checkpoint.resume=never",
        f"logging.run_dir={tmp_path / 'again'}",
        f"pretrain.output_dir={base}",
        "logging.jsonl=false",  # the summary comes from the run's own records then
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cached at" in second.stdout and "pre-training it" not in second.stdout
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert not (tmp_path / "again" / "metrics.jsonl").exists()
    assert again["eval/steps"] == [0, 2] and again["eval/accuracy_after"] is not None
    # Greedy decoding of the same base model is deterministic.
    assert again["eval/accuracy_before"] == summary["eval/accuracy_before"]


@pytest.mark.integration
def test_pretrain_cli_rejects_non_arith_task(tmp_path: Path) -> None:
    proc = _run("embr_rl.pretrain", tmp_path, "task.name=gsm8k")
    assert proc.returncode != 0
    assert "task.name" in proc.stderr
