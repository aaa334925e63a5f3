"""A small but real method plugin used by the core tests: per-channel output scales on Linear layers
("TOYSCALE"), plus an optional learned shift of the input embeddings through prepare_inputs.

It touches every hook of the contract, so the core can be tested without any built-in method.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from peft_core import MethodSpec, TaskType, hookimpl
from peft_core.compat import disk_to_model_key, model_to_disk_key
from peft_core.config import PeftConfig, check, to_str_tuple
from peft_core.errors import TargetError
from torch import nn


@attrs.frozen(kw_only=True)
class ToyScaleConfig(PeftConfig):
    peft_type: ClassVar[str] = "TOYSCALE"
    target_modules: tuple[str, ...] = attrs.field(default=("q_proj",), converter=to_str_tuple)
    shift_inputs: bool = attrs.field(default=False, validator=check(bool))


class ScaledLinear(nn.Module):
    """Implements peft-core's AdapterLayer protocol (and, on purpose, cannot route mixed batches)."""

    supports_routing = False

    def __init__(self, base: nn.Linear, runtime: Any) -> None:
        super().__init__()
        self.base_layer = base
        self.toy_scale = nn.ParameterDict()
        self._runtime = runtime
        self.merged: dict[str, torch.Tensor] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.toy_scale)

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {f"toy_scale.{adapter_name}": self.toy_scale[adapter_name]}

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> tuple[str, ...]:
        return ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self._runtime.disabled:
            return out
        for name in self._runtime.active:
            if name in self.toy_scale and name not in self.merged:
                out = out * self.toy_scale[name]
        return out


class ToyPlugin:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def declare_methods(self) -> list[MethodSpec]:
        return [MethodSpec(name="TOYSCALE", config_cls=ToyScaleConfig, task_types=[TaskType.CAUSAL_LM],
                           mergeable=True, summary="toy per-channel scales (tests only)",
                           operations={"toy_count": lambda model: len(model.peft_config)})]

    @hookimpl
    def inject(self, model: nn.Module, adapter_name: str, config: ToyScaleConfig, runtime: Any,
               store: nn.ModuleDict) -> list[str]:
        self.calls.append("inject")
        paths = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, ScaledLinear))
                 and any(n.endswith("." + t) for t in config.target_modules)]
        if not paths:
            raise TargetError(f"toy: {config.target_modules} matched nothing")
        for path in paths:
            module = model.get_submodule(path)
            if not isinstance(module, ScaledLinear):
                module = ScaledLinear(module, runtime)
                model.set_submodule(path, module)
            w = module.base_layer.weight
            module.toy_scale[adapter_name] = nn.Parameter(torch.ones(w.shape[0], device=w.device, dtype=w.dtype))
        if config.shift_inputs:
            hidden = model.get_input_embeddings().weight.shape[1]
            store[adapter_name] = nn.ParameterDict({"shift": nn.Parameter(torch.zeros(hidden))})
        return paths

    @hookimpl
    def state_dict_filter(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tag = f".toy_scale.{adapter_name}"
        out = {model_to_disk_key(k.replace(tag, ".toy_scale")): v for k, v in state_dict.items() if k.endswith(tag)}
        shift = f"adapter_modules.{adapter_name}.shift"
        if shift in state_dict:
            out["toy_shift"] = state_dict[shift]
        return out

    @hookimpl
    def state_dict_load(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in state_dict.items():
            if k == "toy_shift":
                out[f"adapter_modules.{adapter_name}.shift"] = v
            elif k.endswith(".toy_scale"):
                out[disk_to_model_key(k) + f".{adapter_name}"] = v
            else:
                out[k] = v
        return out

    def _layers(self, model: nn.Module, adapter_name: str) -> list[tuple[str, ScaledLinear]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, ScaledLinear) and adapter_name in m.toy_scale]

    @hookimpl
    def merge(self, model: nn.Module, adapter_name: str) -> bool:
        self.calls.append("merge")
        for _, m in self._layers(model, adapter_name):
            with torch.no_grad():
                m.merged[adapter_name] = m.base_layer.weight.detach().clone()
                m.base_layer.weight.mul_(m.toy_scale[adapter_name][:, None])
                if m.base_layer.bias is not None:
                    m.merged[adapter_name + ".bias"] = m.base_layer.bias.detach().clone()
                    m.base_layer.bias.mul_(m.toy_scale[adapter_name])
        return True

    @hookimpl
    def unmerge(self, model: nn.Module, adapter_name: str) -> bool:
        self.calls.append("unmerge")
        for _, m in self._layers(model, adapter_name):
            with torch.no_grad():
                m.base_layer.weight.copy_(m.merged.pop(adapter_name))
                if adapter_name + ".bias" in m.merged:
                    m.base_layer.bias.copy_(m.merged.pop(adapter_name + ".bias"))
        return True

    @hookimpl
    def remove(self, model: nn.Module, adapter_name: str) -> bool:
        self.calls.append("remove")
        for path, m in self._layers(model, adapter_name):
            m.merged.pop(adapter_name, None)
            m.merged.pop(adapter_name + ".bias", None)
            del m.toy_scale[adapter_name]
            if not len(m.toy_scale):
                model.set_submodule(path, m.base_layer)
        return True

    @hookimpl
    def prepare_inputs(self, model: nn.Module, adapter_name: str, store: nn.ModuleDict,
                       inputs: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append("prepare_inputs")
        if adapter_name not in store:
            return None
        ids = inputs.pop("input_ids", None)
        if ids is not None:
            inputs["inputs_embeds"] = model.get_input_embeddings()(ids)
        inputs["inputs_embeds"] = inputs["inputs_embeds"] + store[adapter_name]["shift"]
        return inputs


class ToyGateVariant:
    """A third party's LoRA variant (``peft_lora.variant.LoraVariant``): a trained gate on the update, started at 2,
    so the update counts twice. Built only on a layer's public A, B and scaling, as an outside plugin would be."""

    attr = "toy_gate"

    def create(self, layer: Any, name: str) -> nn.Module:
        m = nn.Module()
        m.weight = nn.Parameter(torch.full((1,), 2.0))
        return m

    def forward(self, layer: Any, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                p: float) -> torch.Tensor:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        return result + getattr(layer, self.attr)[name].weight * update * layer.scaling[name]

    def merged_weight(self, layer: Any, name: str) -> torch.Tensor:
        gate = float(getattr(layer, self.attr)[name].weight)
        return layer.base_layer.weight.detach().float() + gate * layer.delta_weight(name)
