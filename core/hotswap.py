"""Hot-swapping: serve another adapter by overwriting a loaded one's weights in place, without recompiling.

``hotswap_adapter(model, path, adapter_name)`` loads an adapter's config and file (a folder or a Hub id) and
replaces adapter ``adapter_name``'s weights by the file's, keeping every parameter object, so a
``torch.compile``d model runs on with the same graph. ``prepare_model_for_compiled_hotswap(model,
target_rank=...)``, called once before compiling, pads the loaded adapter to the largest rank to come and turns
what a graph would bake in as a constant (LoRA's scaling) into tensors, so adapters of other ranks and alphas swap
in without recompiling too. Hugging Face PEFT's functions of the same names and arguments (``peft.utils.hotswap``).

The core does the method-independent part — finding the model inside a compiled wrapper, loading the files,
checking the method and the keys — and each method's ``prepare_hotswap`` / ``hotswap`` hooks do the rest; a
method without them is refused by name.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import torch
from torch import nn

from . import checkpoint
from .config import PeftConfig
from .errors import AdapterError, CheckpointError, ConfigError
from .model import AdaptedModel, config_answer
from .serialization import load_weights, resolve_weights

__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap"]


def _adapted(model: nn.Module) -> AdaptedModel:
    """The AdaptedModel itself or inside ``torch.compile``'s wrapper (``_orig_mod``)."""
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, AdaptedModel):
        raise TypeError(f"hot-swapping needs a peft-core model (get_peft_model / PeftModel.from_pretrained), got "
                        f"{type(model).__name__}")
    return inner


def _compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: PeftConfig | dict[str, PeftConfig] | None = None,
                                       check_compiled: Literal["error", "warn", "ignore"] = "error",
                                       ) -> dict[str, PeftConfig] | None:
    """Prepare a model with its first adapter loaded for hot-swapping adapters of other ranks or alphas under
    ``torch.compile``: call it *before* compiling. ``target_rank``: the largest rank among the adapters you will
    swap in (the loaded ones are zero-padded to it: outputs stay exactly the same).

    ``check_compiled``: what to do if ``model`` is compiled already ("error", "warn" or "ignore").
    ``config``: Hugging Face PEFT rewrites the ranks of the configs passed here; configs are frozen values in
    peft-core, so instead the model's configs (for ``config``'s adapters, or all) are returned when it is given.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ConfigError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if _compiled(model):
        if check_compiled == "error":
            raise AdapterError("call prepare_model_for_compiled_hotswap before compiling the model, not after "
                               "(or pass check_compiled='warn' to accept a recompilation)")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap on a compiled model: the model will recompile once",
                          stacklevel=2)
    adapted = _adapted(model)
    found = False
    for name in list(adapted.peft_config):
        reg = adapted._registry
        current = adapted.peft_config[name]
        if not reg.implements(type(current).peft_type, "prepare_hotswap"):
            continue
        updated = config_answer("prepare_hotswap", current,
                                adapted._call(name, "prepare_hotswap", target_rank=target_rank))
        if updated is None:
            continue
        adapted.peft_config[name] = updated
        found = True
    if not found:
        methods = sorted({type(c).peft_type for c in adapted.peft_config.values()})
        raise ConfigError(f"prepare_model_for_compiled_hotswap found no adapter to prepare (this model has "
                          f"{methods or 'no adapters'}; hot-swapping needs a method that implements it, such as "
                          "LORA): load the first adapter, then call it, then compile")
    if config is None:
        return None
    names = list(config) if isinstance(config, dict) else list(adapted.peft_config)
    return {n: adapted.peft_config[n] for n in names if n in adapted.peft_config}


def hotswap_adapter(model: nn.Module, model_name_or_path: str | os.PathLike[str], adapter_name: str,
                    torch_device: str | torch.device | None = None, *, subfolder: str | None = None,
                    revision: str | None = None, **hub_kwargs: Any) -> None:
    """Replace the weights of loaded adapter ``adapter_name`` by those of the adapter at ``model_name_or_path`` (a
    folder or Hub id, written by peft-core or Hugging Face PEFT), in place; the name stays. A compiled model
    does not recompile (for different ranks or alphas, see :func:`prepare_model_for_compiled_hotswap`).

    The adapters must be of the same method, target the same modules (a module the new adapter leaves alone is
    switched off) and agree in what changes the computation beyond the weights; anything else is refused with
    the difference named, before any weight changes. ``torch_device``: where the file is loaded (default: where
    the adapter's weights are).
    """
    adapted = _adapted(model)
    if adapter_name not in adapted.peft_config:
        raise AdapterError(f"no adapter named {adapter_name!r} to hot-swap; this model has "
                           f"{list(adapted.peft_config)}")
    if adapter_name in adapted.merged_adapters:
        raise AdapterError(f"adapter {adapter_name!r} is merged into the base weights: unmerge_adapter() before "
                           "hot-swapping it (a swap under a merge would leave the old weights in the base)")
    old = adapted.peft_config[adapter_name]
    new = PeftConfig.from_pretrained(model_name_or_path, subfolder=subfolder, revision=revision, **hub_kwargs)
    method = type(old).peft_type
    if type(new).peft_type != method:
        raise ConfigError(f"cannot hot-swap adapter {adapter_name!r} ({method}) with {model_name_or_path!s}, a "
                          f"{type(new).peft_type} adapter: the methods must be the same")
    if not adapted._registry.implements(method, "hotswap"):
        raise ConfigError(f"{method} adapters cannot be hot-swapped (its plugin does not implement the hotswap "
                          "hook); load the new adapter with load_adapter() instead")
    path = resolve_weights(model_name_or_path, subfolder=subfolder, revision=revision, **hub_kwargs)
    weights = load_weights(path)
    if torch_device is not None:
        weights = {k: v.to(torch_device) for k, v in weights.items()}
    mapped, copies = checkpoint.map_adapter_tensors(adapted, adapter_name, weights)
    owned = set(adapted._ownership.owned(adapter_name))
    unexpected = sorted(k for k in {**mapped, **copies} if k not in owned)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(f"cannot hot-swap adapter {adapter_name!r} with {path}: it has tensors the loaded "
                              f"adapter does not ({shown}): it targets other modules. Load it with load_adapter() "
                              "instead")
    # the modules_to_save copies are the core's: checked here, copied in place once the method has swapped
    targets = dict(adapted.named_parameters())
    targets.update(adapted.named_buffers())
    misfit = [f"{k} {tuple(v.shape)} vs {tuple(targets[k].shape)}" for k, v in copies.items()
              if tuple(v.shape) != tuple(targets[k].shape)]
    if misfit:
        raise CheckpointError(f"cannot hot-swap adapter {adapter_name!r} with {path}: its modules_to_save tensors "
                              f"have other shapes ({', '.join(misfit[:3])})")
    updated = config_answer("hotswap", old, adapted._call(adapter_name, "hotswap", new_config=new, state_dict=mapped))
    if updated is None:
        raise ConfigError(f"{method} adapters cannot be hot-swapped (no plugin answered the hotswap hook); load the "
                          "new adapter with load_adapter() instead")
    with torch.no_grad():
        for key, value in copies.items():
            targets[key].copy_(value)
    adapted.peft_config[adapter_name] = updated
