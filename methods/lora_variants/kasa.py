"""KaSA (Knowledge-aware Singular-value Adaptation): ``LoraConfig(kasa_config={...})``, as Hugging Face PEFT 0.21.

Two changes to LoRA on an ``nn.Linear`` layer:

1. When the adapter is added, the base weight loses its ``r`` smallest singular components: ``W`` becomes its best
   rank ``min(out, in) - r`` approximation (from an fp32 SVD, in the weight's dtype). This changes the base model for
   good, as in PEFT: deleting or unloading the adapter keeps the truncated weight, and unmerging restores the
   truncated weight, bit for bit. For the same reason an adapter with KaSA and one without cannot share a model
   (PEFT refuses it too; :func:`check_kasa_mixing`).

   The truncated weight is a new ``nn.Parameter`` in the base layer's ``weight`` slot (PEFT overwrites the old one's
   data): if adding or loading the adapter fails later on, the core's snapshot of the module tree puts the original
   parameter back, so a refused load leaves the base model exactly as it was. The layer declares the new parameter
   as the adapter's frozen state (``frozen``), so the core knows who made it. A weight tied to another module's (an
   ``lm_head`` sharing the input embedding) is refused (:func:`check_kasa_untied`): truncating it would change
   the other module, which PEFT does silently.
2. The update carries learned singular values between the factors: ``s * B diag(d) A`` with ``d`` (r values,
   ``lora_diag``, drawn from N(0, 1) as in PEFT; B starts at zero, so the adapter starts as the identity).

The paper's two regularisers (``beta * sum(d^2)`` and ``gamma * (||B^T B - I|| + ||A A^T - I||)``) are not part of
the forward pass: add :func:`kasa_loss` to the training loss, as PEFT's ``_get_kasa_loss``.

Files: ``lora_diag`` is saved as ``<path>.lora_diag`` (PEFT's key); in the model it is
``<path>.lora_diag.<adapter>.weight`` (PEFT's in-memory name is ``lora_diag.<adapter>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft_core.errors import ConfigError, TargetError
from peft_lora import LoraConfig, LoraLayer, LoraLinear
from peft_lora.targeting import rank_and_alpha
from torch import nn

from .common import VariantTensor, float_weight, linear_update, require_layer

__all__ = ["Kasa", "check_kasa_mixing", "check_kasa_untied", "kasa_loss", "tied_weight_modules"]

_FIELD = "kasa_config"


class Kasa:
    """The KaSA variant (stateless)."""

    attr = "lora_diag"
    claims = frozenset({"kasa_config"})

    def check(self, layer: LoraLayer, path: str, r: int) -> None:
        require_layer(layer, path, "KaSA", _FIELD, conv1d=False)
        float_weight(layer, path, "KaSA", _FIELD)
        w = layer.base_layer.weight
        if w.is_meta:
            raise TargetError(f"{_FIELD}: module {path!r} has its base weight on the meta device; KaSA truncates the "
                              "base weight when the adapter is added, so load the base model's weights first")
        if r >= min(w.shape):
            raise TargetError(f"{_FIELD}: module {path!r} has a weight of shape {tuple(w.shape)}; KaSA drops r={r} "
                              f"singular components and must keep at least one, so r must be below {min(w.shape)} "
                              "(lower r for it with rank_pattern, or exclude it)")

    def create(self, layer: LoraLayer, name: str) -> nn.Module:
        assert isinstance(layer, LoraLinear)
        r = layer.r[name]
        a = layer.lora_A[name].weight
        # drawn before the truncation, like A's own dtype and device: PEFT's order, so a seeded run matches
        diag = torch.randn(r, device=a.device, dtype=a.dtype)
        w = layer.base_layer.weight
        u, sv, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
        keep = min(w.shape) - r
        truncated = ((u[:, :keep] * sv[:keep]) @ vh[:keep]).to(w.dtype)
        # a new parameter, not a write into the old one: the core's snapshot can then undo it (see the module doc)
        layer.base_layer.weight = nn.Parameter(truncated, requires_grad=w.requires_grad)
        return VariantTensor(diag, trained=True)

    def frozen(self, layer: LoraLayer, name: str) -> frozenset[str]:
        """The truncated base weight: made by this adapter, never trained by it."""
        return frozenset({"base_layer.weight"})

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                p: float) -> torch.Tensor:
        assert isinstance(layer, LoraLinear)
        return linear_update(layer, name, x, result, p, between=getattr(layer, self.attr)[name].weight)

    def merged_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        assert isinstance(layer, LoraLinear)
        w = layer.base_layer.weight.detach().float()
        a = layer.lora_A[name].weight.detach().float()
        b = layer.lora_B[name].weight.detach().float()
        d = getattr(layer, self.attr)[name].weight.detach().float()
        return w + layer.scaling[name] * ((b * d) @ a).to(w.device)


KASA = Kasa()


def kasa_for(config: LoraConfig, layer: LoraLayer, path: str) -> Kasa:
    KASA.check(layer, path, rank_and_alpha(config, path)[0])
    return KASA


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def check_kasa_mixing(model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """ConfigError before a KaSA adapter joins LoRA adapters without KaSA, or the other way round: KaSA changes the
    base weights when it is added, so the other adapters would no longer see the model they were made for."""
    new = config.kasa_config is not None
    for layer in _lora_layers(model):
        for other in layer.adapter_names:
            if other == adapter_name:
                continue
            if isinstance(layer.variants.get(other), Kasa) is not new:
                raise ConfigError(
                    f"adapter {adapter_name!r} {'uses' if new else 'does not use'} KaSA (kasa_config) but adapter "
                    f"{other!r} {'does not' if new else 'does'}: KaSA truncates the base weights when it is added, "
                    "so adapters with and without it cannot share a model (nor in Hugging Face PEFT); use a fresh "
                    "copy of the base model")


def tied_weight_modules(model: nn.Module) -> set[int]:
    """Ids of the modules whose ``weight`` is shared with another module (tied embeddings)."""
    users: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        w = module._parameters.get("weight")
        if w is not None:
            users.setdefault(id(w), []).append(module)
    return {id(m) for group in users.values() if len(group) > 1 for m in group}


def check_kasa_untied(model: nn.Module, adapter_name: str, tied: set[int]) -> None:
    """TargetError (after inject: the core then undoes it) if a KaSA layer of ``adapter_name`` wraps a module whose
    weight was tied to another module's before (``tied``: :func:`tied_weight_modules` of the model then)."""
    for path, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and isinstance(layer.variants.get(adapter_name), Kasa) and (
                id(layer.base_layer) in tied):
            raise TargetError(f"kasa_config: module {path!r} shares its weight with another module (tied "
                              "embeddings); KaSA truncates the weight, which would change that module too. Exclude "
                              "it with exclude_modules, or untie the weights first")


def kasa_loss(model: nn.Module, adapter_names: str | Sequence[str] | None = None) -> torch.Tensor | float:
    """KaSA's regularisers summed over the layers of the given adapters (default: the active ones), each with its
    own config's coefficients: ``beta * sum(d^2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)``, computed in fp32;
    0.0 when none of them uses KaSA. Add it to the task loss, as PEFT's ``model._get_kasa_loss()``."""
    if adapter_names is None:
        adapter_names = list(getattr(model, "active_adapters", ()))
    elif isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    configs = getattr(model, "peft_config", {})
    total: torch.Tensor | float = 0.0
    for layer in _lora_layers(model):
        for name in adapter_names:
            if not isinstance(layer.variants.get(name), Kasa):
                continue
            assert isinstance(layer, LoraLinear)
            settings = configs[name].kasa_config
            d = getattr(layer, KASA.attr)[name].weight.float()
            a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
            eye = torch.eye(d.shape[0], device=d.device)
            orth = torch.linalg.norm(b.t() @ b - eye) + torch.linalg.norm(a @ a.t() - eye)
            total = total + settings["beta"] * (d * d).sum() + settings["gamma"] * orth
    return total
