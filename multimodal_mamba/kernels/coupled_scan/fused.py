"""Triton coupled selective scan (Coupled Mamba, Eq. 6): forward and backward kernels and the autograd wrapper.

Reference (the definition of correct): ``multimodal_mamba.modeling.ops_coupled_scan.coupled_selective_scan_ref``
(re-exported by ``naive.py`` beside this file). Contract: the module docstring of ``ops_coupled_scan``.

The coupled state obeys one diagonal recurrence, H_t = S_t H_{t-1} + U_t with S_t = c sum_m a^m_t and
U_t = c sum_m b^m_t, and every chain reads H_{t-1}: h^m_t = a^m_t H_{t-1} + b^m_t, y^m_t = <C^m_t, h^m_t>. A program
per (batch, block of channels) walks the sequence in chunks of BLOCK_T steps; each chain m (M <= 4, unrolled at
compile time) has its own (BLOCK_D, BLOCK_T) tiles, all in one layout. For each state index n the chains' decays and
drives are summed and ONE ``tl.associative_scan`` along time yields H_{t-1} directly (an exclusive scan: the tuple
(S, U, P, Q) carries the composite of the steps before t besides the one up to t, so no division by a decay and no
shifted reload); the readouts of all chains follow. The carried state goes through memory as in the selective scan
(slots of (batch, dim, n_slots, N)), written from the one element that holds a chunk's last state. u, delta, z and
y cross HBM once.

Backward, per chunk in reverse: recompute H_{t-1} from the saved chunk-start state; the adjoint of H obeys
G_{t-1} = S_t G_t + sum_m a^m_t dh^m_t (dh^m_t = dy^m_t C^m_t), one reverse exclusive scan that yields G_t; then
da^m = (dh^m + c G) H_{t-1}, db^m = dh^m + c G, and the chain rule through a = exp(dt A), b = dt B u, softplus, D
and the gate. dB, dC are summed over channels with atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import empty_like_layout, next_pow2, softplus
from . import sequential

MAX_CHAINS = 4  # chains unrolled in the kernels; more fall back to the PyTorch path (see kernels/__init__.py)


@triton.jit
def exclusive_affine_combine(s1, u1, p1, q1, s2, u2, p2, q2):
    """(S, U): the composite map of a segment; (P, Q): the composite of the segment without its last step.
    Leaves are (S_t, U_t, 1, 0); the scan's (P, Q) at t maps the carried state to the state before step t."""
    return s1 * s2, u1 * s2 + u2, s1 * p2, u1 * p2 + q2


