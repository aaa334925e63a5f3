"""Module-name regexes from configs, checked for catastrophic backtracking before they ever run.

``target_modules="..."`` and similar fields are regexes read from ``adapter_config.json`` files, which
may come from anyone. Python's ``re`` backtracks and has no timeout, and a 20-character pattern such as
``(.*){1,20}z`` takes longer than the age of the universe against an ordinary 40-character module name.
So before use, :func:`compile_module_pattern` bounds the work a pattern can cause, statically
(no timeout, no thread, no subprocess), and refuses a pattern over the bound with a :class:`ConfigError`:

- at most :data:`MAX_PATTERN_LENGTH` characters;
- no quantifier (``*``, ``+``, ``{m,n}`` with n > 1) applied to something that itself varies in length or
  has alternatives (``(a+)+``, ``(.*a){3}``, ``(ab|a)*``): the classic exponential shapes;
- no backreferences;
- the product, over the pattern's quantifiers, of how many lengths each may take (counting lengths up to
  :data:`NAME_LENGTH`), summed over alternatives, is at most :data:`MAX_BACKTRACK_PATHS`. Three ``.*`` pass
  (65**3); four do not. This bounds the matching work per module name to about a million steps
  (milliseconds) for names up to :data:`NAME_LENGTH` characters, and polynomially beyond.

Every pattern Hugging Face PEFT documents (``.*\\.(q_proj|v_proj)$``, ``^(?!.*vision).*(q|k|v)_proj``...)
is far inside these bounds.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError

try:  # Python 3.11+
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["MAX_BACKTRACK_PATHS", "MAX_PATTERN_LENGTH", "NAME_LENGTH", "compile_module_pattern"]

MAX_PATTERN_LENGTH = 1000
NAME_LENGTH = 64
MAX_BACKTRACK_PATHS = 1_000_000

_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


class _Refused(Exception):
    pass


def _has_choice(items: Any) -> bool:
    """Whether a parsed (sub)pattern contains an alternation, a quantifier that varies, or a backreference."""
    for op, av in items:
        name = str(op)
        if name in {"BRANCH", "GROUPREF", "GROUPREF_EXISTS"}:
            return True
        if name in _REPEATS and (av[0] != av[1] or _has_choice(av[2])):
            return True
        if name == "SUBPATTERN" and _has_choice(av[3]):
            return True
        if name in {"ASSERT", "ASSERT_NOT"} and _has_choice(av[1]):
            return True
        if name == "ATOMIC_GROUP" and _has_choice(av):
            return True
    return False


def _paths(items: Any) -> int:
    """An upper bound on the ways the backtracking engine can split a name among the pattern's parts."""
    total = 1
    for op, av in items:
        name = str(op)
        if name in {"GROUPREF", "GROUPREF_EXISTS"}:
            raise _Refused("backreferences are not allowed")
        if name in _REPEATS:
            low, high, body = av
            if high > 1 and _has_choice(body):
                raise _Refused("a quantifier is applied to a part that itself varies in length or has "
                               "alternatives (like (a+)+ or (a|ab)*), which can take exponential time")
            total *= _paths(body) * (min(high, NAME_LENGTH) - min(low, NAME_LENGTH) + 1)
        elif name == "BRANCH":
            total *= sum(_paths(branch) for branch in av[1])
        elif name == "SUBPATTERN":
            total *= _paths(av[3])
        elif name in {"ASSERT", "ASSERT_NOT"}:
            total *= _paths(av[1])
        elif name == "ATOMIC_GROUP":
            total *= _paths(av)
        if total > MAX_BACKTRACK_PATHS:
            raise _Refused(f"it has too many ways to match (more than {MAX_BACKTRACK_PATHS:,}; at most three "
                           "unbounded quantifiers such as .* are allowed)")
    return total


def compile_module_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """Compile a module-name regex from a config, refusing invalid or catastrophic ones.

    ``where`` names the field (``"LoraConfig.target_modules"``) for the error message.
    """
    shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
    fix = "give a list of module names instead, or a simpler regex"
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigError(f"{where}={shown!r} is {len(pattern)} characters long; a module-name regex may have "
                          f"at most {MAX_PATTERN_LENGTH}: {fix}")
    try:
        compiled = re.compile(pattern)
        parsed = _sre_parse.parse(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise ConfigError(f"{where}={shown!r} is not a valid regular expression ({e}); {fix}") from None
    try:
        _paths(parsed.data)
    except _Refused as e:
        raise ConfigError(f"{where}={shown!r} is refused as a module-name regex: {e}; {fix}") from None
    except RecursionError:
        raise ConfigError(f"{where}={shown!r} is nested too deeply; {fix}") from None
    return compiled
