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

from ..utils import CachedLaunch


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
def _transpose_tile(x_ptr, o_ptr, C, L, sb, sl, sc, b, offs_l, tile, BLOCK_C: tl.constexpr):
    """Channel tile ``tile`` of x (batch, L, C) -> o (batch, C, L) contiguous, for the rows offs_l."""
    offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_l[:, None] < L) & (offs_c[None, :] < C)
    t = tl.load(x_ptr + b * sb + offs_l[:, None] * sl + offs_c[None, :] * sc, mask=mask)
    tl.store(o_ptr + b * C * L + offs_c[None, :] * L + offs_l[:, None], t, mask=mask)


@triton.jit
def _transpose_group_kernel(x0, x1, x2, x3, x4, o0, o1, o2, o3, o4, L, c0, c1, c2, c3, c4, e0, e1, e2, e3,
                            s0b, s0l, s0c, s1b, s1l, s1c, s2b, s2l, s2c, s3b, s3l, s3c, s4b, s4l, s4c,
                            BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Up to five (batch, L, C_i) tensors of one dtype -> o_i (batch, C_i, L) contiguous, in one launch. Grid axis 1
    runs over every tensor's channel tiles in turn (tensor i owns tiles [e_{i-1}, e_i)), axis 2 over the batch."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    p = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    # (each branch loads and stores itself: strides of 1 are specialized to constants, so the branches' strides
    # cannot be merged into one variable)
    if p < e0:
        _transpose_tile(x0, o0, c0, L, s0b, s0l, s0c, b, offs_l, p, BLOCK_C)
    elif p < e1:
        _transpose_tile(x1, o1, c1, L, s1b, s1l, s1c, b, offs_l, p - e0, BLOCK_C)
    elif p < e2:
        _transpose_tile(x2, o2, c2, L, s2b, s2l, s2c, b, offs_l, p - e1, BLOCK_C)
    elif p < e3:
        _transpose_tile(x3, o3, c3, L, s3b, s3l, s3c, b, offs_l, p - e2, BLOCK_C)
    else:
        _transpose_tile(x4, o4, c4, L, s4b, s4l, s4c, b, offs_l, p - e3, BLOCK_C)


_GROUP = CachedLaunch(_transpose_group_kernel)
_MAX_GROUP = 5


def _launch_group(tensors, outs, channel_major=False):
    """Launch the group kernel on up to five (batch, L, C_i) tensors ((batch, C_i, L) views if ``channel_major``)
    and their (batch, C_i, L) outputs."""
    if channel_major:
        batch, length = tensors[0].shape[0], tensors[0].shape[2]
        channels = tuple(t.shape[1] for t in tensors)
    else:
        batch, length = tensors[0].shape[0], tensors[0].shape[1]
        channels = tuple(t.shape[2] for t in tensors)
    count = len(tensors)
    pad = _MAX_GROUP - count
    channels = channels + (0,) * pad
    ends, total = [], 0
    for c in channels[:_MAX_GROUP - 1]:
        total += triton.cdiv(c, 64)
        ends.append(total)
    total += triton.cdiv(channels[-1], 64)
    if batch == 0 or length == 0 or total == 0:
        return
    xs = tuple(tensors) + (tensors[0],) * pad
    strides = ()
    if channel_major:
        for t in xs:
            sb, sc, sl = t.stride()
            strides += (sb, sl, sc)
    else:
        for t in xs:
            strides += t.stride()
    grid = (triton.cdiv(length, 64), total, batch)
    _GROUP(grid, xs + tuple(outs) + (outs[0],) * pad, (length,) + channels + tuple(ends) + strides, (64, 64), 4)


def time_contiguous_group(*views: torch.Tensor):
    """(batch, C_i, L) views of one batch, length and dtype (any strides; the mixers' are token-major) -> the same
    values as (batch, C_i, L) contiguous tensors: ``channel_major_group`` of the views' transposes, without forming
    them. Not differentiable."""
    return _transpose_group("time_contiguous_group", views, length_dim=2, channel_major=True)


def _transpose_group(name, tensors, length_dim, channel_major):
    """Both grouped transposes: ``tensors`` (3-D, one batch, length and dtype; the length at ``length_dim``, the
    channels at the other non-batch dim) -> (batch, C_i, L) contiguous outputs, one launch per ``_MAX_GROUP``."""
    first = tensors[0]
    batch, length = first.shape[0], first.shape[length_dim]
    for t in tensors:
        if t.dim() != 3 or t.shape[0] != batch or t.shape[length_dim] != length or t.dtype != first.dtype:
            raise ValueError(f"{name}: every tensor needs the same batch, length and dtype, "
                             f"got {[tuple(v.shape) for v in tensors]}")
    outs = _outputs_by_width([t.shape[3 - length_dim] for t in tensors], batch, length, first)
    for start in range(0, len(tensors), _MAX_GROUP):
        _launch_group(tensors[start:start + _MAX_GROUP], outs[start:start + _MAX_GROUP], channel_major=channel_major)
    return tuple(outs)


def _outputs_by_width(widths, batch, length, like):
    """Empty (batch, width_i, L) outputs in ``like``'s dtype and device; outputs of one width share one allocation."""
    outs = [None] * len(widths)
    by_width = {}
    for i, width in enumerate(widths):
        by_width.setdefault(width, []).append(i)
    for width, indices in by_width.items():
        if len(indices) == 1:
            outs[indices[0]] = torch.empty(batch, width, length, device=like.device, dtype=like.dtype)
        else:
            stacked = torch.empty(len(indices), batch, width, length, device=like.device, dtype=like.dtype)
            for i, out in zip(indices, stacked.unbind(0)):
                outs[i] = out
    return outs


def channel_major_group(*tensors: torch.Tensor):
    """(batch, L, C_i) tensors of one batch, length, dtype and device (any strides, any C_i) -> a tuple of
    (batch, C_i, L) contiguous tensors, one kernel launch per five. Tensors of one shape share one allocation. Not
    differentiable: for inference (see ``channel_major_triton``)."""
    return _transpose_group("channel_major_group", tensors, length_dim=1, channel_major=False)


def channel_major_many(*tensors: torch.Tensor):
    """Several (batch, L, C) tensors of one shape and dtype -> a tuple of (batch, C, L) contiguous tensors, in one
    kernel launch per five (a prefill transposes x, z and delta of every layer: launches are what a batch-1
    prefill's host time is made of). Not differentiable: for inference (see ``channel_major_triton``)."""
    shape, dtype = tensors[0].shape, tensors[0].dtype
    if any(t.shape != shape or t.dtype != dtype for t in tensors):
        raise ValueError("channel_major_many: every tensor needs the same shape and dtype")
    return channel_major_group(*tensors)


_ONE = CachedLaunch(_transpose_kernel)


def _transpose(x: torch.Tensor) -> torch.Tensor:
    batch, length, channels = x.shape
    out = torch.empty(batch, channels, length, device=x.device, dtype=x.dtype)
    if out.numel():
        grid = (triton.cdiv(length, 64), triton.cdiv(channels, 64), batch)
        _ONE(grid, (x, out), (length, channels) + x.stride() + out.stride(), (64, 64), 4)
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
