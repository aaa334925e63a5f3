"""What a plugin declares: frozen, typed values the core dispatches on."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from .compat import DISK_MODEL_PREFIX
from .config import PeftConfig
from .tasks import TaskType

__all__ = ["MethodSpec"]

_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _task_set(value: Any) -> frozenset[TaskType]:
    return frozenset(TaskType(v) for v in value)


def _name_ok(_: Any, __: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"MethodSpec.name must be an upper-case identifier like 'LORA' (it is the "
                         f"peft_type written to adapter_config.json), got {value!r}")


def _config_ok(instance: MethodSpec, _: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, type) and issubclass(value, PeftConfig)):
        raise TypeError(f"MethodSpec.config_cls must be a subclass of peft_core.PeftConfig, got {value!r}")
    if value.peft_type != instance.name:
        raise ValueError(f"{value.__name__}.peft_type is {value.peft_type!r} but the MethodSpec is "
                         f"named {instance.name!r}; they must be equal")


def _freeze_ops(value: Mapping[str, Callable[..., Any]] | None) -> Mapping[str, Callable[..., Any]]:
    ops = dict(value or {})
    for key, fn in ops.items():
        if not key.isidentifier() or key.startswith("_") or not callable(fn):
            raise ValueError(f"MethodSpec.operations[{key!r}] must map a public identifier to a callable")
    return MappingProxyType(ops)


@attrs.frozen(kw_only=True)
class MethodSpec:
    """One fine-tuning method, as a plugin declares it from ``declare_methods``.

    - ``name``: the ``peft_type`` (``"LORA"``); unique across installed distributions.
    - ``config_cls``: its :class:`~peft_core.PeftConfig` subclass (``config_cls.peft_type == name``).
    - ``task_types``: the task types it supports; ``get_peft_model`` refuses others.
    - ``mergeable``: whether ``merge``/``unmerge`` can fold it into the base weights.
    - ``summary``: one line for ``peft-core list-methods``.
    - ``operations``: extra model methods the method offers (``add_weighted_adapter``, say); each is
      called as ``fn(model, *args, **kwargs)`` when a user calls ``model.<name>(...)``. When several
      installed methods offer one name, the call goes to the method of the adapters it names (string
      arguments, or lists of strings, that are adapter names of the model); naming adapters of none or of
      several of those methods is an :class:`~peft_core.AdapterError`.
    - ``disk_model_prefix``: what Hugging Face PEFT writes in front of base-model paths in this
      method's files; the core uses it for the ``modules_to_save`` keys. ``"base_model.model."`` (the
      default) for methods PEFT runs through a tuner model (LoRA); ``"base_model."`` for prompt-learning
      methods (prompt and prefix tuning), whose PEFT model holds the transformers model directly.
    """

    name: str = attrs.field(validator=_name_ok)
    config_cls: type[PeftConfig] = attrs.field(validator=_config_ok)
    task_types: frozenset[TaskType] = attrs.field(converter=_task_set)
    mergeable: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    summary: str = attrs.field(validator=attrs.validators.instance_of(str))
    operations: Mapping[str, Callable[..., Any]] = attrs.field(factory=dict, converter=_freeze_ops)
    disk_model_prefix: str = attrs.field(default=DISK_MODEL_PREFIX, validator=attrs.validators.in_(
        ("base_model.model.", "base_model.")))
