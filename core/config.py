"""The base of every method's configuration: a frozen attrs class with a JSON round trip.

A method plugin subclasses :class:`PeftConfig`, sets the class variable ``peft_type`` (the value
Hugging Face PEFT writes in ``adapter_config.json``) and declares its fields with attrs. The core only
ever reads the fields defined here; everything else belongs to the method.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import math
import reprlib
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs

from .errors import ConfigError
from .tasks import PeftType, TaskType

__all__ = ["ANY", "CONFIG_NAME", "FrozenDict", "PeftConfig", "check", "check_layer_indices", "short_repr",
           "to_layer_indices", "to_str_tuple"]

_FLOAT_MAX = sys.float_info.max

#: In ``peft_inert_fields``: any value is accepted (and ignored).
ANY: Any = object()
_OFF = (None, False, {}, [], ())

CONFIG_NAME = "adapter_config.json"

C = TypeVar("C", bound="PeftConfig")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 80


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a readable length: values from files may be huge or nested thousands deep."""
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # an int beyond int_max_str_digits; absurd nesting
        return f"<{type(value).__name__}>"


def check(kind: type | tuple[type, ...], *, optional: bool = False, low: float | None = None,
          high: float | None = None, choices: Sequence[Any] | None = None,
          fix: str = "") -> Callable[[Any, attrs.Attribute, Any], None]:
    """An attrs validator that raises :class:`ConfigError` naming the field, the value and the fix.

    ``bool`` is never accepted where a number is asked for (``r=True`` is a mistake, not ``r=1``).
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        name = f"{type(instance).__name__}.{attribute.name}"
        if value is None:
            if optional:
                return
            raise ConfigError(f"{name} is required (got None). {fix}".strip())
        numeric = any(k in (int, float) for k in kinds) and bool not in kinds
        if not isinstance(value, kinds) or (numeric and isinstance(value, bool)):
            want = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{name} must be {want}, got {short_repr(value)} ({type(value).__name__}). {fix}".strip())
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {short_repr(value)}. {fix}".strip())
        if float in kinds and isinstance(value, int) and abs(value) > _FLOAT_MAX:
            # a float field: the method will compute with float(value), which would overflow
            raise ConfigError(f"{name} must be a finite number, got an int of {value.bit_length()} bits. "
                              f"{fix}".strip())
        if low is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {short_repr(value)}. {fix}".strip())
        if high is not None and value > high:
            raise ConfigError(f"{name} must be <= {high}, got {short_repr(value)}. {fix}".strip())
        if choices is not None and value not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)!r}, got {short_repr(value)}. {fix}".strip())

    return validate


class FrozenDict(dict):  # type: ignore[type-arg]
    """A read-only ``dict`` that hashes by content: the value of a mapping field (LoRA's ``rank_pattern``), so
    that configs are hashable as frozen values should be. Still a ``dict`` for JSON and for ``==``."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((str(k), repr(v)) for k, v in self.items())))

    def _readonly(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("config mappings are read-only: use config.replace(field={...}) for a changed copy")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]

    def __reduce__(self) -> Any:  # pickle/deepcopy rebuild it through the constructor, not item by item
        return (FrozenDict, (dict(self),))


def _to_task_type(value: Any) -> Any:
    if value is None or isinstance(value, TaskType):
        return value
    try:
        return TaskType(value)
    except ValueError:
        names = ", ".join(t.value for t in TaskType)
        raise ConfigError(f"task_type={short_repr(value)} is not a task type; use one of {names}") from None


def to_str_tuple(value: Any) -> Any:
    """Converter for module-name lists: lists/sets become sorted-stable tuples, a str stays a str."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"expected a list of module names (str), got {short_repr(value)}")
        # sets have no order; sort so equal configs serialize identically
        return tuple(sorted(items)) if isinstance(value, (set, frozenset)) else tuple(items)
    return value  # left for the field's validator to reject with its name


def to_layer_indices(value: Any) -> Any:
    """Converter for ``layers_to_transform``: a list (JSON's form) becomes a tuple; an int or None stays."""
    return tuple(value) if isinstance(value, list) else value


def check_layer_indices(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator for ``layers_to_transform``: None, one layer index, or a tuple of them (ints >= 0, not bools)."""
    if value is None:
        return
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in items):
        raise ConfigError(f"{type(instance).__name__}.{attribute.name} must be a layer index or a list of indices "
                          f"(int >= 0), got {short_repr(value)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _name_the_field(cls: type, kwargs: Mapping[str, Any], error: BaseException) -> str:
    """The error's message, prefixed with the field at fault when the message does not name one: converters
    (unlike validators) are not told which field they convert, so "expected a list of module names" alone
    would leave the user guessing."""
    if isinstance(error, RecursionError):
        message = "a value is nested too deeply"
    else:
        message = str(error).splitlines()[0][:500] if str(error) else type(error).__name__
    if any(f"{cls.__name__}.{name}" in message or f"{name}=" in message or f"{name}[" in message for name in kwargs):
        return message
    for f in attrs.fields(cls):
        convert = getattr(f.converter, "converter", f.converter)  # attrs.Converter wraps the function
        if f.name in kwargs and convert is not None:
            try:
                convert(kwargs[f.name])
            except Exception:
                return f"{cls.__name__}.{f.name}: {message}"
    return message


def _check_inert(target: type[PeftConfig], values: Mapping[str, Any], source: str) -> None:
    """ConfigError for a field of ``peft_inert_fields`` given at a value other than its inert one."""
    for key, expected in target.peft_inert_fields.items():
        value = values.get(key, expected)
        if expected is ANY or value == expected or (expected in _OFF and value in _OFF):
            continue
        raise ConfigError(f"{source}: {key}={short_repr(value)} asks for a feature of Hugging Face PEFT that the "
                          f"{target.peft_type} plugin of peft-core does not implement; "
                          f"only {key}={expected!r} is supported")


class _FrozenConfig(attrs.exceptions.FrozenInstanceError):
    """attrs' error for writing to a frozen instance (an AttributeError), saying what to do instead."""

    def __init__(self, message: str) -> None:
        AttributeError.__init__(self, message)
        self.msg = message

    def __str__(self) -> str:
        return self.msg


class _ConfigMeta(type):
    """Lets the constructor take the fields of ``peft_inert_fields`` as PEFT's does: code written for PEFT
    (``LoraConfig(..., use_dora=False)``) runs, and ``use_dora=True`` is a ConfigError, not a TypeError.

    It also gives every config class its real signature (the fields, their defaults and types, then the inert
    PEFT fields): IDEs, ``help()`` and ``inspect.signature`` would otherwise see this ``__call__``'s
    ``(*args, **kwargs)``."""

    def __init__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> None:
        super().__init__(name, bases, namespace)
        # PEFT's peft_type is a str enum (``config.peft_type.value`` works); a third party's own name, which
        # PeftType does not list, stays a plain string. Both compare equal to the string.
        declared = namespace.get("peft_type")
        if isinstance(declared, str) and declared in PeftType._value2member_map_:
            cls.peft_type = PeftType(declared)
        frozen = namespace.get("__setattr__")
        if frozen is not None and getattr(frozen, "__name__", "") == "_frozen_setattrs":
            def __setattr__(self: Any, key: str, value: Any) -> None:
                raise _FrozenConfig(f"{type(self).__name__} is frozen (configs are values, shared by every model "
                                    f"that uses them): use config.replace({key}=...) for a changed copy")

            cls.__setattr__ = __setattr__  # type: ignore[method-assign,assignment]

    @property
    def __signature__(cls) -> inspect.Signature:
        init = inspect.signature(cls.__init__)  # type: ignore[misc]
        params = [p for p in init.parameters.values() if p.name != "self"]
        known = {p.name for p in params}
        inert = getattr(cls, "peft_inert_fields", {}) or {}
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None if v is ANY else v)
                   for k, v in inert.items() if k not in known]
        return inspect.Signature(params, return_annotation=cls)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        inert = getattr(cls, "peft_inert_fields", None)
        if inert and kwargs:
            known = {f.name for f in attrs.fields(cls)}
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in inert and k not in known}
            if given:
                _check_inert(cls, given, cls.__name__)
        return super().__call__(*args, **kwargs)


