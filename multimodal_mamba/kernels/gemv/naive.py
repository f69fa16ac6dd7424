"""Reference for the decode GEMV: ``torch.nn.functional.linear`` (what every projection computes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) -> (..., N): x @ weight.T + bias, float32 accumulation."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(torch.promote_types(x.dtype, weight.dtype))
