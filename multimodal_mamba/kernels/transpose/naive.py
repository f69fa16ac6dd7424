"""The reference the Triton transpose is tested against."""

import torch


def channel_major_ref(x: torch.Tensor) -> torch.Tensor:
    """x (batch, L, C) -> (batch, C, L), contiguous."""
    return x.transpose(1, 2).contiguous()
