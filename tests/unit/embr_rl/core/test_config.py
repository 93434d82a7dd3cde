"""Config schema: loading, overrides, and one clear message per kind of mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from embr_rl.core.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[4]
YAMLS = sorted([*REPO.glob("configs/**/*.yaml"), *REPO.glob("deploy/**/*.yaml")])


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.logging.run_dir == "runs/demo"  # interpolation resolved


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_validates(path: Path) -> None:
    if path.relative_to(REPO).parts[0] == "deploy":
        # Kubernetes manifests and the Ray cluster-launcher file are not EMBR configs.
        pytest.skip("deploy/ files are validated by tests/unit/deploy")
    data = OmegaConf.load(path)
    if "kind" in data:
        pytest.skip("Kubernetes manifests are validated by the deploy tests")
    cfg = load_config(path)
    assert cfg.name


def test_there_are_shipped_configs() -> None:
    names = {p.name for p in YAMLS}
    assert {"demo.yaml", "demo_base.yaml", "llada8b_gsm8k.yaml"} <= names


def test_yaml_then_overrides_take_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nlearner:\n  lr: 0.5\n  zero_stage: 2\n")
    cfg = load_config(f, ["learner.lr=0.25", "rollout.cache=prefix"])
    assert cfg.learner.lr == 0.25
    assert cfg.learner.zero_stage == 2
    assert cfg.rollout.cache == "prefix"
    assert cfg.logging.run_dir == "runs/x"


@pytest.mark.parametrize(
    ("override", "must_name"),
    [
        (
            "learner.lrr=1",
            ["'learner.lrr'", "did you mean 'learner.lr'", "allowed keys in learner"],
        ),
        ("bogus=1", ["'bogus'", "allowed keys in the top level", "learner"]),
        ("model.builtin.layers=3", ["'model.builtin.layers'", "num_layers"]),
    ],
)
def test_unknown_key_names_key_and_allowed(override: str, must_name: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for text in must_name:
        assert text in str(info.value)


def test_unknown_key_in_yaml_names_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("algo:\n  betaa: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml: unknown key 'algo\.betaa'.*did you mean 'algo\.beta'"
    ):
        load_config(f)


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("learner.lr=abc", "learner.lr", "'abc'"),
        ("model.builtin.num_layers=two", "model.builtin.num_layers", "'two'"),
        ("algo.stratified=maybe", "algo.stratified", "'maybe'"),
    ],
)
def test_wrong_type_names_key_value_and_type(override: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert f"'{key}'" in msg and value in msg and "expected type" in msg


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("learner.lr=-1", "learner.lr", "> 0"),
        ("learner.zero_stage=4", "learner.zero_stage", "<= 3"),
        ("algo.eubo_gamma=0.5", "algo.eubo_gamma", ">= 1"),
        ("rollout.threshold=1.5", "rollout.threshold", "<= 1"),
        ("algo.name=ppo", "algo.name", "'embr_c'"),
        ("rollout.cache=full", "rollout.cache", "'prefix'"),
        ("model.dtype=int8", "model.dtype", "'bfloat16'"),
    ],
)
def test_out_of_range_names_key_value_and_allowed(override: str, key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert f"'{key}'" in msg and "allowed" in msg and allowed in msg
    assert override.split("=", 1)[1] in msg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rollout.gen_length=30", "rollout.block_length=8"], "rollout.block_length"),
        (["eval.gen_length=32", "eval.block_length=8", "eval.steps=6"], "eval.steps"),
        (["task.arith.min_operands=3", "task.arith.max_operands=2"], "task.arith.max_operands"),
        (["task.arith.ops=[/]"], "task.arith.ops"),
        (["learner.batch_size=10", "learner.micro_batch_size=4"], "learner.batch_size"),
        (
            ["learner.batch_size=8", "learner.micro_batch_size=4", "learner.num_ranks=4"],
            "learner.batch_size",
        ),
        (
            ["algo.name=embr_c", "learner.batch_size=9", "learner.micro_batch_size=3"],
            "learner.micro_batch_size",
        ),
        (["algo.mode=offline", "algo.name=d1"], "algo.name"),
        (["rollout.engine=vllm", "model.lora.enabled=true"], "rollout.engine"),
        (
            [
                "algo.mode=sync",
                "rollout.num_workers=1",
                "rollout.prompts_per_batch=2",
                "rollout.group_size=4",
                "learner.batch_size=16",
                "learner.micro_batch_size=4",
            ],
            "learner.batch_size",
        ),
    ],
)
def test_cross_field_rules(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


def test_every_config_key_is_read_somewhere() -> None:
    """Walks the schema: each leaf key's name must be read as an attribute (or through
    ``getattr``) by some module outside the schema. Leaf names shared by two sections
    count once, so this catches a key nothing reads, not every misuse."""
    import ast
    import dataclasses
    import typing

    from embr_rl.core.config import Config

    def leaves(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, str]]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from leaves(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f.name

    read: set[str] = set()
    for pkg in ("embr_rl", "actors", "buffer", "learner"):
        for path in (REPO / pkg).rglob("*.py"):
            if path == REPO / "embr_rl" / "core" / "config.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute):
                    read.add(node.attr)
                elif (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", "") == "getattr"
                    and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                ):
                    read.add(str(node.args[1].value))
    unread = [key for key, leaf in leaves(Config) if leaf not in read]
    assert not unread, f"config keys nothing reads: {unread}"


def test_algo_names_are_the_registered_losses() -> None:
    import dataclasses

    from embr_rl.core.config import AlgoConfig
    from embr_rl.core.losses import LOSS_TRAITS, LOSSES

    (name,) = [f for f in dataclasses.fields(AlgoConfig) if f.name == "name"]
    assert set(name.metadata["choices"]) == set(LOSSES) == set(LOSS_TRAITS)


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_is_written_and_reloads(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=abc", "learner.lr=0.125"])
    path = save_config(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg
    assert "runs/abc" in path.read_text()  # interpolations are written resolved


def test_cli_bad_key_exits_nonzero_with_message() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "embr_rl.run", str(REPO / "configs/demo.yaml"), "learner.lrr=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'learner.lrr'" in proc.stderr
