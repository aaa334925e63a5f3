"""Hot-swapping LoRA adapters: another adapter's weights copied into a loaded one's tensors, in place.

A server keeps one compiled model and changes which fine-tune it serves by overwriting the adapter's tensors:
the parameter objects stay the same, so a ``torch.compile``d graph runs on without compiling anything. Two things
would otherwise change what a graph was specialised on, and :func:`prepare` takes them out beforehand:

- the **rank** (a tensor's shape): every adapter's A and B are zero-padded to ``target_rank`` (exact: the padded
  rows and columns contribute zeros), and a later, smaller adapter is copied into the leading slice;
- the **scaling** (a Python float in the graph): each layer also keeps it as a 0-d tensor, which the compiled path
  reads (:meth:`~peft_lora.layers.LoraLinear._forward_gated`) and a swap overwrites.

The padding is a serving detail: ``save_pretrained`` trims it (:func:`trim_for_save`), so the files written hold the
adapter's true rank and load anywhere. Layers with a variant (DoRA...) are refused: their extra tensors are not
rank-shaped, and PEFT does not swap them either.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft_core.compat import MODEL_PREFIX
from peft_core.errors import CheckpointError, ConfigError, TargetError
from torch import nn

from .config import LoraConfig
from .layers import LoraLayer
from .targeting import rank_and_alpha

__all__ = ["prepare", "swap", "trim_for_save"]

#: Config fields that change what an adapter computes beyond its tensors and scaling: they must match (PEFT's set).
MUST_MATCH = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")


def _rank_dim(rel: str) -> int | None:
    """Which dimension of an adapter tensor is the rank: 0 for A (``r x in``), 1 for B (``out x r``), None for
    a tensor without one (lora_B's bias)."""
    if rel.startswith(("lora_A.", "lora_embedding_A.")):
        return 0
    if rel.startswith("lora_embedding_B.") or (rel.startswith("lora_B.") and rel.endswith(".weight")):
        return 1
    return None


def _layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r]
    for path, layer in found:
        if adapter_name in layer.variants:
            raise TargetError(f"hot-swapping adapter {adapter_name!r}: layer {path!r} has a "
                              f"{type(layer.variants[adapter_name]).__name__} variant, whose tensors cannot be "
                              "swapped in place; load the other adapter with load_adapter() instead")
        groups = getattr(layer.base_layer, "groups", 1)
        if groups != 1:
            raise TargetError(f"hot-swapping adapter {adapter_name!r}: layer {path!r} is a grouped "
                              f"{type(layer.base_layer).__name__} (groups={groups}), whose B is not padded by rank "
                              "alone; load the other adapter with load_adapter() instead")
    return found


def _resize(param: nn.Parameter, dim: int, rank: int) -> None:
    """Give ``param`` ``rank`` entries along ``dim`` (zero padding), keeping the parameter object."""
    shape = list(param.shape)
    shape[dim] = rank
    grown = param.new_zeros(shape)
    grown.narrow(dim, 0, param.shape[dim]).copy_(param.detach())
    param.data = grown


def _sync_module_sizes(layer: LoraLayer, name: str, rank: int) -> None:
    """Keep ``in_features``/``out_features`` (or channels) of A and B modules true to their weights."""
    for attr, fields in (("lora_A", ("out_features", "out_channels")), ("lora_B", ("in_features", "in_channels"))):
        store = layer._modules.get(attr)
        module = store[name] if isinstance(store, nn.ModuleDict) and name in store else None
        for field in fields:
            if module is not None and hasattr(module, field):
                setattr(module, field, rank)


def _set_scaling(layer: LoraLayer, name: str, scaling: float) -> None:
    layer.scaling[name] = scaling
    tensors = layer.__dict__.get("_scaling_tensors")
    if tensors is not None and name in tensors:
        tensors[name].fill_(scaling)


def prepare(model: nn.Module, adapter_name: str, target_rank: int | None) -> bool:
    """Pad ``adapter_name``'s tensors to ``target_rank`` and give each layer a tensor scaling. False when the
    model has no LoRA layer of that adapter."""
    layers = _layers(model, adapter_name)
    if not layers:
        return False
    if target_rank is not None:
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
            raise ConfigError(f"target_rank must be a positive int, got {target_rank!r}")
        above = [f"{p} (r={layer.r[adapter_name]})" for p, layer in layers if layer.r[adapter_name] > target_rank]
        if above:
            raise ConfigError(f"target_rank={target_rank} is below the rank of adapter {adapter_name!r} at "
                              f"{', '.join(above[:3])}: pass the largest rank of the adapters you will swap in")
    with torch.no_grad():
        for _, layer in layers:
            if target_rank is not None and layer.r[adapter_name] < target_rank:
                for rel, param in layer.adapter_parameters(adapter_name).items():
                    dim = _rank_dim(rel)
                    if dim is not None:
                        _resize(param, dim, target_rank)
                _sync_module_sizes(layer, adapter_name, target_rank)
                layer.r[adapter_name] = target_rank
                layer.__dict__.setdefault("_padded", set()).add(adapter_name)
            if target_rank is not None:
                layer.__dict__.setdefault("_hotswap_rank", {})[adapter_name] = target_rank
            weight = next(iter(layer.adapter_parameters(adapter_name).values()))
            layer.__dict__.setdefault("_scaling_tensors", {})[adapter_name] = torch.tensor(
                layer.scaling[adapter_name], dtype=torch.float32, device=weight.device)
            layer._generation += 1  # cached stacks (mixed batches) were built from the old shapes
    return True


