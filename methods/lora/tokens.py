"""Trainable tokens for LoRA (``LoraConfig.trainable_token_indices``): train a few rows of an embedding (new
tokens, say) instead of the whole table, beside an adapter's LoRA layers.

Semantics are Hugging Face PEFT's (0.21), so results and files carry over:

- Each listed token gets one trainable row per adapter, initialised to the embedding's own row. The row
  *replaces* the base row (PEFT calls it ``trainable_tokens_delta``, but it holds values, not differences):
  the forward pass sees the base table with those rows swapped in, and gradients reach only them.
- A list of indices is for the model's input embedding; a mapping names modules (``{"embed_tokens": [...]}``,
  matched like ``target_modules`` list entries). Besides ``nn.Embedding`` a mapping may name an
  ``nn.Linear`` output head (an untied ``lm_head``), whose listed *output* rows are then trained.
- Modules that share the embedding's weight (a tied ``lm_head``; T5's ``encoder``/``decoder.embed_tokens``
  and ``lm_head`` beside ``shared``) follow it: they see the same swapped rows and hold nothing of their own.
  The rows are saved once, under the embedding. This is PEFT's weight tying for trainable tokens (it applies
  it whenever the config ties word embeddings, with or without ``ensure_weight_tying``); here a module follows
  when it holds the very same weight tensor.
- Merging writes the rows into the base weight (once, for every module sharing it); unmerging puts the saved
  original rows back, bit for bit.

Layout and keys follow PEFT's ``TrainableTokensWrapper``: the wrapped module sits at
``<path>.token_adapter.base_layer`` and the rows at ``<path>.token_adapter.trainable_tokens_delta.<adapter>``;
on disk ``base_model.model.<path>.token_adapter.trainable_tokens_delta``. PEFT's ``trainable_tokens_original``
buffer (a copy of the original rows taken at creation) is not kept: merging saves the rows it overwrites.

Refused with an error that names the module and the fix, before the model changes (PEFT refuses most of these
too, or computes something that merging would not reproduce): an index outside the table, a name that matches
no module, a module that is also a LoRA target or a ``modules_to_save`` copy, trainable tokens on a module
that follows another's weight (name the embedding instead), and tied modules given different indices.

The LoRA plugin calls the functions at the bottom from its hooks (:mod:`peft_lora.plugin`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from peft_core.compat import MODEL_PREFIX, model_to_disk_key
from peft_core.errors import AdapterError, ConfigError, MergeError, TargetError
from peft_core.layers import is_adapter_layer
from peft_core.merging import check_finite
from peft_core.runtime import AdapterRuntime, Routing
from peft_core.targeting import matches
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .config import LoraConfig

__all__ = ["TokenAdapter", "TrainableTokensWrapper", "apply_trainable_tokens", "check_token_merge",
           "map_token_keys", "merge_tokens", "plan_trainable_tokens", "remove_tokens", "token_state_dict",
           "unmerge_tokens"]

#: The rows' key below a wrapped module, as PEFT names it (in memory ``.<adapter>`` follows).
DELTA = ".token_adapter.trainable_tokens_delta"


class TokenAdapter(nn.Module):
    """The ``token_adapter`` child of a :class:`TrainableTokensWrapper`: the wrapped module as ``base_layer``
    and, on the module that owns the rows, ``trainable_tokens_delta[adapter]`` (one row per listed token).
    A separate child only so that names read as PEFT's (``embed_tokens.token_adapter.base_layer.weight``)."""

    def __init__(self, base_layer: nn.Module, owns_rows: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        if owns_rows:
            self.trainable_tokens_delta = nn.ParameterDict()


class TrainableTokensWrapper(nn.Module):
    """Stands in place of an ``nn.Embedding`` (or an ``nn.Linear`` head) and swaps the active adapters' trained
    rows into its output. A *source* owns the rows of every adapter on this weight; a *follower* (built with
    ``source=``) wraps another module that shares the source's weight and reads the source's rows and state.

    Implements peft-core's ``AdapterLayer`` protocol. A follower reports no adapters: it owns nothing, and
    the rows are counted, trained and saved once, under the source.
    """

    #: Mixed batches (``adapter_names=[...]``): each row gets its own adapter's tokens.
    supports_routing = True

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, path: str = "",
                 source: TrainableTokensWrapper | None = None) -> None:
        super().__init__()
        self.token_adapter = TokenAdapter(base_layer, owns_rows=source is None)
        self._runtime = runtime
        self._path = path  # for messages
        # a list, not an attribute holding the module: the source must not become a submodule of its followers
        # (its rows would be listed, counted and saved twice)
        self._source: list[TrainableTokensWrapper] = [] if source is None else [source]
        self.token_indices: dict[str, tuple[int, ...]] = {}  # adapter -> tokens (source only)
        self._restore: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # merged adapter -> (index, old rows)
        self._generation = 0  # bumped when the held or merged adapters change (invalidates the memos)
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}  # index tensors per (adapter, device)

    # ---- structure
    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def source(self) -> TrainableTokensWrapper:
        """The wrapper that owns the rows this one uses (itself, unless it follows another)."""
        return self._source[0] if self._source else self

    @property
    def is_follower(self) -> bool:
        return bool(self._source)

    @property
    def _embedding(self) -> bool:
        return isinstance(self.base_layer, nn.Embedding)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "token_adapter":
                raise
        # model code reads the wrapped module's attributes (num_embeddings, padding_idx, out_features...)
        return getattr(self.token_adapter.base_layer, name)

    # ---- the AdapterLayer protocol
    @property
    def adapter_names(self) -> list[str]:
        return [] if self.is_follower else list(self.token_indices)

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        if self.is_follower:
            return {}
        return {f"token_adapter.trainable_tokens_delta.{adapter_name}":
                self.token_adapter.trainable_tokens_delta[adapter_name]}

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> tuple[str, ...]:
        return ()

    # ---- adapters (source only)
    def add(self, name: str, indices: Sequence[int]) -> None:
        """Give adapter ``name`` trainable rows for ``indices``, starting as the base rows (works on meta)."""
        weight = self.base_layer.weight
        index = torch.tensor(list(indices), dtype=torch.long, device=weight.device)
        self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(weight.detach()[index].clone())
        # a new dict, not an update in place: a failed add_adapter restores the module's attributes as they were
        self.token_indices = {**self.token_indices, name: tuple(indices)}
        self._changed()

    def drop(self, name: str) -> None:
        self._restore.pop(name, None)
        self.token_indices = {k: v for k, v in self.token_indices.items() if k != name}
        if name in self.token_adapter.trainable_tokens_delta:
            del self.token_adapter.trainable_tokens_delta[name]
        self._changed()

    def _changed(self) -> None:
        self._generation += 1
        self._cache = {}

    def _rows(self, name: str) -> nn.Parameter:
        return self.source.token_adapter.trainable_tokens_delta[name]

    def _index(self, name: str, device: torch.device) -> torch.Tensor:
        src = self.source
        key = ("index", name, device)
        found = src._cache.get(key)
        if found is None:
            found = torch.tensor(src.token_indices[name], dtype=torch.long, device=device)
            src._cache[key] = found
        return found

    def _lookup(self, name: str, device: torch.device) -> torch.Tensor:
        """token id -> its row in the adapter's rows, -1 for tokens it does not train (one long per token of the
        vocabulary: cheaper than comparing every input position with every listed token)."""
        src = self.source
        key = ("lookup", name, device)
        found = src._cache.get(key)
        if found is None:
            index = self._index(name, device)
            found = torch.full((self.base_layer.weight.shape[0],), -1, dtype=torch.long, device=device)
            found[index] = torch.arange(index.numel(), device=device)
            src._cache[key] = found
        return found

    def _check_disjoint(self, names: Sequence[str], error: type[Exception] = AdapterError) -> None:
        """Two adapters replacing the same row at once has no defined result (PEFT refuses it too)."""
        src = self.source
        owner: dict[int, str] = {}
        for name in names:
            for token in src.token_indices[name]:
                other = owner.setdefault(token, name)
                if other != name:
                    raise error(
                        f"adapters {other!r} and {name!r} both train token {token} of {src._path or 'an embedding'} "
                        "(trainable_token_indices): they cannot act at once. Activate (or merge) one of them at a "
                        "time, or give them disjoint indices")

    def _live(self) -> tuple[str, ...]:
        """Active adapters with rows here that are not merged (memoized: this runs in every forward)."""
        src = self.source
        rt = self._runtime
        key = (rt.active, src._generation)
        memo = self.__dict__.get("_live_memo")
        if memo is not None and memo[0] == key:
            return memo[1]  # type: ignore[no-any-return]
        live = tuple(n for n in rt.active if n in src.token_indices and n not in src._restore)
        if live:
            self._check_disjoint((*src._restore, *live))
        self.__dict__["_live_memo"] = (key, live)
        return live

    # ---- forward
    @property
    def weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it: the base weight with the active adapters' rows in place, so
        model code that reads ``embed_tokens.weight`` sees the trained tokens (as with PEFT). A new tensor
        when rows are swapped in; the base parameter itself otherwise."""
        if self._runtime.disabled or self._runtime.routing() is not None:
            return self.base_layer.weight
        return self._swapped(self._live())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rt = self._runtime
        if rt.disabled or not self.source.token_indices:
            return self.base_layer(x, *args, **kwargs)
        routing = rt.routing()
        if routing is not None:
            return self._routed(x, routing)
        names = self._live()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._compute(x, names)

    def _compute(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        return self._embed(x, names) if self._embedding else self._project(x, names)

    def _routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """A mixed batch: each batch row with its adapter's tokens; ``__base__`` rows, and rows of adapters that
        train no tokens here, as the base module computes them."""
        if len(routing.names) != x.shape[0]:
            raise AdapterError(f"adapter_names has {len(routing.names)} entries but the batch has {x.shape[0]} rows")
        src = self.source
        out = self.base_layer(x)
        for name in dict.fromkeys(routing.names):
            if name not in src.token_indices:
                continue
            rows = torch.tensor([i for i, n in enumerate(routing.names) if n == name], device=x.device)
            out = out.index_copy(0, rows, self._compute(x.index_select(0, rows), (name,)).to(out.dtype))
        return out

    def _embed_scale(self) -> torch.Tensor | None:
        """A scaled embedding's factor (Gemma's ``embed_scale``), which its forward applies to every row."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return torch.tensor(scale, dtype=self.base_layer.weight.dtype, device=self.base_layer.weight.device)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return None

    def _embed(self, ids: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        scale = self._embed_scale()
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
            # these options act on the table itself (renormalising looked-up rows, scaling or sparsifying its
            # gradient): give them the table with the rows swapped in, as PEFT does (a copy of the whole table)
            out = F.embedding(ids, self._swapped(names), base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
            return out * scale.to(out.dtype) if scale is not None else out
        # otherwise look the base rows up as the module does and put the trained rows where their tokens are: the
        # same values, without copying the table in every forward (nor a table-sized gradient in backward)
        out = base(ids)
        for name in names:
            if not self.source.token_indices[name]:
                continue
            pos = self._lookup(name, ids.device)[ids]
            rows = self._rows(name).to(base.weight.dtype)[pos.clamp(min=0)]
            pad = base.padding_idx
            if pad is not None and pad in self.source.token_indices[name] and rows.requires_grad:
                # F.embedding gives the padding row no gradient; neither does the row that replaces it
                rows = torch.where((ids == pad).unsqueeze(-1), rows.detach(), rows)
            if scale is not None:
                rows = rows * scale.to(rows.dtype)
            out = torch.where((pos >= 0).unsqueeze(-1), rows.to(out.dtype), out)
        return out

    def _swapped(self, names: Sequence[str]) -> torch.Tensor:
        weight = self.base_layer.weight
        for name in names:
            weight = weight.index_copy(0, self._index(name, weight.device), self._rows(name).to(weight.dtype))
        return weight

    def _project(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """An output head: the listed output columns come from the trained rows."""
        base: nn.Linear = self.base_layer  # type: ignore[assignment]
        out = base(x)
        # torch's Linear keeps no reference to its output for backward, so the columns can be written in place
        # (unless a forward hook may have kept the output)
        inplace = type(base) is nn.Linear and not base._forward_hooks and not _global_forward_hooks
        for name in names:
            index = self._index(name, out.device)
            if index.numel() == 0:
                continue
            bias = None if base.bias is None else base.bias.index_select(0, index)
            cols = F.linear(x, self._rows(name).to(base.weight.dtype), bias).to(out.dtype)
            out = out.index_copy_(-1, index, cols) if inplace else out.index_copy(-1, index, cols)
        return out

    # ---- merging (source only): the rows are written into the one weight every follower shares
    def check_merge(self, name: str, safe: bool) -> None:
        """Raise :class:`MergeError` now for what :meth:`merge` would refuse (nothing changes here)."""
        weight = self.base_layer.weight
        if weight.is_meta or self._rows(name).is_meta:
            raise MergeError(f"cannot merge the trainable tokens of adapter {name!r} on the meta device: load real "
                             "weights first")
        self._check_disjoint((*self._restore, name), MergeError)
        if safe:
            check_finite(self._rows(name).detach().to(weight.dtype), name, f"{self._path} (trainable tokens)")

    def merge(self, name: str) -> None:
        if name not in self.token_indices or name in self._restore:
            return
        weight = self.base_layer.weight
        index = self._index(name, weight.device)
        with torch.no_grad():
            old = weight.detach().index_select(0, index)  # the bits unmerge puts back
            weight.data.index_copy_(0, index, self._rows(name).detach().to(device=weight.device, dtype=weight.dtype))
        self._restore[name] = (index, old)
        self._changed()

    def unmerge(self, name: str) -> None:
        saved = self._restore.pop(name, None)
        if saved is not None:
            weight = self.base_layer.weight
            with torch.no_grad():
                weight.data.index_copy_(0, saved[0], saved[1])
            self._changed()

    def forget_merge(self, name: str) -> None:
        """Keep the merged rows; drop what unmerge needed (merge_and_unload)."""
        if self._restore.pop(name, None) is not None:
            self._changed()

    def extra_repr(self) -> str:
        if self.is_follower:
            return f"follows={self.source._path or 'its source'}"
        return f"tokens={ {k: len(v) for k, v in self.token_indices.items()} }, merged={list(self._restore)}"


# ------------------------------------------------------------------ planning (inject, before anything changes)
@attrs.frozen
class TokenPlan:
    """One module to give an adapter's rows, and the modules that share its weight and follow it."""

    path: str
    indices: tuple[int, ...]
    followers: tuple[str, ...]


def _is_saved_copy(module: nn.Module) -> bool:
    """A ``modules_to_save`` wrapper of the core, known by its layout (PEFT's ``original_module`` beside a
    ``modules_to_save`` dict of copies): its class is not part of the API plugins build on."""
    return "original_module" in module._modules and isinstance(module._modules.get("modules_to_save"), nn.ModuleDict)


def _units(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(path, module, raw)`` for the modules a config can name: all but the insides of adapter layers and of
    ``modules_to_save`` wrappers (the wrappers themselves are listed). ``raw`` holds the weight: the wrapped
    module of a wrapper, else the module. A module reachable under two paths is listed under both."""
    out: list[tuple[str, nn.Module, nn.Module]] = []
    closed: str | None = None
    for path, module in model.named_modules(remove_duplicate=False):
        if not path:
            continue
        if closed is not None and path.startswith(closed):
            continue
        closed = None
        raw = module
        if _is_saved_copy(module):
            raw, closed = module._modules["original_module"], path + "."
        elif is_adapter_layer(module):
            raw, closed = getattr(module, "base_layer", module), path + "."
        out.append((path, module, raw))
    return out


def _weight(module: nn.Module) -> torch.Tensor | None:
    return module._parameters.get("weight") if isinstance(module, nn.Module) else None


def _input_embedding(model: nn.Module, units: list[tuple[str, nn.Module, nn.Module]],
                     getter: str = "get_input_embeddings") -> str | None:
    """The path of the module transformers' ``get_input_embeddings()`` (or ``getter``) returns, if any."""
    get = getattr(model, getter, None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is None:
        return None
    return next((p for p, m, raw in units if m is emb or raw is emb), None)


def _kind(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def _embeddings(units: list[tuple[str, nn.Module, nn.Module]]) -> str:
    names = [p for p, _, raw in units if isinstance(raw, nn.Embedding)]
    return ", ".join(names[:10]) or "(none)"


def plan_trainable_tokens(model: nn.Module, config: LoraConfig, lora_targets: Sequence[str]) -> list[TokenPlan]:
    """Check ``config.trainable_token_indices`` against ``model`` and say what :func:`apply_trainable_tokens`
    will do; raises (ConfigError / TargetError naming the module and the fix) with the model untouched. Also
    checks, for every LoRA adapter, that its LoRA targets and ``modules_to_save`` leave alone the modules that
    trainable tokens of earlier adapters wrap."""
    units = _units(model)
    modules = {p: (m, raw) for p, m, raw in units}
    planned_lora = set(lora_targets)
    saved = tuple(config.modules_to_save or ())
    for path, module, _ in units:
        if not isinstance(module, TrainableTokensWrapper):
            continue
        role = (f"follows {module.source._path!r}, whose weight it shares" if module.is_follower
                else f"holds trainable tokens of adapter(s) {module.adapter_names}")
        if path in planned_lora:
            raise TargetError(f"target_modules includes {path!r}, which {role} (trainable_token_indices); LoRA cannot "
                              f"adapt it too (PEFT refuses this as well). Leave {path!r} out of target_modules")
        if saved and matches(path, saved):
            raise ConfigError(f"modules_to_save includes {path!r}, which {role} (trainable_token_indices); a module "
                              "is trained either fully or by tokens, not both. Leave it out of modules_to_save")
    spec = config.trainable_token_indices
    if spec is None:
        return []
    field = "trainable_token_indices"
    named: dict[str, tuple[int, ...]] = {}
    wanted: Mapping[str, tuple[int, ...]]
    if isinstance(spec, tuple):
        emb = _input_embedding(model, units)
        if emb is not None:
            named[emb] = spec
            wanted = {}
        else:  # PEFT's fallback when the model names no input embedding
            wanted = {"embed_tokens": spec}
    else:
        wanted = spec
    for key, indices in wanted.items():
        hits = [p for p, _, _ in units if matches(p, [key])]
        if not hits:
            raise TargetError(f"{field} names {key!r}, which matches no module of {type(model).__name__}; its "
                              f"embeddings are: {_embeddings(units)}. Use one of these names (or a list of indices "
                              "for the input embedding)")
        for p in hits:
            if p in named and named[p] != indices:
                raise ConfigError(f"{field}: two keys name {p!r} with different indices; give it once")
            named[p] = indices
    for path, indices in named.items():
        module, raw = modules[path]
        if _is_saved_copy(module) or (saved and matches(path, saved)):
            raise ConfigError(f"{field} names {path!r}, which modules_to_save trains fully; either train it fully "
                              f"(modules_to_save) or train some of its tokens ({field}), not both")
        if path in planned_lora or (is_adapter_layer(module) and not isinstance(module, TrainableTokensWrapper)):
            raise TargetError(f"{field} names {path!r}, which is also a LoRA target ({_kind(module)} of an adapter, "
                              "or in target_modules); PEFT refuses this too. Leave it out of target_modules, or "
                              f"drop {field} and adapt the whole embedding with LoRA")
        weight = _weight(raw)
        # an nn.Linear only as the output head (get_output_embeddings()): its rows are the tokens' output embeddings
        head = isinstance(raw, nn.Linear) and path == _input_embedding(model, units, "get_output_embeddings")
        if not (isinstance(raw, nn.Embedding) or head) or weight is None:
            raise TargetError(f"{field} names {path!r}, a {_kind(raw)}, which is not an embedding; trainable tokens "
                              "need a torch.nn.Embedding (or the model's torch.nn.Linear output head, "
                              f"get_output_embeddings()). Embeddings of this model: {_embeddings(units)}")
        if type(weight) not in (torch.Tensor, nn.Parameter) or not (weight.is_floating_point() or weight.is_meta):
            raise TargetError(f"{field} names {path!r}, whose weight is not a plain floating-point tensor "
                              f"({type(weight).__name__}, {weight.dtype}); trainable tokens cannot swap its rows")
        size = weight.shape[0]
        outside = [i for i in indices if i >= size]
        if outside:
            rows = "tokens" if isinstance(raw, nn.Embedding) else "output rows"
            raise ConfigError(f"{field}: index {outside[0]} is outside {path!r}, which has {size} {rows} (indices "
                              f"0..{size - 1}). Resize the embedding first (model.resize_token_embeddings) if these "
                              "are new tokens, or fix the indices")
    plans: list[TokenPlan] = []
    done: set[str] = set()
    for path in named:
        if path in done:
            continue
        weight = _weight(modules[path][1])
        group = [p for p, _, raw in units if _weight(raw) is weight]  # every module that shares this weight
        for p in group:
            module = modules[p][0]
            if p in planned_lora or _is_saved_copy(module) or (
                    is_adapter_layer(module) and not isinstance(module, TrainableTokensWrapper)):
                raise TargetError(f"{p!r} shares its weight with {path!r} (tied embeddings) and is adapted by LoRA or "
                                  f"modules_to_save; with {field} on {path!r} merging would change both. Leave "
                                  f"{p!r} out of target_modules/modules_to_save")
        source = _source_of(model, units, group, path)
        if source not in named:
            raise TargetError(f"{field} names {path!r}, which shares its weight with {source!r} (tied embeddings); "
                              f"give the indices for {source!r} (or a list, for the input embedding): the modules "
                              "sharing its weight follow it. Rows of a tied module alone would differ before and "
                              "after merging")
        for p in group:
            if p in named and named[p] != named[source]:
                raise ConfigError(f"{field} gives {p!r} and {source!r} different indices, but they share one weight "
                                  f"(tied embeddings); give the same indices, or name only {source!r} (the tied "
                                  "modules follow it)")
        done.update(group)
        plans.append(TokenPlan(path=source, indices=named[source], followers=tuple(p for p in group if p != source)))
    return plans


def _source_of(model: nn.Module, units: list[tuple[str, nn.Module, nn.Module]], group: list[str],
               named_path: str) -> str:
    """Which module of a weight-sharing group owns the rows: the one that already does, else the input
    embedding, else the group's only ``nn.Embedding``."""
    if len(group) == 1:
        return group[0]
    modules = {p: (m, raw) for p, m, raw in units}
    for p in group:
        module = modules[p][0]
        if isinstance(module, TrainableTokensWrapper):  # an earlier adapter's: its source keeps the rows
            return next(q for q in group if modules[q][0] is module.source)
    emb = _input_embedding(model, units)
    if emb in group:
        return emb  # type: ignore[return-value]
    embeddings = [p for p in group if isinstance(modules[p][1], nn.Embedding)]
    if len(embeddings) == 1:
        return embeddings[0]
    raise TargetError(f"trainable_token_indices names {named_path!r}, whose weight is shared by {group}; none of them "
                      "is the model's input embedding, so which one owns the trainable rows is ambiguous")


def apply_trainable_tokens(model: nn.Module, adapter_name: str, plans: Sequence[TokenPlan],
                           runtime: AdapterRuntime) -> None:
    """Carry out :func:`plan_trainable_tokens`'s plans (after the checks passed): wrap, add the rows, follow."""
    for plan in plans:
        module = model.get_submodule(plan.path)
        if isinstance(module, TrainableTokensWrapper):
            source = module
        else:
            source = TrainableTokensWrapper(module, runtime, path=plan.path)
            model.set_submodule(plan.path, source)
        source.add(adapter_name, plan.indices)
        for path in plan.followers:
            follower = model.get_submodule(path)
            if not isinstance(follower, TrainableTokensWrapper):
                model.set_submodule(path, TrainableTokensWrapper(follower, runtime, path=path, source=source))


def _sources(model: nn.Module, adapter_name: str) -> list[TrainableTokensWrapper]:
    return [m for m in model.modules()
            if isinstance(m, TrainableTokensWrapper) and not m.is_follower and adapter_name in m.token_indices]


# ------------------------------------------------------------------ merge, unmerge, remove
def check_token_merge(model: nn.Module, adapter_name: str, safe: bool) -> list[TrainableTokensWrapper]:
    """The modules whose rows :func:`merge_tokens` will write; raises MergeError first if one would fail."""
    sources = _sources(model, adapter_name)
    for source in sources:
        source.check_merge(adapter_name, safe)
    return sources


def merge_tokens(sources: Sequence[TrainableTokensWrapper], adapter_name: str) -> None:
    done: list[TrainableTokensWrapper] = []
    try:
        for source in sources:
            if adapter_name not in source._restore:
                source.merge(adapter_name)
                done.append(source)
    except BaseException:
        for source in reversed(done):
            source.unmerge(adapter_name)
        raise


def unmerge_tokens(model: nn.Module, adapter_name: str) -> None:
    for source in _sources(model, adapter_name):
        source.unmerge(adapter_name)


def remove_tokens(model: nn.Module, adapter_name: str) -> None:
    """Drop the adapter's rows (a merged adapter's stay in the weight); put the original modules back where no
    adapter has rows any more, followers included."""
    wrappers = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, TrainableTokensWrapper)]
    emptied: set[int] = set()
    for _, module in wrappers:
        if not module.is_follower and adapter_name in module.token_indices and id(module) not in emptied:
            module.forget_merge(adapter_name)
            module.drop(adapter_name)
            if not module.token_indices:
                emptied.add(id(module))
    for path, module in wrappers:
        if id(module.source) in emptied:
            model.set_submodule(path, module.base_layer)


# ------------------------------------------------------------------ files
def token_state_dict(adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's rows, keyed as PEFT writes them (``base_model.model.<path>.token_adapter.trainable_tokens_delta``;
    followers hold none)."""
    tail = f"{DELTA}.{adapter_name}"
    return {model_to_disk_key(key[: -len(adapter_name) - 1]): value for key, value in state_dict.items()
            if key.startswith(MODEL_PREFIX) and key.endswith(tail)}


def map_token_keys(state_dict: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """The inverse, on keys already moved to the model's namespace: ``….trainable_tokens_delta`` gets the adapter
    name back."""
    return {f"{key}.{adapter_name}" if key.startswith(MODEL_PREFIX) and key.endswith(DELTA) else key: value
            for key, value in state_dict.items()}

