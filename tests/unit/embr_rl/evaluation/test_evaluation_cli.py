"""The evaluation command's pure parts: tables, options, progress display, exit codes."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from pathlib import Path

import pytest
import torch

from embr_rl.core.config import EvalConfig
from embr_rl.core.models.loader import LoadedModel
from embr_rl.core.tasks import Problem
from embr_rl.evaluation.cli import (
    EvalOptions,
    UsageError,
    check_model_arg,
    default_out,
    main,
    parse_args,
    parse_lengths,
    parse_tasks,
    shard_bounds,
)
from embr_rl.evaluation.evaluate import correctness_scorer, evaluate
from embr_rl.evaluation.progress import Progress, format_duration
from embr_rl.evaluation.tables import Cell, aggregate, render_csv, render_markdown
from tests.conftest import TINY_MASK_ID


def _records() -> list[dict[str, object]]:
    rows = []
    for task, length, outcomes in [
        ("gsm8k", 256, [True, False, False, False]),
        ("gsm8k", 128, [True, True, False, False]),
        ("humaneval", 128, [False, False, False, True]),
    ]:
        rows += [{"task": task, "length": length, "correct": c} for c in outcomes]
    return rows


# --------------------------------------------------------------------------- tables


def test_aggregate_counts_per_task_and_length_in_order() -> None:
    cells = aggregate(_records())
    assert cells == [
        Cell("gsm8k", 128, 4, 2),
        Cell("gsm8k", 256, 4, 1),
        Cell("humaneval", 128, 4, 1),
    ]
    assert cells[0].accuracy == 0.5 and Cell("x", 1, 0, 0).accuracy == 0.0


def test_markdown_has_a_row_per_task_a_column_per_length_and_the_mean() -> None:
    lines = render_markdown(aggregate(_records())).splitlines()
    assert lines[0] == "| task | n | 128 | 256 | mean |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| gsm8k | 4 | 50.0 | 25.0 | 37.5 |"
    assert lines[3] == "| humaneval | 4 | 25.0 | - | 25.0 |"  # missing length shows "-"
    assert len(lines) == 4


def test_markdown_single_length_has_no_mean_and_ragged_sizes_show_a_range() -> None:
    one = render_markdown([Cell("arith", 32, 3, 1)], decimals=2).splitlines()
    assert one[0] == "| task | n | 32 |" and one[2] == "| arith | 3 | 33.33 |"
    ragged = render_markdown([Cell("a", 32, 3, 0), Cell("a", 64, 5, 5)]).splitlines()
    assert ragged[2] == "| a | 3-5 | 0.0 | 100.0 | 50.0 |"


def test_csv_is_long_form_with_fraction_accuracy() -> None:
    text = render_csv(aggregate(_records()))
    assert text.splitlines() == [
        "task,length,num,correct,accuracy",
        "gsm8k,128,4,2,0.5000",
        "gsm8k,256,4,1,0.2500",
        "humaneval,128,4,1,0.2500",
    ]
    assert render_csv([]) == "task,length,num,correct,accuracy\n"


# --------------------------------------------------------------------------- options


def test_parse_tasks_and_lengths() -> None:
    assert parse_tasks("gsm8k,math500,gsm8k") == ["gsm8k", "math500"]
    assert parse_lengths("128,256,512", 32) == [128, 256, 512]
    assert parse_lengths("32,64", 32) == [32, 64]
    with pytest.raises(UsageError, match=r"--task: 'gsm9k'; allowed: arith, gsm8k, humaneval"):
        parse_tasks("gsm8k,gsm9k")
    with pytest.raises(UsageError, match=r"--lengths: '100'; allowed: positive multiples of"):
        parse_lengths("128,100", 32)
    with pytest.raises(UsageError, match=r"--lengths: 'abc'"):
        parse_lengths("abc", 32)
    with pytest.raises(UsageError, match=r"--lengths: '0'"):
        parse_lengths("0", 32)
    with pytest.raises(UsageError, match=r"--block-length: 5; allowed: an even number"):
        parse_lengths("10", 5)
    with pytest.raises(UsageError, match=r"comma-separated"):
        parse_lengths("32,,64", 32)


def test_check_model_arg(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"model folder .* not found"):
        check_model_arg(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="not a model folder"):
        check_model_arg(str(tmp_path))
    with pytest.raises(UsageError, match="untrained"):
        check_model_arg("builtin")
    check_model_arg("GSAI-ML/LLaDA-8B-Instruct")  # a hub id is passed on to the loader
    (tmp_path / "config.json").write_text("{}")
    check_model_arg(str(tmp_path))


def _options(tmp_path: Path, *extra: str) -> EvalOptions:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    return parse_args([str(tmp_path / "m"), "--out", str(tmp_path / "o"), *extra])


def test_parse_args_defaults_follow_d1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    opts = _options(tmp_path, "--task", "gsm8k,arith")
    assert opts.tasks == ["gsm8k", "arith"] and opts.lengths == [128, 256, 512]
    assert opts.prompt_settings("gsm8k") == ("d1", True)
    assert opts.prompt_settings("arith") == ("plain", False)
    ecfg = opts.eval_config(256)
    assert (ecfg.gen_length, ecfg.block_length, ecfg.steps) == (256, 32, 128)
    assert ecfg.temperature == 0 and ecfg.threshold is None and ecfg.cache is None
    assert not opts.use_ray and opts.limit is None
    assert default_out("runs/demo/base_model") == Path("runs/eval/base_model")
    assert default_out("GSAI-ML/LLaDA-8B-Instruct") == Path("runs/eval/LLaDA-8B-Instruct")


def test_parse_args_flags_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    opts = _options(
        tmp_path,
        "verifier.code.timeout_s=3",
        "--task=humaneval",
        "--prompt-format=plain",
        "--no-chat-template",
        "--threshold=0.9",
        "--cache=dual",
        "--batch-size=5",
        "--block-length=16",
        "--lengths=16,48",
    )
    assert opts.use_ray  # RAY_ADDRESS turns Ray on
    assert opts.cfg.verifier.code.timeout_s == 3
    assert opts.prompt_settings("humaneval") == ("plain", False)
    ecfg = opts.eval_config(48)
    assert (ecfg.threshold, ecfg.cache, ecfg.batch_size, ecfg.steps) == (0.9, "dual", 5, 24)
    assert not _options(tmp_path, "--no-ray").use_ray


def test_parse_args_takes_model_and_task_from_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path / 'm'}\ntask:\n  name: math500\n")
    opts = parse_args(["--config", str(cfg)])
    assert opts.model == str(tmp_path / "m") and opts.tasks == ["math500"]


def test_shard_bounds_are_whole_batches_in_order() -> None:
    assert shard_bounds(10, 4, 2) == [(0, 8), (8, 10)]
    assert shard_bounds(10, 4, 8) == [(0, 4), (4, 8), (8, 10)]
    assert shard_bounds(3, 64, 4) == [(0, 3)]
    assert shard_bounds(0, 4, 2) == []
    bounds = shard_bounds(1000, 7, 3)
    assert bounds[0][0] == 0 and bounds[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(s % 7 == 0 for s, _ in bounds)


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--task", "gsm9k"], "--task: 'gsm9k'; allowed: arith, gsm8k, humaneval, math500"),
        (["--lengths", "100"], "--lengths: '100'; allowed: positive multiples of --block-length"),
        (["--block-length", "0"], "--block-length"),
        (["--limit", "-3"], "--limit"),
        (["--cache", "full"], "--cache"),
        (["--threshold", "2"], "--threshold"),
        (["--bogus"], "--bogus"),
        (["eval.batch_sz=4"], "eval.batch_size"),  # the config's own message (did you mean)
        (["--data-dir", "/nonexistent/data"], "--data-dir"),
    ],
)
def test_usage_errors_exit_2_and_name_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert main([str(tmp_path), *args]) == 2
    assert needle in capsys.readouterr().err


def test_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "no_such_model"), "--task", "arith"]) == 2
    err = capsys.readouterr().err
    assert f"model folder {tmp_path / 'no_such_model'} not found" in err
    assert main(["--task", "arith"]) == 2
    assert "missing MODEL" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--lengths" in out and "--ray" in out and "--workers" in out


def test_a_model_that_fails_to_load_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    code = main(
        [str(model), "--task", "arith", "--lengths", "32", "--limit", "2", "--out", str(tmp_path)]
    )
    assert code == 1
    assert "eval: error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- progress


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_plain_lines_are_throttled() -> None:
    clock, out = _Clock(), io.StringIO()
    p = Progress(10, stream=out, tty=False, interval_s=5, clock=clock)
    p.set_note("gsm8k L=128")
    p.advance(0, force=True)
    clock.t += 2
    p.advance(4)  # within the interval: not printed
    clock.t += 6
    p.advance(2)  # interval passed
    clock.t += 1
    p.advance(4)  # done: always printed
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[eval] gsm8k L=128 0/10 problems (0%)") and "ETA ?" in lines[0]
    assert "6/10 problems (60%), 0.75/s, elapsed 0:08, ETA 0:05" in lines[1]
    assert "10/10 problems (100%)" in lines[2] and "ETA 0:00" in lines[2]


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    clock, out = _Clock(), io.StringIO()
    p = Progress(4, stream=out, tty=True, clock=clock)
    clock.t += 1
    p.advance(2)
    p.advance(2)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "4/4 problems (100%)" in text


def test_format_duration() -> None:
    assert format_duration(0) == "0:00"
    assert format_duration(61.4) == "1:01"
    assert format_duration(3 * 3600 + 5) == "3:00:05"


# --------------------------------------------------------------------------- evaluate


class _CharTok:
    pad_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + (ord(c) % 28) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_evaluate_with_progress_reports_batches_and_keeps_greedy_results(tiny_model) -> None:
    problems = [
        Problem(id=str(i), task="arith", question=f"{i}+{i}=", answer=str(2 * i)) for i in range(5)
    ]
    loaded = LoadedModel(
        tiny_model, _CharTok(), TINY_MASK_ID, 1, 0, None, torch.device("cpu"), torch.float32
    )
    cfg = EvalConfig(batch_size=2, gen_length=8, block_length=4, steps=4)
    seen: list[int] = []
    plain = evaluate(loaded, problems, cfg)
    tracked = evaluate(loaded, problems, cfg, progress=seen.append)
    assert seen == [2, 2, 1]
    assert plain.samples == tracked.samples
    assert plain.stats.forward_passes == tracked.stats.forward_passes == 12
    # Through slots: a progress call per SLOT_CHUNKS batches (here all five problems at once),
    # the same greedy completions.
    slotted = dataclasses.replace(cfg, continuous_batching=True)
    seen.clear()
    assert evaluate(loaded, problems, slotted, progress=seen.append).samples == plain.samples
    assert seen == [5]


def test_correctness_scorer_counts_passed_code_as_correct() -> None:
    problem = Problem(
        id="c",
        task="humaneval",
        question='def inc(x):\n    """x plus one."""\n',
        tests="def check(candidate):\n    assert candidate(1) == 2\n",
        entry_point="inc",
        verifier="code",
    )
    score = correctness_scorer()
    assert score("```python\ndef inc(x):\n    return x + 1\n```", problem) == 1.0
    assert score("```python\ndef inc(x):\n    return x\n```", problem) == 0.0


def test_code_problems_are_scored_with_their_prompt_in_front() -> None:
    # The prompt's import must reach the program for a completion that omits it.
    prompt = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n'
    problem = Problem(
        id="c",
        task="humaneval",
        question=prompt,
        tests="def check(candidate):\n    assert candidate([1, 2]) == 3\n",
        entry_point="total",
        code_prompt=prompt,
        verifier="code",
    )
    completion = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    assert correctness_scorer()(completion, problem) == 1.0
