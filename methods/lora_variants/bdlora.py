"""BD-LoRA (block-diagonal LoRA): ``LoraConfig(use_bdlora={...})``, as Hugging Face PEFT 0.21.

For multi-LoRA serving with tensor parallelism: on a module whose path contains one of ``target_modules_bd_a``,
A is block-diagonal (``nblocks`` blocks); on one matching ``target_modules_bd_b``, B is. A row-sharded layer then
needs no extra communication for its adapter. A block-diagonal factor stores only its blocks, stacked along the
output rows: A as (r x in/nblocks), B as (out x r/nblocks) — PEFT's tensors and keys (``lora_A.weight``). Each block
multiplies its own slice of the input. The update is ``s * B A`` with the factors as full block-diagonal matrices,
so merging folds it like LoRA's.

As in PEFT: a block-diagonal A starts from Kaiming-uniform draws and a block-diagonal B at zero, whatever
``init_lora_weights`` says (the factor is replaced after LoRA's own initialisation); with ``match_strict`` (the
default) every targeted module must match one of the two lists, otherwise those that match neither get plain LoRA.
On ``nn.Linear`` layers (a matching GPT-2 ``Conv1D`` is refused, where PEFT fails).
"""

from __future__ import annotations

import torch
from peft_core.errors import TargetError
from peft_lora import LoraConfig, LoraLayer, LoraLinear
from peft_lora.targeting import rank_and_alpha
from torch import nn

from .common import Settings, linear_update, plain_merged_weight, require_layer

__all__ = ["BdLora", "BlockDiagonal"]

_FIELD = "use_bdlora"


class BlockDiagonal(nn.Module):
    """A block-diagonal linear map without bias: ``nblocks`` blocks of (out/nblocks x in/nblocks), stored stacked
    as ``weight`` (out x in/nblocks), block ``i`` mapping input slice ``i`` to output slice ``i``."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        nb = self.nblocks
        blocks = self.weight.view(nb, self.out_features // nb, self.in_features // nb)
        out = torch.einsum("tbi,boi->tbo", x.reshape(-1, nb, self.in_features // nb), blocks)
        return out.reshape(*lead, self.out_features)

    def dense(self) -> torch.Tensor:
        """The full (out x in) matrix, zeros off the diagonal blocks."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, 0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


class BdLora:
    """The BD-LoRA variant of one layer: which factor is block-diagonal there (``side`` "A", "B", or None for
    plain LoRA on a module that matches neither list) and in how many blocks."""

    attr = "lora_bdlora"
    claims = frozenset({"use_bdlora"})

    def __init__(self, side: str | None, nblocks: int) -> None:
        self.side, self.nblocks = side, nblocks

    def create(self, layer: LoraLayer, name: str) -> nn.Module:
        assert isinstance(layer, LoraLinear)
        w = layer.base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        r, nb = layer.r[name], self.nblocks
        if self.side == "A":
            weight = torch.empty(r, layer.in_features // nb, **kw)
            nn.init.kaiming_uniform_(weight)  # PEFT's init for this factor (a=0, drawn after LoRA's A)
            layer.lora_A[name] = BlockDiagonal(layer.in_features, r, nb, weight)
        elif self.side == "B":
            weight = torch.zeros(layer.out_features, r // nb, **kw)
            layer.lora_B[name] = BlockDiagonal(r, layer.out_features, nb, weight)
        return Settings(block_diagonal=self.side, nblocks=nb)

    def forward(self, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor, base: torch.Tensor,
                p: float) -> torch.Tensor:
        assert isinstance(layer, LoraLinear)
        return linear_update(layer, name, x, result, p)

    def merged_weight(self, layer: LoraLayer, name: str) -> torch.Tensor:
        if self.side is None:
            return plain_merged_weight(layer, name)
        assert isinstance(layer, LoraLinear)
        a, b = layer.lora_A[name], layer.lora_B[name]
        dense_a = a.dense() if isinstance(a, BlockDiagonal) else a.weight
        dense_b = b.dense() if isinstance(b, BlockDiagonal) else b.weight
        w = layer.base_layer.weight.detach().float()
        return w + layer.scaling[name] * (dense_b.detach().float() @ dense_a.detach().float()).to(w.device)


def bdlora_for(config: LoraConfig, layer: LoraLayer, path: str) -> BdLora:
    """This layer's BD-LoRA (checked before the model changes: TargetError naming the module)."""
    settings = config.use_bdlora
    assert settings is not None
    require_layer(layer, path, "BD-LoRA", _FIELD)
    in_a = [p for p in settings["target_modules_bd_a"] or () if p in path]  # PEFT's rule: a substring of the path
    in_b = [p for p in settings["target_modules_bd_b"] or () if p in path]
    if in_a and in_b:
        raise TargetError(f"{_FIELD}: module {path!r} matches target_modules_bd_a ({in_a[0]!r}) and "
                          f"target_modules_bd_b ({in_b[0]!r}); one factor of a module is block-diagonal, not both")
    side = "A" if in_a else "B" if in_b else None
    nb = settings["nblocks"]
    if side is None:
        if settings["match_strict"]:
            raise TargetError(f"{_FIELD}: module {path!r} matches neither target_modules_bd_a nor target_modules_bd_b; "
                              "add a pattern for it, or set match_strict=False to train it as plain LoRA")
        return BdLora(None, nb)
    assert isinstance(layer, LoraLinear)
    if layer.transposed:
        raise TargetError(f"{_FIELD}: module {path!r} is a transformers Conv1D (weight stored transposed), which has "
                          "no block-diagonal factor (Hugging Face PEFT 0.21 fails on it); target nn.Linear layers")
    r = rank_and_alpha(config, path)[0]
    sizes = {"A": ("in_features", layer.in_features), "B": ("out_features", layer.out_features)}[side]
    for what, size in (("r", r), sizes):
        if size % nb:
            raise TargetError(f"{_FIELD}: module {path!r} needs {what}={size} divisible by nblocks={nb} for a "
                              f"block-diagonal {side}; choose another nblocks or r (rank_pattern)")
    return BdLora(side, nb)
