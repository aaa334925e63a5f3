"""Which parameters each adapter owns or trains, and which of them train right now.

The answers come from declarations, never from guessing: the :class:`~peft_core.layers.AdapterLayer`s
that hold the adapter, the adapter's ``store`` entry, its ``modules_to_save`` copies, and the method's
``trained_base_parameters`` hook. From them :class:`Ownership` keeps, per adapter:

- the parameters it owns (trainable exactly while it is active and not in inference mode);
- the base parameters it trains (trainable while *some* active, trainable adapter claims them — so adding,
  activating or deleting another adapter never freezes what an active adapter trains);
- the layers that cannot route a mixed batch (a mixed-batch call naming the adapter is refused).

Parameters are reached through their (module, attribute) slot, resolved once per adapter: the cost of
``set_adapter`` follows the adapters it touches, not how many are loaded, and a slot — unlike the
Parameter object — survives wrappers that swap parameters in place, such as FSDP2, and later injections
that move a base module under a new layer's ``base_layer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
import torch
from torch import nn

from .amp import HALF_DTYPES
from .compat import MODEL_PREFIX, STORE_PREFIX
from .errors import PluginContractError
from .layers import adapter_layers
from .modules_to_save import ModulesToSave

__all__ = ["AdapterRecord", "Ownership"]

Slot = tuple[nn.Module, str]


@attrs.frozen
class AdapterRecord:
    """What one adapter declared, in the wrapping model's namespace (``base_model.<path>...``)."""

    #: Parameters the adapter owns and trains: its layers' ``adapter_parameters``, its store, its copies.
    owned: tuple[str, ...]
    #: Of ``owned``, those created by its layers and store (what ``autocast_adapter_dtype`` and
    #: ``low_cpu_mem_usage`` apply to; ``modules_to_save`` copies keep the dtype of what they copy).
    created: tuple[str, ...]
    #: Of ``created``, those of its layers (``low_cpu_mem_usage`` moves these to meta; store modules such as
    #: prompt tables stay materialised, as in Hugging Face PEFT, which ignores the flag for prompt methods).
    in_layers: tuple[str, ...]
    #: Tensors of the adapter that never train (layers' ``adapter_state``).
    frozen: tuple[str, ...]
    #: Base-model parameters the adapter trains (``base_model.<path>``).
    base: tuple[str, ...]
    #: Paths of its layers that cannot route mixed batches.
    unroutable: tuple[str, ...]


def _slot(root: nn.Module, name: str) -> Slot | None:
    path, _, leaf = name.rpartition(".")
    try:
        module = root.get_submodule(path) if path else root
    except AttributeError:
        return None
    return module, leaf


def _param(slot: Slot) -> nn.Parameter | None:
    module, leaf = slot
    return module._parameters.get(leaf)


