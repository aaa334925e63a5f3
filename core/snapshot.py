"""Shallow snapshots of a module tree, so a failed ``inject`` or load can put everything back."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["ModuleSnapshot"]

_DICTS = ("_modules", "_parameters", "_buffers", "_forward_pre_hooks", "_forward_hooks",
          "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


class ModuleSnapshot:
    """Records, for every module under ``root``, its attributes, children, parameters, buffers and hooks
    (the containers, not tensor data), and every parameter's ``requires_grad``.

    ``restore()`` undoes any structural change made since: replaced or added submodules, new or
    removed parameters, attributes set on existing modules. Tensor *values* are not recorded: hooks
    never write into existing weights during ``inject`` (they create new parameters), and loading
    copies values only after every check passed. Cost: one dict copy per module, no tensor copies.
    """

    def __init__(self, root: nn.Module) -> None:
        self._entries: list[tuple[nn.Module, dict[str, Any], dict[str, dict[Any, Any]]]] = []
        for module in root.modules():
            containers = {k: dict(getattr(module, k)) for k in _DICTS if hasattr(module, k)}
            self._entries.append((module, dict(module.__dict__), containers))
        self._grads = [(p, p.requires_grad) for p in root.parameters()]

    def restore(self) -> None:
        for module, attrs, containers in self._entries:
            live = module.__dict__
            for key in [k for k in live if k not in attrs]:
                del live[key]
            for key, value in attrs.items():
                if key not in containers:
                    live[key] = value
            for key, saved in containers.items():
                target = getattr(module, key)  # keep the container's identity: others may hold it
                target.clear()
                target.update(saved)
                live[key] = target
        for p, flag in self._grads:
            p.requires_grad_(flag)
