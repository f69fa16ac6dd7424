"""The reference the Triton RMSNorm is tested against: transformers' ``MambaRMSNorm`` math, step by step."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, input_dtype=None) -> torch.Tensor:
    """x (..., hidden) -> weight * (x / rms(x)), as ``MambaRMSNorm(x.to(input_dtype))``: x is first rounded to
    ``input_dtype`` (default x.dtype), normalized in float32, rounded back to ``input_dtype``, then multiplied by
    ``weight``; the result has dtype promote(weight.dtype, input_dtype)."""
    input_dtype = input_dtype or x.dtype
    hidden = x.to(input_dtype).to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(input_dtype)
