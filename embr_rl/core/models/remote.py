"""Models that ship their own modelling code, loaded through transformers' Auto classes.

Checkpoint code written for transformers 4 (LLaDA's and Dream's hub code among it) meets
APIs that transformers 5 changed. :func:`load_remote_model` loads the checkpoint's own
class (its ``auto_map['AutoModel']``) through a subclass of the same name and module that
bridges the gaps it detects, each logged once per class:

* ``post_init``: transformers 5's ``from_pretrained`` needs what ``post_init()`` sets up
  (``all_tied_weights_keys``, ...); when the class's ``__init__`` never calls it, the
  subclass calls it after ``__init__``.
* ``tie_weights``: transformers 5 calls ``tie_weights(missing_keys=..., recompute_mapping=...)``;
  an old ``def tie_weights(self)`` is called without the keywords it does not take.
* ``use_cache``: a config class that never sets ``use_cache`` (transformers 4's base config
  no longer supplies it) gets ``use_cache=False`` when the modelling code reads
  ``config.use_cache``; a masked-diffusion LM keeps no autoregressive cache.

Anything else that fails while the class is imported or built, or while transformers loads
it (Dream's ``KeyError: 'default'`` in ``ROPE_INIT_FUNCTIONS``), raises one ``ModelLoadError``
naming the class, the transformers version it was written for, what is missing and, for the
model types the project implements itself (:data:`NATIVE_MODEL_TYPES`),
``model.implementation=native``.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from transformers import AutoModel, PreTrainedModel

log = logging.getLogger(__name__)

# The transformers releases the loader works with; pyproject.toml declares the same range.
# 4.56 is the first whose from_pretrained takes ``dtype=`` (``torch_dtype`` before); 6 is
# untested and drops the deprecated aliases this module still falls back to.
SUPPORTED_TRANSFORMERS = ">=4.56,<6"
# model_type values (as in config.json) that embr_rl.core.models.native implements.
NATIVE_MODEL_TYPES = ("llada", "Dream")

_NATIVE_HINT = (
    "The project's native implementation loads this model_type ({model_type!r}): set "
    "model.implementation=native (the default 'auto' already does)"
)
# Exceptions that, raised while remote code is imported, built or loaded, mean the code
# expects a transformers API that the installed one does not have.
_API_ERRORS = (AttributeError, ImportError, KeyError, NotImplementedError, TypeError)
_DYNAMIC_PACKAGE = "transformers_modules"
_COMPAT_CLASSES: dict[type, type] = {}
_LOGGED: set[tuple[str, str]] = set()


class _ConstructionError(Exception):
    """Carries an exception raised by a remote class's ``__init__`` out of from_pretrained."""


def _load_error(message: str) -> RuntimeError:
    """A :class:`~embr_rl.core.models.loader.ModelLoadError` (imported lazily: loader imports us)."""
    try:
        from embr_rl.core.models.loader import ModelLoadError
    except ImportError:  # loader is still being imported or cannot be
        return RuntimeError(message)
    return ModelLoadError(message)


