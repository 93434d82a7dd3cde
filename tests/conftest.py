"""Shared fixtures: paths, tiny random models, one Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBR_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Local Ray clusters answer 401 without this (Ray 2.60); DeepSpeed probes for CUDA otherwise.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark files in ``../shared/data`` (never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


TINY_VOCAB = 32
TINY_MASK_ID = 31


def build_tiny_model(seed: int = 0, **overrides: object) -> torch.nn.Module:
    """The tiny built-in model (2 layers, 64 dims, vocab 32, mask 31) with random weights;
    ``overrides`` change any ``EmbrDiffusionConfig`` field."""
    from embr_rl.core.models import EmbrDiffusionConfig, EmbrDiffusionModel

    torch.manual_seed(seed)
    kwargs: dict[str, object] = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        mask_token_id=TINY_MASK_ID,
        pad_token_id=0,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return EmbrDiffusionModel(EmbrDiffusionConfig(**kwargs)).eval()


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    """A 2-layer, 64-dim built-in masked-diffusion model with random weights (vocab 32, mask id 31)."""
    return build_tiny_model()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (num_cpus=2) shared by every integration test."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster another test started with `ray start`
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            namespace="embr_rl_tests",
        )
    yield ray
    ray.shutdown()
