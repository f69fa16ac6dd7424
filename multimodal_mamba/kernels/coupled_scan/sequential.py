"""Coupled selective scan, forward, one thread per channel walking the sequence ("sequential" kernel).

Reference: ``multimodal_mamba.modeling.ops_coupled_scan.coupled_selective_scan_ref``; contract: the module docstring
of ``ops_coupled_scan``. The backward stays the chunked-scan kernel of ``fused.py``: this forward writes the
coupled state every ``save_every`` steps in the slots that backward reads.

Why another forward. The chunked kernel of ``fused.py`` scans a chunk of time in parallel for one state index at a
time: per (channel, step, state) it pays an exclusive 4-tuple scan with warp shuffles besides the M exponentials,
and its (BLOCK_T,) tiles leave few warps per SM (2.7 ms, 7 % of HBM bandwidth, on the issue's benchmark shape). Here
the state tile is (N_PAD, BLOCK_D) with every state of a channel inside one thread (or two, see below), so one step
of the recurrence is, per (channel, state):

    a^m = exp2(dt^m * A^m log2(e) + log2(c))     (M FFMA + M MUFU.EX2; c = 1/M for "mean", folded into a and b)
    h^m = a^m * H + (c dt^m u^m) * B^m            (M FMUL + M FFMA)
    y^m += C^m * h^m                              (M FFMA, the readout; a sum over the thread's states)
    H   = sum_m h^m                               (M - 1 FADD)

about 17 instructions for M = 3 and no cross-thread traffic: the per-(channel, step) work (softplus, the gate, loads
and stores) is shared by the 16 states. Parallelism is batch * dim / (channels per warp): with ``block_d`` 16 a warp
holds 16 channels and each channel's states are split over 2 lanes (one shuffle per readout), which doubles the
warps when batch * dim is small (the benchmark's 8 x 1024 channels make only 256 warps at one channel per lane).

Memory: u, delta, z and y cross HBM once, read in chunks of ``K`` steps (``K`` contiguous steps per thread for the
(batch, M, dim, L) layout; for time-major memory a chunk is ``K`` rows of channels), prefetched one chunk ahead.
B and C are read per step as (N,) rows; the wrapper hands them over as one float32 (batch, L, 2M, N) tensor
(``prepare_bc``: per step the B rows of the M chains, then their C rows, 2 M N contiguous floats), so that one
address per step serves all 2M rows (the chains' rows are constant offsets the loads carry as immediates). Each
step's rows lie in L1 sectors no earlier step touched, so a plain load right before use waits for L2 (several hundred
cycles) every step, with about one warp per scheduler to hide it: that made the first version of this kernel 5 - 8x
slower than its instruction count (4.5 ms on the issue's shape, H200). Now the next chunk's rows are prefetched into
L1 a chunk ahead (``prefetch.global.L1``, no registers held) and each step's rows are loaded into registers one step
ahead (``PREFETCH_BC``, ``BC_AHEAD``): 1.98 ms.

Addresses: the batch element's offset goes into each tensor's base pointer once, and the per-lane offsets inside it
are 32-bit (``OFF64`` where they could overflow); where dim and L are multiples of (block_d, K) the tiles are
loaded and stored without masks (``EVEN``). Together with the packed B / C rows these cut the loop from 152 to 130
instructions per step at the fusion benchmark's config (results/gpu_kernels_notes.md, fifth round).

Chains: up to 4, each with its own pointers (u, delta, z, out of chain m may be separate tensors, as the
modalities' activations of a Coupled Mamba layer are: no stacking copy), sharing strides per kind.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..utils import interpret_mode, mufu_ex2, mufu_lg2, mufu_rcp, next_pow2, sm_count

MAX_CHAINS = 4
MAX_STATE = 64  # larger N: the chunked kernel of fused.py
LN2 = math.log(2.0)


@triton.jit
def _prefetch_l1(ptrs):
    """Ask the SM's L1 for the cache lines holding ``ptrs`` (no registers held: the values are read later by
    ordinary loads that then hit L1 instead of waiting ~L2 latency)."""
    tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_bc_steps(BC, t_first, length, offs_pf_line, ROW: tl.constexpr, OFF64: tl.constexpr):
    """L1 prefetch of the B / C rows of steps t_first .. t_first + K - 1 (K * ROW contiguous floats of this batch
    element's packed (L, 2M, N) rows, K * ROW <= 32 * len(offs_pf_line) - 32; clamped to its last element): one
    address per 128-byte line."""
    if OFF64:
        t_first = t_first.to(tl.int64)
        length = length.to(tl.int64)
    off = tl.minimum(t_first * ROW + offs_pf_line * 32, length * ROW - 1)
    _prefetch_l1(BC + off)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    """torch's softplus (threshold 20) with the MUFU exp2 / log2 (x < -15: exp(x), as log1p would give)."""
    e = mufu_ex2(x * 1.4426950408889634, FAST)
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, mufu_lg2(1.0 + e, FAST) * 0.6931471805599453))


@triton.jit
def _silu(z, FAST: tl.constexpr):
    return z * mufu_rcp(1.0 + mufu_ex2(z * -1.4426950408889634, FAST), FAST)


