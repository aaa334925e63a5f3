"""The base layer and its LoRA update as one operation, and sibling layers that read the same input together.

Why: at r = 16 the adapter adds 6-9% of a linear layer's arithmetic, but computed as autograd sees it (the base
``linear``, then ``x @ A.T`` and an in-place ``addmm_`` on a view of the output) a training step cost 1.35-1.45x
the frozen layer's on CPU: the in-place update on a view makes autograd copy the output gradient back, the two
input gradients (base and adapter) are summed into a fresh tensor, and each projection's ``x @ A.T`` is a skinny
product that runs far from peak. :class:`FusedLinear` is one autograd function for a group of base layers and
their adapters that read the same ``x`` (q/k/v of an attention, gate/up of an MLP, or a single layer):

- forward: per layer the base ``linear``, its ``x @ A.T`` and the update added into the base output in place (one
  product per layer on purpose: a GEMM's rounding can depend on its width, and a layer's output must be the same
  bits whichever siblings it was computed with);
- backward: the input gradient is accumulated into one buffer (``g_1 @ W_1``, then ``addmm_`` of every other
  layer's ``g_i @ W_i`` and of the adapters' ``gh @ [A_1; A_2; ...]``), the A gradients are one product, and
  nothing output-sized is copied.

The maths is today's (same products, same dtypes: adapter weights cast to the activation dtype, the update added
with ``alpha = scaling``), so outputs and gradients match the ordinary route to rounding.

**Which layers are siblings** is not guessed from names: the inject hook links the LoRA linear layers of one
parent module that have the same input width (:func:`link_siblings`) as *candidates*, and a
:class:`SiblingGroup` watches which of them are really called with the same tensor object. Until one whole round
of calls confirms it, every member takes the ordinary route; once confirmed, the first member called computes the
group and leaves the others' outputs for them, each taken only if that member is called with the very same
``x`` (object and version) in the same state; anything else (T5's cross-attention keys read the encoder output)
takes the ordinary route, and the group is re-learned. Nothing here runs while saved-tensor hooks are active
(gradient checkpointing, activation offloading): a recomputation must save exactly what the forward saved, and a
group's state may not change in between.

Which calls take this route (:func:`plan`): a plain ``nn.Linear`` / transformers ``Conv1D`` base whose weights do
not train and that has no hooks, at most one live adapter without a variant or ``lora_bias``, while training no
dropout or lora_linear's sparse one (each member draws its own positions, in call order, so the masks are the
ordinary route's; a dense mask stays there), no autocast, not under ``torch.compile``, and adapter weights in the
activation dtype or fp32 adapters on a half-precision model (cast as the ordinary route casts them). The fp32 route
for half-precision models (:func:`peft_lora.functional.fp32_route`) and mixed batches keep their own routes.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from . import functional
from .functional import fp32_route
from .hardware import choices as kernel_choices

if TYPE_CHECKING:
    from torch import nn

    from .layers import LoraLinear

__all__ = ["FusedLinear", "SiblingGroup", "fused_forward", "link_siblings"]

_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks


class _Member(NamedTuple):
    """One layer of a fused call: its base weight (``transposed``: stored in x out, transformers' Conv1D), bias,
    and its live adapter's A, B and scaling (``a is None``: no live adapter, the base layer only)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool
    a: torch.Tensor | None
    b: torch.Tensor | None
    scaling: float
    fp32: bool = False  # inference on lora_linear's fp32 route: the update is computed in fp32, rounded once
    p: float = 0.0  # training with lora_linear's sparse dropout: its own positions drawn for this member


def _own_output() -> tuple[type, ...]:
    from .layers import _OWN_OUTPUT  # layers imports this module

    return _OWN_OUTPUT


def plan(layer: LoraLinear, x: torch.Tensor, inference: bool = False) -> _Member | None:
    """What the fused route computes for ``layer`` on ``x``, or None when the call must take the ordinary route.
    ``inference``: a no-grad call, which may take lora_linear's fp32 route here too."""
    base = layer.base_layer
    if type(base) not in _own_output() or not layer.inplace_output or base._forward_hooks or base._forward_pre_hooks:
        return None
    weight, bias = base.weight, base.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad) or weight.dtype != x.dtype:
        return None
    names = layer._live()
    if not names:
        return _Member(weight, bias, layer.transposed, None, None, 0.0)
    if len(names) > 1:
        return None
    name = names[0]
    if name in layer.variants or layer.lora_bias[name]:
        return None
    p = layer.dropout_p[name] if layer.training else 0.0
    # dropout: only lora_linear's sparse draw is done here (a dense mask, CUDA's, stays on the ordinary route), and
    # not in an inference program, which is cached across calls (each call must draw afresh)
    if p > 0.0 and (inference or p > kernel_choices(x.device, x.dtype).sparse_dropout_max_p):
        return None
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if a.dtype != x.dtype and not (a.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)):
        return None
    if a.dtype != x.dtype and fp32_route(x, a):  # lora_linear's fp32 route is the faster one here
        return _Member(weight, bias, layer.transposed, a, b, layer.scaling[name], True) if inference else None
    return _Member(weight, bias, layer.transposed, a, b, layer.scaling[name], False, p)