def check_transformers_version(installed: str | None = None) -> None:
    """Fail clearly unless transformers ``installed`` (default: the imported one) is in
    :data:`SUPPORTED_TRANSFORMERS`."""
    installed = installed or transformers.__version__
    try:
        supported = SpecifierSet(SUPPORTED_TRANSFORMERS).contains(
            Version(installed), prereleases=True
        )
    except InvalidVersion:
        supported = False
    if not supported:
        raise _load_error(
            f"transformers {installed} is installed, but EMBR-RL supports transformers"
            f"{SUPPORTED_TRANSFORMERS} (from_pretrained(dtype=...) needs 4.56 or later; 6 is "
            f"untested): pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )


def _log_once(cls: type, shim: str, message: str) -> None:
    key = (f"{cls.__module__}.{cls.__qualname__}", shim)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning("%s: %s", cls.__name__, message)


def _is_dynamic(cls: type) -> bool:
    """Whether ``cls`` was imported from a checkpoint's own code."""
    return cls.__module__.split(".")[0] == _DYNAMIC_PACKAGE


def _native_hint(model_type: str | None) -> str:
    return _NATIVE_HINT.format(model_type=model_type) if model_type in NATIVE_MODEL_TYPES else ""


def _code_location(exc: BaseException, code_dir: Path | None) -> str:
    """`` (at file:line: source)`` for the deepest frame of ``exc`` in the checkpoint's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [
        f
        for f in frames
        if (code_dir is not None and Path(f.filename).parent == code_dir)
        or _DYNAMIC_PACKAGE in Path(f.filename).parts
    ]
    if not own:
        return ""
    frame = own[-1]
    line = f": {frame.line.strip()}" if frame.line else ""
    return f" (at {Path(frame.filename).name}:{frame.lineno}{line})"


def _what_is_missing(exc: BaseException, installed: str) -> str:
    """One sentence naming what the installed transformers lacks, as far as ``exc`` tells."""
    if isinstance(exc, KeyError) and exc.args:
        return f"the entry {exc.args[0]!r} the code looks up does not exist under transformers {installed}"
    if isinstance(exc, AttributeError):
        name, owner = getattr(exc, "name", None), getattr(exc, "obj", None)
        found = re.search(r"'(\w+)' object has no attribute '(\w+)'", str(exc))
        if name is None and found:
            return f"{found[1]} has no attribute {found[2]!r}, which the code expects"
        if name is not None:
            where = type(owner).__name__ if owner is not None else "an object"
            return f"{where} has no attribute {name!r}, which the code expects"
    if isinstance(exc, ImportError):
        return f"transformers {installed} does not provide a name the code imports"
    if isinstance(exc, TypeError):
        return (
            f"a call between the code and transformers {installed} no longer matches its signature"
        )
    return f"the code relies on transformers behaviour that {installed} does not have"


def _incompatible(
    class_name: str,
    path: str,
    model_config: Any,
    exc: BaseException,
    code_dir: Path | None = None,
) -> RuntimeError:
    """The one error for remote code that fails under the installed transformers."""
    installed = transformers.__version__
    written = getattr(model_config, "transformers_version", None)
    written_for = f"transformers {written}" if written else "an earlier transformers"
    model_type = getattr(model_config, "model_type", None)
    advice = _native_hint(model_type) or (
        f"Port the checkpoint's code to transformers {installed} or use a model whose code "
        "supports it"
    )
    return _load_error(
        f"{class_name} from {path} was written for {written_for}; under transformers "
        f"{installed} it fails: {type(exc).__name__}: {exc}{_code_location(exc, code_dir)}. "
        f"Missing: {_what_is_missing(exc, installed)}. {advice}"
    )


def resolve_remote_class(
    path: str, model_config: Any, trust_remote_code: bool, revision: str | None = None
) -> type[PreTrainedModel] | None:
    """The checkpoint's own model class, or None where transformers or the project provides
    the class (or remote code is not trusted) and ``AutoModel`` should pick it."""
    try:
        mapped = AutoModel._model_mapping[type(model_config)]
    except KeyError:
        mapped = None
    if not trust_remote_code or (mapped is not None and not _is_dynamic(mapped)):
        return None
    class_ref = (getattr(model_config, "auto_map", None) or {}).get("AutoModel")
    if class_ref is None:
        return mapped
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        return get_class_from_dynamic_module(class_ref, path, revision=revision)
    except _API_ERRORS as exc:
        if isinstance(exc, ImportError) and "transformers" not in f"{exc} {exc.name}":
            raise  # a missing pip package, not a transformers API
        raise _incompatible(class_ref.rsplit(".", 1)[-1], path, model_config, exc) from exc


def _tie_weights_is_old(cls: type[PreTrainedModel]) -> bool:
    """Whether ``cls`` overrides tie_weights without the keywords transformers passes."""
    method = getattr(cls, "tie_weights", None)
    if method is None or method is PreTrainedModel.tie_weights:
        return False
    try:
        params = inspect.signature(method).parameters
        wanted = inspect.signature(PreTrainedModel.tie_weights).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    return any(name not in params for name in wanted if name != "self")


def _reads_config_use_cache(cls: type) -> bool:
    """Whether the module defining ``cls`` reads ``config.use_cache``."""
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return False
    return re.search(r"config\.use_cache\b", source) is not None


def compat_class(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of ``cls`` (same name and module, so saving still copies the checkpoint's
    code) with the transformers-5 shims the module docstring lists."""
    if cls in _COMPAT_CLASSES:
        return _COMPAT_CLASSES[cls]
    base = _with_generation_mixin(cls)
    original_init = base.__init__
    original_post_init = base.post_init

    def post_init(self: PreTrainedModel) -> None:
        self._embr_post_init_called = True
        original_post_init(self)

    def __init__(self: PreTrainedModel, config: Any, *args: Any, **kwargs: Any) -> None:
        try:
            original_init(self, config, *args, **kwargs)
            if not getattr(self, "_embr_post_init_called", False):
                _log_once(
                    cls,
                    "post_init",
                    "__init__ never calls self.post_init(), which transformers 5 needs; "
                    "calling it after __init__",
                )
                self.post_init()
        except Exception as exc:
            raise _ConstructionError(exc) from exc

    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "__init__": __init__,
        "post_init": post_init,
    }
    if _tie_weights_is_old(base):
        namespace["tie_weights"] = _tie_weights_with_new_keywords(base)
    compat = type(cls.__name__, (base,), namespace)
    _COMPAT_CLASSES[cls] = compat
    return compat


