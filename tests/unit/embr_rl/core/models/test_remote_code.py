"""Remote code written for transformers 4 under the pinned transformers: shims and clear errors.

Each snapshot is a local checkpoint that ships its modelling code (auto_map), like LLaDA's
and Dream's hub repos, and reproduces one defect measured with their code under
transformers 5: no ``post_init()``, an old ``tie_weights(self)``, a config without
``use_cache`` that the forward reads, no activation checkpointing, a constructor that
raises (Dream's ``ROPE_INIT_FUNCTIONS['default']``), an import that no longer exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from safetensors.torch import save_file
from transformers import AutoConfig

from embr_rl.core.config import ModelConfig
from embr_rl.core.models.loader import ModelLoadError, load_model
from embr_rl.core.models.remote import (
    SUPPORTED_TRANSFORMERS,
    check_transformers_version,
    load_remote_model,
)
from embr_rl.core.models.tokenizer import train_char_tokenizer

REPO = Path(__file__).resolve().parents[5]
HIDDEN = 8
WRITTEN_FOR = "4.46.2"  # the transformers_version a transformers-4 checkpoint records

CONFIG_CODE = """
from transformers import PretrainedConfig


class FakeConfig(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, vocab_size=32, hidden=8, weight_tying=False, mask_token_id=None, **kw):
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        super().__init__(**kw)
"""

MODELING_HEAD = """
import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_fake import FakeConfig


