"""The one small hierarchy of errors peft-core raises.

Every error subclasses :class:`PeftCoreError` and a builtin that says what kind of mistake it is
(``ValueError`` for bad input, ``LookupError`` for something missing, ``TypeError`` for a contract
broken by a plugin), so callers can catch either. Messages name the culprit and the fix.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "MergeError",
    "MethodNotInstalledError",
    "PeftCoreError",
    "PluginContractError",
    "PluginError",
    "TargetError",
]


class PeftCoreError(Exception):
    """Base class of every error raised by peft-core and its plugins."""


class ConfigError(PeftCoreError, ValueError):
    """A configuration value (or an ``adapter_config.json``) is invalid."""


class TargetError(PeftCoreError, ValueError):
    """A method could not find, or cannot adapt, the modules it was told to target."""


class AdapterError(PeftCoreError, ValueError):
    """Misuse of adapter names: unknown, duplicate, colliding with a module attribute."""


class CheckpointError(PeftCoreError, ValueError):
    """An adapter folder or weights file is missing, corrupt or does not fit the model."""


class MergeError(PeftCoreError, ValueError):
    """A merge or unmerge was refused (NaN/Inf, not mergeable, nothing merged)."""


class MethodNotInstalledError(PeftCoreError, LookupError):
    """A method (``peft_type``) was asked for but no installed plugin provides it."""


class PluginError(PeftCoreError, RuntimeError):
    """A plugin failed to load, to validate, or raised inside a hook."""


class PluginContractError(PluginError, TypeError):
    """A plugin's hook returned something the hook contract does not allow."""
