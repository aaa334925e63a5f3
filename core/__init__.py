"""peft-core: parameter-efficient fine-tuning as a plugin framework.

The core defines the hook contract (:mod:`peft_core.hookspecs`), the registry that finds method
plugins through entry points, and :class:`AdaptedModel`. It imports no method: names such as
``LoraConfig`` are resolved through the registry when first asked for.
"""

from __future__ import annotations

from typing import Any

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig
from .errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    MergeError,
    MethodNotInstalledError,
    PeftCoreError,
    PluginContractError,
    PluginError,
    TargetError,
)
from .hookspecs import hookimpl, hookspec
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .kbit import prepare_model_for_kbit_training
from .layers import AdapterLayer, MergeableLayer
from .model import AdaptedModel
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from .peft_names import (
    PeftError,
    PeftType,
    PeftWarning,
    cast_mixed_precision_params,
    get_layer_status,
    get_model_status,
    get_peft_config,
    inject_adapter_in_model,
    load_peft_weights,
)
from .registry import get_registry
from .runtime import BASE_ROW, AdapterRuntime
from .spec import MethodSpec
from .tasks import TaskType

__version__ = "0.1.0"

#: The plugin support API: the submodules of ``peft_core`` that method and extension plugins may import
#: from, each through the names in its ``__all__`` (documented in docs/api.md; a test holds the built-in
#: plugins and the examples to it). Everything else in ``peft_core`` is internal and may change.
SUPPORT_MODULES = ("amp", "compat", "config", "errors", "hookspecs", "layers", "merging", "patterns", "registry",
                   "runtime", "spec", "targeting", "tasks", "virtual_tokens")

# Method config classes (LoraConfig, ...) are not listed: they come from whichever method plugins are
# installed, through __getattr__ below, so ``from peft_core import *`` never fails on a missing plugin.
__all__ = [  # noqa: RUF022 - grouped by role, not alphabetically
    # the PEFT-compatible API
    "PeftConfig", "PeftModel", "TaskType", "get_peft_model", "get_peft_model_state_dict",
    "set_peft_model_state_dict", "prepare_model_for_kbit_training",
    "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
    "PeftType", "PeftMixedModel", "PeftError", "PeftWarning", "get_peft_config", "inject_adapter_in_model",
    "load_peft_weights", "cast_mixed_precision_params", "get_layer_status", "get_model_status",
    "hotswap_adapter", "prepare_model_for_compiled_hotswap",
    # the native API and the plugin contract
    "AdaptedModel", "AdapterRuntime", "BASE_ROW", "MethodSpec", "hookimpl", "hookspec", "get_registry",
    "AdapterLayer", "MergeableLayer", "SUPPORT_MODULES",
    # errors
    "PeftCoreError", "ConfigError", "TargetError", "AdapterError", "CheckpointError", "MergeError",
    "MethodNotInstalledError", "PluginError", "PluginContractError",
]

#: PEFT's PeftMixedModel combines adapters of different methods; every peft-core model does.
PeftMixedModel = PeftModel

#: Config class names of well-known methods -> the method that provides them (for error messages).
_KNOWN_CONFIGS = {"LoraConfig": "LORA", "PromptTuningConfig": "PROMPT_TUNING",
                  "PrefixTuningConfig": "PREFIX_TUNING"}


def _plugin_packages() -> list[Any]:
    """The top-level packages of the registered plugins (whose ``__all__`` reach ``peft_core``)."""
    import sys

    packages = []
    for record in get_registry().plugins():
        package = sys.modules.get(type(record.plugin).__module__.split(".")[0])
        if package is None:  # a plugin that is a module object itself
            package = sys.modules.get(getattr(record.plugin, "__name__", "").split(".")[0])
        if package is not None:
            packages.append(package)
    return packages


def _plugin_export(name: str) -> Any:
    """``name`` from an installed plugin's package ``__all__`` (``PromptTuningInit``, ``PrefixEncoder``...): a
    plugin's public names reach ``peft_core`` as its config class does, without the core naming them."""
    if not _plugin_object_name(name):
        for package in _plugin_packages():
            if name in getattr(package, "__all__", ()):
                return getattr(package, name)
    raise LookupError(name)


def _plugin_object_name(name: str) -> bool:
    # the plugin objects and classes themselves are the registry's business, not the user's namespace
    return name == "plugin" or name.endswith("Plugin")


def __getattr__(name: str) -> Any:
    """Resolve a method's config class (``LoraConfig``...) and plugins' public names through the installed
    plugins; Hugging Face PEFT names peft-core lacks say so."""
    if name.startswith("_"):
        raise AttributeError(f"module 'peft_core' has no attribute {name!r}")
    registry = get_registry()
    for spec, _ in registry.methods():
        if spec.config_cls.__name__ == name:
            return spec.config_cls
    if name == "PEFT_TYPE_TO_CONFIG_MAPPING":
        return {spec.name: spec.config_cls for spec, _ in registry.methods()}
    try:
        return _plugin_export(name)
    except LookupError:
        pass
    method = _KNOWN_CONFIGS.get(name)
    if method is not None:
        registry.method(method)  # raises MethodNotInstalledError saying what to install
    from .peft_names import unsupported_message

    raise AttributeError(f"module 'peft_core' has no attribute {name!r}. If it is Hugging Face PEFT's: "
                         f"{unsupported_message(name)}")


def __dir__() -> list[str]:
    names = set(globals()) | {spec.config_cls.__name__ for spec, _ in get_registry().methods()}
    names.add("PEFT_TYPE_TO_CONFIG_MAPPING")
    for package in _plugin_packages():
        names.update(getattr(package, "__all__", ()))
    return sorted(n for n in names if not _plugin_object_name(n))
