"""The main job end to end on a shrunken demo: config -> pre-train -> cached base model -> eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1].parent

SMALL = [
    "pretrain.time_budget_s=4",
    "pretrain.batch_size=16",
    "model.builtin.hidden_size=32",
    "model.builtin.num_layers=1",
    "model.builtin.num_heads=2",
    "model.builtin.intermediate_size=64",
    "task.arith.num_test=12",
    "eval.batch_size=6",
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
    assert "pre-training it" in first.stdout
    assert "accuracy" in first.stdout and "12 held-out problems" in first.stdout
    base = tmp_path / "base_model"
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval/num"] == 12 and 0.0 <= summary["eval/accuracy"] <= 1.0
    written = OmegaConf.load(tmp_path / "config.yaml")
    assert written.logging.run_dir == str(tmp_path) and written.pretrain.time_budget_s == 4
    assert len((tmp_path / "eval_base_samples.jsonl").read_text().splitlines()) == 12

    second = _run("embr_rl.run", tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cached at" in second.stdout and "pre-training it" not in second.stdout
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["eval/accuracy"] == summary["eval/accuracy"]  # greedy decoding is deterministic


@pytest.mark.integration
def test_pretrain_cli_rejects_non_arith_task(tmp_path: Path) -> None:
    proc = _run("embr_rl.pretrain", tmp_path, "task.name=gsm8k")
    assert proc.returncode != 0
    assert "task.name" in proc.stderr
