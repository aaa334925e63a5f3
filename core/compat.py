"""How peft-core's names map to Hugging Face PEFT's on disk — the one place that documents it.

Files
    ``adapter_config.json``   the config's ``to_dict()``: PEFT's field names, ``peft_type``, ``task_type``.
    ``adapter_model.safetensors`` the adapter's tensors; ``adapter_model.bin`` is read (weights only).
    ``<adapter name>/``        every adapter other than ``default`` in a sub-folder.

Tensor keys (adapter name stripped on disk, put back on load, for any adapter name)
    in the model (peft-core)                         on disk (PEFT)
    ``base_model.<p>.lora_A.<name>.weight``           ``base_model.model.<p>.lora_A.weight``
    ``base_model.<p>.lora_embedding_A.<name>``        ``base_model.model.<p>.lora_embedding_A``
    ``base_model.<p>.modules_to_save.<name>.<w>``     ``base_model.model.<p>.<w>``  (LoRA and other tuners)
    ``base_model.<p>.modules_to_save.<name>.<w>``     ``base_model.<p>.<w>``  (prompt and prefix tuning:
                                                     ``MethodSpec.disk_model_prefix``)
    ``adapter_modules.<name>.embedding.weight``       ``prompt_embeddings``  (prompt and prefix tuning; with
                                                     ``prefix_projection`` the file holds the projected prefix)
    ``base_model.<p>.bias``, ``….base_layer.bias``    ``base_model.model.<p>.bias``, ``….base_layer.bias``
                                                     (LoRA's ``bias="all"`` / ``"lora_only"``)
    ``base_model.<p>.token_adapter.trainable_tokens_delta.<name>``
                                                     ``base_model.model.<p>.token_adapter.trainable_tokens_delta``
                                                     (LoRA's ``trainable_token_indices``)

Read but not written: PEFT's LoRA files with ``bias="all"`` repeat a ``modules_to_save`` module's bias as
``base_model.model.<p>.modules_to_save.bias`` (loaded into the copy) and ``….original_module.bias`` (into
the original);
with an embedding among the targets they hold the whole base embedding (``….base_layer.weight``, loaded
into the base model, as PEFT does).

The method-specific rows are implemented by each method's plugin (``state_dict_filter`` /
``state_dict_load``); the core implements the ``modules_to_save`` row and the prefixes below.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

__all__ = ["DISK_MODEL_PREFIX", "MODEL_PREFIX", "STORE_PREFIX", "adapter_keys_from_disk", "adapter_keys_to_disk",
           "disk_to_model_key", "model_to_disk_key"]

#: Keys of the wrapped model inside an AdaptedModel's state dict.
MODEL_PREFIX = "base_model."
#: Keys of per-adapter modules that are not layers of the base model (``store`` in the hooks).
STORE_PREFIX = "adapter_modules."
#: What PEFT writes in front of a base-model path (its PeftModel.base_model.model nesting).
DISK_MODEL_PREFIX = "base_model.model."

T = TypeVar("T")


def model_to_disk_key(key: str) -> str:
    """``base_model.<path>`` -> ``base_model.model.<path>``."""
    if not key.startswith(MODEL_PREFIX):
        raise ValueError(f"{key!r} is not a key of the wrapped model")
    return DISK_MODEL_PREFIX + key[len(MODEL_PREFIX):]


def disk_to_model_key(key: str) -> str:
    """``base_model.model.<path>`` -> ``base_model.<path>``; other keys come back unchanged."""
    if key.startswith(DISK_MODEL_PREFIX):
        return MODEL_PREFIX + key[len(DISK_MODEL_PREFIX):]
    return key


@functools.lru_cache(maxsize=64)
def _named(names: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    alt = "|".join(map(re.escape, names))
    return re.compile(rf"\.({alt})\.([^.]+)$"), re.compile(rf"\.({alt})$")


def adapter_keys_to_disk(state_dict: Mapping[str, T], adapter_name: str, names: Sequence[str]) -> dict[str, T]:
    """The tensors one adapter's layers hold as ``base_model.<path>.<name>.<adapter_name>`` (``name`` in
    ``names``: ``("ia3_l",)``, say), under PEFT's file keys ``base_model.model.<path>.<name>``; every other key is
    left out. The common ``state_dict_filter`` of a method whose layers keep one tensor per adapter and name."""
    in_model, _ = _named(tuple(names))
    out: dict[str, T] = {}
    for key, value in state_dict.items():
        m = in_model.search(key)  # adapter names never contain "."
        if key.startswith(MODEL_PREFIX) and m is not None and m.group(2) == adapter_name:
            out[model_to_disk_key(f"{key[: m.start()]}.{m.group(1)}")] = value
    return out


def adapter_keys_from_disk(state_dict: Mapping[str, T], adapter_name: str, names: Sequence[str]) -> dict[str, T]:
    """The inverse of :func:`adapter_keys_to_disk`, for ``state_dict_load``: PEFT's
    ``base_model.model.<path>.<name>`` becomes ``base_model.<path>.<name>.<adapter_name>``. Other keys pass
    through unchanged, so the core reports them as unexpected."""
    _, on_disk = _named(tuple(names))
    return {f"{disk_to_model_key(key)}.{adapter_name}" if key.startswith(DISK_MODEL_PREFIX) and on_disk.search(key)
            else key: value for key, value in state_dict.items()}
