"""The reference the fused decode step is tested against: the same steps with the package's existing PyTorch ops
(``MambaRMSNorm``'s math, ``causal_conv1d_update_ref``, ``F.linear``, ``selective_state_update_ref``), rounding where
the unfused mixer rounds (conv output, x_proj's and dt_proj's outputs in the model dtype). Needs no Triton."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...modeling.ops_selective_scan import causal_conv1d_update_ref, selective_state_update_ref
from ..linear_rows.naive import sum_partials_ref


def add_rms_norm_ref(residual_in, delta, weight, eps, residual_out, out, norm_dtype, delta_dtype=None):
    """Same contract as ``fused.add_rms_norm``: residual_out = residual_in + delta (float32 sum, in residual_out's
    dtype); out = ``MambaRMSNorm(residual_out, input_dtype=norm_dtype)`` in out's dtype. A 3-D delta holds float32
    partial sums (splits, rows, hidden): added in split order, rounded to ``delta_dtype`` first. Returns out."""
    if delta is not None and delta.dim() == 3:
        if delta_dtype is None:
            raise ValueError("add_rms_norm_ref: partial sums need delta_dtype")
        delta = sum_partials_ref(delta, delta_dtype)
    total = residual_in.float() if delta is None else residual_in.float() + delta.float()
    residual_out.copy_(total.to(residual_out.dtype))
    # MambaRMSNorm(residual_out, input_dtype=norm_dtype) (as kernels/rms_norm/naive.py, which imports Triton's package)
    hidden = residual_out.to(norm_dtype).to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    out.copy_((weight * hidden.to(norm_dtype)).to(out.dtype))
    return out


def split_count(dim: int, batch=None) -> int:
    """The reference needs no partials buffer; one 'split' keeps the callers' workspace shapes valid."""
    return 1


def counter_count(n_proj: int, batch: int) -> int:
    """The reference needs no counters; one keeps the callers' workspace shapes valid."""
    return 1


def mixer_decode_step_ref(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                          dt_proj_bias, A_log, D, partials=None, out=None, counters=None):
    """Same contract as ``fused.mixer_decode_step`` (``partials`` and ``counters`` are ignored): xz (batch, 2 * dim)
    -> y (batch, dim), conv_state (batch, dim, W) and ssm_state (batch, dim, N) updated in place."""
    dim = xz.shape[1] // 2
    state_size = ssm_state.shape[-1]
    x, z = xz[:, :dim], xz[:, dim:]
    x = causal_conv1d_update_ref(x, conv_state, conv_weight, conv_bias, activation="silu")
    params = F.linear(x, x_proj_weight)
    rank = x_proj_weight.shape[0] - 2 * state_size
    time_step, B, C = torch.split(params, [rank, state_size, state_size], dim=-1)
    dt = F.linear(time_step, dt_proj_weight, dt_proj_bias)
    y = selective_state_update_ref(ssm_state, x, dt, -torch.exp(A_log.float()), B, C, D, z=z, dt_softplus=True)
    if out is not None:
        out.copy_(y)
        return out
    return y


def in_projection(x, linear):
    """Same contract as ``fused.in_projection``: the module call."""
    return linear(x)


def out_projection(y, linear):
    """Same contract as ``fused.out_projection``: the module call (never partial sums)."""
    return linear(y)


# The names the model's decode step calls on its kernel module (``MambaBackbone._fused_decode_step(..., ops)``), so
# this module can stand in for ``fused`` (tests run the whole step on it).
add_rms_norm = add_rms_norm_ref
mixer_decode_step = mixer_decode_step_ref
