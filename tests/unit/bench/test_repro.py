"""bench/repro.py and bench/sweep.py: the plan, the statistics, the verdicts, the report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import repro, sweep
from bench.localrun import (
    RECORDS,
    REPO,
    Changed,
    Job,
    changed_records,
    done_keys,
    make_offline_dataset,
    read_records,
    retire_changed,
    retire_keys,
    run_many,
    run_one,
)

TUNED = {a: {"overrides": [f"learner.lr={i}e-4"], "validation_accuracy": 0.3} for i, a in
         enumerate(repro.ONLINE, 1)}  # fmt: skip


def _rec(setting: str, algo: str, seed: int, final: float, k: int = 0, **kw: Any) -> dict:
    evals = [
        {"step": 10, "samples": 1280, "accuracy": final / 2},
        {"step": 20, "samples": 2560, "accuracy": final},
    ]
    return {
        "key": f"{setting}/{algo}/seed{seed}/K{k}", "setting": setting, "algo": algo,
        "seed": seed, "k": k, "status": "done", "steps": 20, "rows_per_round": 128,
        "samples": 2560, "evals": evals, "final_accuracy": final, "seconds": 60.0, **kw,
    }  # fmt: skip


def _base(acc: float = 0.1) -> dict:
    return {"key": "base", "setting": "base", "status": "done", "final_accuracy": acc,
            "evals": [{"step": 0, "samples": 0, "accuracy": acc}], "seconds": 5.0}  # fmt: skip


# --------------------------------------------------------------------------- plan


def test_plan_runs_every_method_per_seed_with_its_tuned_settings() -> None:
    jobs = repro.plan(
        [0, 1], ["online", "stale"], steps=60, eval_every=15, stale_k=[2], tuned=TUNED
    )
    keys = [j.key for j in jobs]
    assert keys[0] == "base" and len(keys) == len(set(keys))
    assert len(jobs) == 1 + 2 * (len(repro.ONLINE) + len(repro.STALE))
    d1 = next(j for j in jobs if j.key == "online/d1/seed1")
    assert "learner.lr=4e-4" in d1.overrides and "seed=1" in d1.overrides
    assert d1.eval_at == (15, 30, 45, 60) and d1.eval_split == "test"
    stale_d1 = next(j for j in jobs if j.key == "stale/K2/d1/seed0")
    assert "algo.inner_iterations=3" in stale_d1.overrides
    assert "rollout.record_logprobs=true" in stale_d1.overrides
    stale_c = next(j for j in jobs if j.key == "stale/K2/embr_c/seed0")
    assert not any("record_logprobs" in o for o in stale_c.overrides)
    # Evaluations at whole rounds of K + 1 = 3 updates.
    assert all(s % 3 == 0 for s in stale_c.eval_at) and stale_c.eval_at[-1] == 60


def test_plan_offline_runs_on_the_dataset_with_untuned_preference_losses(tmp_path: Path) -> None:
    data = tmp_path / "offline_base.jsonl"
    jobs = repro.plan([0], ["offline"], steps=20, eval_every=10, stale_k=[], tuned=TUNED,
                      offline_data=data, offline_rows=4096)  # fmt: skip
    assert [j.key for j in jobs] == ["base"] + [f"offline/{a}/seed0" for a in repro.OFFLINE]
    dpo = next(j for j in jobs if j.key == "offline/dpo/seed0")
    assert "algo.mode=offline" in dpo.overrides and f"buffer.offline_path={data}" in dpo.overrides
    assert "buffer.capacity=4096" in dpo.overrides
    assert "learner.lr=1.0e-4" in dpo.overrides  # not swept: the online sweep's common choice
    embr_c = next(j for j in jobs if j.key == "offline/embr_c/seed0")
    assert set(TUNED["embr_c"]["overrides"]) <= set(embr_c.overrides)
    with pytest.raises(ValueError, match="offline_data"):
        repro.plan([0], ["offline"], steps=2, eval_every=1, stale_k=[], tuned=TUNED)


def test_plan_offline_takes_the_offline_sweeps_settings_first(tmp_path: Path) -> None:
    off = {"dpo": {"overrides": ["learner.lr=1.0e-4", "algo.beta=0.2"], "validation_accuracy": 0.3},
           "embr_c": {"overrides": ["learner.lr=1.0e-4", "algo.beta=0.1"], "validation_accuracy": 0.3}}  # fmt: skip
    jobs = repro.plan([0], ["offline"], steps=4, eval_every=2, stale_k=[], tuned=TUNED,
                      offline_data=tmp_path / "d.jsonl", offline_rows=64, tuned_offline=off)  # fmt: skip
    by = {j.key.split("/")[1]: j.overrides for j in jobs if j.key != "base"}
    assert "algo.beta=0.2" in by["dpo"] and "algo.beta=0.1" in by["embr_c"]
    assert set(TUNED["embr_u"]["overrides"]) <= set(by["embr_u"])  # not in the offline sweep
    assert "learner.lr=1.0e-4" in by["vrpo"] and not any("beta" in o for o in by["vrpo"])
    assert repro.offline_settings("dpo", None, off) == []  # --untuned
    recs = _records()
    for seed in range(2):
        for a in repro.OFFLINE:
            recs.append(_rec("offline", a, seed, 0.2 + 0.01 * seed, samples=64))
    text = repro.build_report(recs, TUNED, [], tuned_offline=off)
    assert "the offline validation sweep chose" in text
    assert "| DPO-ELBO | `learner.lr=1.0e-4 algo.beta=0.2` | 30.0% |" in text
    assert "(no offline sweep on record)" in repro.build_report(recs, TUNED, [])


def test_sweep_offline_points_run_each_method_on_the_studys_dataset() -> None:
    data = Path("bench/records/repro/offline_base.jsonl")
    jobs = sweep.offline_points(list(sweep.OFFLINE_ALGOS), 10, data, 4096)
    assert len(jobs) == len(sweep.OFFLINE_ALGOS) * len(sweep.OFFLINE_BETAS)
    assert all(j.eval_split == "validation" and j.key.startswith("offline/") for j in jobs)
    assert all("algo.mode=offline" in j.overrides and f"buffer.offline_path={data}" in j.overrides
               for j in jobs)  # fmt: skip
    assert sweep.tuned_overrides({"overrides": list(jobs[0].overrides)}) == [
        f"learner.lr={sweep.OFFLINE_LR}",
        f"algo.beta={sweep.OFFLINE_BETAS[0]}",
    ]
    assert set(sweep.OFFLINE_ALGOS) == set(repro.OFFLINE)
    assert str(sweep.OFFLINE_DATA) == f"bench/records/repro/{repro.OFFLINE_DATA}"


def test_plan_names_the_command_when_a_method_was_not_swept() -> None:
    with pytest.raises(KeyError, match=r"bench/sweep\.py --algos embr_e"):
        repro.plan(
            [0], ["online"], steps=4, eval_every=2, stale_k=[], tuned={"embr_c": TUNED["embr_c"]}
        )


def test_every_planned_run_is_a_valid_config(tmp_path: Path) -> None:
    from embr_rl.core.config import load_config

    tuned = json.loads(repro.TUNED.read_text()) if repro.TUNED.exists() else None
    data = tmp_path / "d.jsonl"
    for job in repro.plan(
        [0], ["online", "stale", "offline"], steps=6, eval_every=3, stale_k=[2], tuned=tuned,
        offline_data=data, offline_rows=128,
    ):  # fmt: skip
        load_config(str(repro.REPO / "configs" / "demo.yaml"), ["algo.mode=sync", *job.overrides])


@pytest.mark.parametrize(("steps", "every", "round_len", "want"), [
    (60, 15, 1, (15, 30, 45, 60)), (60, 15, 3, (15, 30, 45, 60)), (20, 15, 3, (15, 20)),
    (10, 4, 3, (3, 6, 9, 10)), (5, 0, 1, (1, 2, 3, 4, 5)),
])  # fmt: skip
def test_eval_points(steps: int, every: int, round_len: int, want: tuple[int, ...]) -> None:
    assert repro.eval_points(steps, every, round_len) == want


# --------------------------------------------------------------------------- statistics


def test_t_interval_by_hand() -> None:
    iv = repro.t_interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)
    assert iv.mean == pytest.approx(0.2) and iv.n == 3
    assert (iv.lo, iv.hi) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    one = repro.t_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.lo) and repro.fmt(one) == "50.0"
    assert repro.fmt(iv) == f"20.0 [{100 * (0.2 - half):.1f}, {100 * (0.2 + half):.1f}]"


def test_samples_to_target_interpolates_between_evaluations() -> None:
    curve = [(100, 0.2), (200, 0.4), (300, 0.3)]
    assert repro.samples_to_target(curve, 0.3, base=0.1) == pytest.approx(150)
    assert repro.samples_to_target(curve, 0.15, base=0.1) == pytest.approx(50)
    assert repro.samples_to_target(curve, 0.5, base=0.1) is None
    assert repro.samples_to_target(curve, 0.05, base=0.1) == 0.0


@pytest.mark.parametrize(("values", "want"), [
    ([0.02, 0.03, 0.025], "held"), ([-0.02, -0.03, -0.025], "not held"),
    ([0.05, -0.04, 0.01], "not resolved at this power"), ([0.1], "not measurable (one seed)"),
])  # fmt: skip
def test_verdict(values: list[float], want: str) -> None:
    assert repro.verdict(repro.t_interval(values)) == want


# --------------------------------------------------------------------------- report


def _records() -> list[dict]:
    recs = [_base(0.1)]
    for seed in range(3):
        for a, acc in zip(
            repro.ONLINE, (0.2, 0.3, 0.31, 0.25, 0.22, 0.21, 0.23, 0.24), strict=True
        ):
            recs.append(_rec("online", a, seed, acc + 0.01 * seed))
        recs.append(_rec("stale", "embr_c", seed, 0.3 + 0.01 * seed, k=2))
        recs.append(_rec("stale", "d1", seed, 0.2 + 0.01 * seed, k=2))
    return recs


def test_report_holds_every_table_and_marks_the_claims(tmp_path: Path) -> None:
    recs = _records()
    text = repro.build_report(
        recs,
        TUNED,
        [{"command": "x", "started": "now", "seconds": 3.0}],
        sweep_points={"embr_c": 3, "d1": 5},
    )
    assert "test accuracy 10.0%" in text and "seeds 0, 1, 2" in text
    # each method's tuning budget is in its row: the points on record, or none
    assert "| `learner.lr=2e-4` | 30.0% | 3 |" in text and "| 30.0% | 5 |" in text
    assert "| `learner.lr=1e-4` | 30.0% | none (not on record) |" in text
    assert "| EMBR-C | 3 | 31.0 [" in text
    # Target: d1's mean final 26%; EMBR-C reaches it between 1280 (15.5%) and 2560 (30%+).
    assert "d1 (diffu-GRPO) 26.0%" in text
    assert "| wd1 | 0/3 | not reached |" in text
    assert "**EMBR >= d1 (diffu-GRPO) online**" in text and ": held." in text
    assert "**EMBR-C >= EMBR-E** (+10.0 [+10.0, +10.0] points): held." in text
    assert "EMBR > DPO/VRPO offline**: not measurable" in text
    assert "K = 2" in text and "behaviour log-probs" in text
    out = repro.plot(recs, 0.1, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_claims_test_the_variant_validation_chose_not_the_best_on_test() -> None:
    tuned = {a: dict(v) for a, v in TUNED.items()}
    tuned["embr_e"]["validation_accuracy"] = 0.4  # validation ranks EMBR-E first
    assert repro.chosen_embr(["embr_e", "embr_c", "embr_u"], tuned)[0] == "embr_e"
    del tuned["embr_u"]["validation_accuracy"]
    assert repro.chosen_embr(["embr_e", "embr_c", "embr_u"], tuned)[0] == "embr_c"
    tuned["embr_u"]["validation_accuracy"] = 0.1
    text = repro.build_report(_records(), tuned, [])
    # EMBR-E (20-22%) is tested against d1 (25-27%), although EMBR-U has the best test mean
    assert "**EMBR >= d1 (diffu-GRPO) online** (EMBR-E, the EMBR variant the validation" in text
    assert "minus d1 (diffu-GRPO): -5.0 [-5.0, -5.0] points): not held." in text
    assert "Not a test, for reference: EMBR-U, the EMBR variant with the best test mean" in text


def test_report_offline_table_and_claim(tmp_path: Path) -> None:
    recs = _records()
    for seed in range(3):
        for a, acc in zip(repro.OFFLINE, (0.30, 0.28, 0.20, 0.24), strict=True):
            recs.append(_rec("offline", a, seed, acc + 0.01 * seed**2, samples=4096))
    text = repro.build_report(recs, TUNED, [])
    assert "### Offline: one fixed dataset" in text and "4096 scored rows" in text
    assert "| DPO-ELBO | 3 | 21.7 [" in text
    # EMBR-C (best EMBR offline) minus VRPO (the better preference loss): +6 points each seed
    assert "**EMBR > DPO/VRPO offline** (EMBR-C" in text and "minus VRPO" in text
    assert ": +6.0 [+6.0, +6.0] points): held." in text
    out = repro.plot(recs, 0.1, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_needs_the_base_evaluation() -> None:
    with pytest.raises(ValueError, match="base-model evaluation"):
        repro.build_report(_records()[1:], TUNED, [])


def test_a_command_cut_short_is_logged_with_the_records_it_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, log = tmp_path / "results.jsonl", tmp_path / "commands.jsonl"

    def two_then_interrupt(jobs: Any, out: Path, *, processes: int) -> int:
        with out.open("a") as f:
            for s in (0, 1):
                f.write(json.dumps(_rec("online", "d1", s, 0.3)) + "\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(repro, "run_many", two_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        repro.run_logged([], path, log, "repro --seeds 0,1", processes=1)
    (entry,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert entry["command"] == "repro --seeds 0,1"
    assert entry["runs"] == 2 and entry["interrupted"] is True
    assert "interrupted after 2 runs" in repro.build_report(_records(), TUNED, [entry])

    monkeypatch.setattr(repro, "run_many", lambda jobs, out, *, processes: 0)
    assert repro.run_logged([], path, log, "repro --report", processes=1) == 0
    assert len(log.read_text().splitlines()) == 1  # nothing added, nothing logged


def test_a_record_run_at_other_settings_is_refused_not_reused(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    old = _rec("online", "embr_u", 0, 0.3) | {"overrides": ["algo.name=embr_u", "learner.lr=1e-4"]}
    out.write_text(json.dumps(old) + "\n")
    same = Job(old["key"], ("algo.name=embr_u", "learner.lr=1e-4"), 20, "test", (20,))
    assert run_many([same], out, processes=1, log=lambda _: None) == 0  # finished: skipped
    moved = dataclasses.replace(same, overrides=("algo.name=embr_u", "learner.lr=2e-4"))
    (c,) = changed_records([moved], out)
    assert str(c) == f"{old['key']}: learner.lr=1e-4 -> learner.lr=2e-4"
    with pytest.raises(ValueError, match="retire those records"):
        run_many([moved], out, processes=1, log=lambda _: None)
    # Retired: moved beside the records, nothing lost; the job is then to run again.
    other = _rec("online", "d1", 0, 0.2) | {"overrides": ["algo.name=d1"]}
    with out.open("a") as f:
        f.write(json.dumps(other) + "\n")
    d1 = Job(other["key"], ("algo.name=d1",), 20, "test", (20,))
    assert [x.key for x in retire_changed([moved, d1], out)] == [old["key"]]
    assert [r["key"] for r in read_records(out)] == [other["key"]]
    assert json.loads((tmp_path / "results.retired.jsonl").read_text()) == old
    assert changed_records([moved, d1], out) == [] and retire_changed([moved, d1], out) == []


def test_retire_keys_moves_only_the_named_records(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    recs = [_rec("online", a, s, 0.3) for a in ("embr_e", "d1") for s in (0, 1)]
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    gone = {r["key"] for r in recs if r["key"].startswith("online/embr_e/")}
    assert retire_keys(out, gone) == 2
    assert [r["key"] for r in read_records(out)] == [r["key"] for r in recs[2:]]
    retired = tmp_path / "results.retired.jsonl"
    assert {json.loads(x)["key"] for x in retired.read_text().splitlines()} == gone
    assert retire_keys(out, gone) == 0 and len(retired.read_text().splitlines()) == 2


def test_rerun_naming_no_planned_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exc:
        repro.main(["--out", str(out), "--settings", "online", "--rerun", "online/ppo/"])
    assert exc.value.code == 2
    assert "--rerun 'online/ppo/' names none of the planned runs' keys" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()  # nothing ran, nothing retired


def test_report_lists_runs_at_earlier_settings_and_flags_their_claims() -> None:
    earlier = [Changed(f"online/d1/seed{s}", (), ("algo.kl_coef=0.0",)) for s in (0, 1)]
    text = repro.build_report(_records(), TUNED, [], earlier=earlier)
    assert "2 records were run before" in text
    assert "- `online/d1` (seeds 0, 1): `(default)` -> `algo.kl_coef=0.0`" in text
    assert "its online runs are at earlier settings" in text
    assert "earlier settings" not in repro.build_report(_records(), TUNED, [])


def test_write_docs_replaces_only_the_marked_block(tmp_path: Path) -> None:
    docs, img, curves = tmp_path / "results.md", tmp_path / "img" / "r.png", tmp_path / "c.png"
    curves.write_bytes(b"png")
    docs.write_text(f"head\n{repro.BEGIN}\nold\n{repro.END}\ntail\n")
    repro.write_docs("new ![a](curves.png)\n", curves, docs, img)
    assert docs.read_text() == f"head\n{repro.BEGIN}\nnew ![a](img/r.png)\n{repro.END}\ntail\n"
    assert img.read_bytes() == b"png"
    docs.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        repro.write_docs("x", curves, docs, img)


def test_the_docs_hold_the_markers() -> None:
    text = repro.DOCS.read_text()
    blocks = ("sweep", "sweep-baselines", "sweep-offline", "plateau")
    for begin, end in ((repro.BEGIN, repro.END), *(sweep.markers(b) for b in blocks)):
        assert text.count(begin) == 1 and text.count(end) == 1


def test_the_study_records_live_in_the_repository() -> None:
    # The docs' tables are generated from these files alone; under runs/ (ignored) they were
    # lost with the checkout that made them.
    rel = RECORDS.relative_to(REPO).as_posix()
    ignored = [
        line.strip().rstrip("/")
        for line in (REPO / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(rel == g or rel.startswith(g + "/") for g in ignored), (rel, ignored)


# --------------------------------------------------------------------------- sweep


def test_sweep_stage2_tries_each_knob_at_the_stage1_winner() -> None:
    recs = [
        {"algo": "embr_c", "stage": 1, "final_accuracy": acc, "overrides": [f"learner.lr={lr}"],
         "key": f"embr_c/lr{lr}", "point": f"lr{lr}"}
        for lr, acc in (("1.0e-4", 0.2), ("2.0e-4", 0.3), ("4.0e-4", 0.25))
    ]  # fmt: skip
    jobs = sweep.stage2(["embr_c"], 10, recs)
    assert [j.overrides[2:] for j in jobs] == [
        ("learner.lr=2.0e-4", "algo.beta=0.02"),
        ("learner.lr=2.0e-4", "algo.beta=0.1"),
    ]
    assert all(j.eval_split == "validation" for j in jobs)
    assert sweep.best(recs, "embr_c")["point"] == "lr2.0e-4"
    assert sweep.tuned_overrides({"overrides": ["algo.name=x", "seed=0", "learner.lr=1"]}) == [
        "learner.lr=1"
    ]
    assert all(j.eval_split == "validation" for j in sweep.stage1(list(sweep.ALGOS), 5))


def _point(stage: int, point: str, overrides: list[str], solved: int) -> dict[str, Any]:
    """A sweep record of embr_c that solves the first ``solved`` of 100 validation problems."""
    rewards = {f"v{i}": float(i < solved) for i in range(100)}
    return {"algo": "embr_c", "stage": stage, "point": point, "key": f"embr_c/{point}",
            "overrides": ["algo.name=embr_c", "seed=0", *overrides],
            "final_accuracy": solved / 100, "final_rewards": rewards, "reward_curve": [0.1],
            "seconds": 1.0}  # fmt: skip


def test_sweep_stage3_changes_one_shared_setting_and_adopts_only_a_significant_gain() -> None:
    early = [
        _point(1, "lr1.0e-4", ["learner.lr=1.0e-4"], 30),
        _point(2, "lr=1.0e-4+beta=0.02", ["learner.lr=1.0e-4", "algo.beta=0.02"], 40),
    ]
    jobs = sweep.stage3(["embr_c"], 10, early)
    assert [j.meta["point"] for j in jobs] == list(sweep.STAGE3["embr_c"])
    draws = next(j for j in jobs if j.meta["point"] == "draws")
    assert draws.overrides[2:] == ("learner.lr=1.0e-4", "algo.beta=0.02", "algo.num_mc_samples=2")
    assert all(j.eval_split == "validation" and j.meta["stage"] == 3 for j in jobs)
    # Every axis a stage-3 algorithm names exists, and every online algorithm has stage 3.
    assert set(sweep.STAGE3) == set(sweep.ALGOS)
    assert all(set(v) <= set(sweep.STAGE3_AXES) for v in sweep.STAGE3.values())

    # 43 vs 40 on the same problems: 3 flips, p = 0.25, the stage-2 winner stays.
    small = _point(
        3, "warmup", ["learner.lr=1.0e-4", "algo.beta=0.02", "learner.warmup_steps=5"], 43
    )
    assert sweep.versus(small, early[1]) == (3, 0, 0.25)
    assert sweep.best([*early, small], "embr_c") is early[1]
    # 60 vs 40: 20 flips one way, p ~ 2e-6, adopted.
    big = _point(3, "draws", list(draws.overrides[2:]), 60)
    assert sweep.best([*early, small, big], "embr_c") is big
    assert sweep.best([*early, small, big], "embr_c", stage=2) is early[1]
    # A stage-3 point below the winner is never adopted, however significant.
    worse = _point(3, "reward_norm", ["learner.lr=1.0e-4", "algo.beta=0.02"], 10)
    assert sweep.best([*early, worse], "embr_c") is early[1]
    table = sweep.report([*early, small, big], ["embr_c"], 10)
    assert "| embr_c | `algo.num_mc_samples=2` | 0.600 | +20.0 | 20 / 0 |" in table
    assert table.count("| yes |") == 1
    with pytest.raises(ValueError, match="embr_c"):
        sweep.best([big], "embr_c")


def test_tuned_settings_come_from_the_sweep() -> None:
    """bench/tuned.json is what bench/sweep.py wrote: one entry per online method, each with
    overrides that configs/demo.yaml accepts and the validation accuracy that chose them."""
    from embr_rl.core.config import load_config

    tuned = json.loads(repro.TUNED.read_text())
    assert set(tuned) == set(repro.ONLINE)
    for a, entry in tuned.items():
        assert 0.0 <= entry["validation_accuracy"] <= 1.0
        load_config(
            str(repro.REPO / "configs" / "demo.yaml"), [f"algo.name={a}", *entry["overrides"]]
        )


def test_demo_runs_the_sweeps_embr_winner() -> None:
    """configs/demo.yaml runs the EMBR variant the validation sweep ranks first, at that
    variant's tuned settings (bench/tuned.json), and at the study's horizon."""
    from embr_rl.core.config import load_config

    tuned = json.loads(repro.TUNED.read_text())
    pick, _ = repro.chosen_embr(repro.EMBR, tuned)
    path = str(repro.REPO / "configs" / "demo.yaml")
    demo = load_config(path)
    assert demo.algo.name == pick
    assert demo == load_config(path, tuned[pick]["overrides"])
    assert demo.learner.total_steps == repro.DEFAULT_STEPS


def test_tuned_offline_settings_come_from_the_offline_sweep() -> None:
    """bench/tuned_offline.json: one entry per offline method, overrides the offline runs
    accept (bench/sweep.py --setting offline wrote it)."""
    from embr_rl.core.config import load_config

    tuned = json.loads(repro.TUNED_OFFLINE.read_text())
    assert set(tuned) == set(repro.OFFLINE)
    for a, entry in tuned.items():
        assert 0.0 <= entry["validation_accuracy"] <= 1.0
        assert not any(o.startswith(("algo.mode=", "buffer.")) for o in entry["overrides"])
        load_config(
            str(repro.REPO / "configs" / "demo.yaml"),
            [
                f"algo.name={a}",
                "algo.mode=offline",
                "buffer.offline_path=x.jsonl",
                *entry["overrides"],
            ],
        )


# --------------------------------------------------------------------------- one run


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["d1", "unigrpo", "bgpo"])
def test_run_one_trains_evaluates_and_records(tmp_path: Path, algo: str) -> None:
    job = Job(
        "tiny",
        (f"algo.name={algo}", "rollout.prompts_per_batch=2", "rollout.group_size=4",
         "learner.batch_size=8", "learner.micro_batch_size=8", "rollout.record_logprobs=true",
         "algo.inner_iterations=2"),
        steps=2, eval_split="validation", eval_at=(0, 2), eval_limit=4,
    )  # fmt: skip
    rec = run_one(job)
    assert rec["status"] == "done", rec.get("error")
    assert rec["steps"] == 2 and rec["samples"] == 8
    assert [e["step"] for e in rec["evals"]] == [0, 2]
    assert len(rec["final_rewards"]) == 4
    assert rec["last_metrics"]["learner/behaviour_logp"] == 1.0
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({"key": "bad", "status": "failed"}) + "\n")
    assert done_keys(path) == {"tiny"} and len(read_records(path)) == 1


@pytest.mark.slow
def test_offline_dataset_round_trips_and_trains_offline(tmp_path: Path) -> None:
    from buffer.offline import load_offline
    from embr_rl.core.config import load_config
    from embr_rl.core.models.loader import load_model

    data = tmp_path / "offline_base.jsonl"
    assert make_offline_dataset(data, 1) == 128
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    assert len({r["prompt_id"] for r in lines}) == 16 and {r["reward"] for r in lines} <= {0.0, 1.0}
    # the texts encode back to the rollout's ids: every row keeps the window's full width
    cfg = load_config(str(repro.REPO / "configs" / "demo.yaml"), [])
    tok = load_model(cfg.model, for_training=False).tokenizer
    table = load_offline(data, tok, cache_dir=tmp_path / "cache").table
    assert table.num_rows == 128
    assert {len(c) for c in table.column("completion_ids").to_pylist()} == {cfg.rollout.gen_length}
    job = repro._offline_jobs(0, 2, 2, data, 128, lambda a: ["learner.lr=1e-4"])[2]  # dpo
    rec = run_one(dataclasses.replace(job, eval_limit=4))
    assert rec["status"] == "done", rec.get("error")
    assert rec["steps"] == 2 and rec["samples"] == 128 and len(rec["reward_curve"]) == 2
    assert "learner/dpo_margin" in rec["last_metrics"]


def test_run_one_with_no_steps_evaluates_the_base_model() -> None:
    rec = run_one(Job("base", ("seed=0",), 0, "validation", (0,), eval_limit=4))
    assert rec["status"] == "done", rec.get("error")
    assert rec["steps"] == 0 and rec["samples"] == 0 and rec["reward_curve"] == []
    assert [e["step"] for e in rec["evals"]] == [0] and rec["final_accuracy"] is not None
