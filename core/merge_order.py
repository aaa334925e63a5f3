"""The order of merges: adapters are unmerged newest first, so each method may restore weights exactly.

A method's exact restore (:mod:`peft_core.merging`) describes the change from the weights as they were
when it merged. Undoing an older merge under a newer one would apply it to the wrong weights, so to
unmerge an adapter the core unmerges every adapter merged after it, then merges those again.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["MergeStack"]


class MergeStack:
    """Merged adapters, oldest first; ``merge``/``unmerge`` call the method's hook through ``call``."""

    def __init__(self, call: Callable[..., object]) -> None:
        self._call = call  # call(adapter_name, hook, **kwargs)
        self.merged: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.merged

    def __bool__(self) -> bool:
        return bool(self.merged)

    def merge(self, adapter_name: str, safe: bool) -> None:
        self._call(adapter_name, "merge", safe=safe)
        self.merged.append(adapter_name)

    def unmerge(self, adapter_name: str) -> None:
        later = self.merged[self.merged.index(adapter_name) + 1:]
        for name in reversed(later):
            self._call(name, "unmerge")
        self._call(adapter_name, "unmerge")
        self.merged.remove(adapter_name)
        for name in later:
            self._call(name, "merge", safe=False)

    def unmerge_all(self) -> list[str]:
        """Unmerge everything, newest first; returns what was merged (oldest first) to merge it back."""
        was = list(self.merged)
        for name in reversed(was):
            self.unmerge(name)
        return was
