"""Full trainable copies of chosen modules (task heads, say), one per adapter: ``modules_to_save``.

This is a core mechanism, not a method: every method's config has ``modules_to_save``, and the task
models add their heads to it. Layout and keys follow Hugging Face PEFT (``<path>.original_module`` and
``<path>.modules_to_save.<adapter>``; on disk ``base_model.model.<path>.<param>``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .runtime import AdapterRuntime

__all__ = ["ModulesToSave", "matching_module_names"]


def matching_module_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Module paths equal to, or ending in ``.`` + one of ``names`` (outermost wins)."""
    wanted = tuple(names)
    found: list[str] = []
    for path, module in model.named_modules():
        if not path or isinstance(module, ModulesToSave):
            continue
        if any(path == w or path.endswith("." + w) for w in wanted):
            if not any(path.startswith(f + ".") for f in found):
                found.append(path)
    return found


def _batch_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | str | None, torch.Tensor | None]:
    """Where the batch is in a call: (position or keyword, tensor) of the first tensor argument."""
    for i, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return i, value
    for k, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return k, value
    return None, None


#: Containers without a forward of their own: a copy of one cannot stand in for it (PEFT refuses them too).
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class ModulesToSave(nn.Module):
    """Stands in place of a module; runs the active adapter's copy, or the original."""

    def __init__(self, original_module: nn.Module, runtime: AdapterRuntime, path: str = "") -> None:
        if isinstance(original_module, _CONTAINERS):
            from .errors import ConfigError

            kind = type(original_module).__name__
            raise ConfigError(f"modules_to_save names {path or 'a module'!r}, a {kind}, which has no forward to stand "
                              f"in for; name the modules inside it instead (e.g. '{path or 'layers'}.0')")
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._runtime = runtime

    def add(self, adapter_name: str) -> None:
        # deepcopy works on the meta device too; the copy starts equal to the original
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def drop(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]

    def active_module(self) -> nn.Module:
        rt = self._runtime
        if not rt.disabled:
            for name in rt.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = self._runtime.routing()
        if routing is None or self._runtime.disabled:
            return self.active_module()(*args, **kwargs)
        # mixed batch: each row through its own adapter's copy (or the original). The batch is the first tensor
        # argument, positional or keyword (a module may be called with keywords only)
        key, x = _batch_argument(args, kwargs)
        from .errors import AdapterError

        if x is None:
            raise AdapterError(f"adapter_names (mixed batch): {type(self.original_module).__name__} was called without "
                               "a tensor argument, so its rows cannot be routed")
        if len(routing.names) != x.shape[0]:
            raise AdapterError(f"adapter_names has {len(routing.names)} entries but the batch has {x.shape[0]} rows")
        out: torch.Tensor | None = None
        for name in dict.fromkeys(routing.names):
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            rows = torch.tensor([i for i, n in enumerate(routing.names) if n == name], device=x.device)
            if isinstance(key, int):
                part = module(*args[:key], x[rows], *args[key + 1:], **kwargs)
            else:
                part = module(*args, **{**kwargs, key: x[rows]})
            if out is None:
                out = part.new_empty((len(routing.names), *part.shape[1:]))
            out[rows] = part
        assert out is not None
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"original_module", "modules_to_save", "_runtime"}:
                raise
            return getattr(self.active_module(), name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.modules_to_save)}"


