"""AdaLoRA's rank allocation (Zhang et al., 2023, Alg. 1), run once per optimiser step.

Each trained tensor's element importance is ``|p * grad|`` (first-order sensitivity), smoothed by an EMA
(``beta1``) and multiplied by the EMA (``beta2``) of its deviation from that mean (uncertainty). A rank ``i`` of
a layer scores ``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``. The total budget (sum of ranks) follows a cubic
schedule from ``init_r * layers`` to ``target_r * layers``; when the schedule masks, the lowest-scoring ranks
across all layers get ``E_i = 0`` until the budget holds. After ``total_step - tfinal`` the last mask is final
and re-applied every step. The numbers follow Hugging Face PEFT 0.21's ``RankAllocator`` (the same budgets, the
same tie rule: every rank scoring at or below the threshold is masked), so equal training reaches equal ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft_core.errors import AdapterError

from .config import AdaLoraConfig
from .layers import AdaLoraLayer

__all__ = ["pattern_key", "rank_pattern_mask", "step"]

Layers = Sequence[tuple[str, AdaLoraLayer]]


def pattern_key(path: str) -> str:
    """The ``rank_pattern`` key of the layer at ``path``: PEFT's saved form, ``<path>.lora_E``."""
    return f"{path}.lora_E"


def rank_pattern_mask(config: AdaLoraConfig, path: str) -> tuple[bool, ...] | None:
    """The layer's kept-rank mask in ``config.rank_pattern`` (keys with or without the adapter name, as PEFT
    reads them), or None."""
    pattern = config.rank_pattern
    if not pattern:
        return None
    key = pattern_key(path)
    if key in pattern:
        return pattern[key]
    for k, mask in pattern.items():  # PEFT's in-memory form: "<path>.lora_E.<adapter>"
        if k.startswith(key + "."):
            return mask
    return None


def _budget(config: AdaLoraConfig, init_bgt: int, target_bgt: int, global_step: int) -> tuple[int, bool]:
    """(budget, whether to mask at this step) of the cubic schedule."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    assert total is not None  # the config requires it
    if global_step <= tinit:
        return init_bgt, False
    if global_step > total - tfinal:
        return target_bgt, True
    remaining = 1 - (global_step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (remaining ** 3) + target_bgt), global_step % config.deltaT == 0


def _tensors(layer: AdaLoraLayer, name: str) -> dict[str, torch.Tensor]:
    return {"A": layer.lora_A[name], "E": layer.lora_E[name], "B": layer.lora_B[name]}


def _update_importance(layers: Layers, name: str, config: AdaLoraConfig) -> None:
    b1, b2 = config.beta1, config.beta2
    for path, layer in layers:
        state = layer.scores.setdefault(name, {})
        for kind, p in _tensors(layer, name).items():
            if p.grad is None:
                raise AdapterError(f"AdaLoRA adapter {name!r}: {path}.lora_{kind} has no gradient at "
                                   "on_optimizer_step. Call model.on_optimizer_step(step) (or update_and_allocate) "
                                   "after loss.backward() and optimizer.step(), before optimizer.zero_grad()")
            ipt = (p * p.grad).abs().detach()
            avg, unc = state.get(kind, (torch.zeros_like(p), torch.zeros_like(p)))
            avg = b1 * avg + (1 - b1) * ipt
            unc = b2 * unc + (1 - b2) * (ipt - avg).abs()
            state[kind] = (avg, unc)


def _rank_scores(layer: AdaLoraLayer, name: str) -> torch.Tensor:
    """One score per rank of the layer (r,), from the smoothed element scores of E, A and B."""
    state = layer.scores[name]
    score = {kind: avg * unc for kind, (avg, unc) in state.items()}
    a = score["A"].mean(dim=1, keepdim=True)  # (r, 1)
    b = score["B"].mean(dim=0).view(-1, 1)  # (r, 1)
    return score["E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)


def _mask_to_budget(layers: Layers, name: str, budget: int, init_bgt: int) -> dict[str, tuple[bool, ...]]:
    missing = [path for path, layer in layers if not layer.scores.get(name)]
    if missing:
        raise AdapterError(f"AdaLoRA adapter {name!r}: no importance scores yet for {missing[0]} (the schedule masks "
                           "before any step scored it: tinit/tfinal leave no scored step before this one)")
    per_layer = {path: _rank_scores(layer, name) for path, layer in layers}
    threshold = torch.kthvalue(torch.cat(list(per_layer.values())), k=init_bgt - budget)[0].item()
    pattern: dict[str, tuple[bool, ...]] = {}
    for path, layer in layers:
        pruned = per_layer[path] <= threshold
        layer.lora_E[name].masked_fill_(pruned.view(-1, 1), 0.0)
        pattern[pattern_key(path)] = tuple((~pruned).tolist())
    return pattern


def _mask_with_pattern(layers: Layers, name: str, config: AdaLoraConfig) -> None:
    for path, layer in layers:
        mask = rank_pattern_mask(config, path)
        e = layer.lora_E[name]
        if mask is None or len(mask) != e.shape[0]:  # a layer loaded at its kept ranks has nothing to mask
            continue
        keep = torch.tensor(mask, dtype=torch.bool, device=e.device).view(-1, 1)
        e.masked_fill_(~keep, 0.0)


def step(layers: Layers, name: str, config: AdaLoraConfig, global_step: int) -> AdaLoraConfig | None:
    """One optimiser step of the schedule for adapter ``name``: the config with a new ``rank_pattern`` when
    the ranks were reallocated, else None. Call under ``torch.no_grad()`` with this step's gradients present."""
    if not layers:
        return None
    assert config.total_step is not None
    init_bgt = sum(int(layer.lora_A[name].shape[0]) for _, layer in layers)
    target_bgt = config.target_r * len(layers)
    end = config.total_step - config.tfinal
    if global_step < end:
        _update_importance(layers, name, config)
        budget, mask_now = _budget(config, init_bgt, target_bgt, global_step)
        if not mask_now:
            return None
        return config.replace(rank_pattern=_mask_to_budget(layers, name, budget, init_bgt))
    if global_step == end:  # the final allocation: forced, then the importance state is dropped
        budget, _ = _budget(config, init_bgt, target_bgt, global_step)
        pattern = _mask_to_budget(layers, name, budget, init_bgt)
        for _, layer in layers:
            layer.scores.pop(name, None)
        return config.replace(rank_pattern=pattern)
    if config.rank_pattern:
        _mask_with_pattern(layers, name, config)
    return None
