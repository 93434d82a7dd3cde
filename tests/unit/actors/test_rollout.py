"""The rollout worker: rows in the buffer schema, groups, scoring and weight versions."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pytest
import torch
from weight_broadcast import broadcast_over_gloo

from actors.engines import DecodeOptions, EngineOutput
from actors.engines.torch_engine import TorchEngine
from actors.rollout import RolloutWorker
from actors.verifiers import Score
from embr_rl.core.config import BuiltinModelConfig, TaskConfig
from embr_rl.core.experience import SAMPLE_SCHEMA, validate
from embr_rl.core.models.loader import build_builtin_model
from embr_rl.core.tasks import Problem, load_task
from embr_rl.core.transport import (
    TensorSpec,
    TransportSpec,
    build_manifest,
)

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
    # Worker and batch before the random nonce: the learner's sorted group numbering of two
    # workers' rows is the same every run.
    assert all(r["group_id"].startswith("w7-0-") for r in rows)
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

    cfg_overrides = [
        "rollout.group_size=2",
        "rollout.gen_length=8",
        "rollout.block_length=4",
        "rollout.steps=4",
        "rollout.threshold=0.9",
    ]
    cfg = load_config(overrides=[*cfg_overrides, "rollout.cache=prefix"])
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
    assert worker.engine.max_batch_size == 16  # the whole batch: 8 prompts x 2
    flowing = load_config(
        overrides=[*cfg_overrides, "rollout.cache=dual", "rollout.continuous_batching=true",
                   "rollout.max_batch_size=3"]
    )  # fmt: skip
    worker = RolloutWorker.from_config(flowing, loaded)
    assert worker.options.continuous_batching and worker.engine.max_batch_size == 3
    table = worker.generate(problems[:2])
    worker.close()
    assert table.num_rows == 4


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


def test_unigrpo_records_its_draws_log_probs_and_takes_its_ratio_to_them(
    model, tokenizer, problems
) -> None:
    """UniGRPO's behaviour log-probs are per draw, on masks seeded by the row's ``mask_seed``:
    on fresh rows the learner's equal them (ratio 1), after an update the ratio moves."""
    from dataclasses import replace

    from embr_rl.core.config import AlgoConfig
    from embr_rl.core.losses import LossModels, unigrpo_loss, unigrpo_token_logprobs
    from learner.batching import TokenIds, rows_to_batch

    algo = AlgoConfig(name="unigrpo", block_length=4, num_mc_samples=2, kl_coef=0.0, clip_eps=0.05)
    worker = _behaviour_worker(model, tokenizer, algo)
    table = worker.generate(problems)
    worker.close()
    assert all(len(v) == 2 * 8 for v in table.column("behaviour_logp").to_pylist())
    seeds = table.column("mask_seed").to_pylist()
    assert min(seeds) >= 0 and len(set(seeds)) == len(seeds)
    models = LossModels(policy=model, mask_id=tokenizer.mask_token_id)
    batch = rows_to_batch(table, models, ids=TokenIds(pad_id=tokenizer.pad_token_id))
    assert batch.old_token_logp is not None and batch.mask_seeds is not None
    assert tuple(batch.old_token_logp.shape) == (table.num_rows, 16)
    with torch.no_grad():
        now, _ = unigrpo_token_logprobs(batch, algo, model)
    torch.testing.assert_close(
        now.reshape(table.num_rows, -1), batch.old_token_logp, atol=1e-5, rtol=0
    )
    batch = replace(batch, rewards=(torch.arange(len(batch.rewards)) % 2).float())
    assert unigrpo_loss(batch, algo).metrics["learner/clip_fraction"] == 0.0
    moved = replace(batch, models=LossModels(policy=copy_with_noise(model), mask_id=models.mask_id))
    assert unigrpo_loss(moved, algo).metrics["learner/clip_fraction"] > 0.0
    as_if_fresh = replace(moved, old_token_logp=None)
    assert unigrpo_loss(as_if_fresh, algo).metrics["learner/clip_fraction"] == 0.0
    with pytest.raises(ValueError, match="mask_seeds"):
        unigrpo_loss(replace(moved, mask_seeds=None), algo)
    with pytest.raises(ValueError, match="expected"):
        unigrpo_loss(replace(moved, old_token_logp=moved.old_token_logp[:, :8]), algo)