#: The Hugging Face PEFT release whose file format peft-core writes (and tests against).
PEFT_FORMAT_VERSION = "0.21.0"


@functools.cache
def written_version() -> str:
    """``peft_version`` as written to ``adapter_config.json``: ``"0.21.0+peftcore.0.1.0"`` (PEP 440, so PEFT's
    version checks read the format release and ignore the local label)."""
    from . import __version__  # late: the package imports this module; called once a config is built

    return f"{PEFT_FORMAT_VERSION}+peftcore.{__version__}"


@attrs.frozen(kw_only=True)
class PeftConfig(metaclass=_ConfigMeta):
    """Fields every adapter has. Subclasses add their method's own.

    ``peft_type`` is a class variable: it names the method, and is what ``adapter_config.json``
    stores to find the config class again (through the registry, since the core imports no method).
    """

    peft_type: ClassVar[str] = ""
    #: Fields that Hugging Face PEFT writes for this method and that are accepted on load only at
    #: these values (anything else asks for a feature the plugin lacks: a clear error, not a surprise).
    peft_inert_fields: ClassVar[Mapping[str, Any]] = {}

    task_type: TaskType | None = attrs.field(default=None, converter=_to_task_type)
    inference_mode: bool = attrs.field(default=False, validator=check(bool))
    base_model_name_or_path: str | None = attrs.field(default=None, validator=check(str, optional=True))
    revision: str | None = attrs.field(default=None, validator=check(str, optional=True))
    modules_to_save: tuple[str, ...] | None = attrs.field(
        default=None, converter=to_str_tuple, validator=check(tuple, optional=True,
                                                              fix="Give a list of module names."))
    #: Who wrote the file, in a form PEFT parses (it reads the version to pick old file layouts, e.g. OFT's):
    #: the PEFT release whose format is written, with peft-core's own version as the local label.
    peft_version: str | None = attrs.field(factory=written_version, eq=False,
                                           validator=check(str, optional=True))
    auto_mapping: dict[str, Any] | None = attrs.field(default=None, eq=False,
                                                      validator=check(dict, optional=True))

    # ----------------------------------------------------------------- JSON round trip
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, with Hugging Face PEFT's field names."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in attrs.fields(type(self)):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def to_json_string(self) -> str:
        """``to_dict()`` as the JSON text written to ``adapter_config.json`` (sorted keys, indented)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
        """Build a config from a mapping; on :class:`PeftConfig` itself, the method is looked up.

        Unknown fields (written by newer versions) are dropped with one warning naming them.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        target: type[PeftConfig] = cls
        peft_type = data.get("peft_type")
        if not cls.peft_type:
            if not isinstance(peft_type, str):
                raise ConfigError(f"{source}: field 'peft_type' is missing or not a string "
                                  f"(got {short_repr(peft_type)}); it names the method, e.g. \"LORA\"")
            from .registry import get_registry  # late: the registry imports this module

            target = get_registry().config_class(peft_type)
        elif peft_type is not None and peft_type != cls.peft_type:
            raise ConfigError(f"{source}: peft_type is {short_repr(peft_type)} but {cls.__name__} is for "
                              f"{cls.peft_type!r}; load it with PeftConfig.from_pretrained instead")
        known = {f.name for f in attrs.fields(target)}
        inert = target.peft_inert_fields
        _check_inert(target, data, source)
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = sorted(k for k in data if k not in known and k not in inert and k != "peft_type")
        if unknown:
            warnings.warn(f"{source}: ignoring fields unknown to {target.__name__}: {', '.join(unknown)}",
                          stacklevel=2)
        try:
            return target(**kwargs)  # type: ignore[return-value]
        except (TypeError, ValueError, ArithmeticError, RecursionError) as e:  # validators, converters, attrs
            raise ConfigError(f"{source}: {_name_the_field(target, kwargs, e)}") from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (configs are frozen: the user's object is never mutated)."""
        return attrs.evolve(self, **changes)

    # ----------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed; written atomically)."""
        from .serialization import atomic_write_bytes

        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / CONFIG_NAME, self.to_json_string().encode())

    @classmethod
    def from_json_file(cls: type[C], path: str | Path) -> C:
        """Read a config from a JSON file (``adapter_config.json``); unknown fields are dropped with a warning."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                              "the file is truncated or not an adapter_config.json") from None
        except RecursionError:
            raise ConfigError(f"{path}: JSON nested too deeply to read; an adapter_config.json is a flat "
                              "object of fields. The file is corrupt or not an adapter_config.json") from None
        except ValueError as e:  # e.g. an integer literal longer than Python's int_max_str_digits
            raise ConfigError(f"{path}: a value cannot be read ({str(e).splitlines()[0][:200]}); the file is "
                              "corrupt or not an adapter_config.json") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_pretrained(cls: type[C], model_id: str | Path, subfolder: str | None = None,
                        revision: str | None = None, **hub_kwargs: Any) -> C:
        """Read ``adapter_config.json`` from a local folder or a Hub repo id."""
        from .serialization import resolve_file

        path = resolve_file(model_id, CONFIG_NAME, subfolder=subfolder, revision=revision, **hub_kwargs)
        if path is None:
            raise ConfigError(f"no {CONFIG_NAME} found in {model_id!s}"
                              + (f" (subfolder {subfolder!r})" if subfolder else ""))
        return cls.from_json_file(path)
