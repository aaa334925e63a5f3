"""Per-model adapter state that injected layers read at forward time.

One :class:`AdapterRuntime` belongs to one :class:`~peft_core.AdaptedModel`. Method plugins receive it
in ``inject`` and keep a reference in the layers they create, so activating, disabling or routing
adapters is a change of one attribute here — O(1), however many adapters or layers there are — and never
a walk over the model.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["BASE_ROW", "AdapterRuntime", "Routing"]

_COUNT_LOCK = threading.Lock()

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

    __slots__ = ("_routed_calls", "_routing", "active", "disabled")

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.disabled: bool = False
        self._routing: contextvars.ContextVar[Routing | None] = contextvars.ContextVar(
            "peft_core_routing", default=None)
        # How many routed calls are in flight, in any thread. While it is 0 no ContextVar is read: the
        # common path then stays a plain attribute read, which torch.compile (Dynamo) traces without a
        # graph break; it cannot trace ContextVar.get.
        self._routed_calls = 0

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

    # ContextVars are neither picklable nor deep-copyable; a copy gets a fresh one (no call in flight).
    def __getstate__(self) -> dict[str, Any]:
        return {"active": self.active, "disabled": self.disabled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.active = state["active"]
        self.disabled = state["disabled"]

    def __deepcopy__(self, memo: dict[int, Any]) -> AdapterRuntime:
        new = AdapterRuntime()
        new.active, new.disabled = self.active, self.disabled
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        return f"AdapterRuntime(active={self.active!r}, disabled={self.disabled!r})"