def swap(model: nn.Module, adapter_name: str, config: LoraConfig, new_config: LoraConfig,
         state_dict: Mapping[str, torch.Tensor]) -> LoraConfig:
    """Copy the new adapter's tensors (in-model keys) into ``adapter_name``'s, in place; checks everything first."""
    for field in MUST_MATCH:
        old, new = getattr(config, field), getattr(new_config, field)
        if old != new:
            raise ConfigError(f"cannot hot-swap adapter {adapter_name!r}: the configs differ in {field} ({old!r} "
                              f"loaded, {new!r} new), which changes what the adapter computes beyond its weights; "
                              "load the new adapter with load_adapter() instead")
    layers = _layers(model, adapter_name)
    plan: list[tuple[LoraLayer, str, dict[str, tuple[nn.Parameter, torch.Tensor | None]]]] = []
    for path, layer in layers:
        params = layer.adapter_parameters(adapter_name)
        pairs = {rel: (p, state_dict.get(f"{MODEL_PREFIX}{path}.{rel}")) for rel, p in params.items()}
        present = [rel for rel, (_, new) in pairs.items() if new is not None]
        if present and len(present) != len(pairs):
            lacking = sorted(set(pairs) - set(present))
            raise CheckpointError(f"cannot hot-swap adapter {adapter_name!r}: the new adapter has "
                                  f"{', '.join(present)} for {path!r} but not {', '.join(lacking)}")
        prepared = layer.__dict__.get("_hotswap_rank", {}).get(adapter_name)
        for rel, (param, new) in pairs.items():
            if new is None:
                continue
            dim = _rank_dim(rel)
            fits = new.dim() == param.dim() and all(
                n == o or (d == dim and n <= o) for d, (n, o) in enumerate(zip(new.shape, param.shape)))
            if fits:
                continue
            if dim is not None and prepared is not None and new.dim() == param.dim() and new.shape[dim] > prepared:
                raise CheckpointError(f"cannot hot-swap adapter {adapter_name!r}: the new adapter has rank "
                                      f"{new.shape[dim]} at {path!r}, above the {prepared} that "
                                      "prepare_model_for_compiled_hotswap padded to; prepare with a larger "
                                      "target_rank")
            if dim is None or prepared is not None or new.dim() != param.dim() or any(
                    n != o for d, (n, o) in enumerate(zip(new.shape, param.shape)) if d != dim):
                raise CheckpointError(f"cannot hot-swap adapter {adapter_name!r}: {path}.{rel} has shape "
                                      f"{tuple(new.shape)} in the new adapter, {tuple(param.shape)} loaded; the "
                                      "adapters were made for different layers")
        plan.append((layer, path, pairs))
    with torch.no_grad():
        for layer, path, pairs in plan:
            r, alpha = rank_and_alpha(new_config, path)
            if all(new is None for _, new in pairs.values()):
                for param, _ in pairs.values():  # a layer the new adapter leaves alone: no update there
                    param.zero_()
                continue
            held = layer.r[adapter_name]
            for rel, (param, new) in pairs.items():
                assert new is not None
                dim = _rank_dim(rel)
                new = new.to(device=param.device, dtype=param.dtype)
                if dim is not None and new.shape[dim] > param.shape[dim]:  # not prepared: the tensor grows
                    param.data = new.clone()
                    held = new.shape[dim]
                elif dim is not None and new.shape[dim] < param.shape[dim]:
                    param.zero_()
                    param.narrow(dim, 0, new.shape[dim]).copy_(new)
                else:
                    param.copy_(new)
            if held != layer.r[adapter_name]:
                _sync_module_sizes(layer, adapter_name, held)
                layer.r[adapter_name] = held
            if held > r:  # zero-padded beyond the new adapter's rank: trimmed again when saving
                layer.__dict__.setdefault("_padded", set()).add(adapter_name)
            layer.lora_alpha[adapter_name] = alpha
            scaling = alpha / r ** 0.5 if new_config.use_rslora else alpha / r
            _set_scaling(layer, adapter_name, scaling)
            layer._generation += 1
    return new_config.replace(inference_mode=config.inference_mode)


def trim_for_save(model: nn.Module, adapter_name: str, config: LoraConfig, key: str,
                  value: torch.Tensor) -> torch.Tensor:
    """A padded tensor (see :func:`prepare`) cut back to the adapter's rank, for the file; others unchanged."""
    stem, found, rel = key.partition(".lora_")
    if not found:
        return value
    rel = "lora_" + rel
    dim = _rank_dim(rel)
    if dim is None or not stem.startswith(MODEL_PREFIX):
        return value
    path = stem[len(MODEL_PREFIX):]
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        return value
    if not isinstance(layer, LoraLayer) or adapter_name not in layer.__dict__.get("_padded", ()):
        return value
    rank = rank_and_alpha(config, path)[0]
    return value.narrow(dim, 0, rank) if value.shape[dim] > rank else value