class Inner(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.emb = torch.nn.Embedding(config.vocab_size, config.hidden)
        self.out = torch.nn.Linear(config.hidden, config.vocab_size)

    def forward(self, input_ids):
        return self.out(self.emb(input_ids))
"""

# LLaDA's hub class: __init__ builds the model and never calls self.post_init().
NO_POST_INIT = """
class NoPostInit(PreTrainedModel):
    config_class = FakeConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = Inner(config)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return ModelOutput(logits=self.model(input_ids))
"""

# LLaDA's transformers-4 `def tie_weights(self)`, which ties by assignment.
OLD_TIE_WEIGHTS = """
class OldTieWeights(PreTrainedModel):
    config_class = FakeConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = Inner(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return ModelOutput(logits=self.model(input_ids))

    def tie_weights(self):
        if self.config.weight_tying:
            self.model.out.weight = self.model.emb.weight
"""

# LLaDA's forward: `use_cache = self.config.use_cache` when the caller passes none.
READS_USE_CACHE = """
class ReadsUseCache(PreTrainedModel):
    config_class = FakeConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = Inner(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache:
            raise NotImplementedError("this diffusion LM keeps no KV cache")
        return ModelOutput(logits=self.model(input_ids))
"""

# All three at once, as LLaDA-8B-Instruct's modeling_llada.py has them.
LLADA_LIKE = """
class LLaDALike(PreTrainedModel):
    config_class = FakeConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = Inner(config)

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache
        return ModelOutput(logits=self.model(input_ids))

    def tie_weights(self):
        if self.config.weight_tying:
            self.model.out.weight = self.model.emb.weight
"""

# supports_gradient_checkpointing stays PreTrainedModel's False.
NO_CHECKPOINTING = """
class NoCheckpointing(PreTrainedModel):
    config_class = FakeConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = Inner(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return ModelOutput(logits=self.model(input_ids))
"""

# Dream's rotary embedding looks up ROPE_INIT_FUNCTIONS["default"], which transformers 5
# dropped; a local table of the same shape keeps the test independent of the version.
ROPE_KEY_ERROR = """
ROPE_INIT_FUNCTIONS = {"linear": None, "dynamic": None, "yarn": None}


class DreamLike(PreTrainedModel):
    config_class = FakeConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.rope_type = "default"
        self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        self.model = Inner(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return ModelOutput(logits=self.model(input_ids))
"""

# Imports a helper that the installed transformers does not have.
REMOVED_IMPORT = """
from transformers.modeling_utils import helper_removed_in_transformers_5


class RemovedImport(PreTrainedModel):
    config_class = FakeConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = Inner(config)
        self.post_init()
"""


@pytest.fixture
def tok():
    return train_char_tokenizer(["0123456789+-=;\\boxed{}"])


def _weights(vocab: int, tied: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    weights = {
        "model.emb.weight": torch.randn(vocab, HIDDEN, generator=gen),
        "model.out.weight": torch.randn(vocab, HIDDEN, generator=gen),
        "model.out.bias": torch.randn(vocab, generator=gen),
    }
    if tied:  # a tied checkpoint stores the shared matrix once
        del weights["model.out.weight"]
    return weights


def _snapshot(
    tmp_path: Path,
    tok,
    class_code: str,
    class_name: str,
    model_type: str = "fake_dllm",
    weight_tying: bool = False,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint directory with the code, config.json (auto_map), weights and tokenizer."""
    path = tmp_path / f"ckpt_{class_name.lower()}"
    path.mkdir()
    (path / "configuration_fake.py").write_text(CONFIG_CODE.format(model_type=model_type))
    (path / "modeling_fake.py").write_text(MODELING_HEAD + class_code)
    config = {
        "model_type": model_type,
        "architectures": [class_name],
        "auto_map": {
            "AutoConfig": "configuration_fake.FakeConfig",
            "AutoModel": f"modeling_fake.{class_name}",
        },
        "vocab_size": len(tok),
        "hidden": HIDDEN,
        "weight_tying": weight_tying,
        "transformers_version": WRITTEN_FOR,
    }
    (path / "config.json").write_text(json.dumps(config))
    weights = _weights(len(tok), weight_tying)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(path)
    return path, weights


def _expected_logits(weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The snapshot's forward, run directly on the saved tensors."""
    emb = weights["model.emb.weight"]
    out = weights.get("model.out.weight", emb)
    return torch.nn.functional.linear(emb[ids], out, weights["model.out.bias"])


def _load(path: Path, **overrides: object):
    cfg = ModelConfig(
        path=str(path), device="cpu", trust_remote_code=True, implementation="remote", **overrides
    )
    return load_model(cfg, for_training=bool(overrides.get("gradient_checkpointing")))


def _assert_logits_match(loaded, weights: dict[str, torch.Tensor]) -> None:
    ids = torch.tensor([[3, 4, 5, loaded.mask_token_id]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits, _expected_logits(weights, ids))


@pytest.mark.parametrize(
    ("code", "name", "tied"),
    [
        (NO_POST_INIT, "NoPostInit", False),
        (OLD_TIE_WEIGHTS, "OldTieWeights", True),
        (READS_USE_CACHE, "ReadsUseCache", False),
        (LLADA_LIKE, "LLaDALike", False),
    ],
)
def test_transformers4_class_loads_through_shims_with_its_weights(
    tmp_path: Path, tok, code: str, name: str, tied: bool
) -> None:
    path, weights = _snapshot(tmp_path, tok, code, name, model_type="llada", weight_tying=tied)
    loaded = _load(path)
    assert type(loaded.model).__name__ == name
    assert loaded.mask_token_id == tok.mask_token_id
    _assert_logits_match(loaded, weights)


def test_old_tie_weights_really_ties(tmp_path: Path, tok) -> None:
    path, _ = _snapshot(tmp_path, tok, OLD_TIE_WEIGHTS, "OldTieWeights", weight_tying=True)
    inner = _load(path).model.model
    assert inner.out.weight is inner.emb.weight


def test_unset_use_cache_defaults_to_false_without_touching_the_callers_config(
    tmp_path: Path, tok
) -> None:
    path, weights = _snapshot(tmp_path, tok, READS_USE_CACHE, "ReadsUseCache")
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    model = load_remote_model(str(path), config, torch.float32, trust_remote_code=True)
    assert model.config.use_cache is False
    assert not hasattr(config, "use_cache")
    ids = torch.tensor([[3, 4]])
    torch.testing.assert_close(model(input_ids=ids).logits, _expected_logits(weights, ids))


def test_shimmed_model_saves_its_own_code(tmp_path: Path, tok) -> None:
    path, weights = _snapshot(tmp_path, tok, LLADA_LIKE, "LLaDALike")
    saved = tmp_path / "saved"
    _load(path).model.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_fake.LLaDALike"
    )
    assert (saved / "modeling_fake.py").read_text() == (path / "modeling_fake.py").read_text()
    tok.save_pretrained(saved)
    _assert_logits_match(_load(saved), weights)


@pytest.mark.parametrize("model_type", ["llada", "fake_dllm"])
def test_no_activation_checkpointing_is_one_clear_error(
    tmp_path: Path, tok, model_type: str
) -> None:
    path, _ = _snapshot(tmp_path, tok, NO_CHECKPOINTING, "NoCheckpointing", model_type)
    with pytest.raises(ModelLoadError) as err:
        _load(path, gradient_checkpointing=True)
    message = str(err.value)
    assert "NoCheckpointing cannot checkpoint activations" in message
    assert "supports_gradient_checkpointing is False" in message
    assert ("model.implementation=native" in message) == (model_type == "llada")
    if model_type != "llada":
        assert "model.gradient_checkpointing=false" in message
    assert _load(path).model.training is False  # without checkpointing it loads


@pytest.mark.parametrize("model_type", ["Dream", "fake_dllm"])
def test_constructor_failure_is_one_clear_error(tmp_path: Path, tok, model_type: str) -> None:
    path, _ = _snapshot(tmp_path, tok, ROPE_KEY_ERROR, "DreamLike", model_type)
    with pytest.raises(ModelLoadError) as err:
        _load(path)
    message = str(err.value)
    assert message.startswith(
        f"DreamLike from {path} was written for transformers {WRITTEN_FOR}; under "
        f"transformers {transformers.__version__} it fails: KeyError: 'default'"
    )
    assert "ROPE_INIT_FUNCTIONS[self.rope_type]" in message  # where, in the checkpoint's code
    assert "Missing: the entry 'default'" in message
    native = "set model.implementation=native (the default 'auto' already does)"
    assert (native in message) == (model_type == "Dream")
    assert isinstance(err.value.__cause__, KeyError)


def test_removed_transformers_import_is_one_clear_error(tmp_path: Path, tok) -> None:
    path, _ = _snapshot(tmp_path, tok, REMOVED_IMPORT, "RemovedImport", model_type="llada")
    with pytest.raises(ModelLoadError) as err:
        _load(path)
    message = str(err.value)
    assert message.startswith(f"RemovedImport from {path} was written for transformers")
    assert "helper_removed_in_transformers_5" in message
    assert "model.implementation=native" in message


def _pyproject_transformers() -> Requirement:
    text = (REPO / "pyproject.toml").read_text()
    found = re.findall(r'^\s*"(transformers[^"]*)"', text, flags=re.MULTILINE)
    assert len(found) == 1, found
    return Requirement(found[0])


def test_installed_transformers_satisfies_pyproject() -> None:
    requirement = _pyproject_transformers()
    assert str(requirement.specifier) == str(Requirement(f"t{SUPPORTED_TRANSFORMERS}").specifier)
    assert requirement.specifier.contains(Version(transformers.__version__), prereleases=True)
    check_transformers_version()


@pytest.mark.parametrize("version", ["4.46.3", "4.55.4", "6.0.0", "not-a-version"])
def test_unsupported_transformers_is_a_clear_error(version: str) -> None:
    with pytest.raises(RuntimeError, match=rf"transformers {re.escape(version)} is installed"):
        check_transformers_version(version)
    with pytest.raises(ModelLoadError, match=re.escape(SUPPORTED_TRANSFORMERS)):
        check_transformers_version(version)


@pytest.mark.parametrize("version", ["4.56.0", "5.24.0", "5.99.0.dev0"])
def test_supported_transformers_passes(version: str) -> None:
    check_transformers_version(version)
