"""LoraConfig: Hugging Face PEFT's LoRA fields, with their meanings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
from peft_core.config import (
    ANY,
    FrozenDict,
    PeftConfig,
    check,
    check_layer_indices,
    short_repr,
    to_layer_indices,
    to_str_tuple,
)
from peft_core.errors import ConfigError
from peft_core.patterns import compile_module_pattern

from .variant_fields import VARIANT_FIELDS, VARIANT_INITS, subconfig

__all__ = ["LoraConfig"]


def _patterns(value: Any) -> dict[str, Any]:
    if value is None:
        return FrozenDict()
    if not isinstance(value, Mapping):
        raise ConfigError(f"rank_pattern/alpha_pattern must be a mapping of module-name patterns to values, "
                          f"got {short_repr(value)}")
    return FrozenDict(value)


def _pattern_values(kind: type) -> Any:
    def validate(instance: Any, attribute: attrs.Attribute, value: dict[str, Any]) -> None:
        for key, v in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"LoraConfig.{attribute.name}: keys must be non-empty module-name "
                                  f"patterns, got {short_repr(key)}")
            # not (0 < v <= 1e6) also refuses NaN, which compares False with everything
            if isinstance(v, bool) or not isinstance(v, kind) or not 0 < v <= 1_000_000:
                raise ConfigError(f"LoraConfig.{attribute.name}[{short_repr(key)}] must be a positive "
                                  f"{kind.__name__ if isinstance(kind, type) else 'number'} (at most 1e6), "
                                  f"got {short_repr(v)}")
            # the key is used as re.match(rf"(.*\.)?(?:{key})$", module_name) (see targeting.py)
            compile_module_pattern(rf"(.*\.)?(?:{key})$",
                                   f"LoraConfig.{attribute.name} key {short_repr(key)}, as the regex")
    return validate


def _replication(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in value)
    return value


def _replication_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not (isinstance(value, tuple) and value and all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
            and 0 <= p[0] < p[1] for p in value)):
        raise ConfigError(f"LoraConfig.layer_replication must be a list of [start, end) layer ranges, e.g. "
                          f"[[0, 4], [2, 5]], got {short_repr(value)}")


def _target_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or isinstance(value, tuple):
        return
    if isinstance(value, str):
        if value == "all-linear":
            return
        compile_module_pattern(value, f"LoraConfig.{attribute.name}")  # invalid or catastrophic: ConfigError
        return
    raise ConfigError(f"LoraConfig.{attribute.name} must be a list of module names, a regex string, "
                      f"'all-linear' or None, got {short_repr(value)}")


def _parameters_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    # a list of names, as in PEFT (which refuses a string: regex matching of parameters is not implemented there)
    if value is None or (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)):
        return
    raise ConfigError(f"LoraConfig.target_parameters must be a list of parameter names (e.g. "
                      f"['mlp.experts.gate_up_proj']) or None, got {short_repr(value)}; a string is not read as a "
                      "regex here, nor in PEFT: wrap a single name in a list")


def _int_to_float(value: Any) -> Any:
    """0 and 1 in JSON mean 0.0 and 1.0; an int too large for a float becomes inf, which the validator names."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    return value


