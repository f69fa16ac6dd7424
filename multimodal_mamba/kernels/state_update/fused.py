"""Triton decode step of the selective scan: one token, the state updated in place.

Reference: ``multimodal_mamba.modeling.ops_selective_scan.selective_state_update_ref`` (``naive.py`` beside this
file). One program per (batch, block of channels) loads its rows of the state (BLOCK_D, N), applies
h = exp(dt A) h + dt B x, writes them back, and returns y = <C, h> + D x gated by silu(z). No temporaries, no
allocation but the output, so a preallocated cache captured in a CUDA graph replays it as is. Inference only
(the registered backend declines calls that need gradients).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import next_pow2, softplus


@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, dim_per_group,
    stride_s_b, stride_s_d, stride_s_n,
    stride_x_b, stride_x_d, stride_dt_b, stride_dt_d, stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_C_b, stride_C_g, stride_C_n,
    stride_z_b, stride_z_d, stride_out_b, stride_out_d,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < dim
    mask = mask_d[:, None] & (offs_n[None, :] < N)
    group = (offs_d // dim_per_group)[:, None]

    state_ptrs = state_ptr + pid_b * stride_s_b + offs_d[:, None] * stride_s_d + offs_n[None, :] * stride_s_n
    h = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * stride_x_b + offs_d * stride_x_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * stride_dt_b + offs_d * stride_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * stride_A_d + offs_n[None, :] * stride_A_n, mask=mask, other=0.0)
    Bv = tl.load(B_ptr + pid_b * stride_B_b + group * stride_B_g + offs_n[None, :] * stride_B_n, mask=mask, other=0.0)
    Cv = tl.load(C_ptr + pid_b * stride_C_b + group * stride_C_g + offs_n[None, :] * stride_C_n, mask=mask, other=0.0)
    h = tl.exp(dt[:, None] * A.to(tl.float32)) * h + (dt * x)[:, None] * Bv.to(tl.float32)
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(h * Cv.to(tl.float32), axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * stride_z_b + offs_d * stride_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + pid_b * stride_out_b + offs_d * stride_out_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """Decode step on the Triton kernel (backend "triton"); same contract as ``selective_state_update``:
    state (batch, dim, N) updated in place; x, dt, z (batch, dim); B, C (batch, N) or (batch, G, N)."""
    batch, dim, state_size = state.shape
    Bg = B[:, None] if B.dim() == 2 else B
    Cg = C[:, None] if C.dim() == 2 else C
    dim_per_group = dim // Bg.shape[1]
    out = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    n_pad = next_pow2(state_size)
    block_d = max(1, min(64, 2048 // n_pad, next_pow2(dim)))
    zz = z if z is not None else x
    grid = (triton.cdiv(dim, block_d), batch)
    _selective_state_update_kernel[grid](
        state, x, dt, A, Bg, Cg, D if D is not None else x, zz, dt_bias if dt_bias is not None else x, out,
        dim, dim_per_group,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *Bg.stride(), *Cg.stride(), *zz.stride(),
        *out.stride(),
        N=state_size, N_PAD=n_pad, BLOCK_D=block_d,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        num_warps=4,
    )
    return out
