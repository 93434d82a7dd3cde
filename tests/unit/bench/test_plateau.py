"""bench/plateau.py: the plan, the plateau rule, the report."""

from __future__ import annotations

from bench import plateau


def _rec(algo: str, seed: int, accs: list[float]) -> dict:
    evals = [{"step": 20 * (i + 1), "samples": 2560 * (i + 1), "accuracy": a} for i, a in
             enumerate(accs)]  # fmt: skip
    return {"key": f"plateau/{algo}/seed{seed}", "algo": algo, "seed": seed, "evals": evals}


def test_plan_evaluates_on_validation_with_the_tuned_settings() -> None:
    tuned = {"d1": {"overrides": ["learner.lr=1e-4"]}}
    jobs = plateau.plan(["d1"], [0, 1], 60, 20, tuned)
    assert [j.key for j in jobs] == ["plateau/d1/seed0", "plateau/d1/seed1"]
    assert all(j.eval_split == "validation" and j.eval_at == (20, 40, 60) for j in jobs)
    assert jobs[1].overrides == ("algo.name=d1", "learner.lr=1e-4", "seed=1")


def test_plateau_is_the_first_step_never_exceeded_by_more_than_tol() -> None:
    curve = [(20, 20.0), (40, 28.0), (60, 30.0), (80, 30.5), (100, 29.0)]
    assert plateau.plateau_step(curve, 1.0) == 60
    assert plateau.plateau_step(curve, 3.0) == 40
    # still rising at the end: no plateau in range
    assert plateau.plateau_step([(20, 20.0), (40, 25.0), (60, 30.0)], 1.0) is None
    assert plateau.plateau_step([(20, 20.0)], 1.0) is None


def test_report_averages_seeds_and_names_the_study_length() -> None:
    recs = [
        _rec("d1", 0, [0.20, 0.30, 0.31]),
        _rec("d1", 1, [0.22, 0.30, 0.29]),
        _rec("embr_c", 0, [0.20, 0.25, 0.30]),
    ]
    text = plateau.report(recs, 1.0)
    assert "| d1 (diffu-GRPO) | 2 | 21.0 | 30.0 | 30.0 | 40 |" in text
    assert "| EMBR-C | 1 | 20.0 | 25.0 | 30.0 | not reached |" in text
    assert "not determined" in text
    assert "Study length (largest plateau): 40 steps." in plateau.report(recs[:2], 1.0)
