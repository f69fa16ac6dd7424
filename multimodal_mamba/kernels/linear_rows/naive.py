"""References for the few-rows projections (``fused.py``): ``F.linear`` in float32, and its split-K partial sums.
Needs no Triton."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_rows_ref(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x (rows, K), weight (N, K), bias (N,) or None -> (rows, N) in x's dtype: x @ weight.T (+ bias), float32 sums."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def linear_rows_partials_ref(x: torch.Tensor, weight: torch.Tensor, k_split: int) -> torch.Tensor:
    """x (rows, K), weight (N, K) -> (ceil(K / k_split), rows, N) float32: part[s] = x[:, s-th K range] @
    weight[:, s-th K range].T, each K range ``k_split`` long (the last one what is left)."""
    k_in = weight.shape[1]
    parts = [F.linear(x[:, k0:k0 + k_split].float(), weight[:, k0:k0 + k_split].float())
             for k0 in range(0, k_in, k_split)]
    return torch.stack(parts)


def sum_partials_ref(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(splits, rows, N) float32 -> (rows, N) in ``dtype``: the splits added in order (0, 1, ...), rounded once."""
    total = partials[0].clone()
    for part in partials[1:]:
        total += part
    return total.to(dtype)