def _base(x: torch.Tensor, m: _Member) -> torch.Tensor:
    if m.transposed:  # Conv1D: bias + x @ W, as transformers computes it
        out = x.reshape(-1, x.shape[-1]) @ m.weight if m.bias is None else torch.addmm(
            m.bias, x.reshape(-1, x.shape[-1]), m.weight)
        return out.view(*x.shape[:-1], m.weight.shape[1])
    return F.linear(x, m.weight, m.bias)


def _stack(members: tuple[_Member, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The adapted members' A matrices stacked, in ``dtype``."""
    adapted = [m.a for m in members if m.a is not None]
    if not adapted:
        return None
    return (torch.cat(adapted) if len(adapted) > 1 else adapted[0]).to(dtype)


def _compute(x: torch.Tensor, members: tuple[_Member, ...]) -> tuple[list[torch.Tensor], torch.Tensor | None,
                                                                     list[torch.Tensor], list[torch.Tensor]]:
    """Every member's output, with the stacked A (cast to the activation dtype), each adapted member's bottleneck
    ``x @ A.T`` (of the dropped input where it has dropout), and each dropout member's dropped positions."""
    a_cat = _stack(members, x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    outs: list[torch.Tensor] = []
    hs: list[torch.Tensor] = []
    drops: list[torch.Tensor] = []
    offset = 0
    for m in members:
        out = _base(x, m)
        if m.a is not None:
            r = m.a.shape[0]
            a = a_cat[offset:offset + r]
            # one product per member, not one x @ [A_1; A_2; ...].T split after: a GEMM's rounding can depend on
            # its width (AVX-512 kernels round an 8-column product differently from a 24-column one), and a
            # layer's output must not depend on which siblings it was computed with (the first call of a group
            # takes the single-layer route); the stacked A still serves the backward's wide products
            if m.p:  # lora_linear's sparse dropout, drawn in member (= call) order as the ordinary route draws
                h, positions = functional.dropped_bottleneck(x2, a, m.p)
                drops.append(positions)
            else:
                h = x2 @ a.t()
            out.view(-1, out.shape[-1]).addmm_(h, m.b.to(x.dtype).t(), alpha=m.scaling)
            hs.append(h)
            offset += r
        outs.append(out)
    return outs, a_cat, hs, drops


class FusedLinear(torch.autograd.Function):
    """``apply(members, x, *adapter weights)``: the outputs of a group of base layers with their LoRA updates.

    The adapter weights are passed as inputs (A and B of every adapted member, in order) so autograd gives them
    gradients; the base weights are frozen (checked by :func:`plan`) and travel in ``members``."""

    @staticmethod
    def forward(ctx: Any, members: tuple[_Member, ...], x: torch.Tensor, *weights: torch.Tensor) -> tuple[
            torch.Tensor, ...]:
        outs, a_cat, hs, drops = _compute(x, members)
        ctx.members = members
        ctx.adapted, ctx.dropped = len(hs), len(drops)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, a_cat, *hs, *drops, *weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, a_cat, *saved = ctx.saved_tensors
        hs, drops = saved[:ctx.adapted], saved[ctx.adapted:ctx.adapted + ctx.dropped]
        weights = saved[ctx.adapted + ctx.dropped:]
        members: tuple[_Member, ...] = ctx.members
        need_x = ctx.needs_input_grad[1]
        x2 = x.reshape(-1, x.shape[-1])
        dtype = x.dtype
        gx: torch.Tensor | None = None

        def add_x(g: torch.Tensor, w: torch.Tensor) -> None:  # gx += g @ w, into one buffer
            nonlocal gx
            gx = g @ w if gx is None else gx.addmm_(g, w)

        # members without dropout share the wide products: gx += [gh_1 gh_2 ...] @ [A_1; A_2; ...] and one
        # [gh_1 gh_2 ...].T @ x for their A gradients; a dropout member's input differs (its own dropped copy)
        gh_parts: list[torch.Tensor] = []
        wide: list[tuple[int, int, int]] = []  # (slot of its A gradient, first row in a_cat, r)
        weight_grads: list[torch.Tensor | None] = []
        row = 0
        adapted = dropped = 0
        for m, g in zip(members, grads):
            g2 = g.reshape(-1, g.shape[-1]) if g is not None else None
            if g2 is not None and need_x:
                add_x(g2, m.weight.t() if m.transposed else m.weight)
            if m.a is None:
                continue
            r = m.a.shape[0]
            h = hs[adapted]
            adapted += 1
            first, row = row, row + r
            pos = drops[dropped].long() if m.p else None
            dropped += 1 if m.p else 0
            if g2 is None:  # this output was not used (taken by no one): no gradient for its adapter
                weight_grads += [None, None]
                continue
            b = m.b.to(dtype)
            # (h.T @ g).T, not g.T @ h: the same numbers, and 1.3-1.7x faster on CPU (the long dimension is then the
            # reduction of a well-shaped product); one copy makes it contiguous, in B's dtype
            gb = (h.t() @ g2).mul_(m.scaling).t().to(m.b.dtype, memory_format=torch.contiguous_format)
            if pos is None:
                wide.append((len(weight_grads), first, r))
                gh_parts.append((g2 @ b).mul_(m.scaling))
                weight_grads += [None, gb]
                continue
            # lora_linear's sparse dropout backward: its own input gradient (zero where dropped) is added after
            ga, part = functional.dropped_backward(x2, g2, a_cat[first:first + r], b, m.scaling, m.p, pos,
                                                   ctx.needs_input_grad[2 + len(weight_grads)], need_x)
            if part is not None:
                gx = part if gx is None else gx.add_(part)
            weight_grads += [ga.to(m.a.dtype) if ga is not None else None, gb]
        if gh_parts:
            gh = torch.cat(gh_parts, 1) if len(gh_parts) > 1 else gh_parts[0]
            # a_cat itself unless some adapted member is not in the wide part (dropout, or an unused output)
            a_wide = a_cat if len(wide) == ctx.adapted else torch.cat([a_cat[f:f + r] for _, f, r in wide])
            if need_x:
                add_x(gh, a_wide)
            ga_all = gh.t() @ x2
            offset = 0
            for slot, _, r in wide:
                weight_grads[slot] = ga_all[offset:offset + r].to(weights[slot].dtype)
                offset += r
        if gx is not None:
            gx = gx.view(x.shape)
        wanted = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(weight_grads)]
        return (None, gx, *wanted)


def _run(x: torch.Tensor, members: tuple[_Member, ...]) -> tuple[torch.Tensor, ...]:
    weights = [w for m in members if m.a is not None for w in (m.a, m.b)]
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return FusedLinear.apply(members, x, *weights)
    with torch.no_grad():
        return tuple(_compute(x, members)[0])


class _Program(NamedTuple):
    """An inference call's plans, prepared once and kept while the layers' state and the adapter tensors stay the
    same: decoding runs each layer thousands of times with a token or two, where re-deriving the plans, stacking A
    and casting B cost more than the update's products."""

    key: tuple[Any, ...]
    members: tuple[_Member, ...] | None  # None: this state takes the ordinary route
    failed: LoraLinear | None  # then, the first layer whose own plan said so
    fp32: bool  # the update in fp32 (lora_linear's fp32 route), rounded once into the output
    steps: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]  # per member: its A.T and B.T in the product dtype
    sources: tuple[tuple[torch.Tensor, int, int], ...]  # what the A.T and B.T were made from: (tensor, ptr, version)


def _state(layers: list[LoraLinear], x: torch.Tensor) -> tuple[Any, ...]:
    """What plan() reads that can change between calls without touching a tensor; the base layers' hooks are in it
    as counts (a hook added later must run). Written for speed: it runs in every layer of every decoding step."""
    key: list[Any] = [x.dtype, x.device, x.numel() // x.shape[-1]]
    for m in layers:
        base = m._modules["base_layer"]
        weight = base._parameters.get("weight")
        key.append((m._generation, m._live(), m.training, len(base._forward_hooks) + len(base._forward_pre_hooks),
                    weight is None or weight.requires_grad))
    return tuple(key)


def _prepare(key: tuple[Any, ...], layers: list[LoraLinear], x: torch.Tensor) -> _Program:
    plans = []
    for m in layers:
        p = plan(m, x, inference=True)
        if p is None:  # remembered too: a call that must take the ordinary route should learn it once per state
            return _Program(key, None, m, False, (), ())
        plans.append(p)
    members = tuple(plans)
    routes = {m.fp32 for m in members if m.a is not None}
    if len(routes) > 1:  # some adapters on the fp32 route and some not: each takes its own (ordinary) route
        return _Program(key, None, None, False, (), ())
    fp32 = routes == {True}
    dtype = torch.float32 if fp32 else x.dtype
    # per member, not one stacked A: the outputs must not depend on which siblings were computed together (_compute)
    steps = tuple(None if m.a is None else (m.a.detach().to(dtype).t(), m.b.detach().to(dtype).t()) for m in members)
    sources = tuple((t, t.data_ptr(), t._version) for m in members if m.a is not None for t in (m.a, m.b))
    return _Program(key, members, None, fp32, steps, sources)


def _inference(owner: Any, layers: list[LoraLinear], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """No-grad call of ``layers`` on ``x`` through the fused route with ``owner``'s cached program, or None."""
    key = _state(layers, x)
    prog: _Program | None = owner.__dict__.get("_program")
    if prog is None or prog.key != key or any(t.data_ptr() != p or t._version != v for t, p, v in prog.sources):
        prog = owner.__dict__["_program"] = _prepare(key, layers, x)
    if prog.members is None:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if prog.fp32:
        x2 = x2.float()
    outs = []
    for m, step in zip(prog.members, prog.steps):
        out = _base(x, m)
        if step is not None:
            h = x2 @ step[0]
            if prog.fp32:  # as lora_linear's fp32 route: base output + update summed in fp32, rounded once
                out = torch.addmm(out.view(-1, out.shape[-1]).float(), h, step[1],
                                  alpha=m.scaling).to(x.dtype).view(out.shape)
            else:
                out.view(-1, out.shape[-1]).addmm_(h, step[1], alpha=m.scaling)
        outs.append(out)
    return tuple(outs)


class _Stash(NamedTuple):
    """Outputs a group's first member computed for the others, valid for that very input in that state."""

    x: weakref.ref[torch.Tensor]
    version: int
    grad: bool
    outputs: dict[LoraLinear, tuple[torch.Tensor, tuple[str, ...]]]


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version  # inference tensors keep no version counter


class SiblingGroup:
    """Candidate siblings (LoRA linear layers of one parent with the same input width), learning which of them are
    fed the same tensor; see the module docstring."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.confirmed = False
        self._first: weakref.ref[torch.Tensor] | None = None  # the round being watched: its first input
        self._same: list[LoraLinear] = []
        self._other: list[LoraLinear] = []
        self._stash: _Stash | None = None
        for m in members:
            m.__dict__["_siblings"] = self

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer(x)`` from the group's fused call, or None (the caller takes the single-layer route)."""
        if not self.confirmed and (not self._watch(layer, x) or layer.__dict__.get("_siblings") is not self):
            return None
        stash = self._stash
        if stash is not None:
            found = stash.outputs.pop(layer, None)
            if found is not None:
                if (stash.x() is x and _version(x) == stash.version and stash.grad == torch.is_grad_enabled()
                        and found[1] == layer._live()):
                    return found[0]
                self._relearn()  # this member was not fed the first one's input after all
                return None
            if stash.outputs:  # members not called since the last fused call: not fed that input, it seems
                self._relearn()
                return None
        # the first member of this call: compute the whole group if every member can take the fused route
        if not torch.is_grad_enabled():
            found_outs = _inference(self, self.members, x)
            if found_outs is None:
                return None
            outs = found_outs
        else:
            if plan(layer, x) is None:
                return None
            plans = []
            for m in self.members:
                p = plan(m, x) if m.training == layer.training else None
                if p is None:
                    return None
                plans.append(p)
            outs = _run(x, tuple(plans))
        self._stash = _Stash(weakref.ref(x), _version(x), torch.is_grad_enabled(),
                             {m: (o, m._live()) for m, o in zip(self.members, outs) if m is not layer})
        return outs[self.members.index(layer)]

    def _relearn(self) -> None:
        self.confirmed = False
        self._stash = None
        self._first = None

    def _watch(self, layer: LoraLinear, x: torch.Tensor) -> bool:
        """Record an ordinary-route call while unconfirmed; True when this call ends a round that confirmed the
        group (the caller is then the first member of a new fused call)."""
        if self._first is None or layer in self._same or layer in self._other:
            # a member called again ends the round (the first input may be gone by then: the next forward)
            if self._first is not None and self._decide():
                return True
            self._first, self._same, self._other = weakref.ref(x), [layer], []
            return False
        (self._same if self._first() is x else self._other).append(layer)
        return False

    def _decide(self) -> bool:
        """End of a watched round: confirm the members that shared the first input; the others become candidates of
        their own (they may share another input). True when this group is confirmed."""
        same, other = self._same, self._other
        self._first, self._same, self._other = None, [], []
        if not other and len(same) < 2:
            return False  # one member called twice: nothing learned yet
        rest = [m for m in self.members if m not in same]
        if len(rest) > 1:
            SiblingGroup(rest)
        for m in rest if len(rest) == 1 else ():
            m.__dict__["_siblings"] = None
        if len(same) < 2:
            for m in same:
                m.__dict__["_siblings"] = None
            return False
        self.members = [m for m in self.members if m in same]
        self.confirmed = True
        return True


def fused_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` through the fused route, or None when the ordinary route must run (see the module docstring)."""
    if (layer._runtime.disabled or _top_hooks(False) is not None or _global_forward_hooks
            or _global_forward_pre_hooks or torch.is_autocast_enabled(x.device.type)):
        return None  # disabled: the ordinary route is the base layer alone, cheaper than any bookkeeping
    group = layer.__dict__.get("_siblings")
    if group is not None:
        out = group.forward(layer, x)
        if out is not None:
            return out
        tried = group.__dict__.get("_program")
        if tried is not None and tried.failed is layer:  # its own plan refused the group's inference call: alone too
            return None
    if not torch.is_grad_enabled():
        outs = _inference(layer, [layer], x)
        return outs[0] if outs is not None else None
    p = plan(layer, x)
    if p is None:
        return None
    return _run(x, (p,))[0]


def link_siblings(model: nn.Module) -> None:
    """Make the LoRA linear layers of each parent module with the same input width candidate siblings."""
    from .layers import _OWN_OUTPUT, LoraLinear

    for parent in model.modules():
        by_width: dict[int, list[LoraLinear]] = {}
        for child in parent.children():
            if isinstance(child, LoraLinear) and type(child.base_layer) in _OWN_OUTPUT:
                by_width.setdefault(child.in_features, []).append(child)
        for members in by_width.values():
            if len(members) > 1:
                SiblingGroup(members)  # learned afresh: the layers' adapters just changed
