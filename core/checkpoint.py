"""Adapter files: what ``save_pretrained`` writes and how a file's tensors are checked and loaded.

Functions of an :class:`~peft_core.AdaptedModel` (which delegates to them), kept apart from the adapter
lifecycle. The file format is Hugging Face PEFT's (see :mod:`peft_core.compat` for the keys); the method
plugin translates its own keys (``state_dict_filter`` / ``state_dict_load``), the core adds the
``modules_to_save`` keys and checks everything before copying anything.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import compat
from .config import CONFIG_NAME, PeftConfig
from .errors import CheckpointError, ConfigError, PluginContractError
from .modules_to_save import ModulesToSave
from .serialization import SAFETENSORS_NAME, WEIGHTS_NAME, load_weights, serialize_safetensors, staged_files

if TYPE_CHECKING:
    from .model import AdaptedModel

__all__ = ["adapter_state_dict", "load_adapter_tensors", "save_adapters"]


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"{shown} (and {len(items) - n} more)" if len(items) > n else shown


def distributed() -> bool:
    """Whether this process is one rank of an initialized torch.distributed job."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def modules_to_save_keys(model: AdaptedModel, adapter_name: str) -> dict[str, str]:
    """modules_to_save: model key -> disk key, for ``adapter_name``."""
    out = {}
    disk_prefix = model._spec(adapter_name).disk_model_prefix  # PEFT nests prompt methods differently
    for path, module in model.base_model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for pname, _ in module.modules_to_save[adapter_name].named_parameters():
                key = f"{compat.MODEL_PREFIX}{path}.modules_to_save.{adapter_name}.{pname}"
                out[key] = f"{disk_prefix}{path}.{pname}"
    return out


