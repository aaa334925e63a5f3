"""The maths of OFT, as plain functions: packed skew-symmetric blocks, their rotations, and block-diagonal products.

A block of size ``b`` is stored as the ``b * (b - 1) / 2`` entries above the diagonal of a skew-symmetric matrix
``Q`` (row-major, ``torch.triu_indices(b, b, 1)``'s order: Hugging Face PEFT's packing, so its files load as they
are). The rotation is the Cayley transform ``(I - Q)(I + Q)^-1``, or PEFT's truncated Neumann series
``I + 2Q + 2Q^2 + ... + 2Q^(m-2) + Q^(m-1)``, which is the series of ``(I + Q)(I - Q)^-1`` (the transpose of the
former; PEFT's choice, kept so that its adapters compute the same). The operations follow PEFT's order where
rounding depends on it.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["apply_left", "apply_right", "block_layout", "nearest_divisor", "project_coft", "rotations",
           "skew_symmetric"]


def skew_symmetric(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(n, m)`` packed upper entries -> ``(n, b, b)`` skew-symmetric matrices ``U - U^T``."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    upper = packed.new_zeros(packed.shape[0], block_size, block_size)
    upper[:, rows, cols] = packed
    return upper - upper.transpose(-2, -1)


def rotations(packed: torch.Tensor, block_size: int, neumann: bool, terms: int) -> torch.Tensor:
    """The ``(n, b, b)`` rotation blocks of ``n`` packed skew matrices, in ``packed``'s dtype."""
    q = skew_symmetric(packed, block_size)
    n = q.shape[0]
    if not neumann:
        # the identity in the default dtype, as PEFT: a bf16/fp16 Q is solved in fp32 (CPUs have no half-precision
        # solver), then cast back to Q's dtype
        eye = torch.eye(block_size, device=q.device).expand(n, block_size, block_size)
        # X (I + Q) = I - Q, solved from the right: X = (I - Q)(I + Q)^-1
        return torch.linalg.solve(eye + q, eye - q, left=False).to(q.dtype)
    r = torch.eye(block_size, device=q.device, dtype=q.dtype).repeat(n, 1, 1)
    if terms <= 1:
        return r
    r = torch.add(r, q, alpha=2.0)
    if terms <= 2:
        return r
    # PEFT's series: coefficient 2 on Q .. Q^max(2, terms-2), then 1 on the last power (Q^max(3, terms-1))
    power = torch.bmm(q, q)
    r = torch.add(r, power, alpha=2.0)
    for _ in range(3, terms - 1):
        power = torch.bmm(power, q)
        r = torch.add(r, power, alpha=2.0)
    power = torch.bmm(power, q)
    return r + power


def project_coft(packed: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """Constrained OFT: each block's skew matrix, if its Frobenius norm exceeds ``eps / sqrt(n)``, scaled back onto
    that sphere; returned packed again."""
    q = skew_symmetric(packed, block_size)
    radius = eps / torch.sqrt(torch.tensor(float(q.shape[0])))
    norm = torch.linalg.matrix_norm(q, keepdim=True)
    # norm == 0 gives 0/0 in the unused branch; where() keeps the untouched block there
    kept = torch.where(norm <= radius, q, radius * (q / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    return kept[:, rows, cols]


def apply_right(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` over the last dimension of ``x`` (``blocks``: ``(k, b, b)``)."""
    k, b, _ = blocks.shape
    lead = x.shape[:-1]
    y = torch.einsum("...rk,rkc->...rc", x.reshape(*lead, k, b), blocks)
    return y.reshape(*lead, k * b)


def apply_left(blocks: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``blockdiag(blocks) @ t`` for a ``(k * b, m)`` matrix ``t``."""
    k, b, _ = blocks.shape
    y = torch.einsum("rkc,rcm->rkm", blocks, t.reshape(k, b, t.shape[-1]))
    return y.reshape(k * b, t.shape[-1])


def nearest_divisor(dim: int, value: int) -> int:
    """The divisor of ``dim`` PEFT picks for a ``value`` that does not divide it: the nearer of the divisors just
    below and just above (the lower one on a tie); ``dim`` itself for a value at least ``dim``."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def block_layout(dim: int, r: int, block_size: int, where: str = "") -> tuple[int, int]:
    """``(blocks, block_size)`` for a rotated dimension ``dim``: exactly one of ``r`` and ``block_size`` is given
    (the config checks it); a value that does not divide ``dim`` is moved to the nearest divisor, with PEFT's
    warning."""
    place = f" for {where}" if where else ""
    if r == 0:
        if dim % block_size != 0 or block_size > dim:
            new = nearest_divisor(dim, block_size)
            warnings.warn(f"Invalid `oft_block_size` ({block_size})! Adjusted `oft_block_size` to ({new}){place}.",
                          stacklevel=3)
            block_size = new
        return dim // block_size, block_size
    if dim % r != 0 or r > dim:
        new = nearest_divisor(dim, r)
        warnings.warn(f"Invalid `r` ({r})! Adjusted `r` to ({new}){place}.", stacklevel=3)
        r = new
    return r, dim // r
