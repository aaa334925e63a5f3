"""The shared random projections of one VeRA adapter: ``vera_A`` (r x max_in) and ``vera_B`` (max_out x r).

They are drawn from ``projection_prng_key`` exactly as Hugging Face PEFT 0.21 draws them (a CPU
``torch.Generator`` seeded with the key; ``vera_A`` first, then ``vera_B``, each uniform in ``[-bound, bound]``
with Kaiming's bound for a ReLU gain and the tensor's fan-in, its second dimension), so an adapter saved without
its projections (``save_projection=False``) gets PEFT's very numbers back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["VeraProjections", "draw_projections"]


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    fan_in = shape[1]  # a 2-D tensor's fan-in is its number of columns
    # the bound is computed in PEFT's order of operations (gain, then std, then sqrt(3) * std): the same float bits
    gain = math.sqrt(2)
    std = gain / math.sqrt(fan_in)
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vera_A, vera_B)`` in fp32 on the CPU, from seed ``key`` (always on the CPU: a CUDA generator draws
    other numbers)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = _kaiming_uniform((r, max_in), generator)
    vera_b = _kaiming_uniform((max_out, r), generator)
    return vera_a, vera_b


class VeraProjections(nn.Module):
    """One adapter's frozen projections, kept once in the adapter's ``store`` entry (state-dict keys
    ``adapter_modules.<adapter>.vera_A`` / ``.vera_B``) and read by every layer of the adapter by slicing.

    Buffers, not parameters: they never train, ``print_trainable_parameters`` does not count them (as PEFT),
    and ``model.to(device)`` moves them once for all layers."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor, prng_key: int, save_projection: bool,
                 bias: str = "none") -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_a)
        self.register_buffer("vera_B", vera_b)
        # what PEFT requires the model's VeRA adapters to agree on, kept where a later adapter's inject sees it
        self.prng_key = prng_key
        self.save_projection = save_projection
        self.bias = bias

    @property
    def r(self) -> int:
        return int(self.vera_A.shape[0])

    @property
    def max_in(self) -> int:
        return int(self.vera_A.shape[1])

    @property
    def max_out(self) -> int:
        return int(self.vera_B.shape[0])

    def copy(self, save_projection: bool, bias: str = "none") -> VeraProjections:
        """A new adapter's own copy of these projections (PEFT gives a later adapter the first one's; a copy,
        so that loading the new adapter's file can never change another adapter's numbers)."""
        return VeraProjections(self.vera_A.detach().clone(), self.vera_B.detach().clone(), self.prng_key,
                               save_projection, bias)

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, prng_key={self.prng_key}"
