"""Every algorithm and every mode on the same machinery: ``embr_rl.run.run`` in this process,
on the session's Ray instance, with a tiny pre-trained base model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embr_rl.core.config import Config, load_config
from embr_rl.telemetry import read_jsonl

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.builtin.hidden_size=32",
    "model.builtin.num_layers=1",
    "model.builtin.num_heads=2",
    "model.builtin.intermediate_size=64",
]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embr_rl.pretrain import pretrain

    root = tmp_path_factory.mktemp("modes")
    cfg = load_config(
        REPO / "configs" / "demo_base.yaml",
        [f"logging.run_dir={root}", "pretrain.max_steps=5", "pretrain.batch_size=8", *TINY],
    )
    return pretrain(cfg)


def _cfg(run_dir: Path, base: Path, *extra: str) -> Config:
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"logging.run_dir={run_dir}",
            f"model.path={base}",
            "rollout.num_workers=1",
            "rollout.prompts_per_batch=2",
            "rollout.group_size=4",
            "learner.num_cpus_per_rank=0.5",
            "learner.num_threads=null",
            "learner.batch_size=8",
            "learner.micro_batch_size=4",
            "algo.num_mc_samples=1",
            "eval.limit=4",
            "eval.batch_size=4",
            "eval.every=0",
            "eval.at_start=false",
            "checkpoint.every=0",
            "logging.tensorboard=false",
            "logging.progress=never",
            "logging.plot=false",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "algo", ["embr_e", "embr_c", "embr_u", "d1", "wd1", "unigrpo", "spg", "bgpo", "dpo", "vrpo"]
)
def test_sync_mode_runs_every_algorithm(
    ray_session: object, base_model: Path, tmp_path: Path, algo: str
) -> None:
    from embr_rl.run import run

    inner = 1 if algo in ("d1", "unigrpo", "bgpo") else 2
    # Weights reach the workers and the evaluator through shared memory (adopted, no copy).
    summary = run(
        _cfg(
            tmp_path, base_model, f"algo.name={algo}", "algo.mode=sync",
            f"algo.inner_iterations={inner}", "learner.total_steps=4",
            "learner.broadcast=shared_memory",
        )
    )  # fmt: skip
    assert summary["steps"] == 4 and summary["algo"] == algo
    # Algorithm 1: one broadcast per `inner` updates, one fresh batch of 2 x 4 rows per round.
    assert summary["policy_version"] == 4 // inner
    assert summary["samples"] == (4 // inner) * 8
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "learner/loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["learner/staleness_max"] == 0 for r in recs)  # sync: always on-policy rows


def test_offline_mode_trains_from_a_dataset_without_workers(
    ray_session: object, base_model: Path, tmp_path: Path
) -> None:
    from embr_rl.run import run

    data = tmp_path / "scored.jsonl"
    with open(data, "w") as fh:
        for i in range(12):
            a, b = i % 7, i % 5
            for completion, reward in (
                (f"{a}+{b}={a + b};\\boxed{{{a + b}}}", 1.0),
                (f"{a}+{b}={a + b + 1};\\boxed{{{a + b + 1}}}", 0.0),
            ):
                fh.write(json.dumps({"prompt": f"{a}+{b}=", "completion": completion,
                                     "reward": reward, "prompt_id": f"q{i}"}) + "\n")  # fmt: skip
    summary = run(
        _cfg(
            tmp_path / "run", base_model, "algo.name=embr_c", "algo.mode=offline",
            f"buffer.offline_path={data}", "learner.total_steps=3", "eval.every=2",
        )
    )  # fmt: skip
    assert summary["steps"] == 3 and summary["samples"] == 0
    assert summary["eval/steps"] == [2, 3]
    final = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert pq.read_table(final / "buffer.parquet").num_rows == 24
    assert json.loads((tmp_path / "run" / "actors.json").read_text())["rollout_workers"] == []


@pytest.mark.parametrize("algo", ["embr_u", "unigrpo", "spg"])
def test_online_mode_respects_max_staleness_even_when_starved(
    ray_session: object, base_model: Path, tmp_path: Path, algo: str
) -> None:
    from embr_rl.run import run

    summary = run(
        _cfg(
            tmp_path, base_model, f"algo.name={algo}", "algo.mode=online", "learner.total_steps=6",
            "learner.sync_every=2", "buffer.max_staleness=0", "buffer.max_lag=1",
            "checkpoint.every=3",
        )
    )  # fmt: skip
    assert summary["steps"] == 6 and summary["policy_version"] == 3
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "learner/loss" in r]
    # Each broadcast makes every buffered row stale; the paused workers must be woken up.
    assert max(r.get("learner/staleness_max", 0) for r in recs) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000003",
        "step_00000006",
    ]


def test_reference_scored_by_the_workers_leaves_the_learner_the_policy_only(
    ray_session: object, base_model: Path, tmp_path: Path
) -> None:
    from embr_rl.run import run

    summary = run(
        _cfg(
            tmp_path, base_model, "algo.name=embr_u", "algo.mode=online", "learner.total_steps=3",
            "rollout.score_reference=true", "algo.num_mc_samples=4",
        )
    )  # fmt: skip
    assert summary["steps"] == 3
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in recs if "learner/loss" in r]
    assert [r["learner/reference_cached"] for r in steps] == [1.0, 1.0, 1.0]
    assert any("rollout/reference_s" in r and r["rollout/decode_s"] > 0 for r in recs)


def test_sync_round_survives_mid_round_evaluations_and_frees_its_actors(
    ray_session: object, base_model: Path, tmp_path: Path
) -> None:
    import time

    import ray

    from embr_rl.run import run

    summary = run(
        _cfg(
            tmp_path, base_model, "algo.name=embr_c", "algo.mode=sync",
            "algo.inner_iterations=3", "learner.total_steps=4", "eval.every=1",
        )
    )  # fmt: skip
    # Evaluations at steps 1-3 force broadcasts inside the first round; its rows stay usable.
    assert summary["steps"] == 4 and summary["eval/steps"] == [1, 2, 3, 4]
    assert summary["samples"] == 2 * 8  # two rounds (steps 1-3 and 4)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "the run's actors still hold CPUs after it returned"
        time.sleep(0.5)
