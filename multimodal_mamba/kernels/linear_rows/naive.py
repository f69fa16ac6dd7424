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


def linear_rows_residual_ref(x, weight, residual_in, k_split, residual_dtype, norm_dtype, block_n):
    """``fused.linear_rows_residual``'s results, new: (residual_out, sumsq): residual_out = residual_in + the split-K
    partial sums (``k_split``) added in order and rounded to x's dtype (float32 sum, in ``residual_dtype``); sumsq
    (ceil(N / block_n), rows) float32 = per block of ``block_n`` columns, sum of round(residual_out, norm_dtype)^2."""
    delta = sum_partials_ref(linear_rows_partials_ref(x, weight, k_split), x.dtype)
    residual_out = (residual_in.float() + delta.float()).to(residual_dtype)
    squares = residual_out.to(norm_dtype).float().pow(2)
    sumsq = torch.stack([squares[:, j:j + block_n].sum(-1) for j in range(0, weight.shape[0], block_n)])
    return residual_out, sumsq


def linear_rows_normed_ref(residual, sumsq, norm_weight, eps, norm_dtype, weight, bias=None):
    """``fused.linear_rows_normed``: MambaRMSNorm of residual (mean squares sumsq.sum(0) / K, weight norm_weight,
    rounded to norm_dtype, then norm_weight times it to weight's dtype), then ``linear_rows_ref``."""
    mean_square = sumsq.sum(0) / residual.shape[1]
    normed = residual.to(norm_dtype).float() * torch.rsqrt(mean_square + eps)[:, None]
    x = (norm_weight.float() * normed.to(norm_dtype).float()).to(weight.dtype)
    return linear_rows_ref(x, weight, bias)
