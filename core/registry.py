"""Discovers method plugins through entry points and dispatches hook calls to the owning plugin.

- Entry points of the ``peft_core.methods`` group load one at a time. A plugin that fails to import,
  to validate against the hook contract, or to declare its methods is reported (:class:`BrokenPlugin`)
  and skipped — unless strict mode is on (``PEFT_CORE_STRICT=1`` or ``strict=True``), then it raises.
- ``PEFT_CORE_PLUGINS`` selects plugins by entry-point name: unset loads all, ``"lora,prefix_tuning"``
  loads those, ``""`` or ``"none"`` loads none.
- Tests register a plugin in-process with :meth:`Registry.register` and drop it with
  :meth:`Registry.unregister` (or the :meth:`Registry.plugin` context manager).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .config import PeftConfig
from .errors import MethodNotInstalledError, PluginContractError, PluginError
from .spec import MethodSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "STRICT_ENV",
    "BrokenPlugin",
    "PluginRecord",
    "Registry",
    "get_registry",
    "reset_registry",
]

ENTRY_POINT_GROUP = "peft_core.methods"
STRICT_ENV = "PEFT_CORE_STRICT"
PLUGINS_ENV = "PEFT_CORE_PLUGINS"
IN_PROCESS = "<in-process>"

#: Which distribution provides a well-known method, for "install X" messages.
KNOWN_PROVIDERS = {"LORA": "peft-core", "PROMPT_TUNING": "peft-core", "PREFIX_TUNING": "peft-core"}


@attrs.frozen
class PluginRecord:
    """A registered plugin: where it came from and what it declared."""

    name: str
    distribution: str
    version: str
    plugin: Any = attrs.field(eq=False, repr=False)
    methods: tuple[MethodSpec, ...]


@attrs.frozen
class BrokenPlugin:
    """A plugin that was skipped, with enough to act on it."""

    name: str
    distribution: str
    version: str
    error: str
    hint: str

    def describe(self) -> str:
        version = f" {self.version}" if self.version else ""
        return f"plugin {self.name!r} from {self.distribution}{version} was skipped: {self.error}. {self.hint}"


def _strict_from_env() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _selection_from_env() -> set[str] | None:
    raw = os.environ.get(PLUGINS_ENV)
    if raw is None:
        return None
    names = {p.strip() for p in raw.split(",") if p.strip()}
    return set() if names == {"none"} else names


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(__import__("torch"), "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0] if text else type(exc).__name__


class Registry:
    """The plugin manager plus what the core needs to dispatch: method name -> owning plugin."""

    def __init__(self, *, strict: bool | None = None) -> None:
        self.strict = _strict_from_env() if strict is None else strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._records: dict[str, PluginRecord] = {}
        self._methods: dict[str, tuple[MethodSpec, PluginRecord]] = {}
        self._broken: list[BrokenPlugin] = []
        self._callers: dict[tuple[str, str], Any] = {}
        self._implements: dict[tuple[str, str, bool], bool] = {}  # both caches: until the set of plugins changes
        # hookimpl code object -> (its plugin, the hook): to name who raised, and in which hook
        self._codes: dict[Any, tuple[PluginRecord, str]] | None = None
        self._lock = threading.RLock()
        self._loaded = False
        self._loading = False

    # ------------------------------------------------------------------ discovery
    def load_entry_points(self) -> None:
        """Load every selected entry point of :data:`ENTRY_POINT_GROUP`, one at a time."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            self._loading = True
            try:
                self._load_selected()
            finally:
                self._loading = False
            # a plugin may implement a hook that another plugin publishes (add_hookspecs), whichever loaded
            # first: only now can a hook that nobody specifies be told from one specified later
            for record in list(self._records.values()):
                try:
                    self._check_specified(record.plugin, self._label(record.name, record.distribution,
                                                                     record.version))
                except PluginError as exc:
                    self._unregister_record(record)
                    self._broken_or_raise(record.name, record.distribution, record.version, exc,
                                          "It implements a hook that is neither in this peft-core's hook contract "
                                          "nor published by an installed plugin; install the plugin it extends, or "
                                          f"upgrade {record.distribution}; {PLUGINS_ENV} can exclude it meanwhile.")

    def _load_selected(self) -> None:
        selection = _selection_from_env()
        if selection:
            available = {ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP)}
            for typo in sorted(selection - available):  # PEFT_CORE_PLUGINS=lora,lorra must not pass in silence
                self._broken_or_raise(typo, "<not installed>", "", LookupError(
                    f"{PLUGINS_ENV} names {typo!r}, but no installed plugin has that entry-point name"),
                    f"Installed plugins: {', '.join(sorted(available)) or 'none'}; fix {PLUGINS_ENV} or install it.")
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):  # one at a time
            if selection is not None and ep.name not in selection:
                continue
            if ep.name in self._records:
                continue
            dist = getattr(ep, "dist", None)
            dname = dist.metadata["Name"] if dist is not None else "<unknown distribution>"
            dver = dist.version if dist is not None else "?"
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must never break the core or the CLI
                self._broken_or_raise(ep.name, dname, dver, exc,
                                      f"Its code failed to import ({ep.value}). Upgrade or reinstall "
                                      f"it (pip install -U {dname}), or uninstall it; "
                                      f"{PLUGINS_ENV} can exclude it meanwhile.")
                continue
            try:
                self.register(plugin, name=ep.name, distribution=dname, version=dver)
            except PluginError as exc:
                self._broken_or_raise(ep.name, dname, dver, exc,
                                      f"It does not fit this peft-core's hook contract; upgrade "
                                      f"{dname} or report it to its authors; {PLUGINS_ENV} can exclude "
                                      "it meanwhile.")

    def _broken_or_raise(self, name: str, dist: str, version: str, exc: Exception, hint: str) -> None:
        broken = BrokenPlugin(name=name, distribution=dist, version=version, error=_first_line(exc),
                              hint=hint)
        if self.strict:
            raise PluginError(broken.describe() + f" (strict mode, from {STRICT_ENV}=1 or --strict: without "
                              "it the plugin would be reported and skipped)") from exc
        self._broken.append(broken)

    # ------------------------------------------------------------------ registration
    def register(self, plugin: Any, *, name: str | None = None, distribution: str = IN_PROCESS,
                 version: str = "") -> PluginRecord:
        """Register ``plugin`` and its declared methods; all or nothing.

        Raises :class:`PluginError` when the plugin does not validate, implements hooks that are not in
        the contract, declares something that is not a :class:`MethodSpec`, or declares a method name
        another plugin already provides.
        """
        if not self._loading:
            self._ensure()  # the installed plugins first: they may publish hooks this one implements
        with self._lock:
            name = name or self.pm.get_canonical_name(plugin)
            if name in self._records or self.pm.has_plugin(name):
                raise PluginError(f"a plugin named {name!r} is already registered "
                                  f"(from {self._records[name].distribution})" if name in self._records
                                  else f"a plugin named {name!r} is already registered")
            label = self._label(name, distribution, version)
            try:
                self.pm.register(plugin, name=name)  # pluggy >= 1.7 validates every hookimpl first
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"{label} does not match the hook contract: {exc}") from exc
            try:
                self._publish(plugin, label)
                if not self._loading:
                    self._check_specified(plugin, label)
                methods = self._declared(plugin, label)
                for spec in methods:
                    if spec.mergeable:
                        missing = [h for h in ("merge", "unmerge") if not self._own_impl(plugin, h)]
                        if missing:
                            raise PluginContractError(
                                f"{label} declares {spec.name} mergeable=True but does not implement "
                                f"{' and '.join(missing)}; implement both, or declare mergeable=False")
                for spec in methods:
                    if spec.name in self._methods:
                        other = self._methods[spec.name][1]
                        raise PluginError(
                            f"method {spec.name!r} is declared by both {other.distribution} (plugin "
                            f"{other.name!r}) and {distribution} (plugin {name!r}); uninstall one of them")
                if len({s.name for s in methods}) != len(methods):
                    raise PluginError(f"{label} declares the same method name twice")
            except BaseException:
                self.pm.unregister(plugin)
                raise
            record = PluginRecord(name=name, distribution=distribution, version=version, plugin=plugin,
                                  methods=tuple(methods))
            self._records[name] = record
            for spec in methods:
                self._methods[spec.name] = (spec, record)
            self._plugins_changed()
            return record

    @staticmethod
    def _label(name: str, distribution: str, version: str) -> str:
        return f"plugin {name!r} ({distribution}{' ' + version if version else ''})"

    def _own_impl(self, plugin: Any, hook: str) -> bool:
        caller = getattr(self.pm.hook, hook, None)
        return caller is not None and any(i.plugin is plugin for i in caller.get_hookimpls())

    def _publish(self, plugin: Any, label: str) -> None:
        """Let the plugin add its own hookspecs (``add_hookspecs``), before its hooks are checked."""
        for impl in self.pm.hook.add_hookspecs.get_hookimpls():
            if impl.plugin is plugin:
                try:
                    impl.function(pluginmanager=self.pm)
                except pluggy.PluginValidationError as exc:
                    raise PluginError(f"{label}: a hook it publishes does not fit an implementation already "
                                      f"registered: {exc}") from exc
                except Exception as exc:
                    raise PluginError(f"{label}: add_hookspecs raised {_first_line(exc)}") from exc

    def _check_specified(self, plugin: Any, label: str) -> None:
        for caller in self.pm.get_hookcallers(plugin) or []:
            if not caller.has_spec():
                known = ", ".join(sorted(self.hook_names()))
                raise PluginError(f"{label} implements hook {caller.name!r}, which is neither in the contract "
                                  f"nor published by an installed plugin (known hooks: {known})")

    def hook_names(self) -> list[str]:
        """Every specified hook: the core's and those plugins published."""
        return sorted(n for n, c in vars(self.pm.hook).items() if isinstance(c, pluggy.HookCaller) and c.has_spec())

    @property
    def hook(self) -> Any:
        """The plugin manager's hook relay: call hooks that plugins published (``registry.hook.lora_make_layer(
        module=..., ...)``). Every plugin implementing the hook is called, latest registered (extensions
        installed over the publisher) first, as in pluggy."""
        self._ensure()
        return self.pm.hook

    def _declared(self, plugin: Any, label: str) -> list[MethodSpec]:
        impls = [i for i in self.pm.hook.declare_methods.get_hookimpls() if i.plugin is plugin]
        out: list[MethodSpec] = []
        for impl in impls:
            try:
                result = impl.function()
            except Exception as exc:
                raise PluginError(f"{label}: declare_methods raised {_first_line(exc)}") from exc
            if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
                raise PluginContractError(f"{label}: declare_methods must return a list of MethodSpec, "
                                          f"got {type(result).__name__}")
            for item in result:
                if not isinstance(item, MethodSpec):
                    raise PluginContractError(f"{label}: declare_methods returned {item!r}; the hook "
                                              "contract expects peft_core.MethodSpec values")
                out.append(item)
        return out

    def unregister(self, name: str) -> None:
        """Remove a plugin (and its methods) registered under ``name``."""
        with self._lock:
            record = self._records.get(name)
            if record is None:
                raise PluginError(f"no plugin named {name!r} is registered")
            self._unregister_record(record)

    def _unregister_record(self, record: PluginRecord) -> None:
        self._records.pop(record.name, None)
        self.pm.unregister(record.plugin)
        for spec in record.methods:
            self._methods.pop(spec.name, None)
        self._plugins_changed()

    @contextmanager
    def plugin(self, plugin: Any, *, name: str | None = None) -> Iterator[PluginRecord]:
        """Register ``plugin`` for the duration of a ``with`` block (tests)."""
        record = self.register(plugin, name=name)
        try:
            yield record
        finally:
            self.unregister(record.name)

    # ------------------------------------------------------------------ queries
    def _ensure(self) -> None:
        if not self._loaded:
            self.load_entry_points()

    def methods(self) -> list[tuple[MethodSpec, PluginRecord]]:
        self._ensure()
        return sorted(self._methods.values(), key=lambda item: item[0].name)

    def plugins(self) -> list[PluginRecord]:
        self._ensure()
        return list(self._records.values())

    def extensions(self) -> list[PluginRecord]:
        """Registered plugins that declare no method (they extend or wrap others)."""
        return [r for r in self.plugins() if not r.methods]

    def broken(self) -> list[BrokenPlugin]:
        self._ensure()
        return list(self._broken)

    def method(self, name: str) -> MethodSpec:
        return self._lookup(name)[0]

    def owner(self, name: str) -> PluginRecord:
        return self._lookup(name)[1]

    def _lookup(self, name: str) -> tuple[MethodSpec, PluginRecord]:
        self._ensure()
        try:
            return self._methods[name]
        except KeyError:
            raise MethodNotInstalledError(self._missing_message(name)) from None

    def _missing_message(self, name: str) -> str:
        installed = ", ".join(sorted(self._methods)) or "none"
        msg = f"no installed plugin provides the method {name!r} (installed: {installed})."
        provider = KNOWN_PROVIDERS.get(name)
        if provider:
            msg += f" It is provided by {provider}: pip install {provider}."
        else:
            msg += " Install the plugin distribution that provides it."
        if _selection_from_env() is not None:
            msg += f" Note: {PLUGINS_ENV}={os.environ.get(PLUGINS_ENV)!r} limits which plugins load."
        for b in self._broken:
            msg += f" Also, {b.describe()}"
        return msg

    def config_class(self, peft_type: str) -> type[PeftConfig]:
        return self.method(peft_type).config_cls

    def spec_for(self, config: PeftConfig) -> MethodSpec:
        spec = self.method(type(config).peft_type)
        if not isinstance(config, spec.config_cls):
            raise PluginContractError(f"{type(config).__name__} says peft_type={type(config).peft_type!r} "
                                      f"but that method's config class is {spec.config_cls.__name__}")
        return spec

    # ------------------------------------------------------------------ dispatch
    def caller(self, method: str, hook: str) -> Any:
        """The hook caller for ``hook`` that reaches ``method``'s plugin and every extension plugin,
        but no other method plugin (cached until the set of plugins changes)."""
        key = (method, hook)
        found = self._callers.get(key)
        if found is None:
            with self._lock:
                owner = self.owner(method)
                others = [r.plugin for r in self._records.values() if r.methods and r is not owner]
                found = self.pm.subset_hook_caller(hook, remove_plugins=others)
                self._callers[key] = found
        return found

    def _plugins_changed(self) -> None:
        self._callers.clear()
        self._implements.clear()
        self._codes = None

    def implements(self, method: str, hook: str, *, owner_only: bool = False) -> bool:
        """Whether a call of ``hook`` for ``method`` reaches any implementation: the owning plugin's or an
        extension's (``owner_only``: the owning plugin's own). Cached: the core asks this in every forward of
        a model with input-preparing adapters."""
        key = (method, hook, owner_only)
        found = self._implements.get(key)
        if found is None:
            found = (self._own_impl(self.owner(method).plugin, hook) if owner_only
                     else bool(self.caller(method, hook).get_hookimpls()))
            self._implements[key] = found
        return found

    def _culprit(self, exc: BaseException) -> tuple[PluginRecord, str] | None:
        """The plugin whose hook implementation the exception came out of: the innermost traceback frame
        that runs a registered hookimpl (so an extension's wrapper is blamed for its own errors, and the
        owner for errors that merely passed through the wrapper)."""
        if self._codes is None:
            codes: dict[Any, tuple[PluginRecord, str]] = {}
            by_plugin = {id(r.plugin): r for r in self._records.values()}
            for caller in vars(self.pm.hook).values():
                if isinstance(caller, pluggy.HookCaller):
                    for impl in caller.get_hookimpls():
                        code = getattr(impl.function, "__code__", None)
                        rec = by_plugin.get(id(impl.plugin))
                        if code is not None and rec is not None:
                            codes[code] = (rec, caller.name)
            self._codes = codes
        culprit = None
        tb = exc.__traceback__
        while tb is not None:
            found = self._codes.get(tb.tb_frame.f_code)
            if found is not None:
                culprit = found
            tb = tb.tb_next
        return culprit

    #: Hooks that run inside the user's forward pass: what they raise is the forward's error.
    _FORWARD_HOOKS = frozenset({"prepare_inputs"})

    def call(self, method: str, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` for ``method``: on the owning plugin and every extension.

        Errors raised by plugin code are re-raised as :class:`PluginError` naming the plugin whose code
        raised, and its distribution. Passed through unchanged: peft-core's own errors (they name their
        cause already), running out of memory, ``KeyboardInterrupt`` and other non-``Exception`` signals,
        and anything raised in a forward-time hook (``prepare_inputs`` runs the user's model: its errors
        are the user's to catch; a note on the exception names the plugin).
        """
        from .errors import PeftCoreError

        try:
            return self.caller(method, hook)(**kwargs)
        except PeftCoreError:
            raise
        except Exception as exc:
            forward_time = hook in self._FORWARD_HOOKS
            rec, where_hook = self._culprit(exc) or (self.owner(method), hook)
            who = self._label(rec.name, rec.distribution, rec.version)
            if where_hook != hook:  # a hook a plugin published, called from inside this one
                hook = f"{where_hook} (called from {hook})"
            if forward_time or isinstance(exc, MemoryError) or _is_oom(exc):
                if hasattr(exc, "add_note"):
                    exc.add_note(f"peft-core: raised while {who} ran {hook} for method {method}")
                raise
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            loc = f" at {where.filename}:{where.lineno}" if where else ""
            raise PluginError(f"{who} raised in {hook} for method {method}: {_first_line(exc)}{loc}") from exc

    def describe_extensions(self) -> list[Mapping[str, Any]]:
        """Rows for the extensions section of ``peft-core list-methods``."""
        rows = []
        for rec in self.extensions():
            hooks = sorted(c.name for c in self.pm.get_hookcallers(rec.plugin) or [])
            doc = (getattr(rec.plugin, "__doc__", None) or "").strip().splitlines()
            rows.append({"plugin": rec.name, "distribution": rec.distribution, "version": rec.version,
                         "hooks": hooks, "summary": doc[0] if doc else ""})
        return rows

    def describe(self) -> list[Mapping[str, Any]]:
        """Rows for ``peft-core list-methods``."""
        rows = []
        for spec, rec in self.methods():
            rows.append({"method": spec.name, "distribution": rec.distribution, "version": rec.version,
                         "plugin": rec.name, "mergeable": spec.mergeable,
                         "task_types": sorted(t.value for t in spec.task_types), "summary": spec.summary})
        return rows


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry; entry points are discovered on first use."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = Registry()
    return _registry


def reset_registry(*, strict: bool | None = None) -> Registry:
    """Forget every plugin and start over (tests; after installing a plugin in-process)."""
    global _registry
    with _registry_lock:
        _registry = Registry(strict=strict)
    return _registry
