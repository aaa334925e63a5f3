"""Per-model adapter state that injected layers read at forward time.

One :class:`AdapterRuntime` belongs to one :class:`~peft_core.AdaptedModel`. Method plugins receive it
in ``inject`` and keep a reference in the layers they create, so activating, disabling or routing
adapters is a change of one attribute here — O(1), however many adapters or layers there are — and never
a walk over the model.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["BASE_ROW", "AdapterRuntime", "Routing"]

_COUNT_LOCK = threading.Lock()
_KEYS = itertools.count()
#: Live runtimes by key: the compiled-graph gate operator (below) finds its runtime from an int argument, since
#: a custom operator cannot take a Python object.
_RUNTIMES: weakref.WeakValueDictionary[int, AdapterRuntime] = weakref.WeakValueDictionary()

#: The row name that means "no adapter" in mixed-batch inference (``adapter_names=[...]``).
BASE_ROW = "__base__"


class Routing:
    """One forward call's per-row adapter names, plus a scratch cache shared by all layers of the call.

    Layers may memoize derived values (index tensors, stacked weights) in :attr:`cache` so the work is
    done once per call instead of once per layer.
    """

    __slots__ = ("cache", "names")

    def __init__(self, names: Sequence[str]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.cache: dict[Any, Any] = {}


class AdapterRuntime:
    """Which adapters are active, whether adapters are disabled, and the current call's routing.

    ``active`` and ``disabled`` are model-wide (set by ``set_adapter`` / ``disable_adapter``: not safe
    to change while another thread runs the model). The routing is a context variable, so concurrent
    calls with different ``adapter_names`` in different threads do not see each other's rows.
    """

    __slots__ = ("__weakref__", "_active", "_disabled", "_gate_cache", "_key", "_routed_calls", "_routing", "filling",
                 "gates", "slots")

    def __init__(self) -> None:
        self._active: tuple[str, ...] = ()
        self._disabled: bool = False
        #: adapter name -> its column in :meth:`gate_rows` (assigned once, by :meth:`slot`, never reused)
        self.slots: dict[str, int] = {}
        #: True while ``load_adapter`` injects: every tensor the adapter owns is then overwritten from the file right
        #: after ``inject`` (a file missing one is refused and the model restored), so a plugin may create those
        #: tensors without their random initialisation (nothing else may depend on the skipped values)
        self.filling = False
        #: 1.0 at the slot of each active adapter, 0.0 elsewhere and everywhere while disabled: the gates of an
        #: unrouted call, kept in step by the ``active``/``disabled`` setters and updated in place, so a compiled
        #: graph reads the current values without a guard on them (see :meth:`gate_rows`)
        self.gates = torch.zeros(0)
        self._key = next(_KEYS)
        _RUNTIMES[self._key] = self
        self._gate_cache: tuple[Any, torch.Tensor] | None = None
        self._routing: contextvars.ContextVar[Routing | None] = contextvars.ContextVar(
            "peft_core_routing", default=None)
        # How many routed calls are in flight, in any thread. While it is 0 no ContextVar is read: the
        # common path then stays a plain attribute read, which torch.compile (Dynamo) traces without a
        # graph break; it cannot trace ContextVar.get.
        self._routed_calls = 0

    @property
    def active(self) -> tuple[str, ...]:
        return self._active

    @active.setter
    def active(self, names: tuple[str, ...]) -> None:
        self._active = tuple(names)
        self._refresh_gates()

    @property
    def disabled(self) -> bool:
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disabled = bool(value)
        self._refresh_gates()

    def _refresh_gates(self) -> None:
        with torch.no_grad():
            self.gates.zero_()
            if not self._disabled:
                for name in self._active:
                    column = self.slots.get(name)
                    if column is not None:
                        self.gates[column] = 1.0

    def routing(self) -> Routing | None:
        """The per-row routing of the forward call in progress, or None (all rows use ``active``)."""
        if not self._routed_calls:
            return None
        return self._routing.get()

    @contextmanager
    def route(self, names: Sequence[str]) -> Iterator[Routing]:
        token = self._routing.set(Routing(names))
        with _COUNT_LOCK:  # `+= 1` is not atomic across threads; a lost update could hide a routing
            self._routed_calls += 1
        try:
            yield self._routing.get()  # type: ignore[misc]
        finally:
            with _COUNT_LOCK:
                self._routed_calls -= 1
            self._routing.reset(token)

    # ---- compiled graphs
    def slot(self, name: str) -> int:
        """The column of adapter ``name`` in :meth:`gate_rows` (layers call it when they add the adapter)."""
        if name not in self.slots:
            self.slots[name] = len(self.slots)
            with torch.inference_mode(False):  # an inference tensor could not be updated outside inference mode
                self.gates = torch.zeros(len(self.slots))  # a new width: graphs that read it recompile (new adapter)
            self._refresh_gates()
        return self.slots[name]

    def gate_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row gates for a layer inside a ``torch.compile``d graph: 1 where a row's adapter is on, else 0, as
        a tensor indexed ``[..., slots[name]]`` that broadcasts against ``x``'s rows.

        Nothing the graph is specialised on changes with ``set_adapter``, ``disable_adapter`` or a mixed batch's
        names, so those compile nothing new. Unrouted calls read :attr:`gates` (a ``(width,)`` tensor on the CPU,
        updated in place; its 0-d entries act as scalars on any device). While a routed call is in flight (in any
        thread) the graph instead calls a custom operator, opaque to Dynamo and run when the graph runs, which
        reads this thread's routing: ``(x.shape[0], width)`` in ``x``'s dtype and device. The branch between the
        two is the one value the graph is specialised on (so the first mixed batch compiles once more). A layer
        computes every adapter it holds and weights each by its gate (1 or 0, so exact).
        """
        if self._routed_calls:
            return torch.ops.peft_core.gate_rows(x, self._key, len(self.slots))
        return self.gates

    def _gates(self, rows: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        routing = self.routing()
        key = (self._active, self._disabled, routing, rows, width, device, dtype)
        cached = self._gate_cache
        if cached is not None and cached[0] == key:
            return cached[1].clone()  # a fresh tensor: the graph owns (and may reuse) an operator's output
        if self.disabled:
            table = torch.zeros(rows, width)
        elif routing is None:
            row = torch.zeros(width)
            for name in self.active:
                if self.slots.get(name, width) < width:
                    row[self.slots[name]] = 1.0
            table = row.expand(rows, width)
        else:
            if len(routing.names) != rows:
                from .errors import AdapterError

                raise AdapterError(f"adapter_names has {len(routing.names)} entries but a layer saw {rows} rows")
            table = torch.zeros(rows, width)
            for i, name in enumerate(routing.names):
                column = self.slots.get(name)
                if column is not None and column < width:
                    table[i, column] = 1.0
        gates = table.to(device=device, dtype=dtype).contiguous()
        self._gate_cache = (key, gates)
        return gates.clone()

    # ContextVars are neither picklable nor deep-copyable; a copy gets a fresh one (no call in flight).
    def __getstate__(self) -> dict[str, Any]:
        return {"active": self.active, "disabled": self.disabled, "slots": dict(self.slots)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        for name in state.get("slots", {}):
            self.slot(name)
        self.active = state["active"]
        self.disabled = state["disabled"]

    def __deepcopy__(self, memo: dict[int, Any]) -> AdapterRuntime:
        new = AdapterRuntime()
        for name in self.slots:
            new.slot(name)
        new.active, new.disabled = self.active, self.disabled
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        return f"AdapterRuntime(active={self.active!r}, disabled={self.disabled!r})"


@torch.library.custom_op("peft_core::gate_rows", mutates_args=())
def _gate_rows_op(x: torch.Tensor, key: int, width: int) -> torch.Tensor:
    runtime = _RUNTIMES.get(key)
    if runtime is None:  # the model was freed but a graph compiled for it still runs
        return x.new_zeros((x.shape[0], width))
    return runtime._gates(x.shape[0], width, x.device, x.dtype)


@_gate_rows_op.register_fake
def _(x: torch.Tensor, key: int, width: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], width))
