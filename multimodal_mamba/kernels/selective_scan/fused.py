"""Triton selective scan: forward and backward kernels and their autograd wrapper.

Reference (the definition of correct): ``multimodal_mamba.modeling.ops_selective_scan.selective_scan_ref``
(re-exported by ``naive.py`` beside this file). Contract: the module docstring of ``ops_selective_scan``.

Design (measurements: ``benchmarks/results/gpu_selective_scan.md`` and ``gpu_kernels_notes.md``):

- One program per (batch, block of ``BLOCK_D`` channels); by default one warp per channel. It walks the sequence in
  chunks of ``BLOCK_T`` steps (512 forward, 128 backward: the whole chunk lies within the warp, so every scan and
  reduction is a shuffle, never a barrier). Inside a chunk, for each state index n, the decays a_t = exp(dt_t A_n)
  and drives b_t = dt_t B_{n,t} u_t of the (BLOCK_D, BLOCK_T) tile are combined by one ``tl.associative_scan`` along
  time (work-efficient: sequential inside a thread, shuffles across), the carried state entering as the first drive,
  and y accumulates <C_t, h_t>. u, delta, z and the output cross HBM once.
- The carried state goes through memory (an L1/L2-resident slot buffer): each chunk reads h_n (one value per
  channel, broadcast) and writes the next (in inference from a warp sum of the last step's element, in training from
  the elements at the save points). In training the forward keeps a slot every backward chunk; the backward walks the
  chunks in reverse, recomputes the chunk's states from its slot, runs the adjoint recurrence
  g_t = a_{t+1} g_{t+1} + dy_t C_t as a reverse scan (flip, forward scan, flip by shuffles where the layout is known;
  its carry through memory too), and accumulates every gradient. a_t h_{t-1} is taken as h_t - b_t (no division by a
  decay that may underflow).
- The kernels are latency-bound one-warp programs: registers decide how many share an SM and so how many waves the
  programs take (the forward is capped at 96, ``FWD_MAXNREG``); softplus / sigmoid run on the special-function unit
  (``FAST_MATH``).
- dB, dC are sums over the channels of a group: each program reduces its rows and adds them to one of ``partials``
  float32 copies (plain stores when every program owns one, atomics otherwise), summed after.
- Any strides; time-major inputs (the mixers' (batch, L, dim) memory) are copied to (batch, dim, L) first (faster than
  scanning with time spread across threads). Grouped B/C (batch, G, N, L), initial / final states; L need not be a
  multiple of anything; the gradient of the final state is propagated (mamba-ssm ignores it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (
    CachedLaunch, affine_combine, empty_like_layout, interpret_mode, largest_pow2_divisor, mufu_lg2, mufu_rcp,
    next_pow2, softplus,
)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _softplus(x, FAST_MATH: tl.constexpr):
    """softplus (torch's threshold 20). FAST_MATH 0: ``utils.softplus`` (libdevice's log: ~40 instructions an element,
    ~12 % of the forward kernel's; relative error up to 0.17 for x in [-15, -10] and 1.3e-3 in [-10, -5], where 1 + e
    rounds). 1 and 2: log(1 + e), e = exp(x), as a degree-7 series of log1p for e < 1/8 (truncation < 1e-7 relative)
    and as log2(1 + e) ln 2 above (where log(1 + e) > 0.117), ~15 instructions; 2 takes log2 on MUFU.LG2 (inline PTX;
    max relative error 3.4e-6 on the H200), 1 (the interpreter) on ``tl.log2`` (5.4e-7)."""
    if FAST_MATH > 0:
        e = tl.exp(x)
        series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - e * (0.25 - e * (0.2 - e * (
            0.16666666666666666 - e * 0.14285714285714285))))))
        large = mufu_lg2(1.0 + e, FAST_MATH == 2) * 0.6931471805599453
        return tl.where(x > 20.0, x, tl.where(e < 0.125, series, large))
    else:
        return softplus(x)


@triton.jit
def _sigmoid(x, FAST_MATH: tl.constexpr):
    """FAST_MATH 1, 2: 1 / (1 + exp(-x)) with a reciprocal (MUFU.RCP at 2) instead of an IEEE division."""
    if FAST_MATH > 0:
        return mufu_rcp(1.0 + tl.exp(-x), FAST_MATH == 2)
    else:
        return tl.sigmoid(x)


@triton.jit
def _bf16x2_to_f32(x):
    """bfloat16 -> float32 by one byte permute per element (a bfloat16 is a float32's upper half): the compiler's
    conversion takes a permute and a shift for every second element (a pair of a 32-bit register: 3 instructions)."""
    return tl.inline_asm_elementwise("prmt.b32 $0, $2, 0, 0x1044;\n\tprmt.b32 $1, $2, 0, 0x3244;", "=r,=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _to_f32(x, CVT_ASM: tl.constexpr):
    if CVT_ASM and x.dtype == tl.bfloat16:
        return _bf16x2_to_f32(x)
    else:
        return x.to(tl.float32)


@triton.jit
def _load_BC(base, n, stride_n, stride_l, t, mask_t, mask, SAME_GROUP: tl.constexpr, CVT_ASM: tl.constexpr = False):
    """B[n] or C[n] over the chunk: a (1, BLOCK_T) row when the block's channels share one group, else per row.
    CVT_ASM: bfloat16 rows converted by ``_bf16x2_to_f32`` (inline PTX: not under the interpreter)."""
    if SAME_GROUP:
        return _to_f32(tl.load(base + n * stride_n + t * stride_l, mask=mask_t, other=0.0), CVT_ASM)[None, :]
    else:
        return _to_f32(tl.load(base + n * stride_n + t[None, :] * stride_l, mask=mask, other=0.0), CVT_ASM)


@triton.jit
def _fwd_state(
    n, y, dt, dtu, A_base, stride_A_n, B_base, C_base, stride_B_n, stride_B_l, stride_C_n, stride_C_l,
    read_base, write_ptrs, t, mask_t, mask, mask_d, last, SAME_GROUP: tl.constexpr, offs_t=None,
    SAVE_K: tl.constexpr = 0, BLOCK_T: tl.constexpr = 1, N: tl.constexpr = 1, FOLD_H: tl.constexpr = False,
    CVT_ASM: tl.constexpr = False, CARRY_SUM: tl.constexpr = False, write_base=None,
):
    """State index n over one chunk: scan its decays and drives, fold in the carried state, accumulate y.

    FOLD_H: the carried state enters as the chunk's first drive (b_0 + a_0 h), so the scan's drives are the states
    themselves; else x = b_cum + a_cum h after the scan (two more instructions per element)."""
    A_n = tl.load(A_base + n * stride_A_n, mask=mask_d, other=0.0).to(tl.float32) * 1.4426950408889634
    B_n = _load_BC(B_base, n, stride_B_n, stride_B_l, t, mask_t, mask, SAME_GROUP, CVT_ASM)
    C_n = _load_BC(C_base, n, stride_C_n, stride_C_l, t, mask_t, mask, SAME_GROUP, CVT_ASM)
    h_n = tl.load(read_base + n, mask=mask_d, other=0.0)  # the carried state (one value per channel)
    a = tl.exp2(dt * A_n[:, None])
    b = dtu * B_n
    if FOLD_H:
        b = tl.where((offs_t == 0)[None, :], b + a * h_n[:, None], b)
        _, x = tl.associative_scan((a, b), axis=1, combine_fn=affine_combine)
    else:
        a_cum, b_cum = tl.associative_scan((a, b), axis=1, combine_fn=affine_combine)
        x = b_cum + a_cum * h_n[:, None]
    y += x * C_n
    if SAVE_K > 0:  # one store per saved state, each through a pointer uniform over the tile (no pointer tile)
        for k in tl.static_range(SAVE_K):
            tl.store(write_ptrs + k * N + n, x, mask=last & (offs_t == (k + 1) * (BLOCK_T // SAVE_K) - 1)[None, :])
    elif CARRY_SUM:  # the last state picked by a warp sum (shuffles, no shared memory, no barrier), stored per row
        tl.store(write_base + n, tl.sum(tl.where(last, x, 0.0), axis=1), mask=mask_d)
    else:
        tl.store(write_ptrs + n, x, mask=last)  # the chunk's last state, for the next chunk (one element a row)
    return y


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, states_ptr,
    dim, length, dim_per_group, n_chunks, n_slots,
    stride_u_b, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_d, stride_delta_l,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_B_l,
    stride_C_b, stride_C_g, stride_C_n, stride_C_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_out_b, stride_out_d, stride_out_l,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, SAME_GROUP: tl.constexpr, UNROLL_N: tl.constexpr,
    N_PAD: tl.constexpr, SAVE_EVERY: tl.constexpr, SAVE_MODE: tl.constexpr = 0, FOLD_H: tl.constexpr = False,
    FAST_MATH: tl.constexpr = 0, CVT_ASM: tl.constexpr = False, CARRY_SUM: tl.constexpr = False,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_t = tl.arange(0, BLOCK_T)
    SAVE_K: tl.constexpr = BLOCK_T // SAVE_EVERY if (SAVE_STATES and SAVE_MODE == 1) else 0
    offs_n = tl.arange(0, N_PAD)
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)

    u_base = u_ptr + pid_b * stride_u_b + offs_d[:, None] * stride_u_d
    delta_base = delta_ptr + pid_b * stride_delta_b + offs_d[:, None] * stride_delta_d
    z_base = z_ptr + pid_b * stride_z_b + offs_d[:, None] * stride_z_d
    out_base = out_ptr + pid_b * stride_out_b + offs_d[:, None] * stride_out_d
    A_base = A_ptr + offs_d * stride_A_d
    if SAME_GROUP:
        group = (pid_d * BLOCK_D) // dim_per_group
        B_base = B_ptr + pid_b * stride_B_b + group * stride_B_g
        C_base = C_ptr + pid_b * stride_C_b + group * stride_C_g
    else:
        rows_group = (offs_d // dim_per_group)[:, None]
        B_base = B_ptr + pid_b * stride_B_b + rows_group * stride_B_g
        C_base = C_ptr + pid_b * stride_C_b + rows_group * stride_C_g
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    # The carried state goes through memory: states (batch, dim, n_slots, N) float32; with SAVE_STATES, slot k =
    # the state before step k * SAVE_EVERY (kept for the backward; the last slot = the final state), else two
    # slots used in turn. Each chunk reads its slot (one value per channel and state, broadcast to the row) and writes the
    # next one from the single element that holds the chunk's last state: no reduction across the warp.
    slot_row = (pid_b * dim + offs_d) * n_slots  # (BLOCK_D,)
    if HAS_H0:
        h0 = tl.load(h0_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0)
    else:
        h0 = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    tl.store(states_ptr + slot_row[:, None] * N + offs_n[None, :], h0, mask=mask_dn)
    if SAVE_STATES:  # write the state after every SAVE_EVERY steps (the backward's chunk starts)
        last = mask_d[:, None] & ((offs_t + 1) % SAVE_EVERY == 0)[None, :]
    else:
        last = mask_d[:, None] & (offs_t == BLOCK_T - 1)[None, :]

    for chunk in range(n_chunks):
        tl.debug_barrier()  # the previous chunk's state writes are visible to every thread
        if SAVE_STATES:  # slot k: the state before step k * SAVE_EVERY (SAVE_EVERY divides BLOCK_T)
            read_slot = chunk * (BLOCK_T // SAVE_EVERY)
            if SAVE_MODE == 1:  # slots read_slot + 1 + k: a pointer uniform over the tile, SAVE_K masked stores
                write_ptrs = states_ptr + (slot_row[:, None] + read_slot + 1) * N + offs_t[None, :] * 0
            else:
                write_ptrs = states_ptr + (slot_row[:, None] + read_slot + (offs_t[None, :] + 1) // SAVE_EVERY) * N
        else:
            read_slot = chunk % 2
            write_ptrs = states_ptr + (slot_row[:, None] + 1 - read_slot) * N + offs_t[None, :] * 0
        write_base = states_ptr + (slot_row + 1 - read_slot) * N  # (CARRY_SUM: only without saves)
        read_base = states_ptr + (slot_row + read_slot) * N
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        mask = mask_d[:, None] & mask_t[None, :]
        u = _to_f32(tl.load(u_base + t[None, :] * stride_u_l, mask=mask, other=0.0), CVT_ASM)
        dt = _to_f32(tl.load(delta_base + t[None, :] * stride_delta_l, mask=mask, other=0.0), CVT_ASM)
        if HAS_BIAS:
            dt += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt, FAST_MATH)
        dt = tl.where(mask, dt, 0.0)  # padded steps: decay 1, drive 0 (the state passes through unchanged)
        dtu = dt * u
        if HAS_D:  # the skip term first: u is then dead during the loop over states (16 registers at BLOCK_T 512)
            y = u * skip[:, None]
        else:
            y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        if UNROLL_N:
            for n in tl.static_range(N):
                y = _fwd_state(
                    n, y, dt, dtu, A_base, stride_A_n, B_base, C_base, stride_B_n, stride_B_l, stride_C_n,
                    stride_C_l, read_base, write_ptrs, t, mask_t, mask, mask_d, last, SAME_GROUP, offs_t,
                    SAVE_K, BLOCK_T, N, FOLD_H, CVT_ASM, CARRY_SUM and not SAVE_STATES, write_base,
                )
        else:
            for n in range(N):
                y = _fwd_state(
                    n, y, dt, dtu, A_base, stride_A_n, B_base, C_base, stride_B_n, stride_B_l, stride_C_n,
                    stride_C_l, read_base, write_ptrs, t, mask_t, mask, mask_d, last, SAME_GROUP, offs_t,
                    SAVE_K, BLOCK_T, N, FOLD_H, CVT_ASM, CARRY_SUM and not SAVE_STATES, write_base,
                )
        if HAS_Z:
            zz = _to_f32(tl.load(z_base + t[None, :] * stride_z_l, mask=mask, other=0.0), CVT_ASM)
            y = y * zz * _sigmoid(zz, FAST_MATH)
        tl.store(out_base + t[None, :] * stride_out_l, y.to(out_ptr.dtype.element_ty), mask=mask)


_FLIP_PTX = tl.constexpr("\n\t".join(f"shfl.sync.bfly.b32 ${k}, ${7 - k}, 31, 31, -1;" for k in range(4)))


@triton.jit
def _flip_time(x):
    """x[:, ::-1] of a (1, 128) float32 tile spread over the 32 lanes of one warp, 4 steps a lane (the backward's
    chunk at its default configuration). In any such layout the step index's bits are the register index's and the
    lane's bits in some order, so reversing the steps (complementing every bit) is: register k <- register 3 - k of
    lane 31 - lane, one butterfly shuffle per register. (Triton 3.6 lowers ``reverse=True`` scans with five butterfly
    rounds per register and operand, in and out: 80 shuffles per state for the backward's adjoint scan.)"""
    return tl.inline_asm_elementwise(_FLIP_PTX, "=r,=r,=r,=r,r,r,r,r", [x], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def exclusive_affine_combine(s1, u1, p1, q1, s2, u2, p2, q2):
    """(S, U): the composite map of a segment; (P, Q): the composite of the segment without its last step (as the
    coupled scan's). Leaves (a_t, u_t, 1, 0); the scan's (P, Q) at t maps the carry to the value before step t."""
    return s1 * s2, u1 * s2 + u2, s1 * p2, u1 * p2 + q2


@triton.jit
def _bwd_state(
    n, h_base, g_read_base, g_write_ptrs, first, y, ddt, du, dA_acc, u, dt, dtu, dt_next, dy, A_base, stride_A_n,
    B_base, C_base, stride_B_n, stride_B_l, stride_C_n, stride_C_l, dB_base, dC_base, stride_dB_n, stride_dB_l, t,
    mask_t, mask, mask_d, offs_t, dA_write_ptrs, SAME_GROUP: tl.constexpr, BC_MODE: tl.constexpr,
    GB_ACC: tl.constexpr, DA_STORE: tl.constexpr, EXCL_REV: tl.constexpr, BC_PADDED: tl.constexpr,
    FLIP_ASM: tl.constexpr = False, FOLD_H: tl.constexpr = False, CVT_ASM: tl.constexpr = False,
):
    """State index n over one chunk of the backward pass: recompute h_t, run the adjoint scan, accumulate.

    Variants (constexpr, measured in benchmarks/results/gpu_kernels_notes.md): GB_ACC accumulates sum_n g B_n in
    ``du`` (ddt then gets only the decay term here; u and dt are applied once after the loop over states);
    DA_STORE writes each chunk's dA[:, n] (one warp sum) to its own slot instead of adding it into a column of a
    (BLOCK_D, BLOCK_T) tile; EXCL_REV runs the adjoint as the exclusive reverse scan of (a_t, a_t c_t), which
    yields lam_t = a_{t+1} g_{t+1} without the shifted decays a_{t+1} (one exp2 less), and carries lam between
    chunks. BC_PADDED: the dB / dC rows are padded to whole chunks (the padded steps add zeros there), so the
    atomics need no mask (a masked atomic is a branch around each element's instruction). FOLD_H: the
    chunk-start state enters as the first drive."""
    A_n = tl.load(A_base + n * stride_A_n, mask=mask_d, other=0.0).to(tl.float32)
    A2_n = A_n * 1.4426950408889634
    B_n = _load_BC(B_base, n, stride_B_n, stride_B_l, t, mask_t, mask, SAME_GROUP, CVT_ASM)
    C_n = _load_BC(C_base, n, stride_C_n, stride_C_l, t, mask_t, mask, SAME_GROUP, CVT_ASM)
    # recompute the chunk's states h_t from the saved chunk-start state
    a = tl.exp2(dt * A2_n[:, None])
    b = dtu * B_n
    h_n = tl.load(h_base + n, mask=mask_d, other=0.0)
    if FOLD_H:  # the chunk-start state as the first drive (as the forward's FOLD_H)
        _, x = tl.associative_scan((a, tl.where((offs_t == 0)[None, :], b + a * h_n[:, None], b)), axis=1,
                                   combine_fn=affine_combine)
    else:
        a_cum, b_cum = tl.associative_scan((a, b), axis=1, combine_fn=affine_combine)
        x = b_cum + a_cum * h_n[:, None]
    y += x * C_n
    c = dy * C_n
    if EXCL_REV:
        # lam_{t-1} = a_t lam_t + a_t c_t (lam_t = a_{t+1} g_{t+1}, the adjoint arriving from after step t);
        # g_t = c_t + lam_t; the lam after the chunk is carried in from the next one
        ones = tl.zeros_like(a) + 1.0
        if FLIP_ASM:  # the reverse scan as flip, forward scan, flip (what reverse=True means), with cheap flips
            _, _, P, Q = tl.associative_scan((_flip_time(a), _flip_time(a * c), ones, tl.zeros_like(a)), axis=1,
                                             combine_fn=exclusive_affine_combine)
            P = _flip_time(P)
            Q = _flip_time(Q)
        else:
            _, _, P, Q = tl.associative_scan((a, a * c, ones, tl.zeros_like(a)), axis=1,
                                             combine_fn=exclusive_affine_combine, reverse=True)
        g = c + Q + P * tl.load(g_read_base + n, mask=mask_d, other=0.0)[:, None]
        tl.store(g_write_ptrs + n, a * g, mask=first)  # lam before the chunk, for the chunk before
    else:
        # adjoint: g_t = dy_t C_t + a_{t+1} g_{t+1}; the g after the chunk is carried in from the next one
        a_next = tl.exp2(dt_next * A2_n[:, None])
        g_a, g_b = tl.associative_scan((a_next, c), axis=1, combine_fn=affine_combine, reverse=True)
        g = g_b + g_a * tl.load(g_read_base + n, mask=mask_d, other=0.0)[:, None]
        tl.store(g_write_ptrs + n, g, mask=first)  # g at the chunk's first step, for the chunk before
    g_ah = g * (x - b)  # g_t a_t h_{t-1}: the decay's gradient times the decay
    if GB_ACC:
        ddt += g_ah * A_n[:, None]
        du += g * B_n
    else:
        ddt += g * u * B_n + g_ah * A_n[:, None]
        du += g * dt * B_n
    if DA_STORE:
        tl.store(dA_write_ptrs + n, tl.sum(g_ah * dt, axis=1)[:, None], mask=first)
    else:
        dA_acc += tl.where(offs_t[None, :] == n, tl.sum(g_ah * dt, axis=1)[:, None], 0.0)  # column n: dA[:, n]
    if SAME_GROUP:
        dB_row = tl.sum(g * dtu, axis=0)
        dC_row = tl.sum(dy * x, axis=0)
        if BC_MODE == 0:  # this program owns its partial row: plain stores
            tl.store(dB_base + n * stride_dB_n + t, dB_row, mask=mask_t)
            tl.store(dC_base + n * stride_dB_n + t, dC_row, mask=mask_t)
        elif BC_MODE == 1 and BC_PADDED:
            tl.atomic_add(dB_base + n * stride_dB_n + t, dB_row, sem="relaxed")
            tl.atomic_add(dC_base + n * stride_dB_n + t, dC_row, sem="relaxed")
        elif BC_MODE == 1:  # atomics on the contiguous layout (each thread a few neighbours: 16 sectors a warp)
            tl.atomic_add(dB_base + n * stride_dB_n + t, dB_row, mask=mask_t, sem="relaxed")
            tl.atomic_add(dC_base + n * stride_dB_n + t, dC_row, mask=mask_t, sem="relaxed")
        elif BC_MODE == 2 and BC_PADDED:
            tl.atomic_add(dB_base + n * stride_dB_n + t * stride_dB_l, dB_row, sem="relaxed")
            tl.atomic_add(dC_base + n * stride_dB_n + t * stride_dB_l, dC_row, sem="relaxed")
        elif BC_MODE == 2:  # striped: an unspecialized stride hides the contiguity, one element a thread per
            # instruction, so each warp-wide atomic covers 32 consecutive floats (as mamba-ssm's BlockedToStriped)
            tl.atomic_add(dB_base + n * stride_dB_n + t * stride_dB_l, dB_row, mask=mask_t, sem="relaxed")
            tl.atomic_add(dC_base + n * stride_dB_n + t * stride_dB_l, dC_row, mask=mask_t, sem="relaxed")
    else:
        tl.atomic_add(dB_base + n * stride_dB_n + t[None, :], g * dtu, mask=mask, sem="relaxed")
        tl.atomic_add(dC_base + n * stride_dB_n + t[None, :], dy * x, mask=mask, sem="relaxed")
    return y, ddt, du, dA_acc


@triton.jit(do_not_specialize=["stride_dB_l"])
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dfinal_ptr, gbuf_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, length, dim_per_group, n_chunks, blocks_per_group, n_saved, state_step, n_partials,
    stride_u_b, stride_u_d, stride_u_l,
    stride_delta_b, stride_delta_d, stride_delta_l,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n, stride_B_l,
    stride_C_b, stride_C_g, stride_C_n, stride_C_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_dout_b, stride_dout_d, stride_dout_l,
    stride_du_b, stride_du_d, stride_du_l,
    stride_ddelta_b, stride_ddelta_d, stride_ddelta_l,
    stride_dz_b, stride_dz_d, stride_dz_l,
    stride_dB_p, stride_dB_b, stride_dB_g, stride_dB_n, stride_dB_l,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DFINAL: tl.constexpr, SAME_GROUP: tl.constexpr, BC_MODE: tl.constexpr,
    UNROLL_N: tl.constexpr, N_PAD: tl.constexpr, GB_ACC: tl.constexpr, DA_STORE: tl.constexpr,
    EXCL_REV: tl.constexpr, BC_PADDED: tl.constexpr, FLIP_ASM: tl.constexpr = False, FOLD_H: tl.constexpr = False,
    FAST_MATH: tl.constexpr = 0, CVT_ASM: tl.constexpr = False,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = offs_t  # carried states / gradients: (BLOCK_D, BLOCK_T) tiles, column n = state n
    mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
    LOG2E: tl.constexpr = 1.4426950408889634

    u_base = u_ptr + pid_b * stride_u_b + offs_d[:, None] * stride_u_d
    delta_base = delta_ptr + pid_b * stride_delta_b + offs_d[:, None] * stride_delta_d
    z_base = z_ptr + pid_b * stride_z_b + offs_d[:, None] * stride_z_d
    dout_base = dout_ptr + pid_b * stride_dout_b + offs_d[:, None] * stride_dout_d
    du_base = du_ptr + pid_b * stride_du_b + offs_d[:, None] * stride_du_d
    ddelta_base = ddelta_ptr + pid_b * stride_ddelta_b + offs_d[:, None] * stride_ddelta_d
    dz_base = dz_ptr + pid_b * stride_dz_b + offs_d[:, None] * stride_dz_d
    A_base = A_ptr + offs_d * stride_A_d
    if SAME_GROUP:
        group = (pid_d * BLOCK_D) // dim_per_group
        B_base = B_ptr + pid_b * stride_B_b + group * stride_B_g
        C_base = C_ptr + pid_b * stride_C_b + group * stride_C_g
        part = (pid_d % blocks_per_group) % n_partials
        dB_base = dB_ptr + part * stride_dB_p + pid_b * stride_dB_b + group * stride_dB_g
        dC_base = dC_ptr + part * stride_dB_p + pid_b * stride_dB_b + group * stride_dB_g
    else:
        rows_group = (offs_d // dim_per_group)[:, None]
        B_base = B_ptr + pid_b * stride_B_b + rows_group * stride_B_g
        C_base = C_ptr + pid_b * stride_C_b + rows_group * stride_C_g
        dB_base = dB_ptr + pid_b * stride_dB_b + rows_group * stride_dB_g
        dC_base = dC_ptr + pid_b * stride_dB_b + rows_group * stride_dB_g
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    state_offs = (pid_b * dim + offs_d[:, None]) * N + offs_n[None, :]  # dA (columns of a (BLOCK_D, BLOCK_T) tile)
    offs_np = tl.arange(0, N_PAD)
    mask_dnp = mask_d[:, None] & (offs_np[None, :] < N)
    # g after each chunk goes through memory (two slots of gbuf (batch, dim, 2, N) used in turn), as the forward
    # carries its state; the chunk-start states are the forward's slots (n_saved of them, one every state_step)
    g_row = (pid_b * dim + offs_d) * 2
    if HAS_DFINAL:
        g0 = tl.load(dfinal_ptr + (pid_b * dim + offs_d[:, None]) * N + offs_np[None, :], mask=mask_dnp, other=0.0)
    else:
        g0 = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    tl.store(gbuf_ptr + g_row[:, None] * N + offs_np[None, :], g0, mask=mask_dnp)
    first = mask_d[:, None] & (offs_t == 0)[None, :]
    saved_row = (pid_b * dim + offs_d) * n_saved
    dA_acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    for rev in range(n_chunks):
        tl.debug_barrier()  # the previous chunk's g writes are visible to every thread
        chunk = n_chunks - 1 - rev
        g_read_base = gbuf_ptr + (g_row + rev % 2) * N
        g_write_ptrs = gbuf_ptr + (g_row[:, None] + 1 - rev % 2) * N + offs_t[None, :] * 0
        # DA_STORE: dA_ptr is (batch, dim, n_chunks, N), one slot per chunk (summed over chunks after the kernel)
        dA_write_ptrs = dA_ptr + ((pid_b * dim + offs_d[:, None]) * n_chunks + chunk) * N + offs_t[None, :] * 0
        h_base = states_ptr + (saved_row + chunk * state_step) * N
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        mask = mask_d[:, None] & mask_t[None, :]
        u = _to_f32(tl.load(u_base + t[None, :] * stride_u_l, mask=mask, other=0.0), CVT_ASM)
        raw = _to_f32(tl.load(delta_base + t[None, :] * stride_delta_l, mask=mask, other=0.0), CVT_ASM)
        if HAS_BIAS:
            raw += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(raw, FAST_MATH)
        else:
            dt = raw
        dt = tl.where(mask, dt, 0.0)
        if EXCL_REV:
            dt_next = dt  # (unused)
        else:
            mask_next = mask_d[:, None] & (t + 1 < length)[None, :]
            raw_next = tl.load(delta_base + (t + 1)[None, :] * stride_delta_l, mask=mask_next, other=0.0).to(
                tl.float32)
            if HAS_BIAS:
                raw_next += bias[:, None]
            if SOFTPLUS:
                raw_next = _softplus(raw_next, FAST_MATH)
            dt_next = tl.where(mask_next, raw_next, 0.0)  # a_{t+1} = 1 past the end: g_{L-1} = dy C + dfinal
        dy = _to_f32(tl.load(dout_base + t[None, :] * stride_dout_l, mask=mask, other=0.0), CVT_ASM)
        if HAS_Z:
            zz = _to_f32(tl.load(z_base + t[None, :] * stride_z_l, mask=mask, other=0.0), CVT_ASM)
            dy = dy * zz * _sigmoid(zz, FAST_MATH)
        dtu = dt * u
        y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        ddt = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        du = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        if UNROLL_N:
            for n in tl.static_range(N):
                y, ddt, du, dA_acc = _bwd_state(
                    n, h_base, g_read_base, g_write_ptrs, first, y, ddt, du, dA_acc, u, dt, dtu, dt_next, dy, A_base,
                    stride_A_n, B_base, C_base, stride_B_n, stride_B_l, stride_C_n, stride_C_l, dB_base, dC_base,
                    stride_dB_n, stride_dB_l, t, mask_t, mask, mask_d, offs_t, dA_write_ptrs, SAME_GROUP, BC_MODE,
                    GB_ACC, DA_STORE, EXCL_REV, BC_PADDED, FLIP_ASM, FOLD_H, CVT_ASM,
                )
        else:
            for n in range(N):
                y, ddt, du, dA_acc = _bwd_state(
                    n, h_base, g_read_base, g_write_ptrs, first, y, ddt, du, dA_acc, u, dt, dtu, dt_next, dy, A_base,
                    stride_A_n, B_base, C_base, stride_B_n, stride_B_l, stride_C_n, stride_C_l, dB_base, dC_base,
                    stride_dB_n, stride_dB_l, t, mask_t, mask, mask_d, offs_t, dA_write_ptrs, SAME_GROUP, BC_MODE,
                    GB_ACC, DA_STORE, EXCL_REV, BC_PADDED, FLIP_ASM, FOLD_H, CVT_ASM,
                )
        if GB_ACC:  # du held sum_n g B_n: the u and dt factors of d/dt and d/du, applied once
            u = _to_f32(tl.load(u_base + t[None, :] * stride_u_l, mask=mask, other=0.0), CVT_ASM)  # (cache hits)
            ddt += du * u
            du = du * dt
        if HAS_D:
            y += u * skip[:, None]
            du += dy * skip[:, None]
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:  # reloaded (cache hits) rather than kept live across the loop over states
            dout = _to_f32(tl.load(dout_base + t[None, :] * stride_dout_l, mask=mask, other=0.0), CVT_ASM)
            zz = _to_f32(tl.load(z_base + t[None, :] * stride_z_l, mask=mask, other=0.0), CVT_ASM)
            z_sig = _sigmoid(zz, FAST_MATH)
            dz = dout * y * z_sig * (1.0 + zz * (1.0 - z_sig))
            tl.store(dz_base + t[None, :] * stride_dz_l, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            raw = _to_f32(tl.load(delta_base + t[None, :] * stride_delta_l, mask=mask, other=0.0), CVT_ASM)
            if HAS_BIAS:
                raw += bias[:, None]
            ddt = ddt * _sigmoid(raw, FAST_MATH)
        ddt = tl.where(mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_base + t[None, :] * stride_du_l, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_base + t[None, :] * stride_ddelta_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)

    # gradient of the initial state: dh_{-1} = a_0 g_0
    tl.debug_barrier()
    g_first = tl.load(gbuf_ptr + (g_row[:, None] + n_chunks % 2) * N + offs_np[None, :], mask=mask_dnp, other=0.0)
    raw0 = tl.load(delta_base, mask=mask_d[:, None], other=0.0).to(tl.float32)  # (BLOCK_D, 1)
    if HAS_BIAS:
        raw0 += bias[:, None]
    if SOFTPLUS:
        raw0 = _softplus(raw0, FAST_MATH)
    A_tile = tl.load(A_base[:, None] + offs_np[None, :] * stride_A_n, mask=mask_dnp, other=0.0).to(tl.float32)
    dh0_offs = (pid_b * dim + offs_d[:, None]) * N + offs_np[None, :]
    if EXCL_REV:  # the carry is already lam_{-1} = a_0 g_0
        tl.store(dh0_ptr + dh0_offs, g_first, mask=mask_dnp)
    else:
        tl.store(dh0_ptr + dh0_offs, tl.exp2(raw0 * A_tile * LOG2E) * g_first, mask=mask_dnp)
    if not DA_STORE:
        tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
    row_offs = pid_b * dim + offs_d
    tl.store(dD_ptr + row_offs, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + row_offs, dbias_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------
# (block_d, block_t, num_warps, unroll_n), chosen on an H200 (benchmarks/bench_gpu_selective_scan.py --sweep; notes
# in benchmarks/results/gpu_kernels_notes.md). The kernels are fastest when a chunk's time axis lies within one warp
# (all scans and reductions are shuffles, no barrier). unroll_n None: unroll the loop over the N states when
# N <= 32 (faster before the carry moved to memory, slower since: more registers, fewer resident warps). "lmajor": time contiguous ((batch, dim, L) memory, mamba-ssm's
# layout); "tmajor": channels contiguous ((batch, L, dim), as the mixers pass their activations).
FWD_CONFIGS = {"lmajor": (1, 512, 1, False), "tmajor": (1, 512, 1, False)}
BWD_CONFIGS = {"lmajor": (1, 128, 1, False), "tmajor": (1, 128, 1, False)}
# Short scans (a prompt of up to SHORT_MAX_T steps): a forward configuration of one channel per program (block_d 1,
# the long-scan choice above) launches batch x dim programs of a few steps each and leaves most of each warp idle
# (H200, 2.8b shape, 16 steps at batch 16: 81920 one-warp programs, ~150 us per layer, half of a 16-token prompt's
# prefill; benchmarks/results/gpu_decode_parts.md). There each program takes SHORT_TILE // block_t channels on
# SHORT_WARPS warps instead (the same chunk length block_t; the in-chunk scan's float32 rounding may differ with the
# tile's layout over the threads).
SHORT_MAX_T = 64
SHORT_TILE = 256
SHORT_WARPS = 4
# How the forward writes the states it keeps for the backward (one every backward chunk, several per forward chunk):
# 0: one masked store through a (BLOCK_D, BLOCK_T) tile of slot pointers (a 64-bit pointer per element, 26 - 31
# registers more at 2 - 4 saves a chunk); 1: BLOCK_T // SAVE_EVERY masked stores, each through a pointer uniform over
# the tile (registers as without saves).
FWD_SAVE_MODE = 1
# The forward folds the carried state into each chunk's first drive (``_fwd_state``'s FOLD_H).
FWD_FOLD_H = True
# Time-major inputs are copied to (batch, dim, L) first: the kernels then load 16-byte vectors along time, and the
# copy costs far less than scanning with time spread across threads.
COPY_TIME_MAJOR = True
# Largest float32 workspace for the per-program dB / dC partial sums before falling back to atomics.
PARTIALS_MAX_BYTES = 16 << 20
# How the programs of a group add up dB / dC when they share partial rows: 1 atomics on the contiguous layout,
# 2 atomics on a striped layout (coalesced warp-wide), 3 skip (timing experiments only; wrong gradients).
BWD_BC_MODE = 1
# Backward variants (gb_acc, da_store, excl_rev, bc_padded): see ``_bwd_state``.
BWD_OPTS = (True, True, True, True)
# The backward's reverse (adjoint) scan as flip + forward scan + flip with one shuffle per register (``_flip_time``)
# where its layout allows (``_flip_asm``), instead of Triton's reverse scan.
BWD_FLIP_ASM = True
# softplus and sigmoid in both kernels on MUFU.EX2 / LG2 / RCP with a series for log1p near 0 (``_softplus``), instead
# of libdevice's log and IEEE divisions (~18 % of the forward's instructions): relative error < 4e-6 everywhere (the
# libdevice formula's reached 0.17 for x in [-15, -10]).
FAST_MATH = True
# Without saves the forward passes each chunk's last state on by a warp sum (``_fwd_state``'s CARRY_SUM) instead of a
# masked store that the compiler routes through shared memory and a barrier (forward 1.5 % faster at L 2048, 0.5 % at
# 8192, three alternating runs each).
FWD_CARRY_SUM = True
# ptxas register cap of the forward at its default configuration (1, 512, 1), N <= 16, for inference / training (None:
# none). Uncapped it takes 102 / 109 registers (bf16, N 16), so 19 / 18 one-warp programs fit an SM of the H200 and the
# issue's 5120 programs run in 2.04 / 2.15 waves, the last one nearly empty; at 96 (no spill / 16 bytes) 21 fit and
# 1.85 waves remain. Measured: forward 0.214 -> 0.167 ms at L 2048, 0.950 -> 0.673 at 8192.
FWD_MAXNREG = {"infer": 96, "train": 96}
# bfloat16 loads converted to float32 by one byte permute an element (``_bf16x2_to_f32``), per kernel. The backward
# keeps the compiler's conversion: with the permutes it needs 78 registers instead of 96, 25 instead of 21 one-warp
# programs fit an SM, and its 5120 programs then take 1.55 waves instead of 1.85 (measured 2.6 % slower at L 2048,
# 0.3 % at 8192).
CVT_ASM = {"fwd": True, "bwd": False}
# The backward folds the chunk-start state into the first drive (``_bwd_state``'s FOLD_H).
BWD_FOLD_H = True


def _layout(u):
    return "tmajor" if u.stride(-1) != 1 and u.shape[-1] > 1 else "lmajor"


def _lmajor(t):
    """t with its last (time) axis contiguous (a copy if needed)."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def _pick_blocks(u, state_size, dim_per_group, groups, table, override):
    block_d, block_t, num_warps, unroll = override or table[_layout(u)]
    length = u.shape[-1]
    block_t = max(16, next_pow2(state_size), min(block_t, next_pow2(length)))
    if unroll is None:
        unroll = state_size <= 32
    same_group = True
    if groups > 1 and dim_per_group % block_d != 0:
        fitting = largest_pow2_divisor(dim_per_group, block_d)
        if fitting >= max(1, block_d // 4):
            block_d = fitting
        else:
            same_group = False
    return block_d, block_t, num_warps, unroll, same_group


def _as_grouped(mat):
    return mat[:, None] if mat.dim() == 3 else mat


_FWD = CachedLaunch(_selective_scan_fwd_kernel)
_BWD = CachedLaunch(_selective_scan_bwd_kernel)
# launch plans of selective_scan_fwd, by everything they depend on (shape, layout, flags, config): a prefill calls it
# with the same shapes in every layer
_FWD_PLANS = {}


def _fwd_plan(u, state_size, groups, flags, save_states, config, save_every):
    layout = _layout(u)
    key = (tuple(u.shape), layout, state_size, groups, flags, bool(save_states), config, save_every,
           FWD_CONFIGS[layout], BWD_CONFIGS[layout], FWD_SAVE_MODE, FWD_FOLD_H, _fast_math(), _cvt_asm("fwd"),
           SHORT_MAX_T, SHORT_TILE, SHORT_WARPS, FWD_CARRY_SUM, tuple(FWD_MAXNREG.items()))
    # (the tables too: tests and sweeps replace them)
    plan = _FWD_PLANS.get(key)
    if plan is not None:
        return plan
    batch, dim, length = u.shape
    table_d, _, _, table_unroll = FWD_CONFIGS[layout]
    if config is None and table_d == 1 and next_pow2(length) <= SHORT_MAX_T:  # (see SHORT_MAX_T)
        short_t = max(16, next_pow2(state_size), next_pow2(length))
        config = (max(1, SHORT_TILE // short_t), short_t, SHORT_WARPS, table_unroll)
    dim_per_group = dim // groups
    block_d, block_t, num_warps, unroll, same_group = _pick_blocks(
        u, state_size, dim_per_group, groups, FWD_CONFIGS, config
    )
    if save_every is None:  # save a state at least every backward chunk
        save_every = block_t
        if save_states:
            save_every = min(block_t, _pick_blocks(u, state_size, dim_per_group, groups, BWD_CONFIGS, None)[1])
    save_every = min(int(save_every), block_t)
    n_chunks = triton.cdiv(length, block_t)
    # state slots: one every save_every steps plus the final state when saving for the backward, else two in turn
    n_slots = n_chunks * (block_t // save_every) + 1 if save_states else 2
    has_d, has_z, has_bias, softplus, has_h0 = flags
    consts = (state_size, block_d, block_t, has_d, has_z, has_bias, softplus, has_h0, bool(save_states), same_group,
              bool(unroll), next_pow2(state_size), save_every, int(FWD_SAVE_MODE), bool(FWD_FOLD_H), _fast_math(),
              _cvt_asm("fwd"), bool(FWD_CARRY_SUM))
    # the register cap (FWD_MAXNREG) only where it was measured: one channel of 512 steps a warp, N <= 16
    maxnreg = None
    if (block_d, block_t, num_warps) == (1, 512, 1) and state_size <= 16 and not interpret_mode():
        maxnreg = FWD_MAXNREG["train" if save_states else "infer"]
    plan = dict(grid=(triton.cdiv(dim, block_d), batch, 1), consts=consts, num_warps=num_warps, maxnreg=maxnreg,
                n_chunks=n_chunks,
                n_slots=n_slots, dim_per_group=dim_per_group, save_every=save_every,
                final_slot=n_slots - 1 if save_states else n_chunks % 2)
    if len(_FWD_PLANS) < 1024:
        _FWD_PLANS[key] = plan
    return plan


def selective_scan_fwd(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
    save_states=False, config=None, save_every=None,
):
    """Launch the forward kernel. Returns (out, final_state, states, meta) where ``states`` (batch, dim,
    n_chunks + 1, N) are the chunk-start states and the final one (None unless ``save_states``) and ``meta`` the
    launch parameters the backward needs. ``config``: an optional (block_d, block_t, num_warps, unroll_n)."""
    batch, dim, length = u.shape
    state_size = A.shape[1]
    Bg = B[:, None] if B.dim() == 3 else B
    Cg = C[:, None] if C.dim() == 3 else C
    flags = (D is not None, z is not None, delta_bias is not None, bool(delta_softplus), initial_state is not None)
    plan = _fwd_plan(u, state_size, Bg.shape[1], flags, save_states, config, save_every)
    n_slots = plan["n_slots"]
    out = empty_like_layout(u)
    states = torch.empty(batch, dim, n_slots, state_size, device=u.device, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else states
    zz = z if z is not None else u
    if out.numel():
        _FWD(plan["grid"],
             (u, delta, A, Bg, Cg, D if D is not None else u, zz, delta_bias if delta_bias is not None else u, h0,
              out, states),
             (dim, length, plan["dim_per_group"], plan["n_chunks"], n_slots) + u.stride() + delta.stride()
             + A.stride() + Bg.stride() + Cg.stride() + zz.stride() + out.stride(),
             plan["consts"], plan["num_warps"], maxnreg=plan["maxnreg"])
    final = states[:, :, plan["final_slot"]]
    meta = dict(block_t=plan["save_every"])  # the backward's view: a saved state every save_every steps
    return out, final, (states if save_states else None), meta


def selective_scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, block_t, dout, dfinal=None, config=None,
    partials=None, bc_mode=None, opts=None, flip_asm=None,
):
    """Launch the backward kernel. ``states``: the forward's saved states (chunks of ``block_t`` steps); the
    backward walks chunks of its own block size if that is a multiple of ``block_t``, else of ``block_t``.
    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); entries for absent inputs are None.
    ``partials``: how many float32 copies of dB / dC the programs of a group spread over (default: one per
    program, if that fits ``PARTIALS_MAX_BYTES``, else atomics into fewer). ``opts``: the kernel variant
    (gb_acc, da_store, excl_rev, bc_padded); default ``BWD_OPTS``."""
    gb_acc, da_store, excl_rev, bc_padded = (bool(o) for o in (opts if opts is not None else BWD_OPTS))
    batch, dim, length = u.shape
    state_size = A.shape[1]
    Bg, Cg = _as_grouped(B), _as_grouped(C)
    groups = Bg.shape[1]
    dim_per_group = dim // groups
    block_d, bwd_t, num_warps, unroll, same_group = _pick_blocks(
        u, state_size, dim_per_group, groups, BWD_CONFIGS, config
    )
    n_saved = states.shape[2]
    state_step = bwd_t // block_t if bwd_t >= block_t and bwd_t % block_t == 0 else 1
    block_t = block_t * state_step
    n_chunks = triton.cdiv(length, block_t)
    if dout is None:
        dout = torch.zeros_like(u)
    blocks_per_group = triton.cdiv(dim_per_group, block_d)
    if same_group:
        per_copy = batch * groups * state_size * length * 4 * 2
        if partials is None:
            partials = max(1, min(blocks_per_group, PARTIALS_MAX_BYTES // max(per_copy, 1)))
        partials = max(1, min(int(partials), blocks_per_group))
    else:
        partials = 1
    atomic = (not same_group) or partials < blocks_per_group
    if bc_mode is None:
        bc_mode = BWD_BC_MODE if atomic else 0
    bc_padded = bc_padded and same_group and bc_mode in (1, 2)
    bc_length = n_chunks * block_t if bc_padded else length  # padded: whole chunks (sliced off after)
    # dB's and dC's partials in one buffer: one zero fill (atomics) and one summing launch for both
    alloc = torch.zeros if atomic else torch.empty
    bc_part = alloc(2, partials, batch, groups, state_size, bc_length, device=u.device, dtype=torch.float32)
    dB_part, dC_part = bc_part[0], bc_part[1]
    du = empty_like_layout(u)
    ddelta = empty_like_layout(delta)
    dz = empty_like_layout(z) if z is not None else None
    if da_store:  # one slot per chunk
        dA_part = torch.empty(batch, dim, n_chunks, state_size, device=u.device, dtype=torch.float32)
    else:
        dA_part = torch.empty(batch, dim, state_size, device=u.device, dtype=torch.float32)
    dD_part = torch.empty(batch, dim, device=u.device, dtype=torch.float32)
    dbias_part = torch.empty(batch, dim, device=u.device, dtype=torch.float32)
    dh0 = torch.empty(batch, dim, state_size, device=u.device, dtype=torch.float32)
    zz = z if z is not None else u
    dzz = dz if dz is not None else du
    dfinal_arg = dfinal.float().contiguous() if dfinal is not None else dh0
    gbuf = torch.empty(batch, dim, 2, state_size, device=u.device, dtype=torch.float32)
    # (CachedLaunch: Triton's own launch binds and specializes ~80 arguments on every call, a sizeable part of a
    # training step's host time)
    _BWD(
        (triton.cdiv(dim, block_d), batch, 1),
        (u, delta, A, Bg, Cg, D if D is not None else u, zz, delta_bias if delta_bias is not None else u, states,
         dout, dfinal_arg, gbuf, du, ddelta, dzz, dA_part, dB_part, dC_part, dD_part, dbias_part, dh0),
        (dim, length, dim_per_group, n_chunks, blocks_per_group, n_saved, state_step, partials)
        + u.stride() + delta.stride() + A.stride() + Bg.stride() + Cg.stride() + zz.stride() + dout.stride()
        + du.stride() + ddelta.stride() + dzz.stride() + dB_part.stride(),
        (state_size, block_d, block_t, D is not None, z is not None, delta_bias is not None, bool(delta_softplus),
         dfinal is not None, same_group, bc_mode, bool(unroll), next_pow2(state_size), gb_acc, da_store, excl_rev,
         bc_padded, _flip_asm(block_d, block_t, num_warps, excl_rev, flip_asm, u, delta, dout, z), bool(BWD_FOLD_H),
         _fast_math(), _cvt_asm("bwd")),
        num_warps,
    )
    dB, dC = _sum_bc_partials(bc_part, B.dtype, C.dtype)
    if bc_length != length:
        dB, dC = dB[..., :length], dC[..., :length]
    if B.dim() == 3:
        dB, dC = dB[:, 0], dC[:, 0]
    return (
        du, ddelta, (dA_part.sum((0, 2)) if da_store else dA_part.sum(0)).to(A.dtype), dB, dC,
        _batch_sum(dD_part).to(D.dtype) if D is not None else None,
        dz,
        _batch_sum(dbias_part).to(delta_bias.dtype) if delta_bias is not None else None,
        dh0,
    )


def _flip_asm(block_d, block_t, num_warps, excl_rev, requested, *time_tiles):
    """Whether the backward flips its adjoint scan's operands by shuffles (``_flip_time``): only on a GPU (inline
    PTX), for the layout it assumes (one channel, 128 steps on one warp, loaded along a contiguous time axis) and the
    exclusive reverse scan."""
    requested = BWD_FLIP_ASM if requested is None else requested
    return bool(requested and excl_rev and block_d == 1 and block_t == 128 and num_warps == 1
                and all(t is None or t.stride(-1) == 1 for t in time_tiles) and not interpret_mode())


def _fast_math():
    """The kernels' FAST_MATH (``_softplus``, ``_sigmoid``): 0 off, 2 on a GPU, 1 under the interpreter (no inline
    PTX there: the same formulas on tl.log2 and divisions)."""
    return (1 if interpret_mode() else 2) if FAST_MATH else 0


def _cvt_asm(kernel):
    """Whether the ``kernel`` ("fwd" / "bwd") converts its bfloat16 loads by ``_bf16x2_to_f32`` (inline PTX: on a GPU
    only)."""
    return bool(CVT_ASM[kernel] and not interpret_mode())


def _batch_sum(part):
    """(batch, dim) float32 per-sequence sums -> (dim,): at batch 1 a view, no reduction launch."""
    return part[0] if part.shape[0] == 1 else part.sum(0)


@triton.jit
def _sum_bc_partials_kernel(part_ptr, out_ptr, n_elems, partials, stride_kind_part, stride_partial, stride_kind_out,
                            BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[kind, i] = sum over p of part[kind, p, i], cast to out's dtype; kind 0: dB, 1: dC. Loads (BLOCK_P, BLOCK)
    tiles, so that many partials' loads are in flight at once (one partial per iteration is latency-bound: ~5x
    slower at 64 partials)."""
    kind = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elems
    offs_p = tl.arange(0, BLOCK_P)
    base = part_ptr + kind * stride_kind_part + offs[None, :]
    total = tl.zeros((BLOCK_P, BLOCK), dtype=tl.float32)
    for p0 in range(0, partials, BLOCK_P):
        rows = p0 + offs_p
        tile_mask = (rows < partials)[:, None] & mask[None, :]
        total += tl.load(base + rows[:, None].to(tl.int64) * stride_partial, mask=tile_mask, other=0.0)
    tl.store(out_ptr + kind * stride_kind_out + offs, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty), mask=mask)


_SUM_BC_BLOCK = 256
_SUM_BC = CachedLaunch(_sum_bc_partials_kernel)


def _sum_bc_partials(bc_part, b_dtype, c_dtype):
    """bc_part (2, partials, batch, G, N, L) float32 (contiguous) -> dB, dC (batch, G, N, L) in B's and C's dtypes:
    one launch for both (the backward's epilogue is a row of small kernels a step pays for one after another)."""
    if b_dtype != c_dtype:
        return bc_part[0].sum(0).to(b_dtype), bc_part[1].sum(0).to(c_dtype)
    out = torch.empty(bc_part.shape[:1] + bc_part.shape[2:], device=bc_part.device, dtype=b_dtype)
    n_elems = out[0].numel()
    if n_elems:
        grid = (triton.cdiv(n_elems, _SUM_BC_BLOCK), 2)
        partials = bc_part.shape[1]
        _SUM_BC((grid[0], grid[1], 1), (bc_part, out),
                (n_elems, partials, bc_part.stride(0), bc_part.stride(1), out.stride(0)),
                (_SUM_BC_BLOCK, min(16, next_pow2(partials))), 4)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------
# Autograd wrapper (as mamba-ssm's SelectiveScanFn)
# ----------------------------------------------------------------------------------------------------------------
class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state,
                grad_mode):
        needs_grad = grad_mode and any(ctx.needs_input_grad)  # (forward itself runs without grad mode)
        if COPY_TIME_MAJOR:
            u, delta, z, B, C = _lmajor(u), _lmajor(delta), _lmajor(z), _lmajor(B), _lmajor(C)
        out, final, states, meta = selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states=needs_grad
        )
        ctx.delta_softplus = delta_softplus
        ctx.return_final_state = return_final_state
        ctx.has_initial_state = initial_state is not None
        ctx.block_t = meta["block_t"]
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.set_materialize_grads(False)
        if return_final_state:
            return out, final
        return out

    @staticmethod
    def backward(ctx, dout, *rest):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        dfinal = rest[0] if ctx.return_final_state and rest else None
        if COPY_TIME_MAJOR:
            dout = _lmajor(dout)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = selective_scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states, ctx.block_t, dout, dfinal
        )
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, (dh0 if ctx.has_initial_state else None), None, None


def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
    return_final_state=False,
):
    """The selective scan on the Triton kernels (backend "triton"); same contract as ``selective_scan``."""
    if not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))):
        # inference: no autograd node (its bookkeeping is a sizeable part of a batch-1 layer's host time)
        if COPY_TIME_MAJOR:
            u, delta, z, B, C = _lmajor(u), _lmajor(delta), _lmajor(z), _lmajor(B), _lmajor(C)
        out, final, _, _ = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
        return (out, final) if return_final_state else out
    return SelectiveScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, bool(return_final_state),
        torch.is_grad_enabled(),
    )
