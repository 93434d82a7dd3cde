"""The pure parts of bench/repro.py: the run plan, per-run results, aggregation, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import repro
from bench.repro import RunSpec, Stat

OUT = Path("/study")
BASE = Path("/models/base_model")


def _row(setting: str, algo: str, seed: int, k: int | None = 0, **extra: Any) -> dict[str, Any]:
    spec = RunSpec(seed, setting, k, algo)
    row = {
        "key": spec.key, "setting": setting, "k": k, "algo": algo, "seed": seed,
        "scale": "tiny", "status": "done", "steps": 4, "samples": 32,
        "acc_before": 0.25, "acc_after": 0.25, "gain": 0.0,
        "eval_steps": [0, 2, 4], "eval_accuracy": [0.25, 0.25, 0.25],
        "reward_steps": [1, 2, 3, 4], "reward": [0.1, 0.2, 0.3, 0.4],
        "train_reward_last25": 0.4, "wall_seconds": 10.0, "wall_measured": 11.0,
    }  # fmt: skip
    row.update(extra)
    return row


# --------------------------------------------------------------------------- plan


def test_plan_shares_k0_with_online_and_orders_by_seed() -> None:
    specs = repro.plan_runs([1, 0], ["online", "stale", "offline"], [0, 2])
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys))
    # 5 online (= stale K=0) + 5 at K=2 + 4 offline, per seed.
    assert len(specs) == 2 * (5 + 5 + 4)
    assert [s.seed for s in specs] == sorted(s.seed for s in specs)
    assert "stale/K0/embr_u/seed0" not in keys and "online/embr_u/seed0" in keys
    assert "stale/K2/d1/seed1" in keys  # rejected later, by the config
    assert {s.algo for s in specs if s.setting == "offline"} == {"embr_c", "embr_u", "dpo", "vrpo"}


def test_stale_only_still_plans_the_k0_runs_as_online() -> None:
    specs = repro.plan_runs([0], ["stale"], [0, 8])
    assert {s.setting for s in specs} == {"online", "stale"}
    assert all(s.k == 8 for s in specs if s.setting == "stale")


def test_run_overrides_sync_and_offline() -> None:
    spec = RunSpec(2, "stale", 8, "embr_c")
    ov = repro.run_overrides(spec, "tiny", OUT, BASE)
    assert "algo.mode=sync" in ov and "algo.inner_iterations=9" in ov
    assert f"logging.run_dir={OUT / 'stale/K8/embr_c/seed2'}" in ov
    assert f"model.path={BASE}" in ov and "seed=2" in ov and "algo.name=embr_c" in ov
    for key in ("logging.progress=never", "logging.tensorboard=false", "checkpoint.every=0",
                "cluster.dashboard=false", "eval.at_start=true"):  # fmt: skip
        assert key in ov
    online = repro.run_overrides(RunSpec(0, "online", 0, "d1"), "small", OUT, BASE)
    assert "algo.inner_iterations=1" in online and "learner.total_steps=27" in online
    data = Path("/data/seed0.jsonl")
    off = repro.run_overrides(RunSpec(0, "offline", None, "dpo"), "tiny", OUT, BASE, data)
    assert "algo.mode=offline" in off and f"buffer.offline_path={data}" in off
    with pytest.raises(ValueError, match="dataset"):
        repro.run_overrides(RunSpec(0, "offline", None, "dpo"), "tiny", OUT, BASE)


@pytest.mark.parametrize("scale", sorted(repro.SCALES))
def test_every_planned_run_is_a_valid_config_except_d1_when_stale(scale: str) -> None:
    from embr_rl.config import ConfigError, load_config

    data = Path("/data/seed0.jsonl")
    for spec in repro.plan_runs([0], list(repro.SETTINGS), [0, 2, 8]):
        ov = repro.run_overrides(spec, scale, OUT, BASE, data)
        if spec.algo == "d1" and spec.setting == "stale":
            with pytest.raises(ConfigError, match="inner_iterations"):
                load_config(repro.BASE_CONFIG, ov)
            continue
        cfg = load_config(repro.BASE_CONFIG, ov)
        r = cfg.rollout
        # One sync round is exactly one learner batch, and K+1 divides the step count.
        assert r.num_workers * r.prompts_per_batch * r.group_size == cfg.learner.batch_size
        if scale == "small":
            assert cfg.learner.total_steps % cfg.algo.inner_iterations == 0


def test_eval_every_is_a_whole_number_of_sync_rounds() -> None:
    assert repro.eval_every(9, 0) == 9 and repro.eval_every(9, 2) == 9
    assert repro.eval_every(14, 2) == 12 and repro.eval_every(14, 8) == 9
    assert repro.eval_every(1, 2) == 0  # no evaluation inside the run
    assert repro.eval_every(5, None) == 5  # offline: no rounds


@pytest.mark.parametrize("scale", sorted(repro.SCALES))
def test_evaluations_fall_on_round_ends(scale: str) -> None:
    from embr_rl.config import load_config

    data = Path("/data/seed0.jsonl")
    for spec in repro.plan_runs([0], list(repro.SETTINGS), [0, 2, 8]):
        if spec.algo == "d1" and spec.setting == "stale":
            continue
        cfg = load_config(repro.BASE_CONFIG, repro.run_overrides(spec, scale, OUT, BASE, data))
        assert cfg.eval.at_start and cfg.eval.every % cfg.algo.inner_iterations == 0
        assert cfg.eval.limit is not None and cfg.eval.limit <= 500
        # Evaluations between the first and the last fit inside the run (0: none).
        assert 0 <= cfg.eval.every < cfg.learner.total_steps


def test_short_error_and_has_checkpoint(tmp_path: Path) -> None:
    exc = RuntimeError("learner step 2 failed: \x1b[36mray::LearnerRank\x1b[39m\nmore")
    assert repro.short_error(exc) == "RuntimeError: learner step 2 failed: ray::LearnerRank"
    assert not repro.has_checkpoint(tmp_path)
    step = tmp_path / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    assert not repro.has_checkpoint(tmp_path)  # interrupted save
    (step / "state.json").write_text("{}")
    assert repro.has_checkpoint(tmp_path)


def test_parse_lists() -> None:
    assert repro.parse_ints("0, 1,2") == [0, 1, 2]
    assert repro.parse_list("online,offline", repro.SETTINGS) == ["online", "offline"]
    with pytest.raises(ValueError, match="allowed"):
        repro.parse_list("online,onlin", repro.SETTINGS)
    with pytest.raises(ValueError):
        repro.parse_ints("")
    with pytest.raises(ValueError):
        repro.parse_ints("-1")


# --------------------------------------------------------------------------- per-run results


def test_metric_series_skips_events_and_keeps_the_last_value() -> None:
    records = [
        {"step": 0, "eval/accuracy": 0.2},
        {"step": 1, "event": "checkpoint", "eval/accuracy": 9.0},
        {"step": 2, "eval/accuracy": 0.3},
        {"step": 2, "eval/accuracy": 0.4},
        {"step": 3, "learner/loss": 1.0},
    ]
    assert repro.metric_series(records, "eval/accuracy") == ([0, 2], [0.2, 0.4])


def test_last_quarter_mean_every_step() -> None:
    steps = list(range(1, 9))
    values = [float(s) for s in steps]
    assert repro.last_quarter_mean(steps, values, 8) == pytest.approx((7 + 8) / 2)
    # ceil(27 / 4) = 7 steps: 21..27.
    steps = list(range(1, 28))
    assert repro.last_quarter_mean(steps, [float(s) for s in steps], 27) == pytest.approx(24.0)


def test_last_quarter_mean_carries_round_rewards_forward() -> None:
    # K=8 over 27 steps: rewards logged at steps 1, 10, 19; steps 21..27 train on round 19's.
    assert repro.last_quarter_mean([1, 10, 19], [0.1, 0.2, 0.5], 27) == pytest.approx(0.5)
    # K=2 over 6 steps: rounds at 1 and 4; the last 2 steps (5, 6) use round 4.
    assert repro.last_quarter_mean([1, 4], [0.0, 1.0], 6) == pytest.approx(1.0)
    assert repro.last_quarter_mean([], [], 6) is None
    assert repro.last_quarter_mean([1], [0.5], 0) is None


def test_result_row_from_summary_and_metrics() -> None:
    summary = {
        "steps": 4, "samples": 32, "policy_version": 4, "eval/accuracy_before": 0.25,
        "eval/accuracy_after": 0.5, "wall_seconds": 12.3,
    }  # fmt: skip
    records = [
        {"step": 0, "eval/accuracy": 0.25},
        *({"step": s, "rollout/reward_mean": 0.1 * s, "learner/loss": 1.0} for s in (1, 2, 3, 4)),
        {"step": 2, "eval/accuracy": 0.375},
        {"step": 4, "eval/accuracy": 0.5},
        {"step": 4, "event": "checkpoint"},
    ]
    row = repro.result_row(
        RunSpec(1, "online", 0, "embr_u"), summary, records, scale="tiny", total_steps=4,
        wall_measured=13.04,
    )  # fmt: skip
    assert row["key"] == "online/embr_u/seed1" and row["status"] == "done"
    assert row["gain"] == pytest.approx(0.25)
    assert row["eval_steps"] == [0, 2, 4] and row["eval_accuracy"] == [0.25, 0.375, 0.5]
    assert row["reward_steps"] == [1, 2, 3, 4]
    assert row["train_reward_last25"] == pytest.approx(0.4)
    assert row["wall_measured"] == 13.0
    json.dumps(row)  # one results.jsonl line


def test_is_finished() -> None:
    assert repro.is_finished({"steps": 4, "stopped_by": None}, 4)
    assert not repro.is_finished({"steps": 3, "stopped_by": None}, 4)
    assert not repro.is_finished({"steps": 4, "stopped_by": 15}, 4)
    assert not repro.is_finished(None, 4)


def test_read_results_keeps_the_last_line_per_key(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    repro.append_jsonl(path, {"key": "a", "status": "failed"})
    repro.append_jsonl(path, {"key": "b", "status": "done"})
    repro.append_jsonl(path, {"key": "a", "status": "done"})
    with open(path, "a") as fh:
        fh.write('{"key": "torn"\n')
    rows = {r["key"]: r for r in repro.read_results(path)}
    assert rows == {"a": {"key": "a", "status": "done"}, "b": {"key": "b", "status": "done"}}
    assert repro.read_results(tmp_path / "missing.jsonl") == []


# --------------------------------------------------------------------------- aggregation


def test_mean_std_and_formatting() -> None:
    stat = repro.mean_std([0.1, 0.2, None, 0.3])
    assert stat.n == 3 and stat.mean == pytest.approx(0.2) and stat.std == pytest.approx(0.1)
    assert repro.fmt_stat(stat) == "20.0 ± 10.0"
    assert repro.fmt_stat(Stat(0.05, None, 1), signed=True) == "+5.0"
    assert repro.fmt_stat(Stat(-0.05, 0.01, 2), signed=True) == "-5.0 ± 1.0"
    assert repro.fmt_stat(Stat(0.4567, None, 1), percent=False, digits=3) == "0.457"
    assert repro.fmt_stat(repro.mean_std([None])) == "n/a"


def test_select_reads_online_runs_for_stale_k0() -> None:
    rows = [
        _row("online", "embr_u", 0),
        _row("stale", "embr_u", 0, k=2),
        _row("stale", "embr_u", 1, k=8),
        _row("online", "embr_u", 1, status="failed"),
    ]
    assert [r["key"] for r in repro.select(rows, setting="stale", algo="embr_u", k=0)] == [
        "online/embr_u/seed0"
    ]
    assert [r["seed"] for r in repro.select(rows, setting="stale", algo="embr_u", k=8)] == [1]
    assert repro.select(rows, setting="online", algo="d1") == []


def test_markdown_table_and_equal_budgets() -> None:
    table = repro.markdown_table(["method", "acc"], [["EMBR-U", "40.0"]])
    assert table.splitlines() == ["| method | acc |", "|:---|---:|", "| EMBR-U | 40.0 |"]
    assert repro.equal_budgets([_row("online", "d1", 0), _row("online", "wd1", 0)])
    assert not repro.equal_budgets([_row("online", "d1", 0), _row("online", "wd1", 0, steps=3)])


def test_mean_curve_uses_common_steps() -> None:
    xs, mean, sem = repro.mean_curve([([1, 2, 3], [0.0, 1.0, 2.0]), ([1, 3], [1.0, 4.0])])
    assert xs == [1, 3] and mean == [0.5, 3.0]
    assert sem[0] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert repro.mean_curve([]) == ([], [], [])


def _study() -> dict[str, Any]:
    return {
        "scale": "tiny", "scale_description": "smoke", "scale_overrides": ["learner.total_steps=4"],
        "common_overrides": ["checkpoint.every=0"], "base_config": "configs/demo.yaml",
        "base_model": str(BASE), "seeds": [0, 1], "settings": list(repro.SETTINGS),
        "stale_k": [0, 2], "methods": {
            n: {"label": m.label, "note": m.note, "overrides": list(m.overrides)}
            for n, m in repro.METHODS.items()
        },
        "rejected": [{"setting": "stale", "algo": "d1", "k": 2, "reason": "d1 needs K=0"}],
    }  # fmt: skip


def _rows() -> list[dict[str, Any]]:
    rows = []
    for seed in (0, 1):
        for algo in repro.ONLINE_METHODS:
            acc = 0.30 + 0.01 * seed
            rows.append(_row("online", algo, seed, acc_after=acc, gain=acc - 0.25))
            if algo != "d1":
                rows.append(_row("stale", algo, seed, k=2, acc_after=0.2, gain=-0.05))
        for algo in repro.OFFLINE_METHODS:
            rows.append(_row("offline", algo, seed, k=None, train_reward_last25=None))
    rows.append({"key": "offline/vrpo/seed2", "setting": "offline", "k": None, "algo": "vrpo",
                 "seed": 2, "status": "failed", "error": "RuntimeError: boom"})  # fmt: skip
    return rows


def test_build_report_states_command_scale_tables_and_runs() -> None:
    invocations = [
        {"command": ".venv/bin/python bench/repro.py --scale tiny --out /study",
         "started": "2026-01-01 00:00:00", "wall_seconds": 120.0, "runs_executed": 3,
         "runs_skipped": 0},
    ]  # fmt: skip
    datasets = [
        {"seed": 0, "path": "/study/offline/data/seed0.jsonl", "rows": 16, "prompts": 4,
         "group_size": 4, "temperature": 1.0, "mean_reward": 0.25, "mixed_groups": 2,
         "seconds": 3.0},
    ]  # fmt: skip
    text = repro.build_report(_rows(), _study(), invocations, datasets, "python bench/repro.py -r")
    assert ".venv/bin/python bench/repro.py --scale tiny --out /study" in text
    assert "report rebuilt with `python bench/repro.py -r`" in text
    assert "Total wall time of the study commands: 120 s" in text
    assert "learner.total_steps=4" in text and "checkpoint.every=0" in text
    assert "| EMBR-U | 30.5 ± 0.7 | +5.5 ± 0.7 |" in text
    assert "| method | K=0 | K=2 |" in text
    assert "| d1 (diffu-GRPO) | 30.5 ± 0.7 | rejected |" in text
    assert "the config rejects it: d1 needs K=0" in text
    assert "| DPO-ELBO | 25.0 ± 0.0 | +0.0 ± 0.0 |" in text
    assert "16 samples of 4 prompts" in text
    assert "Accuracy before training" in text and "25.0% (identical in every run)" in text
    assert "`offline/vrpo/seed2`: RuntimeError: boom" in text
    # Every run has one line in the per-run table.
    assert text.count("| online | 0 |") == 10
    assert "Equal steps and samples across runs: yes" in text


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    path = repro.plot_curves(_rows(), tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = repro.plot_curves([], tmp_path / "empty.png")
    assert empty.stat().st_size > 0


def test_write_report_from_files(tmp_path: Path) -> None:
    (tmp_path / "study.json").write_text(json.dumps(_study()))
    for row in _rows():
        repro.append_jsonl(tmp_path / "results.jsonl", row)
    report, png = repro.write_report(tmp_path, "cmd")
    assert report == tmp_path / "report.md" and png == tmp_path / "reward_curves.png"
    assert "| EMBR-E |" in report.read_text() and png.stat().st_size > 0


def test_dataset_record_is_the_offline_loaders_scored_shape() -> None:
    from buffer.offline import _check

    rec = repro.dataset_record("1+2=", "1+2=3;\\boxed{3}<|eos|>", 1, "arith-train-7", "s-0")
    assert _check(rec, "scored") is None
    assert rec["reward"] == 1.0 and rec["task"] == "arith" and rec["prompt_id"] == "arith-train-7"
