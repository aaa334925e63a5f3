"""MiCA (Minor Component Adaptation): ``LoraConfig(init_lora_weights="mica")``, as Hugging Face PEFT 0.21.

B starts as the ``r`` left singular vectors of the base weight with the *smallest* singular values and stays frozen;
A starts at zero and is the only trained factor. The update is plain LoRA's, ``s B A``, so forward and merge are
LoRA's; the base weight is not changed (``B A = 0`` at the start). On Linear (and GPT-2's Conv1D) and Embedding
layers, where PEFT has it: an Embedding's "weight" is its (dim x vocab) transpose, so B is dim x r there.

B is declared frozen through the variant protocol's ``frozen`` (see :mod:`peft_lora.variant`): it is saved (PEFT's
files hold it) and counted among all parameters but not the trainable ones, whatever ``set_adapter`` does.
"""

from __future__ import annotations

import torch
from peft_core.errors import TargetError
from peft_lora import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear
from peft_lora.targeting import rank_and_alpha
from torch import nn

from .common import Settings, embedding_update, float_weight, linear_update, plain_merged_weight, require_layer

__all__ = ["Mica"]

_FIELD = "init_lora_weights='mica'"


def _weight_matrix(layer: LoraLayer) -> torch.Tensor:
    """The base weight as PEFT's MiCA reads it, in fp32: (out x in) for a Linear-like layer, (dim x vocab) for an
    Embedding (whose B has the embedding dimension's rows)."""
    w = layer.base_layer.weight.detach().float()
    if isinstance(layer, LoraEmbedding):
        return w.t()
    return w.t() if layer.transposed else w  # type: ignore[attr-defined]


class Mica:
    """The MiCA variant (stateless: one instance serves every layer)."""

    attr = "lora_mica"
    claims = frozenset({"init_lora_weights"})

    def check(self, layer: LoraLayer, path: str, r: int) -> None:
        """Before the model changes: a layer PEFT has MiCA on, a float weight, and ``r`` singular vectors to take."""
        require_layer(layer, path, "MiCA", _FIELD, embedding=True)
        float_weight(layer, path, "MiCA", _FIELD)
        shape = tuple(layer.base_layer.weight.shape)
        if r > min(shape):
            raise TargetError(f"{_FIELD}: module {path!r} has a weight of shape {shape}, which has {min(shape)} "
                              f"singular vectors, fewer than r={r}; lower r for it (rank_pattern) or exclude it")

    def create(self, layer: LoraLayer, name: str) -> nn.Module:
        if not layer.base_layer.weight.is_meta:  # on meta (a model without weights yet) a file fills A and B
            w = _weight_matrix(layer)
            u = torch.linalg.svd(w, full_matrices=False)[0]
            r = layer.r[name]
            a, b = self._factors(layer, name)
            with torch.no_grad():
                b.copy_(u[:, -r:])  # the minor components: the last r, singular values sorted descending
                a.zero_()
        return Settings(frozen="B")

    @staticmethod
    def _factors(layer: LoraLayer, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        if isinstance(layer, LoraEmbedding):
            return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        return layer.lora_A[name].weight, layer.lora_B[name].weight  # type: ignore[index,union-attr]

    def frozen(self, layer: LoraLayer, name: str) -> frozenset[str]:
        """B: saved with the adapter, never trained."""
        if isinstance(layer, LoraEmbedding):
            return frozenset({f"lora_embedding_B.{name}"})
        return frozenset({f"lora_B.{name}.weight"})

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                p: float) -> torch.Tensor:
        if isinstance(layer, LoraEmbedding):
            return embedding_update(layer, name, x, result)  # embeddings drop no input, as in PEFT
        assert isinstance(layer, LoraLinear)
        return linear_update(layer, name, x, result, p)

    def merged_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        return plain_merged_weight(layer, name)


MICA = Mica()


def mica_for(config: LoraConfig, layer: LoraLayer, path: str) -> Mica:
    """The MiCA variant for ``layer``, after checking that it applies (TargetError naming the module if not)."""
    MICA.check(layer, path, rank_and_alpha(config, path)[0])
    return MICA
