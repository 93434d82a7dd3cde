"""The rollout worker: rows in the buffer schema, groups, scoring and weight versions."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pytest
import torch

from actors.engines import DecodeOptions, EngineOutput
from actors.engines.torch_engine import TorchEngine
from actors.rollout import RolloutWorker
from actors.verifiers import Score
from embr_rl.core.config import BuiltinModelConfig, TaskConfig
from embr_rl.core.experience import SAMPLE_SCHEMA, validate
from embr_rl.core.models.loader import build_builtin_model
from embr_rl.core.tasks import Problem, load_task

OPTIONS = DecodeOptions(gen_length=8, block_length=4, steps=4, temperature=0.9)


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_task(TaskConfig(name="arith", limit=3), "test")


@pytest.fixture(scope="module")
def tokenizer(problems: list[Problem]):
    from embr_rl.core.models.tokenizer import train_char_tokenizer

    return train_char_tokenizer(["0123456789+-=;\\boxed{}"] + [p.question for p in problems])


@pytest.fixture
def model(tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_builtin_model(
        BuiltinModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        tokenizer,
    ).eval()


def _worker(model, tokenizer, **kw) -> RolloutWorker:
    engine = TorchEngine(model, tokenizer.mask_token_id, eos_id=tokenizer.eos_token_id)
    return RolloutWorker(engine, tokenizer, OPTIONS, group_size=4, num_scorers=1, **kw)


def test_rows_validate_against_the_buffer_schema(model, tokenizer, problems) -> None:
    worker = _worker(model, tokenizer, worker_id="w7")
    table = worker.generate(problems)
    worker.close()
    assert table.schema == SAMPLE_SCHEMA
    validate(table, fill_defaults=False)
    rows = table.to_pylist()
    assert len(rows) == 3 * 4
    assert [r["prompt_id"] for r in rows] == [p.id for p in problems for _ in range(4)]
    assert len({r["group_id"] for r in rows}) == 3 and len({r["sample_id"] for r in rows}) == 12
    assert all(r["group_id"].startswith("w7-") for r in rows)
    assert all(len(r["completion_ids"]) == 8 and r["policy_version"] == 0 for r in rows)
    assert all(r["task"] == "arith" and r["reward"] in (0.0, 1.0) for r in rows)
    assert all(r["verifier_status"] in ("correct", "wrong", "no_answer") for r in rows)
    want = tokenizer(problems[1].question, add_special_tokens=False)["input_ids"]
    assert rows[4]["prompt_ids"] == want
    assert worker.metrics()["rollout/samples"] == 12.0


def test_a_weight_update_bumps_the_version_of_later_rows(model, tokenizer, problems) -> None:
    worker = _worker(model, tokenizer, seed=1)
    first = worker.generate(problems[:1])
    new = {k: v + 0.5 * torch.randn_like(v) for k, v in model.state_dict().items()}
    worker.update_weights(new, version=3)
    assert worker.policy_version == 3
    assert torch.equal(model.lm_head.weight, new["lm_head.weight"])
    second = worker.generate(problems[:1])
    assert set(first.column("policy_version").to_pylist()) == {0}
    assert set(second.column("policy_version").to_pylist()) == {3}
    with pytest.raises(ValueError, match="older than"):
        worker.update_weights(new, version=2)
    worker.close()


class _SlowEngine:
    """Blocks inside ``generate`` until released; records when weights arrive."""

    name = "slow"

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.events: list[str] = []

    def generate(
        self, prompts: Sequence[Sequence[int]], options: DecodeOptions, *, seed: int | None = None
    ) -> EngineOutput:
        self.events.append("generate-start")
        self.started.set()
        self.release.wait(10)
        self.events.append("generate-end")
        return EngineOutput(torch.zeros(len(prompts), options.gen_length, dtype=torch.long))

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.events.append("weights")


def test_weights_arriving_mid_generation_wait_for_the_batch(tokenizer, problems) -> None:
    engine = _SlowEngine()
    worker = RolloutWorker(engine, tokenizer, OPTIONS, group_size=2, num_scorers=1)
    result = {}
    thread = threading.Thread(target=lambda: result.update(t=worker.generate(problems[:1])))
    thread.start()
    assert engine.started.wait(10)
    worker.update_weights({}, version=1)
    assert engine.events == ["generate-start"]  # not applied mid-generation
    engine.release.set()
    thread.join(10)
    assert set(result["t"].column("policy_version").to_pylist()) == {0}
    assert worker.generate(problems[:1]).column("policy_version").to_pylist() == [1, 1]
    assert engine.events == [
        "generate-start",
        "generate-end",
        "weights",
        "generate-start",
        "generate-end",
    ]
    worker.close()


def test_from_config_builds_engine_verifier_and_options(model, tokenizer, problems) -> None:
    from embr_rl.core.config import load_config
    from embr_rl.core.models.loader import LoadedModel

    cfg = load_config(
        overrides=[
            "rollout.group_size=2",
            "rollout.gen_length=8",
            "rollout.block_length=4",
            "rollout.steps=4",
            "rollout.threshold=0.9",
            "rollout.cache=prefix",
        ]
    )
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        chat_template=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
        stop_token_ids=(tokenizer.eos_token_id, 5),
    )
    worker = RolloutWorker.from_config(cfg, loaded)
    assert worker.options.threshold == 0.9 and worker.options.cache == "prefix"
    assert worker.stop_ids == (tokenizer.eos_token_id, 5) == worker.engine.stop_ids
    table = worker.generate(problems[:2])
    worker.close()
    assert table.num_rows == 4 and worker.engine.name == "torch"


class _FixedEngine:
    """Returns the same completion for every prompt."""

    name = "fixed"

    def __init__(self, completion: list[int]) -> None:
        self.completion = completion

    def generate(
        self, prompts: Sequence[Sequence[int]], options: DecodeOptions, *, seed: int | None = None
    ) -> EngineOutput:
        return EngineOutput(torch.tensor([self.completion] * len(prompts)))

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        pass


class _Recorder:
    """A verifier that keeps the texts it is given."""

    name = "recorder"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def score(self, completion: str, reference: object) -> Score:
        self.texts.append(completion)
        return Score(reward=0.0)


def test_completion_text_is_cut_at_an_end_of_turn_id(tokenizer, problems) -> None:
    eot = tokenizer.convert_tokens_to_ids("9")  # any id can be declared a stop id
    enc = tokenizer("12", add_special_tokens=False)["input_ids"]
    engine = _FixedEngine([*enc, eot, *enc, tokenizer.eos_token_id])
    recorder = _Recorder()
    verifiers = {p.verifier: recorder for p in problems}
    worker = RolloutWorker(
        engine, tokenizer, OPTIONS, group_size=1, verifiers=verifiers, stop_ids=[eot]
    )
    table = worker.generate(problems[:1])
    worker.close()
    assert recorder.texts == ["12"]
    assert table.column("completion_ids").to_pylist() == [engine.completion]
    plain = RolloutWorker(engine, tokenizer, OPTIONS, group_size=1, verifiers=verifiers)
    plain.generate(problems[:1])
    plain.close()
    assert recorder.texts == ["12", "12912"]


# --------------------------------------------------------------------------- behaviour log-probs


def _behaviour_worker(model, tokenizer, algo):
    from actors.rollout import BehaviourScorer

    scorer = BehaviourScorer(algo, mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id)
    return _worker(model, tokenizer, seed=2, behaviour=scorer)


@pytest.mark.parametrize("masking", ["block", "random"])
def test_recorded_behaviour_logp_is_the_learners_d1_estimate_on_fresh_rows(
    model, tokenizer, problems, masking: str
) -> None:
    """The ratio d1 takes on a fresh row is 1: the learner's estimate equals the recorded one
    (prompts of different lengths, so the learner's left padding differs from the worker's)."""
    from embr_rl.core.config import AlgoConfig
    from embr_rl.core.losses import LossModels, d1_loss, d1_token_logprobs
    from learner.batching import TokenIds, rows_to_batch

    algo = AlgoConfig(name="d1", block_length=4, masking=masking, kl_coef=0.0)
    worker = _behaviour_worker(model, tokenizer, algo)
    table = worker.generate(problems)
    worker.close()
    assert all(len(v) == 8 for v in table.column("behaviour_logp").to_pylist())
    assert "rollout/behaviour_logp_s" in worker.metrics()
    models = LossModels(policy=model, mask_id=tokenizer.mask_token_id)
    batch = rows_to_batch(table, models, ids=TokenIds(pad_id=tokenizer.pad_token_id))
    assert batch.old_token_logp is not None and batch.prompt_masks is not None
    assert not batch.prompt_masks.any()
    with torch.no_grad():
        now = d1_token_logprobs(
            model,
            batch.prompt_ids,
            batch.completion_ids,
            algo,
            mask_id=tokenizer.mask_token_id,
            attention_mask=batch.full_attention(),
            prompt_masks=batch.prompt_masks,
        )
    torch.testing.assert_close(now, batch.old_token_logp, atol=1e-5, rtol=0)
    assert abs(d1_loss(batch, algo).metrics["learner/log_ratio_mean"]) < 1e-5


def test_after_an_update_d1_takes_its_ratio_to_the_recorded_behaviour_policy(
    model, tokenizer, problems
) -> None:
    from dataclasses import replace

    from embr_rl.core.config import AlgoConfig
    from embr_rl.core.losses import LossModels, d1_loss
    from learner.batching import TokenIds, rows_to_batch

    algo = AlgoConfig(name="d1", block_length=4, kl_coef=0.0, clip_eps=0.05)
    table = _behaviour_worker(model, tokenizer, algo).generate(problems)
    moved = copy_with_noise(model)
    models = LossModels(policy=moved, mask_id=tokenizer.mask_token_id)
    batch = rows_to_batch(table, models, ids=TokenIds(pad_id=tokenizer.pad_token_id))
    # Mixed rewards in every group, so the advantages (and the clip) are not all zero.
    batch = replace(batch, rewards=(torch.arange(len(batch.rewards)) % 2).float())
    recorded = d1_loss(batch, algo)
    as_if_fresh = d1_loss(replace(batch, old_token_logp=None, prompt_masks=None), algo)
    assert recorded.metrics["learner/behaviour_logp"] == 1.0
    assert abs(recorded.metrics["learner/log_ratio_mean"]) > 1e-3
    assert as_if_fresh.metrics["learner/log_ratio_mean"] == 0.0
    assert recorded.metrics["learner/clip_fraction"] > 0.0
    assert as_if_fresh.metrics["learner/clip_fraction"] == 0.0


def copy_with_noise(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    moved = copy.deepcopy(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return moved


def test_rows_without_recorded_logp_leave_d1_on_the_current_policy(
    model, tokenizer, problems
) -> None:
    from embr_rl.core.losses import LossModels
    from learner.batching import TokenIds, rows_to_batch

    table = _worker(model, tokenizer).generate(problems[:1])
    assert set(map(len, table.column("behaviour_logp").to_pylist())) == {0}
    models = LossModels(policy=model, mask_id=tokenizer.mask_token_id)
    batch = rows_to_batch(table, models, ids=TokenIds(pad_id=tokenizer.pad_token_id))
    assert batch.old_token_logp is None and batch.prompt_masks is None