def test_bgpo_seeds_a_group_alike_and_its_ratio_is_one_on_fresh_rows(
    model, tokenizer, problems
) -> None:
    """BGPO scores a group's rows on its first row's masks (``algo.pair_common_masks``), so
    the worker gives a group's rows one ``mask_seed``; the learner's per-draw terms on fresh
    rows equal the recorded ones (log-ratio 0), after an update they move."""
    from dataclasses import replace

    from embr_rl.core.config import AlgoConfig
    from embr_rl.core.losses import LossModels, bgpo_loss
    from learner.batching import TokenIds, rows_to_batch

    algo = AlgoConfig(name="bgpo", block_length=4, num_mc_samples=2, kl_coef=0.0)
    worker = _behaviour_worker(model, tokenizer, algo)
    table = worker.generate(problems)
    worker.close()
    seeds = table.column("mask_seed").to_pylist()
    groups = table.column("prompt_id").to_pylist()
    assert len(set(seeds)) == len(set(groups)) < len(seeds)
    assert all(len(v) == 2 * 8 for v in table.column("behaviour_logp").to_pylist())
    models = LossModels(policy=model, mask_id=tokenizer.mask_token_id)
    batch = rows_to_batch(table, models, ids=TokenIds(pad_id=tokenizer.pad_token_id))
    batch = replace(batch, rewards=(torch.arange(len(batch.rewards)) % 2).float())
    fresh = bgpo_loss(batch, algo).metrics
    assert fresh["learner/behaviour_logp"] == 1.0
    assert abs(fresh["learner/log_ratio_mean"]) < 1e-5
    moved = replace(batch, models=LossModels(policy=copy_with_noise(model), mask_id=models.mask_id))
    assert abs(bgpo_loss(moved, algo).metrics["learner/log_ratio_mean"]) > 1e-3
    own = AlgoConfig(name="bgpo", block_length=4, num_mc_samples=2, pair_common_masks=False)
    worker = _behaviour_worker(model, tokenizer, own)
    apart = worker.generate(problems).column("mask_seed").to_pylist()
    worker.close()
    assert len(set(apart)) == len(apart)


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


# --------------------------------------------------------------------------- weight broadcast


class _VLLMLikeEngine:
    """Serves its model elsewhere, as vLLM does: no ``.model``; lists the weights it takes
    and records every update it is given."""

    name = "vllm-like"

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = list(specs)
        self.updates: list[dict[str, torch.Tensor]] = []

    def generate(
        self, prompts: Sequence[Sequence[int]], options: DecodeOptions, *, seed: int | None = None
    ) -> EngineOutput:
        return EngineOutput(torch.zeros(len(prompts), options.gen_length, dtype=torch.long))

    def weight_specs(self) -> list[TensorSpec]:
        return self.specs

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.updates.append({k: v.clone() for k, v in state_dict.items()})


def test_a_broadcast_reaches_an_engine_without_a_torch_model(tokenizer, problems) -> None:
    g = torch.Generator().manual_seed(0)
    sent = {
        "blocks.0.w": torch.randn(6, 4, generator=g),
        "blocks.0.b": torch.randn(6, generator=g),
        "head.w": torch.randn(3, 6, generator=g).bfloat16(),
    }
    manifest = build_manifest([(n, tuple(t.shape), t.dtype) for n, t in sent.items()], 1.0)
    engine = _VLLMLikeEngine(manifest.specs)
    assert not hasattr(engine, "model")
    worker = RolloutWorker(engine, tokenizer, OPTIONS, group_size=2, num_scorers=1)
    nbytes = broadcast_over_gloo(
        manifest, list(sent.values()), 4, worker.connect_weights, worker.receive_weights
    )
    assert nbytes == manifest.nbytes
    assert worker.policy_version == 4 and worker.ping()["policy_version"] == 4
    assert len(engine.updates) == 1 and set(engine.updates[0]) == set(sent)
    for name, value in sent.items():
        assert torch.equal(engine.updates[0][name], value), name
    rows = worker.generate(problems[:1])
    worker.close()
    assert rows.column("policy_version").to_pylist() == [4, 4]
    assert len(engine.updates) == 1  # applied once, not again per batch


def test_connect_checks_the_manifest_against_the_engine(tokenizer) -> None:
    engine = _VLLMLikeEngine([TensorSpec("w", (4,), torch.float32)])
    worker = RolloutWorker(engine, tokenizer, OPTIONS, group_size=1, num_scorers=1)
    foreign = build_manifest([("v", (4,), torch.float32)], 1.0)
    with pytest.raises(KeyError, match="'v'"):
        worker.connect_weights(TransportSpec(foreign, "object_store"))
    reshaped = build_manifest([("w", (5,), torch.float32)], 1.0)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        worker.connect_weights(TransportSpec(reshaped, "object_store"))
    with pytest.raises(RuntimeError, match="before connect"):
        worker.receive_weights(None, 1)
    assert engine.updates == [] and worker.policy_version == 0


def test_a_broadcast_reaches_the_torch_engines_model(model, tokenizer, problems) -> None:
    worker = _worker(model, tokenizer)
    named = list(copy_with_noise(model).named_parameters())
    manifest = build_manifest([(n, tuple(p.shape), p.dtype) for n, p in named], bucket_mb=0.005)
    assert len(manifest.buckets) > 1
    broadcast_over_gloo(
        manifest, [p for _, p in named], 2, worker.connect_weights, worker.receive_weights
    )
    assert worker.policy_version == 2
    got = dict(model.named_parameters())
    for name, p in named:
        assert torch.equal(got[name], p), name
    assert set(worker.generate(problems[:1]).column("policy_version").to_pylist()) == {2}
    worker.close()


