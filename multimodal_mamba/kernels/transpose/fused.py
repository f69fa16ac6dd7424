"""Tiled transpose (batch, L, C) -> (batch, C, L) contiguous, differentiable.

The mixers' projections are module calls (so LoRA sees them) and return token-major (batch, L, C) activations,
while the scan and conv kernels read channel-major (batch, C, L) rows. PyTorch's strided copy does that transpose
at about a third of the memory bandwidth (about 36 us for a 2048 x 5120 bf16 tensor on an H200); a tiled kernel
that reads and writes whole 64 x 64 blocks does it near the copy bandwidth. Reference: ``naive.channel_major_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _transpose_kernel(x_ptr, out_ptr, L, C, stride_xb, stride_xl, stride_xc, stride_ob, stride_oc, stride_ol,
                      BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_l[:, None] < L) & (offs_c[None, :] < C)
    tile = tl.load(x_ptr + b * stride_xb + offs_l[:, None] * stride_xl + offs_c[None, :] * stride_xc, mask=mask)
    tl.store(out_ptr + b * stride_ob + offs_c[None, :] * stride_oc + offs_l[:, None] * stride_ol, tile, mask=mask)


def _transpose(x: torch.Tensor) -> torch.Tensor:
    batch, length, channels = x.shape
    out = torch.empty(batch, channels, length, device=x.device, dtype=x.dtype)
    if out.numel():
        grid = (triton.cdiv(length, 64), triton.cdiv(channels, 64), batch)
        _transpose_kernel[grid](x, out, length, channels, *x.stride(), *out.stride(), BLOCK_L=64, BLOCK_C=64,
                                num_warps=4)
    return out


class _ChannelMajor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _transpose(x)

    @staticmethod
    def backward(ctx, grad):
        return _transpose(grad)


def channel_major_triton(x: torch.Tensor) -> torch.Tensor:
    """x (batch, L, C), any strides -> (batch, C, L) contiguous; differentiable."""
    if x.dim() != 3:
        raise ValueError(f"channel_major_triton: expected (batch, L, C), got shape {tuple(x.shape)}")
    return _ChannelMajor.apply(x)
