"""A re-entrant lock that survives ``copy.deepcopy`` and pickling (each copy gets a fresh, unheld lock).

LoRA layers that run their base module with an adapted tensor swapped in for one call (``LoraParameter``,
``LoraMultiheadAttention``: ``torch.func.functional_call``) take turns through it: two threads overlapping there
would each restore what the other put in. A bare ``threading.RLock`` cannot be copied, and models are."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["SwapLock"]


class SwapLock:
    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.RLock()