def _token_indices(value: Any) -> Any:
    """JSON lists (and any sequence of indices) become tuples, a mapping a read-only dict of tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, Mapping):
        return FrozenDict({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()})
    return value  # None, or a wrong type that the validator names


def _indices_problem(value: Any) -> str | None:
    if not isinstance(value, tuple):
        return f"must be a list of token indices, got {short_repr(value)}"
    bad = [i for i in value if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        return f"holds {short_repr(bad[0])}, which is not a token index (an int >= 0)"
    if len(set(value)) != len(value):
        twice = next(i for i in value if value.count(i) > 1)
        # two trainable rows for one token: which one the embedding returns would be undefined
        return f"lists token {twice} more than once; list each index once"
    return None


def _token_indices_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    name = f"LoraConfig.{attribute.name}"
    if value is None:
        return
    if isinstance(value, tuple):
        problem = _indices_problem(value)
        if problem:
            raise ConfigError(f"{name} {problem}")
        return
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(f"{name} is an empty mapping; give {{'embed_tokens': [indices]}} or None")
        for key, indices in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{name}: keys must be non-empty module names, got {short_repr(key)}")
            problem = _indices_problem(indices)
            if problem:
                raise ConfigError(f"{name}[{key!r}] {problem}")
        return
    raise ConfigError(f"{name} must be a list of token indices (for the input embedding), a mapping of "
                      f"embedding-module name to such a list, or None; got {short_repr(value)}")


def _init_ok(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    from .init import valid_init

    if not valid_init(value) and not (isinstance(value, str) and value in VARIANT_INITS):  # "mica": a variant's
        raise ConfigError(f"LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', "
                          f"'pissa_niter_<n>', 'olora', 'orthogonal' or 'mica', got {short_repr(value)} (PEFT's "
                          "'loftq', 'eva', 'corda' and 'lora_ga' are not supported by this plugin)")


@attrs.frozen(kw_only=True)
class LoraConfig(PeftConfig):
    """Low-rank adaptation: ``W x + (alpha / r) * B A x`` on the targeted layers."""

    peft_type: ClassVar[str] = "LORA"
    #: Fields Hugging Face PEFT writes that this plugin accepts only at these (inert) values.
    peft_inert_fields: ClassVar[Mapping[str, Any]] = {
        "use_qalora": False,
        "loftq_config": {}, "eva_config": None, "corda_config": None, "alora_invocation_tokens": None,
        "arrow_config": None, "megatron_config": None,
        "ensure_weight_tying": False, "lora_ga_config": None,
        "monteclora_config": None,
        "megatron_core": ANY, "qalora_group_size": ANY,
    }
    #: Fields that ask for a LoRA variant when set, and the init values that do: the variant that LoRA's
    #: lora_variant hook returns must claim each (peft_lora.variant.check_claims; see peft_lora.variant_fields).
    variant_fields: ClassVar[tuple[str, ...]] = VARIANT_FIELDS
    variant_inits: ClassVar[frozenset[str]] = VARIANT_INITS

    r: int = attrs.field(default=8, validator=check(int, low=1, high=1_000_000,
                                                   fix="r is the adapter rank, e.g. 8."))
    target_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                validator=_target_ok)
    exclude_modules: tuple[str, ...] | str | None = attrs.field(default=None, converter=to_str_tuple,
                                                                 validator=_target_ok)
    lora_alpha: int | float = attrs.field(default=8, validator=check((int, float), low=0))
    lora_dropout: float = attrs.field(default=0.0, converter=_int_to_float,
                                      validator=check(float, low=0.0, high=0.999999))
    fan_in_fan_out: bool = attrs.field(default=False, validator=check(bool))
    bias: str = attrs.field(default="none", validator=check(str, choices=("none", "all", "lora_only")))
    use_rslora: bool = attrs.field(default=False, validator=check(bool))
    #: DoRA: a trained magnitude per output row beside A and B (``peft_lora.dora``); saved as PEFT does.
    use_dora: bool = attrs.field(default=False, validator=check(bool))
    #: Rebuild the layer stack from ``[start, end)`` ranges of the original layers, the copies sharing the base
    #: weights, each with its own LoRA (``peft_lora.replication``); such adapters do not merge.
    layer_replication: tuple[tuple[int, int], ...] | None = attrs.field(default=None, converter=_replication,
                                                                       validator=_replication_ok)
    #: A trained bias on lora_B (scaled like B A); merging adds it to the base layer's bias. Not on embeddings.
    lora_bias: bool = attrs.field(default=False, validator=check(bool))
    init_lora_weights: bool | str = attrs.field(default=True, validator=_init_ok)
    layers_to_transform: int | tuple[int, ...] | None = attrs.field(default=None, converter=to_layer_indices,
                                                                     validator=check_layer_indices)
    layers_pattern: str | tuple[str, ...] | None = attrs.field(default=None, converter=to_str_tuple,
                                                               validator=check((str, tuple), optional=True))
    rank_pattern: dict[str, int] = attrs.field(factory=FrozenDict, converter=_patterns,
                                               validator=_pattern_values(int))
    alpha_pattern: dict[str, int | float] = attrs.field(factory=FrozenDict, converter=_patterns,
                                                        validator=_pattern_values((int, float)))  # type: ignore[arg-type]
    #: LoRA on ``nn.Parameter``s that no layer type wraps, such as the 3-D expert stacks of transformers' MoE
    #: blocks (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``) or a 2-D weight (``["q_proj.weight"]``).
    #: An entry matches a parameter whose full name equals it or ends with ``"." + entry``; every entry must
    #: match. A 2-D parameter ``(out, in)`` gets ``A: r x in`` and ``B: out x r``; a 3-D stack of ``E`` experts
    #: gets rank ``r`` per expert (``A: r*E x in``, ``B: out x r*E``). Combines with ``target_modules`` (use
    #: ``target_modules=[]`` for parameters only; ``None`` means the architecture's default modules where PEFT
    #: 0.21 adds them too, e.g. llama's, and none for MoE architectures). Needs ``lora_dropout=0`` and cannot
    #: route mixed batches (``adapter_names``), as in PEFT. See docs/coming-from-peft.md.
    target_parameters: tuple[str, ...] | None = attrs.field(default=None, converter=to_str_tuple,
                                                            validator=_parameters_ok)
    #: Train only these rows of an embedding (new tokens, say) besides the LoRA layers, as PEFT's field: a list of
    #: indices is for the model's input embedding (``get_input_embeddings()``, else a module named
    #: ``embed_tokens``); a mapping names the modules, ``{"embed_tokens": [0, 1]}`` (a name matches a module
    #: path that is it or ends in ``.`` + it; an untied output head may be named too, for its output rows).
    #: Each listed row starts as the embedding's own row and is replaced,
    #: not added to; modules that share the embedding's weight (a tied ``lm_head``) see the same rows. Saved as
    #: ``<path>.token_adapter.trainable_tokens_delta`` (see ``peft_lora.tokens``).
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] | None = attrs.field(
        default=None, converter=_token_indices, validator=_token_indices_ok)
    #: PEFT's variants implemented by plugins (peft-core's lora_variants extension), stored as PEFT writes them:
    #: BD-LoRA, KaSA and VeLoRA sub-configs (a mapping of the PEFT dataclass's fields, or None). See
    #: peft_lora.variant_fields; with no plugin claiming a set field, inject is a ConfigError naming it.
    use_bdlora: dict[str, Any] | None = attrs.field(default=None, converter=subconfig("use_bdlora"))
    kasa_config: dict[str, Any] | None = attrs.field(default=None, converter=subconfig("kasa_config"))
    velora_config: dict[str, Any] | None = attrs.field(default=None, converter=subconfig("velora_config"))

    def __attrs_post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # as PEFT: a regex already says which layers it matches, so a second layer filter is ambiguous
            raise ConfigError(f"LoraConfig.layers_to_transform cannot be combined with a regex target_modules "
                              f"({self.target_modules!r}); put the layer indices in the regex, or give "
                              "target_modules as a list of names")
        if self.target_parameters:
            # the update is added to the weight itself (W + B A), which leaves no input to drop out; PEFT refuses both
            if self.lora_dropout:
                raise ConfigError(f"LoraConfig.target_parameters needs lora_dropout=0 (got {self.lora_dropout}): LoRA "
                                  "on a parameter adds B A to the weight, so there is no input to apply dropout to. "
                                  "Set lora_dropout=0, or adapt those layers through target_modules instead")
            if self.fan_in_fan_out:
                raise ConfigError("LoraConfig.target_parameters cannot be combined with fan_in_fan_out=True (set "
                                  "for GPT-2 style Conv1D target_modules, whose weights are stored transposed), as in "
                                  "PEFT; target those Conv1D layers in a separate adapter, or drop fan_in_fan_out")
            if self.use_dora:
                raise ConfigError("LoraConfig.target_parameters cannot be combined with use_dora=True (DoRA's "
                                  "magnitude is per layer output; PEFT refuses it too): train those parameters in a "
                                  "separate adapter without DoRA")
            if isinstance(self.init_lora_weights, str) and self.init_lora_weights != "gaussian":
                raise ConfigError(f"LoraConfig.target_parameters cannot be combined with init_lora_weights="
                                  f"{self.init_lora_weights!r}, which reads a Linear layer's weight; use True or "
                                  "'gaussian'")
        others = [f for f in VARIANT_FIELDS if f != "use_dora" and getattr(self, f, None)]
        if self.lora_bias and others:  # a variant's own B (BD-LoRA's blocks, KaSA's) has no place for a bias
            raise ConfigError(f"LoraConfig.lora_bias=True cannot be combined with {others[0]}; train the variant "
                              "without lora_bias")
        if self.lora_bias and (self.use_dora or self.init_lora_weights not in (True, False)):
            # as PEFT: DoRA's magnitude and the weight-reading inits have no place for a LoRA bias
            raise ConfigError(f"LoraConfig.lora_bias=True needs use_dora=False and init_lora_weights True or False "
                              f"(got use_dora={self.use_dora}, init_lora_weights={self.init_lora_weights!r})")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("LoraConfig.layers_pattern only has a meaning with layers_to_transform; "
                              "set layers_to_transform too, or drop layers_pattern")
