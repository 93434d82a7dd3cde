"""The evaluation command end to end on the shared benchmark files, locally and on Ray."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embr_rl.core.config import BuiltinModelConfig
from embr_rl.core.models.loader import build_builtin_model
from embr_rl.core.models.tokenizer import train_char_tokenizer
from embr_rl.evaluation.cli import main
from embr_rl.pretrain import ARITH_ALPHABET

REPO = Path(__file__).resolve().parents[2]
CODE_OUTCOMES = {"passed", "failed", "error", "timeout", "memory", "killed", "sandbox_error"}


@pytest.fixture(scope="module")
def demo_format_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder as pretrain writes it (built-in model + character tokenizer), shrunken
    and with random weights."""
    out = tmp_path_factory.mktemp("eval_model") / "base_model"
    torch.manual_seed(0)
    tok = train_char_tokenizer([ARITH_ALPHABET])
    arch = BuiltinModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    build_builtin_model(arch, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_eval_cli_on_the_shared_benchmarks(
    demo_format_model: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    code = main(
        [
            str(demo_format_model),
            "--task=gsm8k,math500,humaneval",
            "--lengths=32,64",
            "--limit=20",
            f"--data-dir={shared_data}",
            f"--out={out}",
            "--batch-size=20",
            "--no-ray",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "60/120 problems" in captured.err and "120/120 problems (100%)" in captured.err

    rows = _rows(out / "generations.jsonl")
    assert len(rows) == 3 * 2 * 20
    keys = {"id", "task", "length", "prompt", "completion", "answer", "correct", "outcome"}
    assert all(keys <= set(r) for r in rows)
    for task in ("gsm8k", "math500", "humaneval"):
        for length in (32, 64):
            assert sum(r["task"] == task and r["length"] == length for r in rows) == 20
    gsm = [r for r in rows if r["task"] == "gsm8k"]
    assert gsm[0]["id"] == "gsm8k-test-0" and gsm[0]["answer"] == "18"
    assert "<reasoning>" in str(gsm[0]["prompt"])  # d1 prompt
    assert str(gsm[0]["prompt"]).startswith("<|start_header_id|>user")  # chat template
    math_outcomes = {r["outcome"] for r in rows if r["task"] != "humaneval"}
    assert math_outcomes <= {"correct", "wrong", "no_answer"}
    code_rows = [r for r in rows if r["task"] == "humaneval"]
    assert all(r["verifier"] == "code" and r["outcome"] in CODE_OUTCOMES for r in code_rows)
    assert all(r["correct"] == (r["outcome"] in ("correct", "passed")) for r in rows)

    table = (out / "accuracy.md").read_text().splitlines()
    assert "| task | n | 32 | 64 | mean |" in table
    body = [line.split(" | ")[0] for line in table if line.startswith("| ") and "---" not in line]
    assert body == ["| task", "| gsm8k", "| math500", "| humaneval"]
    with open(out / "accuracy.csv") as fh:
        cells = list(csv.DictReader(fh))
    assert [(c["task"], c["length"], c["num"]) for c in cells] == [
        (t, n, "20") for t in ("gsm8k", "math500", "humaneval") for n in ("32", "64")
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == {"32": 16, "64": 32} and summary["block_length"] == 32
    assert summary["tasks"]["humaneval"] == {"prompt_format": "d1", "chat_template": True}


@pytest.mark.integration
def test_ray_workers_give_the_local_result(
    ray_session, demo_format_model: Path, shared_data: Path, tmp_path: Path
) -> None:
    common = [
        str(demo_format_model),
        "--task=arith,gsm8k,humaneval",
        "--lengths=32",
        "--limit=6",
        "--batch-size=2",
        f"--data-dir={shared_data}",
        "--no-progress",
    ]
    assert main([*common, "--no-ray", f"--out={tmp_path / 'local'}"]) == 0
    assert main([*common, "--ray", "--workers=2", f"--out={tmp_path / 'ray'}"]) == 0
    local = _rows(tmp_path / "local" / "generations.jsonl")
    remote = _rows(tmp_path / "ray" / "generations.jsonl")
    assert len(local) == 18 and remote == local  # same samples, same order
    assert (tmp_path / "ray" / "accuracy.csv").read_text() == (
        tmp_path / "local" / "accuracy.csv"
    ).read_text()


@pytest.mark.integration
def test_module_entry_point_exit_codes(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "embr_rl.eval", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    missing = run(str(tmp_path / "nope"), "--task", "gsm8k")
    assert missing.returncode == 2 and "not found" in missing.stderr
    (tmp_path / "config.json").write_text("{}")
    bad_task = run(str(tmp_path), "--task", "gsm8k,mmlu")
    assert bad_task.returncode == 2 and "--task: 'mmlu'; allowed:" in bad_task.stderr