class Ownership:
    """The per-adapter declarations of one wrapping model, and the trainability rule built on them."""

    def __init__(self, root: nn.Module) -> None:
        self._root = root  # the AdaptedModel: names are in its namespace
        self._records: dict[str, AdapterRecord] = {}
        self._slots: dict[str, list[Slot]] = {}
        self._created: dict[str, list[tuple[str, Slot]]] = {}  # the slots of AdapterRecord.created, by name
        self._base_slots: dict[str, list[Slot]] = {}

    # ------------------------------------------------------------------ declarations
    def declare(self, adapter_name: str, base_model: nn.Module, store: nn.ModuleDict,
                hook_claims: Sequence[str] | None, known_before: set[int]) -> AdapterRecord:
        """Collect what ``adapter_name`` declared right after its ``inject``; raise
        :class:`PluginContractError` if ``inject`` created a parameter that nothing declares, or a claimed
        base parameter does not exist. ``known_before``: ids of the parameters that existed before inject
        (used to *check* the declarations, never to make them)."""
        # (name in the wrapper's namespace, slot): each slot resolved from the module that declared it (a short
        # walk), not by path from the root; None where the declared path does not exist (reported below)
        entries: list[tuple[str, Slot | None]] = []
        frozen: list[str] = []
        base: list[str] = []
        unroutable: list[str] = []
        for path, layer in adapter_layers(base_model, adapter_name):
            prefix = f"{MODEL_PREFIX}{path}."
            entries += [(prefix + rel, _slot(layer, rel)) for rel in layer.adapter_parameters(adapter_name)]  # type: ignore[arg-type]
            frozen += [prefix + rel for rel in layer.adapter_state(adapter_name)]
            base += [prefix + rel for rel in layer.trained_base_parameters(adapter_name)]
            if not getattr(layer, "supports_routing", False):
                unroutable.append(path)
        in_layers = len(entries)
        if adapter_name in store:
            entries += [(f"{STORE_PREFIX}{adapter_name}.{n}", _slot(store[adapter_name], n))
                        for n, _ in store[adapter_name].named_parameters()]
        n_created = len(entries)
        for path, module in base_model.named_modules():
            if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                copy = module.modules_to_save[adapter_name]
                entries += [(f"{MODEL_PREFIX}{path}.modules_to_save.{adapter_name}.{n}", _slot(copy, n))
                            for n, _ in copy.named_parameters()]
        owned = [name for name, _ in entries]
        params = dict(self._root.named_parameters())
        for claim in hook_claims or ():
            if not isinstance(claim, str) or (MODEL_PREFIX + claim) not in params:
                raise PluginContractError(f"trained_base_parameters for adapter {adapter_name!r} names "
                                          f"{claim!r}, which is not a parameter of the base model")
            base.append(MODEL_PREFIX + claim)
        declared = set(owned) | set(frozen)
        undeclared = [n for n, p in params.items() if id(p) not in known_before and n not in declared]
        if undeclared:
            raise PluginContractError(
                f"inject of adapter {adapter_name!r} created parameter(s) that no adapter layer declares: "
                f"{', '.join(undeclared[:5])}. Declare them from the layer's adapter_parameters() (trained) or "
                "adapter_state() (frozen) — see peft_core.layers.AdapterLayer — or put them in store[adapter_name]")
        missing = [n for n in owned if n not in params]
        if missing:
            raise PluginContractError(f"adapter {adapter_name!r}: its layers declare parameter(s) that are not in "
                                      f"the model: {', '.join(missing[:5])}")
        record = AdapterRecord(owned=tuple(owned), created=tuple(owned[:n_created]),
                               in_layers=tuple(owned[:in_layers]), frozen=tuple(frozen),
                               base=tuple(dict.fromkeys(base)), unroutable=tuple(unroutable))
        self._records[adapter_name] = record
        self._slots[adapter_name] = [slot for _, slot in entries if slot is not None]
        self._created[adapter_name] = [(n, slot) for n, slot in entries[:n_created] if slot is not None]
        for name in record.frozen:  # declared never to train: a Parameter among them is frozen here, once
            slot = _slot(self._root, name)
            param = _param(slot) if slot is not None else None
            if param is not None:
                param.requires_grad_(False)
        # base slots are resolved now, while the claimed names are valid: a later adapter may move the module
        self._base_slots[adapter_name] = [s for s in (_slot(self._root, n) for n in record.base) if s is not None]
        return record

    def forget(self, adapter_name: str) -> None:
        self._records.pop(adapter_name, None)
        self._slots.pop(adapter_name, None)
        self._created.pop(adapter_name, None)
        self._base_slots.pop(adapter_name, None)

    def record(self, adapter_name: str) -> AdapterRecord | None:
        return self._records.get(adapter_name)

    def owned(self, adapter_name: str) -> tuple[str, ...]:
        rec = self._records.get(adapter_name)
        return rec.owned if rec is not None else ()

    def unroutable(self, names: Iterable[str]) -> list[str]:
        """Layers (paths) that hold one of ``names`` and cannot route a mixed batch."""
        out: list[str] = []
        for name in dict.fromkeys(names):
            rec = self._records.get(name)
            if rec is not None:
                out += [p for p in rec.unroutable if p not in out]
        return out

    def slots(self, adapter_name: str) -> list[Slot]:
        """(module, attribute) of each parameter the adapter owns, resolved once (and again after a
        structural change such as a ``modules_to_save`` copy being unwrapped)."""
        slots = self._slots.get(adapter_name)
        if slots is None:
            slots = [s for s in (_slot(self._root, n) for n in self.owned(adapter_name)) if s is not None]
            self._slots[adapter_name] = slots
        return slots

    def invalidate_slots(self) -> None:
        """Resolve every slot again on next use (after modules were put back, a modules_to_save copy unwrapped)."""
        self._slots.clear()
        self._created.clear()

    # ------------------------------------------------------------------ trainability
    def _live_claims(self, trains: Callable[[str], bool]) -> set[tuple[int, str]]:
        """The base-parameter slots that some adapter which trains now claims."""
        return {(id(m), leaf) for n, slots in self._base_slots.items() if trains(n) for m, leaf in slots}

    def update(self, adapter_names: Iterable[str], trains: Callable[[str], bool]) -> None:
        """Set ``requires_grad`` of what ``adapter_names`` own or claim. ``trains(name)``: whether that adapter
        trains now (active and not in inference mode)."""
        names = list(dict.fromkeys(adapter_names))
        for name in names:
            trainable = trains(name)
            for slot in self.slots(name):
                param = _param(slot)
                if param is not None:
                    param.requires_grad_(trainable)
        touched = {(id(m), leaf): (m, leaf) for n in names for m, leaf in self._base_slots.get(n, ())}
        if touched:
            live = self._live_claims(trains)
            for key, slot in touched.items():
                param = _param(slot)
                if param is not None:
                    param.requires_grad_(key in live)

    def freeze_unowned(self, trains: Callable[[str], bool]) -> None:
        """Freeze every parameter that no adapter owns and no training adapter claims (the base model)."""
        owned = {n for rec in self._records.values() for n in (*rec.owned, *rec.frozen)}
        live = self._live_claims(trains)
        for module_name, module in self._root.named_modules():
            for leaf, param in module._parameters.items():
                if param is None:
                    continue
                full = f"{module_name}.{leaf}" if module_name else leaf
                if full not in owned and (id(module), leaf) not in live:
                    param.requires_grad_(False)

    # ------------------------------------------------------------------ dtype and device of new parameters
    def created_slots(self, adapter_name: str, layers_only: bool = False) -> list[tuple[str, Slot]]:
        rec = self._records.get(adapter_name)
        if rec is None:
            return []
        created = self._created.get(adapter_name)
        if created is None:  # slots were invalidated since: resolve the names again
            created = [(n, s) for n, s in ((n, _slot(self._root, n)) for n in rec.created) if s is not None]
            self._created[adapter_name] = created
        return created[:len(rec.in_layers)] if layers_only else created

    def upcast_half(self, adapter_name: str) -> None:
        """``autocast_adapter_dtype=True``: the adapter's new float16/bfloat16 parameters become float32, so
        the optimizer updates full-precision weights (what Hugging Face PEFT does); the forward casts."""
        for _, slot in self.created_slots(adapter_name):
            param = _param(slot)
            if param is not None and param.dtype in HALF_DTYPES:
                _swap(slot, param, param.detach().float())

    def to_meta(self, adapter_name: str) -> Mapping[str, torch.device]:
        """``low_cpu_mem_usage=True``: the parameters of the adapter's layers move to the meta device (no memory)
        until a load fills them; returns where each belongs."""
        homes: dict[str, torch.device] = {}
        for name, slot in self.created_slots(adapter_name, layers_only=True):
            param = _param(slot)
            if param is not None and not param.is_meta:
                homes[name] = param.device
                _swap(slot, param, torch.empty_like(param, device="meta"))
        return homes


def _swap(slot: Slot, old: nn.Parameter, value: torch.Tensor) -> None:
    """Replace the parameter in its slot by a new one holding ``value`` (dtype or device changes cannot go
    through ``.data`` for every pair of tensor types)."""
    module, leaf = slot
    module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
