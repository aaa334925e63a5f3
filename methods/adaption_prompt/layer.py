"""The LLaMA-Adapter layer: wraps one attention module (kept as ``base_layer``) and holds, per adapter, a
learned prompt ``adaption_prompt[<adapter>]`` of shape ``(1, adapter_len, hidden_size)`` and a gate
``adaption_gate[<adapter>]`` of shape ``(1,)`` that starts at zero.

After the attention runs as usual, the layer projects the prompt with the attention's own key and value
projections, lets the attention's queries attend to those keys (a separate softmax over the prompt
only), multiplies by the gate and adds the result to the attention output. Because the gate starts at
zero, a fresh adapter leaves the model's outputs exactly as they were.

The attention modules of transformers do not return their queries, so the layer recomputes them from the
hidden states (with the rotary embedding for llama/mistral). The prompt's keys get no position: it is
the same wherever the text is. Nothing here touches the KV cache, so ``generate()`` works unchanged: each
step's new queries attend to the prompt again.

The layer implements peft-core's ``AdapterLayer`` protocol (``adapter_parameters`` & co.).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft_core.errors import TargetError
from peft_core.runtime import BASE_ROW, AdapterRuntime
from torch import nn

from .architectures import Architecture

__all__ = ["AdaptedAttention"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(nn.Module):
    """LLaMA-Adapter on one attention module, with any number of adapters (each adapter's gated prompt
    output is added; several active adapters add up)."""

    supports_routing = True  # _routed computes each row with its own adapter

    def __init__(self, base_layer: nn.Module, runtime: AdapterRuntime, arch: Architecture, path: str = "") -> None:
        missing = [name for name in arch.projections if not isinstance(getattr(base_layer, name, None), nn.Module)]
        if missing:
            raise TargetError(f"module {path!r} is a {type(base_layer).__module__}.{type(base_layer).__name__} "
                              f"without {missing}; adaption prompt needs the attention module itself "
                              f"({list(arch.projections)}). Set target_modules to the attention sub-module's "
                              f"name (default {arch.target_modules!r})")
        super().__init__()
        self.base_layer = base_layer
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self._runtime = runtime
        self.fused = arch.kind == "fused"
        if self.fused:  # GPT-2: c_attn is a Conv1D with weight (hidden, 3 * hidden)
            self.num_heads = int(base_layer.num_heads)
            self.head_dim = int(base_layer.head_dim)
            self.num_kv_heads = self.num_heads
            self.split_size = int(base_layer.split_size)
            self.hidden_size = int(base_layer.c_attn.weight.shape[0])
            self._like = base_layer.c_proj.weight
        else:
            self.head_dim = int(base_layer.head_dim)
            self.num_heads = base_layer.q_proj.out_features // self.head_dim
            # from the projection, not a ratio of sizes: correct also where head_dim * heads != hidden_size
            self.num_kv_heads = base_layer.k_proj.out_features // self.head_dim
            self.hidden_size = int(base_layer.k_proj.in_features)
            self._like = base_layer.q_proj.weight
        if self.num_heads % self.num_kv_heads:
            raise TargetError(f"module {path!r}: {self.num_heads} query heads are not a multiple of "
                              f"{self.num_kv_heads} key/value heads")

    # ---------------------------------------------------------------- attributes of the wrapped attention
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":  # not built yet (unpickling): no recursion
                raise
            return getattr(self.base_layer, name)  # layer_idx, config, ... read by transformers

    # ---------------------------------------------------------------- peft-core's AdapterLayer protocol
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adaption_prompt)

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        return {f"adaption_prompt.{adapter_name}": self.adaption_prompt[adapter_name],
                f"adaption_gate.{adapter_name}": self.adaption_gate[adapter_name]}

    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}

    def trained_base_parameters(self, adapter_name: str) -> tuple[str, ...]:
        return ()

    # ---------------------------------------------------------------- adapters
    def add(self, adapter_name: str, adapter_len: int) -> None:
        like = self._like
        # Like the weight beside it; quantized (integer) weights get fp32 parameters.
        dtype = like.dtype if like.dtype.is_floating_point else torch.float32
        # Standard normal, as the paper's nn.Embedding (and PEFT) start; drawn in PEFT's order (prompt, then
        # gate, layer by layer) so a seeded init matches.
        prompt = torch.empty(1, adapter_len, self.hidden_size, device=like.device, dtype=dtype).normal_()
        self.adaption_prompt[adapter_name] = nn.Parameter(prompt)
        # Zero-init gate: the adapter starts as the identity.
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=like.device, dtype=dtype))

    def drop(self, adapter_name: str) -> None:
        del self.adaption_prompt[adapter_name]
        del self.adaption_gate[adapter_name]

    # ---------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        rt = self._runtime
        if rt.disabled:
            return out
        routing = rt.routing()
        if routing is not None:
            names: Sequence[str] = [n for n in dict.fromkeys(routing.names) if n in self.adaption_prompt]
        else:
            names = [n for n in rt.active if n in self.adaption_prompt]
        if not names:
            return out
        attn_output, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        queries = self._queries(hidden, args, kwargs)
        if routing is None:
            result = attn_output
            for name in names:
                result = result + self._prompt_output(name, queries)
        else:
            result = self._routed(attn_output, queries, routing.names, names)
        result = result.to(attn_output.dtype)
        return result if rest is None else (result, *rest)

    def _routed(self, attn_output: torch.Tensor, queries: torch.Tensor, row_names: Sequence[str],
                names: Sequence[str]) -> torch.Tensor:
        if len(row_names) != attn_output.shape[0]:
            raise ValueError(f"adapter_names has {len(row_names)} entries for a batch of {attn_output.shape[0]}")
        result = attn_output.clone()
        for name in names:
            if name == BASE_ROW:
                continue
            rows = torch.tensor([i for i, n in enumerate(row_names) if n == name], device=attn_output.device)
            result[rows] = attn_output[rows] + self._prompt_output(name, queries[rows]).to(attn_output.dtype)
        return result

    def _queries(self, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The attention's queries, ``(batch, heads, seq, head_dim)``, as the attention computed them."""
        bsz, q_len, _ = hidden.shape
        base = self.base_layer
        if self.fused:
            q = base.c_attn(hidden).split(self.split_size, dim=2)[0]
            return q.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        q = base.q_proj(hidden).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if position_embeddings is None:
            raise ValueError("adaption prompt: the attention was called without position_embeddings (cos, sin); "
                             "this transformers version passes positions in a way peft-core does not know")
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin

    def _prompt_output(self, name: str, queries: torch.Tensor) -> torch.Tensor:
        """The gated attention over adapter ``name``'s prompt, ``(batch, seq, hidden)``."""
        base = self.base_layer
        dtype = queries.dtype
        # The prompt may be fp32 beside a bf16 model (autocast_adapter_dtype): compute in the activations' dtype.
        prompt = self.adaption_prompt[name].to(dtype)
        length = prompt.shape[1]
        if self.fused:
            _, keys, values = base.c_attn(prompt).split(self.split_size, dim=2)
        else:
            keys, values = base.k_proj(prompt), base.v_proj(prompt)
        keys = keys.view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = values.view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        scores = torch.matmul(queries, keys.transpose(2, 3).to(dtype)) / math.sqrt(self.head_dim)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        probs = self.adaption_gate[name].to(dtype) * probs
        out = torch.matmul(probs, values.to(probs.dtype))  # (batch, heads, seq, head_dim)
        out = out.transpose(1, 2).reshape(queries.shape[0], queries.shape[2], -1)
        if not self.fused:  # PEFT projects the prompt output with o_proj for llama/mistral, not for gpt2
            out = base.o_proj(out)
        return out