def adapter_state_dict(model: AdaptedModel, adapter_name: str,
                       state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes for ``adapter_name``, keyed as on disk."""
    full = model.state_dict() if state_dict is None else state_dict
    result = model._call(adapter_name, "state_dict_filter", store=model.adapter_modules, state_dict=full)
    if not isinstance(result, dict):
        raise PluginContractError(f"state_dict_filter of {type(model.peft_config[adapter_name]).peft_type}"
                                  f" returned {type(result).__name__}; the hook contract expects a dict")
    result = dict(result)
    for model_key, disk_key in modules_to_save_keys(model, adapter_name).items():
        result[disk_key] = full[model_key]
    # FSDP2 (fully_shard) keeps each rank's shard as a DTensor; a file needs whole tensors. Gathering is
    # a collective, so under FSDP every rank must call this (save_pretrained does, on every rank).
    return {k: v.full_tensor() if callable(getattr(v, "full_tensor", None)) else v for k, v in result.items()}


def _torch_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
    return buf.getvalue()


def save_adapters(model: AdaptedModel, save_directory: str | os.PathLike[str], names: Sequence[str], *,
                  safe_serialization: bool, is_main_process: bool | None,
                  state_dict: Mapping[str, torch.Tensor] | None,
                  initial: str | os.PathLike[str] | None = None) -> None:
    """Write each adapter's folder; see :meth:`AdaptedModel.save_pretrained`."""
    if is_main_process is None:
        is_main_process = not distributed() or torch.distributed.get_rank() == 0
    # Every rank reads the adapter tensors (cheap: views of the live parameters) so that FSDP2 shards
    # can be gathered, which takes all ranks; only the main process serializes and writes.
    full = model.state_dict() if state_dict is None else state_dict  # one walk of the model for all adapters
    gathered = {name: adapter_state_dict(model, name, full) for name in names}
    if not is_main_process:
        return
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a folder")
    payloads = []
    for name in names:  # build every payload before touching the disk
        config = model.peft_config[name].replace(inference_mode=True)
        tensors = gathered[name]
        if initial is not None:
            config, tensors = _converted(model, name, config, tensors, initial)
        data = serialize_safetensors(tensors) if safe_serialization else _torch_bytes(tensors)
        payloads.append((name, config, data))
    # one stage for every adapter: all files are written to temporary names before any replaces its target,
    # so a failure leaves every adapter folder as it was
    with staged_files(root) as files:
        for name, config, data in payloads:
            sub = "" if name == "default" else f"{name}/"
            files[sub + (SAFETENSORS_NAME if safe_serialization else WEIGHTS_NAME)] = data
            files[sub + CONFIG_NAME] = config.to_json_string().encode()


def _converted(model: AdaptedModel, name: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
               initial: str | os.PathLike[str]) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The adapter rewritten relative to its first save in ``initial`` (by its method's ``convert_for_save``)."""
    folder = Path(initial)
    weights = folder / SAFETENSORS_NAME
    if not (folder / CONFIG_NAME).is_file() or not weights.is_file():
        raise ConfigError(f"path_initial_model_for_weight_conversion={str(initial)!r} holds no {CONFIG_NAME} and "
                          f"{SAFETENSORS_NAME}; save the adapter there right after get_peft_model, before training")
    initial_config = PeftConfig.from_pretrained(folder)
    answer = model._call(name, "convert_for_save", state_dict=tensors, initial_config=initial_config,
                         initial_state_dict=load_weights(weights))
    if answer is None:
        raise ConfigError(f"path_initial_model_for_weight_conversion: the {type(config).peft_type} method has no "
                          f"conversion relative to an initial adapter (adapter {name!r}); save without it")
    return answer[0], dict(answer[1])


def map_adapter_tensors(model: AdaptedModel, adapter_name: str, weights: Mapping[str, torch.Tensor],
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Disk-keyed ``weights`` of adapter ``adapter_name`` by in-model key: (the method's tensors, mapped by its
    ``state_dict_load``; the adapter's ``modules_to_save`` copies, which the core maps itself)."""
    mts = {disk: key for key, disk in modules_to_save_keys(model, adapter_name).items()}
    rest = {k: v for k, v in weights.items() if k not in mts}
    mapped = model._call(adapter_name, "state_dict_load", store=model.adapter_modules, state_dict=rest)
    if not isinstance(mapped, dict):
        raise PluginContractError(f"state_dict_load of {type(model.peft_config[adapter_name]).peft_type} "
                                  f"returned {type(mapped).__name__}; the hook contract expects a dict")
    copies = {key: weights[disk] for disk, key in mts.items() if disk in weights}
    return dict(mapped), copies


def load_adapter_tensors(model: AdaptedModel, adapter_name: str, weights: Mapping[str, torch.Tensor],
                         source: str = "state dict") -> None:
    """Copy disk-keyed ``weights`` into adapter ``adapter_name``; checks everything before copying."""
    mapped, copies = map_adapter_tensors(model, adapter_name, weights)
    mapped.update(copies)  # the copy's own key wins over any alias a method maps to it
    # errors name the keys the user passed, not the in-memory names they map to: a plugin's state_dict_load
    # hands the user's tensors on unchanged in the common case, so the tensor's identity finds its key again
    given = {id(v): k for k, v in weights.items()}

    def shown(key: str) -> str:
        return given.get(id(mapped[key]), key)

    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(model.named_buffers())
    unexpected = sorted(shown(k) for k in mapped if k not in targets)
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} tensor(s) match nothing in "
                              f"{type(model.base_model).__name__}: {_first(unexpected)}. The adapter was "
                              "made for another architecture, or its keys are not in PEFT's format")
    order = {k: i for i, k in enumerate(targets)}  # report in model order: the first mismatching modules first
    bad_shape = [f"{shown(k)} {tuple(v.shape)} vs model {tuple(targets[k].shape)}"
                 for k, v in sorted(mapped.items(), key=lambda kv: order[kv[0]])
                 if tuple(v.shape) != tuple(targets[k].shape)]
    if bad_shape:
        raise CheckpointError(f"{source}: {len(bad_shape)} shape mismatch(es): {_first(bad_shape)}. The "
                              "adapter was made for a model of another size, or with another r")
    missing = [k for k in model._ownership.owned(adapter_name) if k not in mapped]  # model order
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) of adapter {adapter_name!r} are missing "
                              f"from the file: {_first(missing)}")
    # only a floating tensor fits a floating parameter: copy_ would turn ints and bools into floats silently,
    # and drop the imaginary part of complex values
    bad_dtype = [f"{shown(k)} ({v.dtype})" for k, v in mapped.items()
                 if targets[k].is_floating_point() and not v.is_floating_point()]
    if bad_dtype:
        raise CheckpointError(f"{source}: {len(bad_dtype)} tensor(s) are not floating point, but the parameters "
                              f"they load into are: {_first(bad_dtype)}. The file is corrupt or not an adapter")
    homes = model._meta_homes
    with torch.no_grad():
        for k, v in mapped.items():
            t = targets[k]
            if t.is_meta:  # low_cpu_mem_usage, or a meta model: the file's values become the tensor
                _materialise(model, k, t, v.to(device=homes.pop(k, v.device), dtype=t.dtype))
            else:
                t.copy_(v)


def _materialise(model: AdaptedModel, key: str, old: torch.Tensor, value: torch.Tensor) -> None:
    """Put ``value`` where the meta tensor ``key`` is (``.data`` cannot move a tensor off the meta device)."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def push(model: AdaptedModel, repo_id: str, *, private: bool | None, token: str | None, commit_message: str,
         revision: str | None, selected_adapters: Sequence[str] | None, api: Any) -> Any:
    """Save to a temporary folder and upload it; see :meth:`AdaptedModel.push_to_hub`."""
    import tempfile

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peft-core-push-") as folder:
        model.save_pretrained(folder, selected_adapters=selected_adapters)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision)