@triton.jit
def _chain_inputs(u_base, delta_base, m, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t, mask,
                  bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Chain m's u and dt over the chunk, (BLOCK_D, BLOCK_T) float32; padded steps get dt = 0."""
    u = tl.load(u_base + m * stride_u_m + t[None, :] * stride_u_l, mask=mask, other=0.0).to(tl.float32)
    dt = tl.load(delta_base + m * stride_delta_m + t[None, :] * stride_delta_l, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + m * stride_bias_m + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SOFTPLUS:
        dt = softplus(dt)
    return u, tl.where(mask, dt, 0.0)


@triton.jit
def _chain_ab(A_base, B_base, C_base, m, n, dt, dtu, stride_A_m, stride_A_n, stride_B_m, stride_B_n, stride_B_l,
              stride_C_m, stride_C_n, stride_C_l, t, mask_t, mask_d):
    """Chain m, state n: decay a = exp(dt A), drive b = dt u B, the readout row C, and A."""
    A = tl.load(A_base + m * stride_A_m + n * stride_A_n, mask=mask_d, other=0.0).to(tl.float32)
    Bn = tl.load(B_base + m * stride_B_m + n * stride_B_n + t * stride_B_l, mask=mask_t, other=0.0).to(tl.float32)
    Cn = tl.load(C_base + m * stride_C_m + n * stride_C_n + t * stride_C_l, mask=mask_t, other=0.0).to(tl.float32)
    a = tl.exp2(dt * (A * 1.4426950408889634)[:, None])
    return a, dtu * Bn[None, :], Cn[None, :], Bn[None, :], A


@triton.jit
def _chain_out(y, u, z_base, out_base, m, stride_z_m, stride_z_l, stride_out_m, stride_out_l, t, mask, D_ptr,
               stride_Dp_m, offs_d, mask_d, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    if HAS_D:
        y += u * tl.load(D_ptr + m * stride_Dp_m + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if HAS_Z:
        zz = tl.load(z_base + m * stride_z_m + t[None, :] * stride_z_l, mask=mask, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(out_base + m * stride_out_m + t[None, :] * stride_out_l, y.to(out_base.dtype.element_ty), mask=mask)


@triton.jit
def _coupled_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, states_ptr,
    dim, length, n_chunks, n_slots, scale,
    stride_u_b, stride_u_m, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_m, stride_delta_d, stride_delta_l,
    stride_A_m, stride_A_d, stride_A_n,
    stride_B_b, stride_B_m, stride_B_n, stride_B_l,
    stride_C_b, stride_C_m, stride_C_n, stride_C_l,
    stride_z_b, stride_z_m, stride_z_d, stride_z_l,
    stride_out_b, stride_out_m, stride_out_d, stride_out_l,
    stride_Dp_m, stride_bias_m,
    M: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    u_base = u_ptr + pid_b * stride_u_b + offs_d[:, None] * stride_u_d
    delta_base = delta_ptr + pid_b * stride_delta_b + offs_d[:, None] * stride_delta_d
    z_base = z_ptr + pid_b * stride_z_b + offs_d[:, None] * stride_z_d
    out_base = out_ptr + pid_b * stride_out_b + offs_d[:, None] * stride_out_d
    A_base = A_ptr + offs_d * stride_A_d
    B_base = B_ptr + pid_b * stride_B_b
    C_base = C_ptr + pid_b * stride_C_b

    # carried coupled state H in memory: slot c = H before chunk c when SAVE_STATES (last slot: the final state),
    # else two slots in turn
    slot_row = (pid_b * dim + offs_d) * n_slots
    if HAS_H0:
        h0 = tl.load(h0_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0)
    else:
        h0 = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    tl.store(states_ptr + slot_row[:, None] * N + offs_n[None, :], h0, mask=mask_dn)
    last = mask_d[:, None] & (offs_t == BLOCK_T - 1)[None, :]
    ones = tl.full([BLOCK_D, BLOCK_T], 1.0, tl.float32)
    zeros = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)

    for chunk in range(n_chunks):
        tl.debug_barrier()
        if SAVE_STATES:
            read_slot = chunk
            write_slot = chunk + 1
        else:
            read_slot = chunk % 2
            write_slot = 1 - read_slot
        read_base = states_ptr + (slot_row + read_slot) * N
        write_ptrs = states_ptr + (slot_row[:, None] + write_slot) * N + offs_t[None, :] * 0
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        mask = mask_d[:, None] & mask_t[None, :]
        u0, dt0 = _chain_inputs(u_base, delta_base, 0, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t,
                                mask, bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS, SOFTPLUS)
        dtu0 = dt0 * u0
        y0 = zeros
        if M > 1:
            u1, dt1 = _chain_inputs(u_base, delta_base, 1, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t,
                                    mask, bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS, SOFTPLUS)
            dtu1 = dt1 * u1
            y1 = zeros
        if M > 2:
            u2, dt2 = _chain_inputs(u_base, delta_base, 2, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t,
                                    mask, bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS, SOFTPLUS)
            dtu2 = dt2 * u2
            y2 = zeros
        if M > 3:
            u3, dt3 = _chain_inputs(u_base, delta_base, 3, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t,
                                    mask, bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS, SOFTPLUS)
            dtu3 = dt3 * u3
            y3 = zeros
        for n in range(N):
            a0, b0, C0, B0, A0 = _chain_ab(A_base, B_base, C_base, 0, n, dt0, dtu0, stride_A_m, stride_A_n,
                                           stride_B_m, stride_B_n, stride_B_l, stride_C_m, stride_C_n, stride_C_l,
                                           t, mask_t, mask_d)
            S = a0
            U = b0
            if M > 1:
                a1, b1, C1, B1, A1 = _chain_ab(A_base, B_base, C_base, 1, n, dt1, dtu1, stride_A_m, stride_A_n,
                                               stride_B_m, stride_B_n, stride_B_l, stride_C_m, stride_C_n,
                                               stride_C_l, t, mask_t, mask_d)
                S += a1
                U += b1
            if M > 2:
                a2, b2, C2, B2, A2 = _chain_ab(A_base, B_base, C_base, 2, n, dt2, dtu2, stride_A_m, stride_A_n,
                                               stride_B_m, stride_B_n, stride_B_l, stride_C_m, stride_C_n,
                                               stride_C_l, t, mask_t, mask_d)
                S += a2
                U += b2
            if M > 3:
                a3, b3, C3, B3, A3 = _chain_ab(A_base, B_base, C_base, 3, n, dt3, dtu3, stride_A_m, stride_A_n,
                                               stride_B_m, stride_B_n, stride_B_l, stride_C_m, stride_C_n,
                                               stride_C_l, t, mask_t, mask_d)
                S += a3
                U += b3
            S = tl.where(mask_t[None, :], S * scale, 1.0)  # padded steps: identity
            U = U * scale
            S_cum, U_cum, P, Q = tl.associative_scan((S, U, ones, zeros), axis=1, combine_fn=exclusive_affine_combine)
            H_n = tl.load(read_base + n, mask=mask_d, other=0.0)[:, None]
            prev = Q + P * H_n  # H_{t-1}
            tl.store(write_ptrs + n, U_cum + S_cum * H_n, mask=last)
            y0 += (a0 * prev + b0) * C0
            if M > 1:
                y1 += (a1 * prev + b1) * C1
            if M > 2:
                y2 += (a2 * prev + b2) * C2
            if M > 3:
                y3 += (a3 * prev + b3) * C3
        _chain_out(y0, u0, z_base, out_base, 0, stride_z_m, stride_z_l, stride_out_m, stride_out_l, t, mask, D_ptr,
                   stride_Dp_m, offs_d, mask_d, HAS_D, HAS_Z)
        if M > 1:
            _chain_out(y1, u1, z_base, out_base, 1, stride_z_m, stride_z_l, stride_out_m, stride_out_l, t, mask,
                       D_ptr, stride_Dp_m, offs_d, mask_d, HAS_D, HAS_Z)
        if M > 2:
            _chain_out(y2, u2, z_base, out_base, 2, stride_z_m, stride_z_l, stride_out_m, stride_out_l, t, mask,
                       D_ptr, stride_Dp_m, offs_d, mask_d, HAS_D, HAS_Z)
        if M > 3:
            _chain_out(y3, u3, z_base, out_base, 3, stride_z_m, stride_z_l, stride_out_m, stride_out_l, t, mask,
                       D_ptr, stride_Dp_m, offs_d, mask_d, HAS_D, HAS_Z)


@triton.jit
def _chain_dy(dout_base, z_base, m, stride_dout_m, stride_dout_l, stride_z_m, stride_z_l, t, mask,
              HAS_Z: tl.constexpr):
    dy = tl.load(dout_base + m * stride_dout_m + t[None, :] * stride_dout_l, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_base + m * stride_z_m + t[None, :] * stride_z_l, mask=mask, other=0.0).to(tl.float32)
        dy = dy * zz * tl.sigmoid(zz)
    return dy


@triton.jit
def _chain_grad(a, b, Cn, Bn, A, prev, dy, G, u, dt, dtu, y, ddt, du, dA_acc, n, offs_t, scale,
                dB_ptrs, dC_ptrs, mask_t, ATOMIC_BC: tl.constexpr):
    """Chain m's share of state n's gradients (see the module docstring)."""
    h = a * prev + b
    y += h * Cn
    K = dy * Cn + scale * G  # the gradient of h^m_t, through y and through H_t
    Ka = K * a * prev  # da^m * a^m
    ddt += Ka * A[:, None] + K * u * Bn
    du += K * dt * Bn
    dA_acc += tl.where(offs_t[None, :] == n, tl.sum(Ka * dt, axis=1)[:, None], 0.0)
    if ATOMIC_BC:
        tl.atomic_add(dB_ptrs, tl.sum(K * dtu, axis=0), mask=mask_t, sem="relaxed")
        tl.atomic_add(dC_ptrs, tl.sum(dy * h, axis=0), mask=mask_t, sem="relaxed")
    else:
        tl.store(dB_ptrs, tl.sum(K * dtu, axis=0), mask=mask_t)
        tl.store(dC_ptrs, tl.sum(dy * h, axis=0), mask=mask_t)
    return y, ddt, du, dA_acc


@triton.jit
def _chain_finish(y, ddt, du, dA_acc, dD_acc, dbias_acc, u, dy, m, z_base, dout_base,
                  delta_base, du_base, ddelta_base, dz_base, t, mask, offs_d, mask_d, D_ptr, stride_Dp_m, bias_ptr,
                  stride_bias_m, stride_z_m, stride_z_l, stride_dout_m, stride_dout_l, stride_delta_m,
                  stride_delta_l, stride_du_m, stride_du_l, stride_ddelta_m, stride_ddelta_l, stride_dz_m,
                  stride_dz_l, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SOFTPLUS: tl.constexpr):
    """The end of a chunk for chain m: skip term, gate and softplus gradients, stores."""
    if HAS_D:
        skip = tl.load(D_ptr + m * stride_Dp_m + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y += u * skip[:, None]
        du += dy * skip[:, None]
        dD_acc += tl.sum(dy * u, axis=1)
    if HAS_Z:
        dout = tl.load(dout_base + m * stride_dout_m + t[None, :] * stride_dout_l, mask=mask, other=0.0)
        zz = tl.load(z_base + m * stride_z_m + t[None, :] * stride_z_l, mask=mask, other=0.0).to(tl.float32)
        z_sig = tl.sigmoid(zz)
        dz = dout.to(tl.float32) * y * z_sig * (1.0 + zz * (1.0 - z_sig))
        tl.store(dz_base + m * stride_dz_m + t[None, :] * stride_dz_l, dz.to(dz_base.dtype.element_ty), mask=mask)
    if SOFTPLUS:
        raw = tl.load(delta_base + m * stride_delta_m + t[None, :] * stride_delta_l, mask=mask, other=0.0)
        raw = raw.to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + m * stride_bias_m + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        ddt = ddt * tl.sigmoid(raw)
    ddt = tl.where(mask, ddt, 0.0)
    dbias_acc += tl.sum(ddt, axis=1)
    tl.store(du_base + m * stride_du_m + t[None, :] * stride_du_l, du.to(du_base.dtype.element_ty), mask=mask)
    tl.store(ddelta_base + m * stride_ddelta_m + t[None, :] * stride_ddelta_l, ddt.to(ddelta_base.dtype.element_ty),
             mask=mask)
    return dD_acc, dbias_acc


@triton.jit
def _coupled_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dfinal_ptr, gbuf_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, length, n_chunks, n_saved, scale,
    stride_u_b, stride_u_m, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_m, stride_delta_d, stride_delta_l,
    stride_A_m, stride_A_d, stride_A_n,
    stride_B_b, stride_B_m, stride_B_n, stride_B_l,
    stride_C_b, stride_C_m, stride_C_n, stride_C_l,
    stride_z_b, stride_z_m, stride_z_d, stride_z_l,
    stride_dout_b, stride_dout_m, stride_dout_d, stride_dout_l,
    stride_du_b, stride_du_m, stride_du_d, stride_du_l,
    stride_ddelta_b, stride_ddelta_m, stride_ddelta_d, stride_ddelta_l,
    stride_dz_b, stride_dz_m, stride_dz_d, stride_dz_l,
    stride_Dp_m, stride_bias_m,
    stride_dB_p, stride_dB_b, stride_dB_m, stride_dB_n,
    M: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DFINAL: tl.constexpr, N_PARTIALS: tl.constexpr, ATOMIC_BC: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < dim
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    u_base = u_ptr + pid_b * stride_u_b + offs_d[:, None] * stride_u_d
    delta_base = delta_ptr + pid_b * stride_delta_b + offs_d[:, None] * stride_delta_d
    z_base = z_ptr + pid_b * stride_z_b + offs_d[:, None] * stride_z_d
    dout_base = dout_ptr + pid_b * stride_dout_b + offs_d[:, None] * stride_dout_d
    du_base = du_ptr + pid_b * stride_du_b + offs_d[:, None] * stride_du_d
    ddelta_base = ddelta_ptr + pid_b * stride_ddelta_b + offs_d[:, None] * stride_ddelta_d
    dz_base = dz_ptr + pid_b * stride_dz_b + offs_d[:, None] * stride_dz_d
    A_base = A_ptr + offs_d * stride_A_d
    B_base = B_ptr + pid_b * stride_B_b
    C_base = C_ptr + pid_b * stride_C_b
    part = pid_d % N_PARTIALS
    dBC_off = part * stride_dB_p + pid_b * stride_dB_b

    # G (the adjoint of H) after each chunk through memory: gbuf (batch, dim, 2, N), two slots in turn
    g_row = (pid_b * dim + offs_d) * 2
    if HAS_DFINAL:
        g0 = tl.load(dfinal_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0)
    else:
        g0 = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    tl.store(gbuf_ptr + g_row[:, None] * N + offs_n[None, :], g0, mask=mask_dn)
    first = mask_d[:, None] & (offs_t == 0)[None, :]
    saved_row = (pid_b * dim + offs_d) * n_saved
    ones = tl.full([BLOCK_D, BLOCK_T], 1.0, tl.float32)
    zeros = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    zeros_d = tl.zeros([BLOCK_D], dtype=tl.float32)
    dA0 = zeros
    dD0 = zeros_d
    dbias0 = zeros_d
    if M > 1:
        dA1 = zeros
        dD1 = zeros_d
        dbias1 = zeros_d
    if M > 2:
        dA2 = zeros
        dD2 = zeros_d
        dbias2 = zeros_d
    if M > 3:
        dA3 = zeros
        dD3 = zeros_d
        dbias3 = zeros_d

    for rev in range(n_chunks):
        tl.debug_barrier()
        chunk = n_chunks - 1 - rev
        g_read_base = gbuf_ptr + (g_row + rev % 2) * N
        g_write_ptrs = gbuf_ptr + (g_row[:, None] + 1 - rev % 2) * N + offs_t[None, :] * 0
        h_base = states_ptr + (saved_row + chunk) * N
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        mask = mask_d[:, None] & mask_t[None, :]
        u0, dt0 = _chain_inputs(u_base, delta_base, 0, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t,
                                mask, bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS, SOFTPLUS)
        dtu0 = dt0 * u0
        dy0 = _chain_dy(dout_base, z_base, 0, stride_dout_m, stride_dout_l, stride_z_m, stride_z_l, t, mask, HAS_Z)
        y0 = zeros
        ddt0 = zeros
        du0 = zeros
        if M > 1:
            u1, dt1 = _chain_inputs(u_base, delta_base, 1, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t,
                                    mask, bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS, SOFTPLUS)
            dtu1 = dt1 * u1
            dy1 = _chain_dy(dout_base, z_base, 1, stride_dout_m, stride_dout_l, stride_z_m, stride_z_l, t, mask,
                            HAS_Z)
            y1 = zeros
            ddt1 = zeros
            du1 = zeros
        if M > 2:
            u2, dt2 = _chain_inputs(u_base, delta_base, 2, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t,
                                    mask, bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS, SOFTPLUS)
            dtu2 = dt2 * u2
            dy2 = _chain_dy(dout_base, z_base, 2, stride_dout_m, stride_dout_l, stride_z_m, stride_z_l, t, mask,
                            HAS_Z)
            y2 = zeros
            ddt2 = zeros
            du2 = zeros
        if M > 3:
            u3, dt3 = _chain_inputs(u_base, delta_base, 3, stride_u_m, stride_delta_m, stride_u_l, stride_delta_l, t,
                                    mask, bias_ptr, stride_bias_m, offs_d, mask_d, HAS_BIAS, SOFTPLUS)
            dtu3 = dt3 * u3
            dy3 = _chain_dy(dout_base, z_base, 3, stride_dout_m, stride_dout_l, stride_z_m, stride_z_l, t, mask,
                            HAS_Z)
            y3 = zeros
            ddt3 = zeros
            du3 = zeros
        for n in range(N):
            a0, b0, C0, B0, A0 = _chain_ab(A_base, B_base, C_base, 0, n, dt0, dtu0, stride_A_m, stride_A_n,
                                           stride_B_m, stride_B_n, stride_B_l, stride_C_m, stride_C_n, stride_C_l,
                                           t, mask_t, mask_d)
            S = a0
            U = b0
            R = a0 * dy0 * C0
            if M > 1:
                a1, b1, C1, B1, A1 = _chain_ab(A_base, B_base, C_base, 1, n, dt1, dtu1, stride_A_m, stride_A_n,
                                               stride_B_m, stride_B_n, stride_B_l, stride_C_m, stride_C_n,
                                               stride_C_l, t, mask_t, mask_d)
                S += a1
                U += b1
                R += a1 * dy1 * C1
            if M > 2:
                a2, b2, C2, B2, A2 = _chain_ab(A_base, B_base, C_base, 2, n, dt2, dtu2, stride_A_m, stride_A_n,
                                               stride_B_m, stride_B_n, stride_B_l, stride_C_m, stride_C_n,
                                               stride_C_l, t, mask_t, mask_d)
                S += a2
                U += b2
                R += a2 * dy2 * C2
            if M > 3:
                a3, b3, C3, B3, A3 = _chain_ab(A_base, B_base, C_base, 3, n, dt3, dtu3, stride_A_m, stride_A_n,
                                               stride_B_m, stride_B_n, stride_B_l, stride_C_m, stride_C_n,
                                               stride_C_l, t, mask_t, mask_d)
                S += a3
                U += b3
                R += a3 * dy3 * C3
            S = tl.where(mask_t[None, :], S * scale, 1.0)
            U = U * scale
            _, _, P, Q = tl.associative_scan((S, U, ones, zeros), axis=1, combine_fn=exclusive_affine_combine)
            prev = Q + P * tl.load(h_base + n, mask=mask_d, other=0.0)[:, None]  # H_{t-1}
            # adjoint of H: G_{t-1} = S_t G_t + R_t with R_t = sum_m a^m_t dy^m_t C^m_t; exclusive reverse scan
            _, _, Pg, Qg = tl.associative_scan((S, R, ones, zeros), axis=1, combine_fn=exclusive_affine_combine,
                                               reverse=True)
            G = Qg + Pg * tl.load(g_read_base + n, mask=mask_d, other=0.0)[:, None]  # G_t
            tl.store(g_write_ptrs + n, S * G + R, mask=first)  # G before the chunk, for the chunk before
            dB_off = dBC_off + n * stride_dB_n + t
            y0, ddt0, du0, dA0 = _chain_grad(a0, b0, C0, B0, A0, prev, dy0, G, u0, dt0, dtu0, y0, ddt0, du0, dA0,
                                             n, offs_t, scale, dB_ptr + dB_off, dC_ptr + dB_off, mask_t, ATOMIC_BC)
            if M > 1:
                y1, ddt1, du1, dA1 = _chain_grad(a1, b1, C1, B1, A1, prev, dy1, G, u1, dt1, dtu1, y1, ddt1, du1,
                                                 dA1, n, offs_t, scale, dB_ptr + dB_off + stride_dB_m,
                                                 dC_ptr + dB_off + stride_dB_m, mask_t, ATOMIC_BC)
            if M > 2:
                y2, ddt2, du2, dA2 = _chain_grad(a2, b2, C2, B2, A2, prev, dy2, G, u2, dt2, dtu2, y2, ddt2, du2,
                                                 dA2, n, offs_t, scale, dB_ptr + dB_off + 2 * stride_dB_m,
                                                 dC_ptr + dB_off + 2 * stride_dB_m, mask_t, ATOMIC_BC)
            if M > 3:
                y3, ddt3, du3, dA3 = _chain_grad(a3, b3, C3, B3, A3, prev, dy3, G, u3, dt3, dtu3, y3, ddt3, du3,
                                                 dA3, n, offs_t, scale, dB_ptr + dB_off + 3 * stride_dB_m,
                                                 dC_ptr + dB_off + 3 * stride_dB_m, mask_t, ATOMIC_BC)
        dD0, dbias0 = _chain_finish(
            y0, ddt0, du0, dA0, dD0, dbias0, u0, dy0, 0, z_base, dout_base, delta_base, du_base, ddelta_base,
            dz_base, t, mask, offs_d, mask_d, D_ptr, stride_Dp_m, bias_ptr, stride_bias_m, stride_z_m, stride_z_l,
            stride_dout_m, stride_dout_l, stride_delta_m, stride_delta_l, stride_du_m, stride_du_l, stride_ddelta_m,
            stride_ddelta_l, stride_dz_m, stride_dz_l, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS)
        if M > 1:
            dD1, dbias1 = _chain_finish(
                y1, ddt1, du1, dA1, dD1, dbias1, u1, dy1, 1, z_base, dout_base, delta_base, du_base,
                ddelta_base, dz_base, t, mask, offs_d, mask_d, D_ptr, stride_Dp_m, bias_ptr, stride_bias_m,
                stride_z_m, stride_z_l, stride_dout_m, stride_dout_l, stride_delta_m, stride_delta_l, stride_du_m,
                stride_du_l, stride_ddelta_m, stride_ddelta_l, stride_dz_m, stride_dz_l, HAS_D, HAS_Z, HAS_BIAS,
                SOFTPLUS)
        if M > 2:
            dD2, dbias2 = _chain_finish(
                y2, ddt2, du2, dA2, dD2, dbias2, u2, dy2, 2, z_base, dout_base, delta_base, du_base,
                ddelta_base, dz_base, t, mask, offs_d, mask_d, D_ptr, stride_Dp_m, bias_ptr, stride_bias_m,
                stride_z_m, stride_z_l, stride_dout_m, stride_dout_l, stride_delta_m, stride_delta_l, stride_du_m,
                stride_du_l, stride_ddelta_m, stride_ddelta_l, stride_dz_m, stride_dz_l, HAS_D, HAS_Z, HAS_BIAS,
                SOFTPLUS)
        if M > 3:
            dD3, dbias3 = _chain_finish(
                y3, ddt3, du3, dA3, dD3, dbias3, u3, dy3, 3, z_base, dout_base, delta_base, du_base,
                ddelta_base, dz_base, t, mask, offs_d, mask_d, D_ptr, stride_Dp_m, bias_ptr, stride_bias_m,
                stride_z_m, stride_z_l, stride_dout_m, stride_dout_l, stride_delta_m, stride_delta_l, stride_du_m,
                stride_du_l, stride_ddelta_m, stride_ddelta_l, stride_dz_m, stride_dz_l, HAS_D, HAS_Z, HAS_BIAS,
                SOFTPLUS)

    tl.debug_barrier()
    g_first = tl.load(gbuf_ptr + (g_row[:, None] + n_chunks % 2) * N + offs_n[None, :], mask=mask_dn, other=0.0)
    tl.store(dh0_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :], g_first, mask=mask_dn)
    # per-batch partials: dA (batch, M, dim, N) from the column tiles; dD, dbias (batch, M, dim)
    dA_cols = (offs_t[None, :] < N) & mask_d[:, None]
    _store_chain_partials(dA_ptr, dD_ptr, dbias_ptr, dA0, dD0, dbias0, pid_b, 0, M, dim, N, offs_d, offs_t, dA_cols,
                          mask_d)
    if M > 1:
        _store_chain_partials(dA_ptr, dD_ptr, dbias_ptr, dA1, dD1, dbias1, pid_b, 1, M, dim, N, offs_d, offs_t,
                              dA_cols, mask_d)
    if M > 2:
        _store_chain_partials(dA_ptr, dD_ptr, dbias_ptr, dA2, dD2, dbias2, pid_b, 2, M, dim, N, offs_d, offs_t,
                              dA_cols, mask_d)
    if M > 3:
        _store_chain_partials(dA_ptr, dD_ptr, dbias_ptr, dA3, dD3, dbias3, pid_b, 3, M, dim, N, offs_d, offs_t,
                              dA_cols, mask_d)


@triton.jit
def _store_chain_partials(dA_ptr, dD_ptr, dbias_ptr, dA, dD, dbias, pid_b, m, M: tl.constexpr, dim, N: tl.constexpr,
                          offs_d, offs_t, dA_cols, mask_d):
    row = (pid_b * M + m) * dim + offs_d
    tl.store(dA_ptr + row[:, None] * N + offs_t[None, :], dA, mask=dA_cols)
    tl.store(dD_ptr + row, dD, mask=mask_d)
    tl.store(dbias_ptr + row, dbias, mask=mask_d)


# (block_d, block_t, num_warps) by layout, chosen on an H200 (benchmarks/bench_gpu_coupled_scan.py --sweep). As for
# the selective scan, a chunk's time axis within one warp keeps every scan and reduction in shuffles.
# The forward kernel of the stacked op (see coupled_scan_fwd): "chunked" (the kernel above), "sequential"
# (sequential.py) or "auto": sequential where batch * dim >= SEQ_MIN_CHANNELS, else chunked. The sequential kernel
# runs one warp per 8 - 16 channels, so it needs many channels to fill the GPU. Measured on the H200
# (bench_gpu_coupled_seq_variants.py, bf16, N 16, M 3), sequential vs chunked: batch 8, dim 1024, L 4096: 1.97 vs
# 2.72 ms; batch 32, dim 512, L 500: 0.51 vs 1.11 ms; batch 16, dim 256, L 500 (4096 channels): 0.51 vs 0.30 ms.
FWD_IMPL = "auto"
SEQ_MIN_CHANNELS = 8192
# The per-modality inference path (no stacking copies) runs the sequential kernel, for "mean" and "sum". ("sum" was
# once sent to the stacked path after a whole-model GPU test disagreed; the cause was the test's model, whose state
# grew like 3^t under "sum" until the next layer's norm overflowed (NaN on every backend), not the kernel.)
CHAINS_ENABLED = True
FWD_CONFIGS = {"lmajor": (1, 256, 1), "tmajor": (1, 256, 1)}  # the chunked forward's
BWD_CONFIGS = {"lmajor": (1, 128, 1), "tmajor": (1, 128, 1)}
COPY_TIME_MAJOR = True  # copy time-major inputs to (batch, M, dim, L) first (see the selective scan)
PARTIALS_MAX_BYTES = 64 << 20


def _layout(u):
    return "tmajor" if u.stride(-1) != 1 and u.shape[-1] > 1 else "lmajor"


def _lmajor(t):
    if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def _scale(coupling, chains):
    return 1.0 / chains if coupling == "mean" else 1.0


def _block_t(u, state_size, block_t):
    return max(16, next_pow2(state_size), min(block_t, next_pow2(u.shape[-1])))


def _use_sequential(impl, state_size, channels):
    impl = impl or FWD_IMPL
    if impl not in ("sequential", "chunked", "auto"):
        raise ValueError(f"coupled scan forward: impl must be 'sequential', 'chunked' or 'auto', got {impl!r}")
    if impl == "auto":
        impl = "sequential" if channels >= SEQ_MIN_CHANNELS else "chunked"
    return impl == "sequential" and next_pow2(state_size) <= sequential.MAX_STATE


def coupled_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, initial_state, save_states,
                     config=None, impl=None):
    """Launch the forward kernel. Returns (out, final_state, saved states or None, meta).

    impl: "sequential" (``sequential.py``, where N <= 64; config (block_d, num_warps, K[, prefetch_bc, bc_ahead])),
    "chunked" (the chunked-scan kernel above; config (block_d, block_t, num_warps)) or None: ``FWD_IMPL``. With
    ``save_states`` both write the coupled state before every backward chunk (``BWD_CONFIGS``' block_t steps), as
    ``coupled_scan_bwd`` reads it."""
    batch, chains, dim, length = u.shape
    if chains > MAX_CHAINS:
        raise ValueError(f"the Triton coupled scan takes at most {MAX_CHAINS} chains, got {chains}")
    state_size = A.shape[2]
    if _use_sequential(impl, state_size, batch * dim):
        block_t = _block_t(u, state_size, BWD_CONFIGS[_layout(u)][1]) if save_states else 0
        out, final, states = sequential.coupled_scan_fwd_seq(
            [u[:, m] for m in range(chains)], [delta[:, m] for m in range(chains)],
            [z[:, m] for m in range(chains)] if z is not None else None, A,
            [B[:, m] for m in range(chains)], [C[:, m] for m in range(chains)], D, delta_bias, delta_softplus,
            coupling, initial_state, save_every=block_t, config=config,
        )
        return out, final, states, dict(block_t=block_t)
    block_d, block_t, num_warps = config or FWD_CONFIGS[_layout(u)]
    if save_states and config is None:  # the backward walks the forward's chunks: use its (smaller) block
        block_t = min(block_t, BWD_CONFIGS[_layout(u)][1])
    block_t = _block_t(u, state_size, block_t)
    n_chunks = triton.cdiv(length, block_t)
    n_slots = n_chunks + 1 if save_states else 2
    out = empty_like_layout(u)
    states = torch.empty(batch, dim, n_slots, state_size, device=u.device, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else states
    zz = z if z is not None else u
    Dp = (D if D is not None else A[:, :, 0]).contiguous()
    bias = (delta_bias if delta_bias is not None else A[:, :, 0]).contiguous()
    grid = (triton.cdiv(dim, block_d), batch)
    _coupled_fwd_kernel[grid](
        u, delta, A, B, C, Dp, zz, bias, h0, out, states,
        dim, length, n_chunks, n_slots, _scale(coupling, chains),
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(), *out.stride(),
        Dp.stride(0), bias.stride(0),
        M=chains, N=state_size, N_PAD=next_pow2(state_size), BLOCK_D=block_d, BLOCK_T=block_t,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_H0=initial_state is not None, SAVE_STATES=bool(save_states), num_warps=num_warps,
    )
    final = states[:, :, n_slots - 1 if save_states else n_chunks % 2]
    return out, final, (states if save_states else None), dict(block_t=block_t)


def coupled_scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, states, block_t, dout,
                     dfinal=None, config=None, partials=None):
    """``states``: the forward's saved states (chunks of ``block_t`` steps). Returns the gradients
    (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), None for absent inputs."""
    batch, chains, dim, length = u.shape
    state_size = A.shape[2]
    block_d, _, num_warps = config or BWD_CONFIGS[_layout(u)]
    n_chunks = triton.cdiv(length, block_t)
    n_blocks = triton.cdiv(dim, block_d)
    per_copy = batch * chains * state_size * length * 4 * 2
    if partials is None:
        partials = max(1, min(n_blocks, PARTIALS_MAX_BYTES // max(per_copy, 1)))
    partials = max(1, min(int(partials), n_blocks))
    atomic = partials < n_blocks
    alloc = torch.zeros if atomic else torch.empty
    dB_part = alloc(partials, batch, chains, state_size, length, device=u.device, dtype=torch.float32)
    dC_part = alloc(partials, batch, chains, state_size, length, device=u.device, dtype=torch.float32)
    if dout is None:
        dout = torch.zeros_like(u)
    du = empty_like_layout(u)
    ddelta = empty_like_layout(delta)
    dz = empty_like_layout(z) if z is not None else None
    dA_part = torch.empty(batch, chains, dim, state_size, device=u.device, dtype=torch.float32)
    dD_part = torch.empty(batch, chains, dim, device=u.device, dtype=torch.float32)
    dbias_part = torch.empty(batch, chains, dim, device=u.device, dtype=torch.float32)
    dh0 = torch.empty(batch, dim, state_size, device=u.device, dtype=torch.float32)
    gbuf = torch.empty(batch, dim, 2, state_size, device=u.device, dtype=torch.float32)
    zz = z if z is not None else u
    dzz = dz if dz is not None else du
    Dp = (D if D is not None else A[:, :, 0]).contiguous()
    bias = (delta_bias if delta_bias is not None else A[:, :, 0]).contiguous()
    dfinal_arg = dfinal.float().contiguous() if dfinal is not None else dh0
    grid = (n_blocks, batch)
    _coupled_bwd_kernel[grid](
        u, delta, A, B, C, Dp, zz, bias, states, dout, dfinal_arg, gbuf,
        du, ddelta, dzz, dA_part, dB_part, dC_part, dD_part, dbias_part, dh0,
        dim, length, n_chunks, states.shape[2], _scale(coupling, chains),
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(), *dout.stride(),
        *du.stride(), *ddelta.stride(), *dzz.stride(),
        Dp.stride(0), bias.stride(0),
        dB_part.stride(0), dB_part.stride(1), dB_part.stride(2), dB_part.stride(3),
        M=chains, N=state_size, N_PAD=next_pow2(state_size), BLOCK_D=block_d, BLOCK_T=block_t,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_DFINAL=dfinal is not None, N_PARTIALS=partials, ATOMIC_BC=atomic, num_warps=num_warps,
    )
    dB = dB_part.sum(0) if partials > 1 else dB_part[0]
    dC = dC_part.sum(0) if partials > 1 else dC_part[0]
    return (
        du, ddelta, dA_part.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD_part.sum(0).to(D.dtype) if D is not None else None,
        dz,
        dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
        dh0,
    )


class CoupledScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, initial_state,
                return_final_state, grad_mode):
        needs_grad = grad_mode and any(ctx.needs_input_grad)  # (forward itself runs without grad mode)
        if COPY_TIME_MAJOR and (needs_grad or not _use_sequential(None, A.shape[2], u.shape[0] * u.shape[2])):
            # the chunked kernels read rows of L; the sequential forward reads either layout in place
            u, delta, z, B, C = _lmajor(u), _lmajor(delta), _lmajor(z), _lmajor(B), _lmajor(C)
        out, final, states, meta = coupled_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, initial_state, save_states=needs_grad
        )
        ctx.delta_softplus, ctx.coupling = delta_softplus, coupling
        ctx.return_final_state = return_final_state
        ctx.has_initial_state = initial_state is not None
        ctx.block_t = meta["block_t"]
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.set_materialize_grads(False)
        return (out, final) if return_final_state else out

    @staticmethod
    def backward(ctx, dout, *rest):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        dfinal = rest[0] if ctx.return_final_state and rest else None
        if COPY_TIME_MAJOR and dout is not None:
            dout = _lmajor(dout)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = coupled_scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.coupling, states, ctx.block_t, dout, dfinal
        )
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, (dh0 if ctx.has_initial_state else None), None, None


def coupled_selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, coupling="mean", initial_state=None,
    return_final_state=False,
):
    """The coupled selective scan on the Triton kernels (backend "triton"); same contract as
    ``coupled_selective_scan`` (at most ``MAX_CHAINS`` chains)."""
    if coupling not in ("mean", "sum"):
        raise ValueError(f"coupled_selective_scan: coupling must be 'mean' or 'sum', got {coupling!r}")
    return CoupledScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), coupling, initial_state, bool(return_final_state),
        torch.is_grad_enabled(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Chains given separately (a Coupled Mamba layer's per-modality activations), without gradients
# ----------------------------------------------------------------------------------------------------------------
def _same_layout(tensors):
    """One shape, strides, dtype and device for every tensor of a chain list."""
    first = tensors[0]
    shape, strides, dtype, device = first.shape, first.stride(), first.dtype, first.device
    return all(t.shape == shape and t.stride() == strides and t.dtype == dtype and t.device == device
               for t in tensors[1:])


def accepts_coupled_selective_scan_chains(us, deltas, A, Bs, Cs, D=None, zs=None, delta_bias=None,
                                          delta_softplus=True, coupling="mean", initial_state=None,
                                          return_final_state=False, outs=None) -> bool:
    """Whether ``coupled_selective_scan_chains_triton`` takes the call: kernel device and float dtypes, 1..4 chains
    of one shape, strides, dtype and device per list, N <= 64, and no gradient needed (it has no backward).
    (Runs once per layer call: the per-tensor checks look at one tensor per list.)"""
    from .. import _needs_grad, _tensors_ok

    if not CHAINS_ENABLED or coupling not in ("mean", "sum") or not 1 <= len(us) <= MAX_CHAINS:
        return False
    lists = (us, deltas, Bs, Cs) if zs is None else (us, deltas, Bs, Cs, zs)
    if outs is not None:  # (their count, shapes and dtype were checked by coupled_selective_scan_chains)
        lists = lists + (outs,)
    if any(len(t) != len(us) for t in lists) or us[0].shape[-1] < 1:
        return False
    if next_pow2(A.shape[-1]) > sequential.MAX_STATE or not all(_same_layout(t) for t in lists):
        return False
    if torch.is_grad_enabled() and _needs_grad(*us, *deltas, A, *Bs, *Cs, D, *(zs or ()), delta_bias,
                                               initial_state):
        return False
    return _tensors_ok(*(t[0] for t in lists), A, D, delta_bias, initial_state)


def coupled_selective_scan_chains_triton(us, deltas, A, Bs, Cs, D=None, zs=None, delta_bias=None,
                                         delta_softplus=True, coupling="mean", initial_state=None,
                                         return_final_state=False, outs=None):
    """The coupled scan of ``coupled_selective_scan`` with the M chains given as lists (us, deltas, zs: M tensors
    (batch, dim, L); Bs, Cs: M tensors (batch, N, L)), read where they lie: no stacking copies. Forward only.

    y is (batch, M, dim, L); for time-major inputs (a layer's activations) its memory is (M, batch, L, dim), so that
    ``y[:, m].transpose(1, 2)`` is a contiguous (batch, L, dim) tensor for the chain's out_proj. With ``outs`` (M
    tensors like ``us``, possibly ``us`` themselves) y is written there and the list is returned instead."""
    if coupling not in ("mean", "sum"):
        raise ValueError(f"coupled_selective_scan: coupling must be 'mean' or 'sum', got {coupling!r}")
    chains = len(us)
    batch, dim, length = us[0].shape
    out = list(outs) if outs is not None else None
    if out is None and not sequential._is_lmajor(us[0]):
        out = torch.empty(chains, batch, length, dim, device=us[0].device, dtype=us[0].dtype).permute(1, 0, 3, 2)
    y, final, _ = sequential.coupled_scan_fwd_seq(
        list(us), list(deltas), list(zs) if zs is not None else None, A, list(Bs), list(Cs), D, delta_bias,
        bool(delta_softplus), coupling, initial_state, out=out,
    )
    return (y, final) if return_final_state else y


coupled_selective_scan_triton.chains = coupled_selective_scan_chains_triton
coupled_selective_scan_triton.chains_accepts = accepts_coupled_selective_scan_chains
