"""One in-process learner rank (a one-process gloo group): losses, LoRA, EMBR-E head, export."""

from __future__ import annotations

import pytest
import torch
from learner_fixtures import rows, tiny_policy

from embr_rl.core.config import AlgoConfig, LearnerConfig, LoraConfig
from learner.learner import Learner, init_distributed, shutdown_distributed

pytestmark = pytest.mark.integration


@pytest.fixture
def one_rank():
    init_distributed()
    yield
    shutdown_distributed()


def _cfg(**kw) -> LearnerConfig:
    base = {"batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "total_steps": 10}
    return LearnerConfig(**(base | kw))


def test_embr_e_trains_policy_and_head(one_rank: None) -> None:
    learner = Learner(
        _cfg(zero_stage=2), AlgoConfig(name="embr_e", num_mc_samples=2), tiny_policy()
    )
    try:
        head = learner.engine.module.energy_head
        before = {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}
        m = learner.train_step(rows(0))
        assert m["learner/step"] == 1.0 and m["learner/grad_norm"] > 0 and "learner/c_mean" in m
        after = dict(learner.engine.module.named_parameters())
        # The head's last layer starts at zero; it must have moved, as must the policy.
        assert not torch.equal(head.net[-1].weight.detach(), torch.zeros_like(head.net[-1].weight))
        assert not torch.equal(
            after["policy.embed_tokens.weight"], before["policy.embed_tokens.weight"]
        )
        # The reference is frozen at the initial policy.
        ref = dict(learner.models.reference.named_parameters())
        assert torch.equal(ref["embed_tokens.weight"], before["policy.embed_tokens.weight"])
    finally:
        learner.close()


def test_lora_trains_adapter_only_and_reference_is_base(one_rank: None) -> None:
    pytest.importorskip("peft")
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)
    spec = tiny_policy()
    base = {n: p.detach().clone() for n, p in spec.model.named_parameters()}
    learner = Learner(_cfg(), AlgoConfig(name="embr_c", num_mc_samples=2), spec, lora=lora)
    try:
        # Start LoRA B away from zero so the adapter changes the output.
        with torch.no_grad():
            for n, p in learner.policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        learner.train_step(rows(0))
        names = [s.name for s in learner.manifest().specs]
        assert names and all("lora_" in n for n in names)
        for n, p in learner.policy.named_parameters():
            if "lora_" not in n:
                assert torch.equal(
                    p, base[n.replace("base_model.model.", "").replace("base_layer.", "")]
                )
        x = torch.randint(2, 30, (2, 7))
        with torch.no_grad():
            ref_logits = learner.models.reference(input_ids=x).logits
            pol_logits = learner.policy(input_ids=x).logits
            spec2 = tiny_policy()
            base_logits = spec2.model(input_ids=x).logits
        assert torch.allclose(ref_logits, base_logits, atol=1e-6)
        assert not torch.allclose(pol_logits, base_logits, atol=1e-4)
    finally:
        learner.close()


def test_hf_export_loads_with_from_pretrained(one_rank: None, tmp_path) -> None:
    from embr_rl.core.models import EmbrDiffusionModel

    learner = Learner(
        _cfg(zero_stage=3), AlgoConfig(name="embr_c", num_mc_samples=2), tiny_policy()
    )
    try:
        learner.train_step(rows(0))
        state = learner.full_state()
        path = learner.export_hf(tmp_path / "hf")
    finally:
        learner.close()
    loaded = EmbrDiffusionModel.from_pretrained(path)
    got = dict(loaded.named_parameters())
    assert set(got) == set(state)
    for n, p in state.items():
        assert torch.equal(got[n], p), n


def test_lora_broadcast_sends_adapter_only(one_rank: None) -> None:
    pytest.importorskip("peft")
    import threading

    from embr_rl.core.models.lora import wrap_lora
    from embr_rl.core.transport import TransportSpec, WeightClient, free_port

    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)
    learner = Learner(_cfg(), AlgoConfig(name="embr_c", num_mc_samples=2), tiny_policy(), lora=lora)
    worker = wrap_lora(tiny_policy().model, lora)
    client = WeightClient(worker)
    try:
        learner.train_step(rows(0))
        manifest = learner.manifest()
        spec = TransportSpec(manifest, "torch_dist", 0, 2, "127.0.0.1", free_port(), "gloo", 60.0)
        joined = threading.Thread(
            target=client.connect, args=(TransportSpec(**{**spec.__dict__, "rank": 1}),)
        )
        joined.start()
        learner.open_sync(spec)
        joined.join(60)
        received = threading.Thread(target=client.receive, args=(None, 4))
        received.start()
        stats, _ = learner.push_weights(4)
        received.join(60)
        assert client.apply_pending() == 4
        adapter = {n: p for n, p in learner.policy.named_parameters() if "lora_" in n}
        assert stats.bytes == sum(p.numel() * p.element_size() for p in adapter.values())
        assert stats.bytes < sum(p.numel() * 4 for p in learner.policy.parameters()) / 10
        got = dict(worker.named_parameters())
        for n, p in adapter.items():
            assert torch.equal(got[n], p), n
    finally:
        client.close()
        learner.close()