@triton.jit
def _neg_zero(shape):
    """A float32 tile of -0.0, the identity of +, so that x + it folds away (x + 0.0 does not: -0.0 + 0.0 is +0.0).
    Made by a bitcast: Triton 3.6 turns a literal -0.0 into +0.0."""
    return tl.full(shape, -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _row(tile, offs_k, k):
    """Row k of a (K, BD) tile (K held by each thread: a register pick once the compiler folds the select)."""
    return tl.sum(tl.where(offs_k[:, None] == k, tile, _neg_zero(tile.shape)), axis=0)


@triton.jit
def _load_one(P, off, mask, XLANE: tl.constexpr, EVEN: tl.constexpr):
    """A (K, BD) tile of u / delta / z (EVEN: no partial chunk or channel block, and ``off`` within bounds: no mask)."""
    if XLANE:  # loaded as (1, K, BD): the layout of a slice of the (NI, LPC, BD) state tile (see _xrow)
        if EVEN:
            return tl.sum(tl.load(P + off[None, :, :]).to(tl.float32), axis=0)
        else:
            return tl.sum(tl.load(P + off[None, :, :], mask=mask[None, :, :], other=0.0).to(tl.float32), axis=0)
    else:
        if EVEN:
            return tl.load(P + off)
        else:
            return tl.load(P + off, mask=mask, other=0.0)


@triton.jit
def _load_raw(U, DL, Z, off_u, off_dl, off_z, mask, HAS_Z: tl.constexpr, XLANE: tl.constexpr, EVEN: tl.constexpr):
    ru = _load_one(U, off_u, mask, XLANE, EVEN)
    rd = _load_one(DL, off_dl, mask, XLANE, EVEN)
    if HAS_Z:
        rz = _load_one(Z, off_z, mask, XLANE, EVEN)
    else:
        rz = ru
    return ru, rd, rz


@triton.jit
def _prep(ru, rd, bias, mask, scale, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
          EVEN: tl.constexpr):
    """dt = softplus(delta + bias) (0 on padded steps) and c dt u, as (K, BD) float32 tiles."""
    dt = rd.to(tl.float32)
    if HAS_BIAS:
        dt += bias[None, :]
    if SOFTPLUS:
        dt = _softplus(dt, FAST)
    if not EVEN:
        dt = tl.where(mask, dt, 0.0)
    return dt, dt * ru.to(tl.float32) * scale


@triton.jit
def _load_bc(row_ptrs, m: tl.constexpr, mask_n, EVEN_N: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    """Chain m's B and C rows of one step, ``row_ptrs`` pointing at the step's packed (2M, N) rows: B at + m N, C at
    + (M + m) N (constant offsets added to the pointers, so that the loads carry them as immediates)."""
    if EVEN_N:
        Bv = tl.load(row_ptrs + m * N)
        Cv = tl.load(row_ptrs + (M + m) * N)
    else:
        Bv = tl.load(row_ptrs + m * N, mask=mask_n, other=0.0)
        Cv = tl.load(row_ptrs + (M + m) * N, mask=mask_n, other=0.0)
    return Bv.to(tl.float32), Cv.to(tl.float32)


@triton.jit
def _load_bc_chains(row_ptrs, mask_n, EVEN_N: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    """``_load_bc`` for each of the M chains: (B, C) rows of chains 0 - 3; a chain past M gets chain 0's rows (no
    load; its values are not read). Only where the results are not carried from one chunk to the next (the rows a
    step ahead are: those of chains past M would be carried for nothing)."""
    b0, c0 = _load_bc(row_ptrs, 0, mask_n, EVEN_N, M, N)
    b1, c1, b2, c2, b3, c3 = b0, c0, b0, c0, b0, c0
    if M > 1:
        b1, c1 = _load_bc(row_ptrs, 1, mask_n, EVEN_N, M, N)
    if M > 2:
        b2, c2 = _load_bc(row_ptrs, 2, mask_n, EVEN_N, M, N)
    if M > 3:
        b3, c3 = _load_bc(row_ptrs, 3, mask_n, EVEN_N, M, N)
    return b0, c0, b1, c1, b2, c2, b3, c3


@triton.jit
def _step(H, A2, dt_k, dtu_k, lc, Bv, Cv, FAST: tl.constexpr):
    """Chain m at one step: h^m = exp2(dt A log2 e + log2 c) H + c dt u B (every state of the thread's channels) and
    its readout <C, h^m> (BD,)."""
    a = mufu_ex2(dt_k[None, None, :] * A2 + lc, FAST)
    h = a * H + dtu_k[None, None, :] * Bv[:, :, None]
    return h, tl.sum(tl.sum(h * Cv[:, :, None], axis=0), axis=0)


@triton.jit
def _shfl_idx(x, SRC: tl.constexpr, SEG: tl.constexpr):
    """Lane (lane & SEG) | SRC's value of x (one element per lane)."""
    return tl.inline_asm_elementwise(f"shfl.sync.idx.b32 $0, $1, {SRC}, {(SEG << 8) | 31}, -1;", "=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _shfl_bfly(x, MASK: tl.constexpr):
    return tl.inline_asm_elementwise(f"shfl.sync.bfly.b32 $0, $1, {MASK}, 31, -1;", "=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _xrow(tile, offs_k, k: tl.constexpr, K: tl.constexpr, JS: tl.constexpr, FAST: tl.constexpr):
    """Row k of a (K, BD) tile with one element per lane (K = LPC; row j of channel d in lane j * JS + d * (K if
    JS == 1 else 1)), broadcast over the rows: every lane of channel d gets tile[k, d], one indexed shuffle
    (``_row``'s masked sum over lanes costs two butterfly shuffles, two adds and a select). The result, read as an
    (LPC, BD) tile, has the layout of a slice of the state tile, so it broadcasts against it without conversion."""
    if FAST:
        return _shfl_idx(tile, k * JS, 31 ^ ((K - 1) * JS))
    else:
        return tl.broadcast_to(_row(tile, offs_k, k)[None, :], tile.shape)


@triton.jit
def _xstep(H, A2, dt_k, dtu_k, lc, Bv, Cv, FAST: tl.constexpr):
    """``_step`` with dt / dt u given as (LPC, BD) tiles (``_xrow``) and the readout left as this lane's partial sum
    (LPC, BD): the sum over a channel's lanes is done once per chunk (``_xscatter``), not per step."""
    a = mufu_ex2(dt_k[None, :, :] * A2 + lc, FAST)
    h = a * H + dtu_k[None, :, :] * Bv[:, :, None]
    return h, tl.sum(h * Cv[:, :, None], axis=0)


@triton.jit
def _xpick(acc, offs_acc, k: tl.constexpr):
    """Step k's (LPC, BD) partials of a (K, LPC, BD) accumulator (K in-thread: a register pick, no adds left)."""
    return tl.sum(tl.where(offs_acc == k, acc, _neg_zero(acc.shape)), axis=0)


@triton.jit
def _xhalf(lo, hi, upper, MASK: tl.constexpr):
    """One butterfly round of a reduce-scatter: lanes whose row bit is set keep ``hi`` and send ``lo``."""
    keep = tl.where(upper, hi, lo)
    return keep + _shfl_bfly(tl.where(upper, lo, hi), MASK)


@triton.jit
def _xscatter(acc, offs_acc, jj, K: tl.constexpr, JS: tl.constexpr, FAST: tl.constexpr):
    """y[k, d] = sum over the channel's lanes j of acc[k, j, d], returned as a (K, BD) tile whose lane (j, d) holds
    y[j, d]: a butterfly reduce-scatter, K - 1 shuffles per chunk instead of log2(K) per step (JS: the lanes' row
    stride, see _xrow)."""
    if FAST:
        if K == 2:
            y = _xhalf(_xpick(acc, offs_acc, 0), _xpick(acc, offs_acc, 1), (jj & 1) != 0, JS)
        elif K == 4:
            up = (jj & 2) != 0
            w0 = _xhalf(_xpick(acc, offs_acc, 0), _xpick(acc, offs_acc, 2), up, 2 * JS)
            w1 = _xhalf(_xpick(acc, offs_acc, 1), _xpick(acc, offs_acc, 3), up, 2 * JS)
            y = _xhalf(w0, w1, (jj & 1) != 0, JS)
        else:
            up = (jj & 4) != 0
            w0 = _xhalf(_xpick(acc, offs_acc, 0), _xpick(acc, offs_acc, 4), up, 4 * JS)
            w1 = _xhalf(_xpick(acc, offs_acc, 1), _xpick(acc, offs_acc, 5), up, 4 * JS)
            w2 = _xhalf(_xpick(acc, offs_acc, 2), _xpick(acc, offs_acc, 6), up, 4 * JS)
            w3 = _xhalf(_xpick(acc, offs_acc, 3), _xpick(acc, offs_acc, 7), up, 4 * JS)
            up = (jj & 2) != 0
            v0 = _xhalf(w0, w2, up, 2 * JS)
            v1 = _xhalf(w1, w3, up, 2 * JS)
            y = _xhalf(v0, v1, (jj & 1) != 0, JS)
        return y
    else:
        return tl.sum(acc, axis=1)


@triton.jit
def _finish(y, ru, rz, Dv, inv_scale, O, off_o, mask, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
            FAST: tl.constexpr, EVEN: tl.constexpr):
    out = y * inv_scale
    if HAS_D:
        out += ru.to(tl.float32) * Dv[None, :]
    if HAS_Z:
        out = out * _silu(rz.to(tl.float32), FAST)
    if EVEN:
        tl.store(O + off_o, out.to(O.dtype.element_ty))
    else:
        tl.store(O + off_o, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gather_states(base, stride_n, offs_d, mask_d, offs_n, NI: tl.constexpr, LPC: tl.constexpr, BD: tl.constexpr,
                   N: tl.constexpr):
    """A (NI, LPC, BD) float32 tile of ``base[n * stride_n + d]``, read one (BD,) row per state: small loads, so
    that no large 3-D access pins a layout (the compiler's layout propagation starts from large loads and stores;
    one whose addresses are contiguous along the states would spread a channel's states over more lanes)."""
    tile = tl.zeros([NI, LPC, BD], dtype=tl.float32)
    for n in tl.static_range(N):
        row = tl.load(base + n * stride_n + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        tile = tl.where(offs_n[:, :, None] == n, row[None, None, :], tile)
    return tile


@triton.jit
def _scatter_states(base, stride_n, tile, offs_d, mask_d, offs_n, N: tl.constexpr):
    """Store a (NI, LPC, BD) tile into ``base[n * stride_n + d]``, one (BD,) row per state (see _gather_states)."""
    for n in tl.static_range(N):
        row = tl.sum(tl.sum(tl.where(offs_n[:, :, None] == n, tile, 0.0), axis=0), axis=0)
        tl.store(base + n * stride_n + offs_d, row, mask=mask_d)


@triton.jit
def _chain_vectors(A_ptr, D_ptr, bias_ptr, m, stride_A_m, stride_A_n, stride_A_d, stride_Dp_m, stride_bias_m,
                   offs_d, mask_d, offs_n, NI: tl.constexpr, LPC: tl.constexpr, BD: tl.constexpr, N: tl.constexpr,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    A2 = _gather_states(A_ptr + m * stride_A_m, stride_A_n, offs_d * stride_A_d, mask_d, offs_n, NI, LPC, BD, N)
    A2 = A2 * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + m * stride_Dp_m + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        Dv = offs_d * 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + m * stride_bias_m + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = offs_d * 0.0
    return A2, Dv, bias


@triton.jit
def _batch_bases(U, DL, Z, O, pid_b, stride_u_b, stride_dl_b, stride_z_b, stride_o_b):
    """Chain m's u, delta, z and out pointers moved to batch element pid_b (int64 products)."""
    return U + pid_b * stride_u_b, DL + pid_b * stride_dl_b, Z + pid_b * stride_z_b, O + pid_b * stride_o_b


@triton.jit(do_not_specialize=["length", "n_slots"])  # (one build for every L)
def _coupled_seq_fwd_kernel(
    U0, U1, U2, U3, DL0, DL1, DL2, DL3, Z0, Z1, Z2, Z3, O0, O1, O2, O3, BC,
    A_ptr, D_ptr, bias_ptr, h0_ptr, states_ptr,
    dim, length, n_slots, scale, inv_scale, lc_valid, lc_pad,
    stride_u_b, stride_u_d, stride_u_l,
    stride_dl_b, stride_dl_d, stride_dl_l,
    stride_z_b, stride_z_d, stride_z_l,
    stride_o_b, stride_o_d, stride_o_l,
    stride_bc_b,
    stride_A_m, stride_A_n, stride_A_d, stride_Dp_m, stride_bias_m,
    M: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, LPC: tl.constexpr, BD: tl.constexpr, K: tl.constexpr,
    SAVE_EVERY: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, FAST: tl.constexpr, PREFETCH_BC: tl.constexpr,
    BC_AHEAD: tl.constexpr, XLANE: tl.constexpr, JS: tl.constexpr, PAD_LC: tl.constexpr, OFF64: tl.constexpr,
    EVEN: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    # states as (NI, LPC, BD) tiles, state n = s * NI + i: the LPC lanes of a channel hold NI states each
    NI: tl.constexpr = N_PAD // LPC
    offs_n = tl.arange(0, NI)[:, None] + tl.arange(0, LPC)[None, :] * NI  # (NI, LPC)
    offs_k = tl.arange(0, K)
    # XLANE (K = LPC, K * BD = 32): (K, BD) tiles hold one element per lane, where the state tile keeps the channel's
    # j-th lane: rows are broadcast by one shuffle per step and the readout's lane sum is done once per chunk
    # (``_xrow``, ``_xscatter``). JS: the lane stride of the rows: the layout Triton picks from the memory order
    # (channels contiguous: lane j * BD + d, JS = BD; steps contiguous: lane j + K * d, JS = 1; checked by the GPU
    # tests and bench_gpu_coupled_sass.py)
    offs_acc = tl.arange(0, K)[:, None, None]
    jj = tl.arange(0, K)[:, None]
    mask_d = offs_d < dim
    mask_n = offs_n < N
    EVEN_N: tl.constexpr = N == N_PAD

    A20, Dv0, bias0 = _chain_vectors(A_ptr, D_ptr, bias_ptr, 0, stride_A_m, stride_A_n, stride_A_d, stride_Dp_m,
                                     stride_bias_m, offs_d, mask_d, offs_n, NI, LPC, BD, N, HAS_D, HAS_BIAS)
    if M > 1:
        A21, Dv1, bias1 = _chain_vectors(A_ptr, D_ptr, bias_ptr, 1, stride_A_m, stride_A_n, stride_A_d,
                                         stride_Dp_m, stride_bias_m, offs_d, mask_d, offs_n, NI, LPC, BD, N, HAS_D,
                                         HAS_BIAS)
    if M > 2:
        A22, Dv2, bias2 = _chain_vectors(A_ptr, D_ptr, bias_ptr, 2, stride_A_m, stride_A_n, stride_A_d,
                                         stride_Dp_m, stride_bias_m, offs_d, mask_d, offs_n, NI, LPC, BD, N, HAS_D,
                                         HAS_BIAS)
    if M > 3:
        A23, Dv3, bias3 = _chain_vectors(A_ptr, D_ptr, bias_ptr, 3, stride_A_m, stride_A_n, stride_A_d,
                                         stride_Dp_m, stride_bias_m, offs_d, mask_d, offs_n, NI, LPC, BD, N, HAS_D,
                                         HAS_BIAS)

    # the coupled state H: (NI, LPC, BD) (the default layout for this shape: BD on lanes, then LPC, NI in-thread)
    # h0: (batch, dim, N); states: (batch, dim, n_slots, N) (slot s of channel d at (d * n_slots + s) * N)
    state_row = states_ptr + (pid_b * dim) * (n_slots * N)
    if HAS_H0:
        H = _gather_states(h0_ptr + (pid_b * dim) * N, 1, offs_d * N, mask_d, offs_n, NI, LPC, BD, N)
    else:
        H = tl.zeros([NI, LPC, BD], dtype=tl.float32)
    if SAVE_EVERY > 0:
        _scatter_states(state_row, 1, H, offs_d * (n_slots * N), mask_d, offs_n, N)

    # u, delta, z, out and the B / C rows: the batch element's offset goes into the (scalar) base pointers, so that
    # the per-lane offsets within it are 32-bit (one IMAD.WIDE per address instead of 64-bit adds and shifts; the
    # launcher sets OFF64 where a batch element's offsets could pass 2^31)
    U0, DL0, Z0, O0 = _batch_bases(U0, DL0, Z0, O0, pid_b, stride_u_b, stride_dl_b, stride_z_b, stride_o_b)
    if M > 1:
        U1, DL1, Z1, O1 = _batch_bases(U1, DL1, Z1, O1, pid_b, stride_u_b, stride_dl_b, stride_z_b, stride_o_b)
    if M > 2:
        U2, DL2, Z2, O2 = _batch_bases(U2, DL2, Z2, O2, pid_b, stride_u_b, stride_dl_b, stride_z_b, stride_o_b)
    if M > 3:
        U3, DL3, Z3, O3 = _batch_bases(U3, DL3, Z3, O3, pid_b, stride_u_b, stride_dl_b, stride_z_b, stride_o_b)
    BC = BC + pid_b * stride_bc_b
    lane_d = offs_d.to(tl.int64) if OFF64 else offs_d
    row_u = lane_d[None, :] * stride_u_d
    row_dl = lane_d[None, :] * stride_dl_d
    row_z = lane_d[None, :] * stride_z_d
    row_o = lane_d[None, :] * stride_o_d
    # B / C: one step's rows of all chains are ROW = 2 M N contiguous floats (B of chains 0 .. M-1, then C)
    ROW: tl.constexpr = 2 * M * N
    row_bc = offs_n.to(tl.int64) if OFF64 else offs_n

    # chunk 0, prefetched
    t = offs_k.to(tl.int64) if OFF64 else offs_k
    mask = (t < length)[:, None] & mask_d[None, :]
    ru0, rd0, rz0 = _load_raw(U0, DL0, Z0, row_u + t[:, None] * stride_u_l, row_dl + t[:, None] * stride_dl_l,
                              row_z + t[:, None] * stride_z_l, mask, HAS_Z, XLANE, EVEN)
    if M > 1:
        ru1, rd1, rz1 = _load_raw(U1, DL1, Z1, row_u + t[:, None] * stride_u_l, row_dl + t[:, None] * stride_dl_l,
                                  row_z + t[:, None] * stride_z_l, mask, HAS_Z, XLANE, EVEN)
    if M > 2:
        ru2, rd2, rz2 = _load_raw(U2, DL2, Z2, row_u + t[:, None] * stride_u_l, row_dl + t[:, None] * stride_dl_l,
                                  row_z + t[:, None] * stride_z_l, mask, HAS_Z, XLANE, EVEN)
    if M > 3:
        ru3, rd3, rz3 = _load_raw(U3, DL3, Z3, row_u + t[:, None] * stride_u_l, row_dl + t[:, None] * stride_dl_l,
                                  row_z + t[:, None] * stride_z_l, mask, HAS_Z, XLANE, EVEN)

    # B / C rows: every step reads M (N,) rows of B and of C that no earlier step touched (64-byte rows, new L1
    # sectors each step), so without help each step waits for L2 about M times over. PREFETCH_BC asks L1 for the
    # next chunk's rows a chunk ahead; BC_AHEAD holds the next step's rows in registers (loaded one step early).
    # (a chunk's rows are K * ROW contiguous floats: one prefetch address per 128-byte line they touch)
    PF_LINES: tl.constexpr = (K * ROW + 31) // 32 + 1
    offs_pf_line = tl.arange(0, triton.next_power_of_2(PF_LINES))
    if PREFETCH_BC:
        _prefetch_bc_steps(BC, pid_d * 0, length, offs_pf_line, ROW, OFF64)
    if BC_AHEAD:  # (only chains below M reload these in the loop, so only theirs are carried from chunk to chunk)
        nB0, nC0, nB1, nC1, nB2, nC2, nB3, nC3 = _load_bc_chains(BC + row_bc, mask_n, EVEN_N, M, N)

    n_chunks = tl.cdiv(length, K)
    for chunk in range(n_chunks):
        if PREFETCH_BC:
            _prefetch_bc_steps(BC, chunk * K + K, length, offs_pf_line, ROW, OFF64)
        t = chunk * K + offs_k
        if OFF64:
            t = t.to(tl.int64)
        mask = (t < length)[:, None] & mask_d[None, :]
        # (EVEN: the last chunk's look-ahead reads step L - 1 again instead of masking)
        tn = tl.minimum(t + K, length - 1) if EVEN else t + K
        mask_next = (tn < length)[:, None] & mask_d[None, :]
        off_nu = row_u + tn[:, None] * stride_u_l
        off_nd = row_dl + tn[:, None] * stride_dl_l
        off_nz = row_z + tn[:, None] * stride_z_l
        # this chunk's raw tiles; the next chunk's loads go out before the work
        cu0, cd0, cz0 = ru0, rd0, rz0
        ru0, rd0, rz0 = _load_raw(U0, DL0, Z0, off_nu, off_nd, off_nz, mask_next, HAS_Z, XLANE, EVEN)
        dt0, dtu0 = _prep(cu0, cd0, bias0, mask, scale, HAS_BIAS, SOFTPLUS, FAST, EVEN)
        y0 = tl.zeros([K, BD], dtype=tl.float32)
        acc0 = tl.zeros([K, LPC, BD], dtype=tl.float32)
        if M > 1:
            cu1, cd1, cz1 = ru1, rd1, rz1
            ru1, rd1, rz1 = _load_raw(U1, DL1, Z1, off_nu, off_nd, off_nz, mask_next, HAS_Z, XLANE, EVEN)
            dt1, dtu1 = _prep(cu1, cd1, bias1, mask, scale, HAS_BIAS, SOFTPLUS, FAST, EVEN)
            y1 = tl.zeros([K, BD], dtype=tl.float32)
            acc1 = tl.zeros([K, LPC, BD], dtype=tl.float32)
        if M > 2:
            cu2, cd2, cz2 = ru2, rd2, rz2
            ru2, rd2, rz2 = _load_raw(U2, DL2, Z2, off_nu, off_nd, off_nz, mask_next, HAS_Z, XLANE, EVEN)
            dt2, dtu2 = _prep(cu2, cd2, bias2, mask, scale, HAS_BIAS, SOFTPLUS, FAST, EVEN)
            y2 = tl.zeros([K, BD], dtype=tl.float32)
            acc2 = tl.zeros([K, LPC, BD], dtype=tl.float32)
        if M > 3:
            cu3, cd3, cz3 = ru3, rd3, rz3
            ru3, rd3, rz3 = _load_raw(U3, DL3, Z3, off_nu, off_nd, off_nz, mask_next, HAS_Z, XLANE, EVEN)
            dt3, dtu3 = _prep(cu3, cd3, bias3, mask, scale, HAS_BIAS, SOFTPLUS, FAST, EVEN)
            y3 = tl.zeros([K, BD], dtype=tl.float32)
            acc3 = tl.zeros([K, LPC, BD], dtype=tl.float32)

        if EVEN:  # this chunk's B / C rows: one pointer, each step's rows at a constant offset from it
            t_chunk = chunk * K
            chunk_rows = BC + (row_bc + (t_chunk.to(tl.int64) if OFF64 else t_chunk) * ROW)
        for k in tl.static_range(K):
            tk = chunk * K + k
            # padded steps (t >= L): dt = 0, so a^m = 2^lc_pad = 1/M and H passes unchanged ("mean": lc_valid is
            # that already; PAD_LC: "sum" with a padded last chunk)
            if PAD_LC:
                lc = tl.where(tk < length, lc_valid, lc_pad)
            else:
                lc = lc_valid
            if BC_AHEAD:
                # this step's rows were loaded one step ago; the next step's go out now, before the work (the last
                # step's look-ahead, past L, re-reads step L - 1)
                if EVEN:
                    if k == K - 1:
                        next_rows = chunk_rows + tl.where(tk + 1 < length, K * ROW, (K - 1) * ROW)
                    else:
                        next_rows = chunk_rows + (k + 1) * ROW
                else:
                    t_bc = tl.minimum(tk + 1, length - 1)
                    next_rows = BC + (row_bc + (t_bc.to(tl.int64) if OFF64 else t_bc) * ROW)
                Bv0, Cv0 = nB0, nC0
                nB0, nC0 = _load_bc(next_rows, 0, mask_n, EVEN_N, M, N)
                if M > 1:
                    Bv1, Cv1 = nB1, nC1
                    nB1, nC1 = _load_bc(next_rows, 1, mask_n, EVEN_N, M, N)
                if M > 2:
                    Bv2, Cv2 = nB2, nC2
                    nB2, nC2 = _load_bc(next_rows, 2, mask_n, EVEN_N, M, N)
                if M > 3:
                    Bv3, Cv3 = nB3, nC3
                    nB3, nC3 = _load_bc(next_rows, 3, mask_n, EVEN_N, M, N)
            else:
                t_bc = tl.minimum(tk, length - 1)
                rows = BC + (row_bc + (t_bc.to(tl.int64) if OFF64 else t_bc) * ROW)
                Bv0, Cv0, Bv1, Cv1, Bv2, Cv2, Bv3, Cv3 = _load_bc_chains(rows, mask_n, EVEN_N, M, N)
            if XLANE:
                dtk, dtuk = _xrow(dt0, offs_k, k, K, JS, FAST), _xrow(dtu0, offs_k, k, K, JS, FAST)
                h0, pk = _xstep(H, A20, dtk, dtuk, lc, Bv0, Cv0, FAST)
                acc0 = tl.where(offs_acc == k, pk[None, :, :], acc0)
                H_new = h0
                if M > 1:
                    dtk, dtuk = _xrow(dt1, offs_k, k, K, JS, FAST), _xrow(dtu1, offs_k, k, K, JS, FAST)
                    h1, pk = _xstep(H, A21, dtk, dtuk, lc, Bv1, Cv1, FAST)
                    acc1 = tl.where(offs_acc == k, pk[None, :, :], acc1)
                    H_new += h1
                if M > 2:
                    dtk, dtuk = _xrow(dt2, offs_k, k, K, JS, FAST), _xrow(dtu2, offs_k, k, K, JS, FAST)
                    h2, pk = _xstep(H, A22, dtk, dtuk, lc, Bv2, Cv2, FAST)
                    acc2 = tl.where(offs_acc == k, pk[None, :, :], acc2)
                    H_new += h2
                if M > 3:
                    dtk, dtuk = _xrow(dt3, offs_k, k, K, JS, FAST), _xrow(dtu3, offs_k, k, K, JS, FAST)
                    h3, pk = _xstep(H, A23, dtk, dtuk, lc, Bv3, Cv3, FAST)
                    acc3 = tl.where(offs_acc == k, pk[None, :, :], acc3)
                    H_new += h3
            else:
                h0, yk = _step(H, A20, _row(dt0, offs_k, k), _row(dtu0, offs_k, k), lc, Bv0, Cv0, FAST)
                y0 = tl.where(offs_k[:, None] == k, yk[None, :], y0)
                H_new = h0
                if M > 1:
                    h1, yk = _step(H, A21, _row(dt1, offs_k, k), _row(dtu1, offs_k, k), lc, Bv1, Cv1, FAST)
                    y1 = tl.where(offs_k[:, None] == k, yk[None, :], y1)
                    H_new += h1
                if M > 2:
                    h2, yk = _step(H, A22, _row(dt2, offs_k, k), _row(dtu2, offs_k, k), lc, Bv2, Cv2, FAST)
                    y2 = tl.where(offs_k[:, None] == k, yk[None, :], y2)
                    H_new += h2
                if M > 3:
                    h3, yk = _step(H, A23, _row(dt3, offs_k, k), _row(dtu3, offs_k, k), lc, Bv3, Cv3, FAST)
                    y3 = tl.where(offs_k[:, None] == k, yk[None, :], y3)
                    H_new += h3
            H = H_new

        if XLANE:
            y0 = _xscatter(acc0, offs_acc, jj, K, JS, FAST)
            if M > 1:
                y1 = _xscatter(acc1, offs_acc, jj, K, JS, FAST)
            if M > 2:
                y2 = _xscatter(acc2, offs_acc, jj, K, JS, FAST)
            if M > 3:
                y3 = _xscatter(acc3, offs_acc, jj, K, JS, FAST)
        off_o = row_o + t[:, None] * stride_o_l
        _finish(y0, cu0, cz0, Dv0, inv_scale, O0, off_o, mask, HAS_D, HAS_Z, FAST, EVEN)
        if M > 1:
            _finish(y1, cu1, cz1, Dv1, inv_scale, O1, off_o, mask, HAS_D, HAS_Z, FAST, EVEN)
        if M > 2:
            _finish(y2, cu2, cz2, Dv2, inv_scale, O2, off_o, mask, HAS_D, HAS_Z, FAST, EVEN)
        if M > 3:
            _finish(y3, cu3, cz3, Dv3, inv_scale, O3, off_o, mask, HAS_D, HAS_Z, FAST, EVEN)
        if SAVE_EVERY > 0:
            t_end = chunk * K + K
            if (t_end % SAVE_EVERY == 0) & (t_end < length):
                _scatter_states(state_row + (t_end // SAVE_EVERY) * N, 1, H, offs_d * (n_slots * N), mask_d,
                                offs_n, N)

    # the final state: the last slot when saving, else the (batch, dim, N) output (n_slots = 1)
    _scatter_states(state_row + (n_slots - 1) * N, 1, H, offs_d * (n_slots * N), mask_d, offs_n, N)


# ----------------------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------------------
def _is_lmajor(t):
    return t.stride(-1) == 1 or t.shape[-1] <= 1


def default_config(batch, dim, length, state_size, lmajor, dtype, chains=3):
    """(block_d, num_warps, K, prefetch_bc, bc_ahead, xlane, maxnreg) for a launch. One warp per program, ``block_d``
    channels per warp, each channel's N_PAD states split over 32 / block_d lanes, K = lanes per channel steps per
    chunk with the XLANE scheme (rows by shuffles, the readout reduce-scattered per chunk); B / C rows prefetched
    into L1 a chunk ahead and loaded into registers a step ahead; registers capped at 128 (N <= 16, >= 4 lanes per
    channel: no spills), so that 16 warps fit an SM. Lanes per channel: the most (8, 4, 2) whose warps
    (batch * dim * lanes / 32) still fit one wave of 16 warps per SM: a lone warp per scheduler is latency-bound, so
    more lanes pay for their duplicated per-channel work until a second wave starts. Without one wave even at 2 lanes,
    for N > 16, or on a Triton where XLANE does not run (``XLANE_SUPPORTED``): the previous defaults, (16, 1, 4) for
    (batch, dim, L) memory, (8, 1, 4) time-major.
    GPU timings (H200, ``benchmarks/bench_gpu_coupled_xlane.py``, results/gpu_kernels_notes.md, fourth round): see
    the notes' table; the previous round's defaults are the first row of each case there."""
    n_pad = next_pow2(state_size)
    k_cap = max(1, next_pow2(length))
    prefetch_bc, bc_ahead = SEQ_BC_DEFAULT
    bc_ahead = bc_ahead and chains <= 3
    maxnreg = SEQ_MAXNREG if n_pad <= 16 else 0
    one_wave = sm_count() * SEQ_WARPS_PER_SM
    # XLANE's configs were measured at N <= 16 (128 registers, 16 warps per SM); at N 64 (the paper's d_state) K = 8
    # lanes doubled the compile time (84 s against 43 s for (16, 1, 4) with Triton 3.6 on this project's CPU
    # machine) and was not timed on the GPU, so larger N keep the previous defaults
    for lanes in SEQ_XLANE_LANES if XLANE_SUPPORTED and n_pad <= 16 else ():
        block_d = 32 // lanes
        if lanes <= n_pad and lanes <= k_cap and triton.cdiv(dim, block_d) * batch <= one_wave:
            return block_d, 1, lanes, prefetch_bc, bc_ahead, True, maxnreg if lanes >= 4 else 0
    layout = "lmajor" if lmajor else "tmajor"
    lanes = min(n_pad, max(2, n_pad // SEQ_STATES_PER_LANE[layout]))
    k = max(1, min(SEQ_K[layout], k_cap))
    return 32 // lanes, 1, k, prefetch_bc, bc_ahead, SEQ_XLANE_DEFAULT, maxnreg if k == lanes >= 4 else 0




SEQ_K = {"lmajor": 4, "tmajor": 4}
SEQ_STATES_PER_LANE = {"lmajor": 8, "tmajor": 4}
SEQ_XLANE_LANES = (8, 4, 2)  # lanes per channel tried by default_config, most first
SEQ_WARPS_PER_SM = 16  # at <= 128 registers
SEQ_MAXNREG = 128
# no masks where dim and L are multiples of (block_d, K) (the last chunk's look-ahead re-reads step L - 1)
SEQ_EVEN_TILES = True
# (prefetch_bc, bc_ahead) of a 3-tuple config: how the per-step B / C rows reach the registers (see the kernel)
SEQ_BC_DEFAULT = (True, True)
# the cross-lane scheme of a config where it applies (``xlane_applies``): rows by indexed shuffles, readout
# reduce-scattered once per chunk
SEQ_XLANE_DEFAULT = True
# XLANE's shuffles address lanes by the layout Triton picks for the (K, block_d) tiles (JS), which no Triton API
# fixes: a version that picked another would give wrong results, not an error. So it runs only on the versions
# whose layouts the GPU tests checked; elsewhere the kernel reduces with tl.sum (layout-independent, slower).
XLANE_TRITON_VERSIONS = ("3.6.",)
XLANE_SUPPORTED = triton.__version__.startswith(XLANE_TRITON_VERSIONS)


def xlane_applies(block_d, num_warps, k):
    """Whether the XLANE scheme fits a config: one warp, K = lanes per channel (2, 4 or 8), so that (K, block_d)
    tiles are one element per lane."""
    lanes = 32 // block_d if num_warps == 1 and 32 % block_d == 0 else 0
    return num_warps == 1 and lanes in (2, 4, 8) and k == lanes


def prepare_bc(Bs, Cs):
    """B and C of every chain (M tensors (batch, N, L) each) as (batch, N, L) float32 views of one (batch, L, 2M, N)
    contiguous tensor (per step the B rows of chains 0 .. M-1, then their C rows), written by one stack: the kernel
    reads one step's 2M rows from 2 M N contiguous floats (a few L1 lines instead of 2M; one address, the chains'
    rows at constant offsets), N-contiguous rows load as vectors, and float32 saves the per-step conversions (~15 %
    of the kernel's instructions for bf16). Views that already are such a tensor's (``packed_bc``) pass as they are.
    """
    if packed_bc(Bs, Cs) is not None:
        return list(Bs), list(Cs)
    packed = _pack_bc(Bs, Cs)
    views = [packed[:, :, i].transpose(-1, -2) for i in range(packed.shape[2])]
    return views[:len(Bs)], views[len(Bs):]


@triton.jit
def _store_rows(src_ptr, dst_ptr, src_off, dst_off, mask):
    tl.store(dst_ptr + dst_off, tl.load(src_ptr + src_off, mask=mask, other=0.0).to(tl.float32), mask=mask)


@triton.jit
def _pack_bc_kernel(B0, B1, B2, B3, C0, C1, C2, C3, P, length,
                    stride_b_b, stride_b_n, stride_b_l, stride_c_b, stride_c_n, stride_c_l,
                    M: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr):
    """P (batch, L, 2M, N) float32 <- B / C of chains 0 .. M-1 ((batch, N, L) each, any strides shared per kind):
    one program per (BLOCK_L steps, batch element)."""
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, N_PAD)
    mask = (offs_l < length)[:, None] & (offs_n < N)[None, :]
    src_b = pid_b * stride_b_b + offs_l[:, None] * stride_b_l + offs_n[None, :] * stride_b_n
    src_c = pid_b * stride_c_b + offs_l[:, None] * stride_c_l + offs_n[None, :] * stride_c_n
    dst = (pid_b * length + offs_l[:, None]) * (2 * M * N) + offs_n[None, :]
    _store_rows(B0, P, src_b, dst, mask)
    _store_rows(C0, P, src_c, dst + M * N, mask)
    if M > 1:
        _store_rows(B1, P, src_b, dst + N, mask)
        _store_rows(C1, P, src_c, dst + (M + 1) * N, mask)
    if M > 2:
        _store_rows(B2, P, src_b, dst + 2 * N, mask)
        _store_rows(C2, P, src_c, dst + (M + 2) * N, mask)
    if M > 3:
        _store_rows(B3, P, src_b, dst + 3 * N, mask)
        _store_rows(C3, P, src_c, dst + (M + 3) * N, mask)


def _pack_bc(Bs, Cs):
    """The (batch, L, 2M, N) float32 tensor of ``prepare_bc``: one Triton kernel where the chains' B share strides
    and their C too (a layer's x_proj outputs), else one stack (and one conversion). (At a Coupled Mamba chunk of 100
    steps the stack and the conversion were two of the ~11 kernels on each layer's critical path.)"""
    tensors = list(Bs) + list(Cs)
    batch, state_size, length = tensors[0].shape
    same_strides = all(t.stride() == Bs[0].stride() for t in Bs) and all(t.stride() == Cs[0].stride() for t in Cs)
    if ((tensors[0].is_cuda or interpret_mode()) and len(Bs) <= MAX_CHAINS and same_strides and batch * length > 0
            and all(t.device == tensors[0].device for t in tensors)):
        packed = torch.empty(batch, length, len(tensors), state_size, device=tensors[0].device, dtype=torch.float32)
        block_l = 32
        pad = lambda ts: list(ts) + [ts[0]] * (MAX_CHAINS - len(ts))  # noqa: E731
        _pack_bc_kernel[(triton.cdiv(length, block_l), batch)](
            *pad(Bs), *pad(Cs), packed, length, *Bs[0].stride(), *Cs[0].stride(),
            M=len(Bs), N=state_size, N_PAD=next_pow2(state_size), BLOCK_L=block_l, num_warps=4,
        )
        return packed
    rows = [t.transpose(-1, -2) for t in tensors]
    if all(t.dtype == tensors[0].dtype for t in tensors) and tensors[0].dtype != torch.float32:
        # one stack in the inputs' dtype and one conversion: a stack into a float32 ``out`` copies each input
        # separately (2M kernels)
        return torch.stack(rows, dim=2).float()
    packed = torch.empty(batch, length, len(tensors), state_size, device=tensors[0].device, dtype=torch.float32)
    torch.stack(rows, dim=2, out=packed)
    return packed


def packed_bc(Bs, Cs):
    """The (batch, L, 2M, N) float32 tensor whose views Bs and Cs are (as ``prepare_bc`` returns them; B of chain m
    at row m, C at row M + m), as a tensor starting at Bs[0]'s first element; None if they are not."""
    first = Bs[0]
    if first.dtype != torch.float32:  # (the common case, a layer's bf16 rows: decided before any other look)
        return None
    tensors = list(Bs) + list(Cs)
    batch, state_size, length = first.shape
    row = len(tensors) * state_size
    if any(t.dtype != torch.float32 or t.device != first.device for t in tensors):
        return None
    if any(t.stride() != first.stride() for t in tensors) or (state_size > 1 and first.stride(1) != 1):
        return None
    if (length > 1 and first.stride(2) != row) or (batch > 1 and first.stride(0) != length * row):
        return None
    size = first.element_size()
    if any(t.data_ptr() != first.data_ptr() + i * state_size * size for i, t in enumerate(tensors)):
        return None
    return first.as_strided((batch, length, len(tensors), state_size), (length * row, row, state_size, 1))


def _offsets_fit_int32(tensors, length, k):
    """Whether every per-lane offset the kernel forms inside one batch element (channel and step offsets of the
    activations, up to a chunk past L; the packed B / C rows) stays below 2^31."""
    limit = 2 ** 31 - 1
    for t in tensors:
        _, dim, _ = t.shape
        if abs(t.stride(1)) * dim + abs(t.stride(2)) * (length + 2 * k) > limit:
            return False
    return True


def coupled_scan_fwd_seq(us, deltas, zs, A, Bs, Cs, D, delta_bias, delta_softplus, coupling, initial_state,
                         save_every=0, out=None, config=None):
    """Forward of the coupled scan over M chains given as lists of per-chain tensors.

    us, deltas, zs (or None): M tensors (batch, dim, L) of one layout per list (any strides, shared by the chains
    of a list); out: None (allocated), a (batch, M, dim, L) tensor, or a list of M (batch, dim, L) tensors of one
    layout, which may be ``us`` themselves (each program reads its u tiles before it writes y at the same places);
    Bs, Cs: M tensors (batch, N, L); A (M, dim, N); D, delta_bias (M, dim) or None; initial_state (batch, dim, N) or
    None. ``save_every`` > 0: also return the coupled state every ``save_every`` steps in (batch, dim, n_slots, N)
    float32 (slot j = the state before step j * save_every, the last slot the final state), as the chunked backward
    reads them.
    Returns (out (batch, M, dim, L) or the given ``out``, final state (batch, dim, N) float32, states or None).
    """
    chains = len(us)
    if not 1 <= chains <= MAX_CHAINS:
        raise ValueError(f"the sequential coupled scan takes 1..{MAX_CHAINS} chains, got {chains}")
    batch, dim, length = us[0].shape
    state_size = A.shape[-1]
    u0 = us[0]
    device = u0.device
    if out is None:
        if _is_lmajor(u0):
            out_full = torch.empty(batch, chains, dim, length, device=device, dtype=u0.dtype)
        else:
            out_full = torch.empty(batch, chains, length, dim, device=device, dtype=u0.dtype).transpose(-1, -2)
        outs = [out_full[:, m] for m in range(chains)]
    elif isinstance(out, (list, tuple)):
        if len(out) != chains or any(tuple(o.shape) != tuple(u0.shape) or o.dtype != u0.dtype for o in out):
            raise ValueError(f"coupled_scan_fwd_seq: out must be {chains} tensors {tuple(u0.shape)} {u0.dtype}")
        out_full = list(out)
        outs = list(out)
    else:
        out_full = out
        outs = [out[:, m] for m in range(chains)]
    lists = {"u": us, "dl": deltas, "o": outs}
    if zs is not None:
        lists["z"] = zs
    for name, tensors in lists.items():
        ref = tensors[0].stride()
        for t in tensors[1:]:
            if t.stride() != ref:
                raise ValueError(f"coupled_scan_fwd_seq: the chains' {name} tensors must share strides")
    bc = packed_bc(Bs, Cs)  # (B / C as prepare_bc returns them) or packed here, without the per-chain views
    if bc is None:
        bc = _pack_bc(Bs, Cs)
    config = tuple(config or default_config(batch, dim, length, state_size, _is_lmajor(u0), u0.dtype, chains))
    if len(config) == 3:
        config = config + SEQ_BC_DEFAULT
    if len(config) == 5:
        config = config + (SEQ_XLANE_DEFAULT,)
    if len(config) == 6:
        config = config + (0,)
    if len(config) != 7:
        raise ValueError(f"coupled_scan_fwd_seq: config must be (block_d, num_warps, K) or (block_d, num_warps, K, "
                         f"prefetch_bc, bc_ahead[, xlane[, maxnreg]]), got {config}")
    block_d, num_warps, k, prefetch_bc, bc_ahead, xlane, maxnreg = config
    if save_every and save_every % k:
        raise ValueError(f"coupled_scan_fwd_seq: save_every ({save_every}) must be a multiple of K ({k})")
    n_pad = next_pow2(state_size)
    lanes = max(1, 32 * num_warps // block_d)  # lanes per channel (block_d < 32 per warp: the states split)
    if lanes > 1 and (num_warps != 1 or 32 % block_d or lanes > n_pad):
        raise ValueError(f"coupled_scan_fwd_seq: config {(block_d, num_warps, k)} splits a channel's {n_pad} states "
                         "unevenly (block_d < 32 needs num_warps 1 and 32 / block_d <= N)")
    xlane = bool(xlane) and XLANE_SUPPORTED and xlane_applies(block_d, num_warps, k)
    # the rows' lane stride follows the memory order, which must then be one for every activation tensor
    all_t = list(us) + list(deltas) + list(zs or []) + outs
    by_l = all(t.stride(-1) == 1 for t in all_t)
    by_d = all(t.stride(-2) == 1 for t in all_t)
    if by_l == by_d:
        xlane = False
    js = 1 if by_l else block_d
    scale = 1.0 / chains if coupling == "mean" else 1.0
    if save_every:
        n_slots = triton.cdiv(length, save_every) + 1
        states = torch.empty(batch, dim, n_slots, state_size, device=device, dtype=torch.float32)
    else:
        n_slots = 1
        states = torch.empty(batch, dim, state_size, device=device, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else states
    # (absent D / delta_bias: any tensor serves as the pointer the kernel never reads; A's strided column would cost
    # a copy kernel per call)
    Dp = D.contiguous() if D is not None else A
    bias = delta_bias.contiguous() if delta_bias is not None else A
    zz = zs if zs is not None else us

    def pad4(ts):
        return list(ts) + [ts[0]] * (MAX_CHAINS - len(ts))

    # padded steps (t >= L) need their own exponent offset only for "sum" (lc_pad = log2(1 / M) is "mean"'s lc_valid)
    pad_lc = coupling != "mean" and length % k != 0
    # (one tensor per kind: the chains of a kind share strides)
    off64 = not (_offsets_fit_int32((us[0], deltas[0], outs[0]) + ((zs[0],) if zs else ()), length, k)
                 and (length + 2 * k) * bc.stride(1) <= 2 ** 31 - 1)
    grid = (triton.cdiv(dim, block_d), batch)
    options = {"maxnreg": int(maxnreg)} if maxnreg and not interpret_mode() else {}
    _coupled_seq_fwd_kernel[grid](
        *pad4(us), *pad4(deltas), *pad4(zz), *pad4(outs), bc,
        A, Dp, bias, h0, states,
        dim, length, n_slots, scale, 1.0 / scale, math.log2(scale), -math.log2(chains),
        *us[0].stride(), *deltas[0].stride(), *zz[0].stride(), *outs[0].stride(), bc.stride(0),
        A.stride(0), A.stride(2), A.stride(1), Dp.stride(0), bias.stride(0),
        M=chains, N=state_size, N_PAD=n_pad, LPC=lanes, BD=block_d, K=k, SAVE_EVERY=int(save_every),
        HAS_D=D is not None, HAS_Z=zs is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_H0=initial_state is not None, FAST=not interpret_mode(),
        PREFETCH_BC=bool(prefetch_bc) and not interpret_mode(), BC_AHEAD=bool(bc_ahead), XLANE=xlane, JS=js,
        PAD_LC=pad_lc, OFF64=off64, EVEN=SEQ_EVEN_TILES and dim % block_d == 0 and length % k == 0,
        num_warps=num_warps, **options,
    )
    final = states[:, :, n_slots - 1] if save_every else states
    return out_full, final, (states if save_every else None)