def test_in_process_updates_take_the_broadcast_path(tokenizer, problems) -> None:
    engine = _VLLMLikeEngine([TensorSpec("w", (2,), torch.float32)])
    worker = RolloutWorker(engine, tokenizer, OPTIONS, group_size=1, num_scorers=1)
    worker.update_weights({"w": torch.ones(2)}, version=1)
    assert worker.policy_version == 1 and len(engine.updates) == 1
    with pytest.raises(ValueError, match="older than"):
        worker.update_weights({"w": torch.zeros(2)}, version=0)
    assert worker.generate(problems[:1]).column("policy_version").to_pylist() == [1]
    worker.close()


def test_the_evaluator_takes_broadcasts_by_the_same_path() -> None:
    """The evaluator (job layer) applies through its torch engine, and only as an evaluation
    starts."""
    from embr_rl.core.config import load_config
    from embr_rl.evaluation.actor import Evaluator
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs/demo.yaml", ["eval.limit=2", "eval.num_show=0"])
    evaluator = Evaluator(cfg, str(REPO / cfg.model.path))
    assert isinstance(evaluator.engine, TorchEngine) and evaluator.sync.target is evaluator.engine
    model = evaluator.loaded.model
    named = [(n, p.detach() + 0.1) for n, p in model.named_parameters()]
    manifest = build_manifest([(n, tuple(t.shape), t.dtype) for n, t in named], 1.0)
    broadcast_over_gloo(
        manifest,
        [t for _, t in named],
        1,
        evaluator.connect_weights,
        evaluator.receive_weights,
    )
    assert not torch.equal(model.lm_head.weight, dict(named)["lm_head.weight"])  # staged only
    metrics = evaluator.evaluate(0)
    assert metrics["eval/policy_version"] == 1.0
    got = dict(model.named_parameters())
    for name, value in named:
        assert torch.equal(got[name], value), name
    evaluator.sync.close()


# --------------------------------------------------------------------------- reference energies


@pytest.mark.parametrize(("name", "masking"), [("embr_u", "block"), ("embr_c", "random")])
def test_reference_energies_scored_at_rollout_are_what_the_learner_would_compute(
    model, tokenizer, problems, name: str, masking: str
) -> None:
    """Rows scored by a :class:`ReferenceScorer` give the learner the reference terms it would
    compute itself on the same masks (to 1e-5), so the loss, its gradient and the policy's terms
    are unchanged while the reference never runs in the learner (``models.reference=None``)."""
    from dataclasses import replace

    from actors.rollout import ReferenceScorer
    from embr_rl.core.config import AlgoConfig
    from embr_rl.core.losses import LossModels, compute_energies, get_loss
    from learner.batching import TokenIds, rows_to_batch

    algo = AlgoConfig(name=name, block_length=4, masking=masking, num_mc_samples=2)
    reference = copy_with_noise(model)  # reference and policy differ, as after some steps
    scorer = ReferenceScorer(
        algo,
        reference,
        mask_id=tokenizer.mask_token_id,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        stop_ids=(),
    )
    worker = _worker(model, tokenizer, seed=4, reference=scorer)
    table = worker.generate(problems)
    worker.close()
    assert "rollout/reference_s" in worker.metrics()
    seeds = table.column("mask_seed").to_pylist()
    assert len(set(seeds)) == len(problems)  # one per group: pairs share their draws
    ids = TokenIds(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    cached = rows_to_batch(
        table, LossModels(policy=model, mask_id=tokenizer.mask_token_id), ids=ids
    )
    assert cached.ref_lower is not None and cached.mask_seeds is not None
    assert (cached.ref_upper is not None) == (name == "embr_u")
    full = replace(
        cached,
        models=LossModels(policy=model, reference=reference, mask_id=tokenizer.mask_token_id),
        ref_lower=None,
        ref_upper=None,
    )
    upper = name == "embr_u"
    a, b = compute_energies(cached, algo, upper=upper), compute_energies(full, algo, upper=upper)
    torch.testing.assert_close(a.lr, b.lr, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.lt, b.lt)
    if upper:
        torch.testing.assert_close(a.ur, b.ur, atol=1e-5, rtol=0)
    # Mixed rewards so the loss has a gradient.
    rewards = (torch.arange(len(cached.rewards)) % 2).float()
    grads = []
    for batch in (cached, full):
        model.zero_grad()
        get_loss(name)(replace(batch, rewards=rewards), algo).loss.backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    from embr_rl.core.config import AlgoConfig
    from embr_rl.core.losses import draw_masks

    algo = AlgoConfig(name="embr_u", block_length=4, num_mc_samples=4)
    span = torch.ones(5, 16, dtype=torch.bool)
    seeds = torch.tensor([7, 8, 9, 7, 11])
    whole = draw_masks(span, algo, seeds=seeds)
    alone = draw_masks(span[2:3], algo, seeds=seeds[2:3])
    assert torch.equal(whole.masks[2:3], alone.masks) and torch.equal(
        whole.masks[0], whole.masks[3]
    )
    assert not torch.equal(whole.masks[0], whole.masks[1])
    torch.testing.assert_close(whole.weights[2:3], alone.weights)
