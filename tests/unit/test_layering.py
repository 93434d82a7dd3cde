"""The import layering of the README's Layout section, read from every module's source.

Layers, bottom up: the core (``embr_rl.core``), the roles (``actors``, ``buffer``,
``learner``) on the core only and never on each other, and the job (the rest of
``embr_rl``) on top. Every import counts, also those inside functions. The pure modules
(the whole core but ``embr_rl.core.transport``, whose implementations are the object store
and torch.distributed) import neither ray, deepspeed nor torch.distributed; only the job
makes Ray actors (``ray.remote``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("embr_rl", "actors", "buffer", "learner")
ROLES = ("actors", "buffer", "learner")
IMPURE_CORE = {"embr_rl.core.transport"}
DISTRIBUTED = ("ray", "deepspeed", "torch.distributed")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names, relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.append((base, node.lineno))
    return out


def layer(name: str) -> str:
    top = name.split(".")[0]
    if top in ROLES:
        return top
    return "core" if name == "embr_rl.core" or name.startswith("embr_rl.core.") else "job"


def allowed(src: str, dst: str) -> bool:
    """May a module of layer ``src`` import one of layer ``dst``?"""
    if src == "job" or src == dst:
        return True
    return dst == "core"


def is_ours(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def violations() -> list[str]:
    found = []
    for name, path in modules().items():
        src = layer(name)
        for target, line in imported(name, path):
            if is_ours(target) and not allowed(src, layer(target)):
                found.append(
                    f"{path.relative_to(REPO)}:{line}: {src} {name} imports {layer(target)} {target}"
                )
            pure = src == "core" and name not in IMPURE_CORE
            if pure and any(target == d or target.startswith(d + ".") for d in DISTRIBUTED):
                found.append(f"{path.relative_to(REPO)}:{line}: pure {name} imports {target}")
    return found


def test_imports_point_down() -> None:
    assert not violations(), "\n".join(violations())


def test_only_the_job_makes_ray_actors() -> None:
    makers = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "remote"
                and isinstance(node.value, ast.Name)
                and node.value.id == "ray"
                and layer(name) != "job"
            ):
                makers.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not makers, "ray.remote outside the job layer:\n" + "\n".join(makers)


@pytest.mark.parametrize(
    ("src", "target", "ok"),
    [
        ("embr_rl.core.losses", "embr_rl.core.masking", True),
        ("embr_rl.core.losses", "learner.learner", False),
        ("actors.rollout", "embr_rl.core.transport", True),
        ("actors.rollout", "buffer.replay", False),
        ("learner.learner", "embr_rl.run", False),
        ("embr_rl.run", "learner.learner", True),
    ],
)
def test_the_rule_itself(src: str, target: str, ok: bool) -> None:
    assert allowed(layer(src), layer(target)) is ok