def _with_generation_mixin(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``cls`` with ``GenerationMixin`` mixed in where AutoModel would mix it in."""
    try:
        from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model
    except ImportError:  # gone once no remote class needs it
        return cls
    return add_generation_mixin_to_remote_model(cls)


def _tie_weights_with_new_keywords(cls: type[PreTrainedModel]) -> Callable[..., Any]:
    original = cls.tie_weights
    accepted = set(inspect.signature(original).parameters) - {"self"}

    def tie_weights(self: PreTrainedModel, **kwargs: Any) -> Any:
        _log_once(
            cls,
            "tie_weights",
            "old signature tie_weights(self); calling it without the keywords transformers "
            f"passes ({', '.join(sorted(kwargs))})",
        )
        return original(self, **{k: v for k, v in kwargs.items() if k in accepted})

    return tie_weights


def _with_config_defaults(cls: type, model_config: Any) -> Any:
    """``model_config``, or a copy with ``use_cache=False`` when the code reads an unset one."""
    if model_config is None or hasattr(model_config, "use_cache"):
        return model_config
    if not _reads_config_use_cache(cls):
        return model_config
    _log_once(
        cls,
        "use_cache",
        f"{type(model_config).__name__} sets no use_cache but the code reads config.use_cache; "
        "defaulting it to False (no autoregressive cache in a masked-diffusion LM)",
    )
    model_config = copy.deepcopy(model_config)
    model_config.use_cache = False
    return model_config


def load_remote_model(
    path: str,
    model_config: Any,
    dtype: torch.dtype,
    trust_remote_code: bool,
    revision: str | None = None,
) -> torch.nn.Module:
    """``from_pretrained`` for ``path`` with ``model_config`` in ``dtype``: the checkpoint's
    own class through :func:`compat_class`, or whatever ``AutoModel`` picks when there is none.

    Raises ModelLoadError when the checkpoint's code fails under the installed transformers.
    """
    cls = resolve_remote_class(path, model_config, trust_remote_code, revision)
    if cls is None:
        return AutoModel.from_pretrained(
            path,
            config=model_config,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            revision=revision,
        )
    cls.register_for_auto_class("AutoModel")  # as AutoModel does: save_pretrained copies the code
    module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    code_dir = Path(module_file).parent if module_file else None
    config = _with_config_defaults(cls, model_config)
    try:
        return compat_class(cls).from_pretrained(
            path, config=config, dtype=dtype, revision=revision
        )
    except _ConstructionError as exc:
        cause = exc.__cause__ or exc
        raise _incompatible(cls.__name__, path, config, cause, code_dir) from cause
    except _API_ERRORS as exc:
        raise _incompatible(cls.__name__, path, config, exc, code_dir) from exc


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation checkpointing (the model's own switch where it has one).

    Raises ModelLoadError naming the class when it cannot checkpoint activations.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None:
        reason = "it has no activation_checkpointing_enable/gradient_checkpointing_enable"
    else:
        try:
            enable()
            return
        except ValueError as exc:
            reason = str(exc).rstrip(".")
            if getattr(model, "supports_gradient_checkpointing", None) is False:
                reason += " (supports_gradient_checkpointing is False)"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    advice = _native_hint(model_type) or "Set model.gradient_checkpointing=false"
    raise _load_error(
        f"model.gradient_checkpointing=true, but {type(model).__name__} cannot checkpoint "
        f"activations: {reason}. {advice}"
    )
