"""The reference the Triton LayerNorm is tested against: ``torch.nn.functional.layer_norm`` over the last dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_ref(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """x (..., hidden) -> (x - mean) / sqrt(var + eps) * weight + bias in x's dtype (statistics in float32)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
