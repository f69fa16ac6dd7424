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


@triton.jit
def _transpose_many_kernel(x0_ptr, x1_ptr, x2_ptr, out_ptr, L, C, batch,
                           s0b, s0l, s0c, s1b, s1l, s1c, s2b, s2l, s2c, stride_ot, stride_ob, stride_oc,
                           BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Up to three same-shaped (batch, L, C) tensors -> out (n, batch, C, L), one launch (grid axis 2: n * batch)."""
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    which = tl.program_id(2) // batch
    b = (tl.program_id(2) % batch).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_l[:, None] < L) & (offs_c[None, :] < C)
    if which == 0:
        tile = tl.load(x0_ptr + b * s0b + offs_l[:, None] * s0l + offs_c[None, :] * s0c, mask=mask)
    elif which == 1:
        tile = tl.load(x1_ptr + b * s1b + offs_l[:, None] * s1l + offs_c[None, :] * s1c, mask=mask)
    else:
        tile = tl.load(x2_ptr + b * s2b + offs_l[:, None] * s2l + offs_c[None, :] * s2c, mask=mask)
    out = out_ptr + which.to(tl.int64) * stride_ot + b * stride_ob
    tl.store(out + offs_c[None, :] * stride_oc + offs_l[:, None], tile, mask=mask)


def channel_major_many(*tensors: torch.Tensor):
    """Several (batch, L, C) tensors of one shape and dtype -> a tuple of (batch, C, L) contiguous tensors, in one
    kernel launch per three (a decode-free prefill transposes x, z and delta of every layer: launches are what a
    batch-1 prefill's host time is made of). Not differentiable: for inference (see ``channel_major_triton``)."""
    shape, dtype = tensors[0].shape, tensors[0].dtype
    if any(t.shape != shape or t.dtype != dtype for t in tensors):
        raise ValueError("channel_major_many: every tensor needs the same shape and dtype")
    batch, length, channels = shape
    results = []
    for start in range(0, len(tensors), 3):
        group = tensors[start:start + 3]
        out = torch.empty(len(group), batch, channels, length, device=group[0].device, dtype=dtype)
        padded = list(group) + [group[0]] * (3 - len(group))
        if out.numel():
            grid = (triton.cdiv(length, 64), triton.cdiv(channels, 64), len(group) * batch)
            _transpose_many_kernel[grid](
                *padded, out, length, channels, batch, *padded[0].stride(), *padded[1].stride(), *padded[2].stride(),
                out.stride(0), out.stride(1), out.stride(2), BLOCK_L=64, BLOCK_C=64, num_warps=4,
            )
        results.extend(out.unbind(0))
    return tuple(results)


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
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChannelMajor.apply(x)
    return _transpose(x)  # (autograd.Function's own overhead is a few microseconds of host time per call)
