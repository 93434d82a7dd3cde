"""The driver's pure parts: prompt stream, checkpoint folders, metrics sinks, end-of-run report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from embr_rl.checkpointing import CheckpointManager
from embr_rl.core.config import ConfigError, load_config
from embr_rl.core.tasks import Problem
from embr_rl.core.tasks.stream import PromptStream
from embr_rl.report import (
    format_table,
    moving_average,
    paired_flips,
    plot_rewards,
    series,
    sign_test_p,
    summary_rows,
)
from embr_rl.telemetry import JsonlSink, MetricsLogger, ProgressSink, read_jsonl


def _problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", task="t", question=str(i), answer=str(i)) for i in range(n)]


# --------------------------------------------------------------------------- prompt stream


def test_stream_covers_each_epoch_once_and_reshuffles() -> None:
    s = PromptStream(_problems(10), seed=3)
    first = [p.id for p in s.take(10)]
    second = [p.id for p in s.take(10)]
    assert sorted(first) == sorted(second) == sorted(f"p{i}" for i in range(10))
    assert first != second  # a new permutation per epoch
    assert s.position == 20 and s.epoch == 2


def test_stream_resumes_from_state_with_returned_prompts_first() -> None:
    a = PromptStream(_problems(7), seed=1)
    a.take(5)
    lost = a.take(3)
    a.give_back(lost)
    state = json.loads(json.dumps(a.state()))
    b = PromptStream(_problems(7), seed=0)
    b.load_state(state)
    got = [p.id for p in b.take(6)]
    assert got == [p.id for p in a.take(6)]
    assert got[:3] == [p.id for p in lost]  # returned prompts come out first


def test_stream_give_back_order_and_empty_error() -> None:
    s = PromptStream(_problems(4), seed=0)
    taken = s.take(2)
    s.give_back(taken)
    assert [p.id for p in s.take(2)] == [p.id for p in taken]
    with pytest.raises(ValueError, match="at least one problem"):
        PromptStream([], seed=0)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_manager_completeness_resolve_and_prune(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    assert ckpt.resolve("auto") is None and ckpt.resolve("never") is None
    for step in (5, 10, 15):
        p = ckpt.path_for(step)
        p.mkdir(parents=True)
        ckpt.write_state(p, {"step": step})
    broken = ckpt.path_for(12)
    broken.mkdir()  # a save interrupted before state.json
    assert [p.name for p in ckpt.complete()] == ["step_00000005", "step_00000010", "step_00000015"]
    assert ckpt.resolve("auto") == ckpt.path_for(15)
    assert ckpt.resolve(str(ckpt.path_for(10))) == ckpt.path_for(10)
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.resume"):
        ckpt.resolve(str(broken))
    removed = ckpt.prune()
    assert sorted(p.name for p in removed) == ["step_00000005", "step_00000012"]
    assert [p.name for p in ckpt.complete()] == ["step_00000010", "step_00000015"]
    assert CheckpointManager.read_state(ckpt.path_for(15)) == {"step": 15, "manifest": {}}
    newer_partial = ckpt.path_for(20)
    newer_partial.mkdir()
    ckpt.prune()
    assert newer_partial.is_dir()  # may still be being written


def test_resume_skips_damaged_checkpoints_and_names_them(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path, keep_last=5)
    for step in (5, 10, 15):
        p = ckpt.path_for(step)
        (p / "learner").mkdir(parents=True)
        (p / "learner" / "model.bin").write_bytes(b"x" * (100 + step))
        (p / "buffer.parquet").write_bytes(b"rows" * step)
        ckpt.write_state(p, {"step": step})
    assert CheckpointManager.read_state(ckpt.path_for(10))["manifest"] == {
        "buffer.parquet": 40,
        "learner/model.bin": 110,
    }
    # Newest: state.json truncated mid-write; middle: a file cut short after the save.
    state = ckpt.path_for(15) / "state.json"
    state.write_text(state.read_text()[:20])
    (ckpt.path_for(10) / "learner" / "model.bin").write_bytes(b"x" * 7)
    assert ckpt.resolve("auto") == ckpt.path_for(5)
    reasons = {p.name: why for p, why in ckpt.skipped}
    assert reasons.keys() == {"step_00000010", "step_00000015"}
    assert "state.json unreadable" in reasons["step_00000015"]
    assert reasons["step_00000010"] == "learner/model.bin has 7 bytes, 110 written"
    with pytest.raises(FileNotFoundError, match=r"model\.bin has 7 bytes"):
        ckpt.resolve(str(ckpt.path_for(10)))
    (ckpt.path_for(5) / "buffer.parquet").unlink()
    assert ckpt.resolve("auto") is None
    assert (
        "buffer.parquet is missing" in dict((p.name, w) for p, w in ckpt.skipped)["step_00000005"]
    )


# --------------------------------------------------------------------------- telemetry


def test_jsonl_sink_appends_and_skips_non_finite(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"a": 1.0, "b": float("nan"), "c": "text"})
    sink.event(1, "checkpoint", {"path": "x"})
    sink.close()
    again = JsonlSink(path)
    again.log(2, {"a": 2.0})
    again.close()
    with open(path, "a") as fh:
        fh.write('{"step": 3, "a": ')  # a torn line from a crash
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [1, 1, 2]
    assert "b" not in recs[0] and "c" not in recs[0] and recs[1]["event"] == "checkpoint"


def test_progress_line_on_tty_and_plain_lines_elsewhere() -> None:
    out = io.StringIO()
    tty = ProgressSink(10, tty=True, stream=out)
    tty.log(1, {"learner/loss": 2.0, "rollout/reward_mean": 0.25})
    tty.log(2, {"eval/accuracy": 0.5, "learner/loss": 1.0})
    text = out.getvalue()
    assert text.count("\r") == 2 and "step 2/10" in text and "acc 0.500" in text
    assert "reward 0.250" in text
    plain_out = io.StringIO()
    plain = ProgressSink(10, tty=False, every=2, stream=plain_out)
    for step in range(1, 5):
        plain.log(step, {"learner/loss": 1.0})
    lines = plain_out.getvalue().splitlines()
    assert [ln.split("|")[0].strip() for ln in lines] == [
        "[progress] step 2/10",
        "[progress] step 4/10",
    ]


def test_step_clock_splits_a_step_and_the_line_shows_it() -> None:
    from embr_rl.driver import StepClock

    clock = StepClock()
    for _ in range(3):
        clock.start()
        for part in ("data_wait", "learner", "broadcast"):
            clock.mark(part)
        m = clock.metrics()
        parts = [m[f"time/{p}_s"] for p in ("data_wait", "learner", "broadcast")]
        assert all(v >= 0 for v in parts) and m["time/step_s"] == sum(parts)
        assert 0.0 <= m["time/learner_busy"] <= 1.0
    out = io.StringIO()
    sink = ProgressSink(10, tty=True, stream=out)
    sink.log(1, {"learner/loss": 1.0, **m, "time/learner_busy": 0.8})
    assert "wait/learn/sync" in out.getvalue() and "learner busy 80%" in out.getvalue()


def test_logger_keeps_the_records_whatever_the_sinks() -> None:
    logger = MetricsLogger([])
    logger.log(1, {"eval/accuracy": 0.5})
    logger.log(2, {"learner/loss": 1.0})
    assert [(r["step"], r.get("eval/accuracy")) for r in logger.records] == [(1, 0.5), (2, None)]


def test_logger_fans_out_to_every_sink(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    class Probe:
        def log(self, step: int, metrics: dict) -> None:
            seen.append(("log", step))

        def event(self, step: int, kind: str, detail: dict) -> None:
            seen.append((kind, step))

        def close(self) -> None:
            seen.append(("close", -1))

    logger = MetricsLogger([Probe(), JsonlSink(tmp_path / "m.jsonl")])
    logger.log(3, {"x": 1.0})
    logger.event(3, "resumed", path="p")
    logger.close()
    assert seen == [("log", 3), ("resumed", 3), ("close", -1)]


# --------------------------------------------------------------------------- report


def _records() -> list[dict]:
    recs = [
        {"step": s, "learner/loss": 1.0 / s, "rollout/reward_mean": 0.1 * s} for s in range(1, 6)
    ]
    recs += [{"step": 0, "eval/accuracy": 0.3}, {"step": 5, "eval/accuracy": 0.4}]
    recs += [{"step": 3, "rollout/reward_mean": 9.0}]  # a resumed run logs step 3 again
    recs += [{"step": 4, "event": "worker_restarted", "worker": 0}]
    return recs


def test_series_last_record_of_a_step_wins_and_moving_average() -> None:
    steps, values = series(_records(), "rollout/reward_mean")
    assert steps == [1, 2, 3, 4, 5] and values[2] == 9.0
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_summary_rows_and_table() -> None:
    rows = dict(summary_rows(_records(), 12.3))
    assert rows["learner steps"] == "5"
    assert rows["eval accuracy at step 0"] == "0.300" and rows["eval accuracy at step 5"] == "0.400"
    assert rows["rollout worker restarts"] == "1" and rows["wall time"] == "12 s"
    table = format_table(list(rows.items()))
    assert table.splitlines()[0].startswith("| metric") and "| learner steps" in table


def test_plot_rewards_writes_png(tmp_path: Path) -> None:
    out = plot_rewards(_records(), tmp_path / "reward.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- run config rules


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["algo.mode=offline"], "buffer.offline_path"),
        (["rollout.num_workers=0"], "rollout.num_workers"),
        (["algo.name=d1", "algo.inner_iterations=2"], "algo.inner_iterations"),
        (["rollout.record_logprobs=true", "rollout.engine=vllm"], "rollout.record_logprobs"),
        (["rollout.record_logprobs=true", "algo.prompt_mask_prob=0.1"], "algo.prompt_mask_prob"),
        (["rollout.max_restarts=-1"], "rollout.max_restarts"),
        (
            ["rollout.continuous_batching=true", "rollout.cache=prefix"],
            "rollout.continuous_batching",
        ),
        (
            ["rollout.continuous_batching=true", "rollout.engine=vllm"],
            "rollout.continuous_batching",
        ),
        (["rollout.max_batch_size=0"], "rollout.max_batch_size"),
        (["eval.continuous_batching=true", "eval.cache=prefix"], "eval.continuous_batching"),
        (["rollout.score_reference=true", "algo.name=d1"], "rollout.score_reference"),
        (
            ["rollout.score_reference=true", "algo.common_random_numbers=false"],
            "rollout.score_reference",
        ),
        (["rollout.score_reference=true", "rollout.engine=vllm"], "rollout.score_reference"),
        (["buffer.capacity=16", "learner.batch_size=32"], "buffer.capacity"),
        (["learner.broadcast=cuda_ipc"], "learner.num_gpus_per_rank"),
        (
            ["learner.broadcast=cuda_ipc", "learner.num_gpus_per_rank=1"],
            "rollout.num_gpus_per_worker",
        ),
    ],
)
def test_run_rules_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_d1_takes_stale_updates_when_the_workers_record_behaviour_logprobs() -> None:
    cfg = load_config(
        None, ["algo.name=d1", "algo.inner_iterations=3", "rollout.record_logprobs=true"]
    )
    assert cfg.algo.inner_iterations == 3 and cfg.rollout.record_logprobs


def test_paired_flips_and_exact_sign_test() -> None:
    before = {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 0.0}
    after = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 1.0, "x": 1.0}
    assert paired_flips(before, after) == (2, 1)
    # n=3 flips, 1 the other way: P(X<=1) = (1+3)/8, two-sided 1.0 (capped)
    assert sign_test_p(2, 1) == 1.0
    # 10 fixed, 0 broken: 2 * 0.5**10
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(44, 32) == pytest.approx(sign_test_p(32, 44))


# --------------------------------------------------------------------------- fail first


def test_non_finite_numbers_are_refused_at_load() -> None:
    for key in ("learner.lr", "algo.beta", "learner.max_grad_norm", "rollout.temperature"):
        for value in ("inf", "-inf", "nan"):
            with pytest.raises(ConfigError, match=rf"'{key}'.*finite"):
                load_config(None, [f"{key}={value}"])


def _preflight_error(tmp_path: Path, *overrides: str) -> str:
    from embr_rl.run import preflight

    with pytest.raises(ConfigError) as info:
        preflight(load_config(None, list(overrides)))
    return str(info.value)


def test_preflight_names_a_bad_model_path_before_ray(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"model_type": ')
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    for path, says in (
        (empty, "config.json"),
        (corrupt, "cannot be read"),
        (listed, "not a JSON object"),
        (tmp_path / "missing", "no such folder"),
        ("./nowhere", "no such folder"),
    ):
        message = _preflight_error(tmp_path, f"model.path={path}")
        assert "'model.path'" in message and says in message, message
    from embr_rl.run import preflight

    preflight(load_config(None, ["model.path=GSAI-ML/LLaDA-8B-Instruct"]))  # a hub id passes


def test_preflight_names_missing_offline_data_and_benchmark_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _preflight_error(
        tmp_path, "algo.mode=offline", f"buffer.offline_path={tmp_path / 'rows.jsonl'}"
    )
    assert "'buffer.offline_path'" in message
    message = _preflight_error(tmp_path, "task.name=gsm8k", f"task.data_dir={tmp_path / 'no'}")
    assert "'task.data_dir'" in message
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a)
    )
    message = _preflight_error(tmp_path, "task.name=gsm8k")
    assert "'task.data_dir'" in message and "datasets" in message


def test_run_stops_at_preflight_before_starting_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embr_rl import run as run_mod

    def no_ray(cfg: object) -> str:
        raise AssertionError("Ray was started before the model path was checked")

    monkeypatch.setattr(run_mod, "start_ray", no_ray)
    cfg = load_config(
        None, [f"model.path={tmp_path / 'missing'}", f"logging.run_dir={tmp_path / 'run'}"]
    )
    with pytest.raises(ConfigError, match=r"'model\.path'"):
        run_mod.run(cfg)


def test_run_dir_never_lands_in_a_jobs_temporary_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embr_rl.run import resolve_run_dir

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_run_dir("runs/demo") == copy / "runs" / "demo"  # not a job: stays
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    assert resolve_run_dir("runs/demo") == tmp_path / "home" / "embr_runs" / "runs" / "demo"
    assert resolve_run_dir(str(tmp_path / "shared" / "r")) == tmp_path / "shared" / "r"
    with pytest.raises(ConfigError, match=r"'logging\.run_dir'.*temporary"):
        resolve_run_dir(str(copy / "runs" / "demo"))
