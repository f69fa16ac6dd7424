"""A GPU-suited pure-PyTorch selective scan: blocks of steps scanned in lockstep (backend "torch" on CUDA tensors).

Same contract as ``ops_selective_scan.selective_scan`` (see that module's docstring). The CPU-tuned
``selective_scan_chunked`` works block after block of 8 steps, which on a GPU is thousands of tiny kernel launches
per layer. Here the work is arranged for a GPU instead: few, large, memory-bound kernels, and a number of launches
that does not grow with the sequence length (only with the number of memory-bounded segments).

Layout: everything of size N (the state) per channel and step lives in (batch, time, G, N, Dg) float32 tensors with
the channels (Dg = dim / G) contiguous, so that a slice at one time step of every block is a set of long contiguous
rows. Per segment of S steps (S chosen so that one such tensor stays below ``SEGMENT_ELEMENTS`` elements), with
blocks of ``b`` (32) steps:

1. ``a = exp(dt A)`` and ``v = dt u B`` for all S steps at once;
2. the recurrence ``h_t = a_t h_{t-1} + v_t`` inside every block at once, from a zero state: b - 1 in-place
   multiply-adds, step i of all S / b blocks in one kernel;
3. the state entering each block: a scan over the S / b blocks of (block decay, block end state), sequential when
   there are few blocks, else by doubling (log2(S / b) steps of whole-tensor ops); the block decay is
   ``exp(A sum dt)``;
4. the fix-up ``h_t += exp(A cumsum_block(dt)_t) h_block_start`` for all steps at once;
5. ``y_t = <C_t, h_t>`` as one batched matrix product (1 x N) @ (N x Dg) per step.

Only products of decays <= 1 are ever formed (no exponent is inverted), so nothing over- or underflows beyond what
the sequential reference does, whatever dt and A are: there is no data-dependent fallback and no host sync. Per
segment: about 14 passes over one (S, N, dim) float32 tensor and about ``b + 4 log2(S / b) + 10`` kernel launches.

Backward (``_BlockedScan``): the forward keeps only its inputs (O(batch * L * dim) and O(batch * L * N)) and the
state at each segment start; backward recomputes one segment at a time (step 1-4 above, keeping ``a`` and ``h``),
runs the adjoint recurrence ``lambda_t = C_t dy_t + a_{t+1} lambda_{t+1}`` with the same block scheme in reverse,
and forms the gradients with batched matrix products (dB, dC, dx) and two reductions (dA, ddt). Its memory is a
few segment-sized tensors: O(SEGMENT_ELEMENTS), not O(L * dim * N).

On CPU the "torch" backend keeps ``selective_scan_chunked`` (tuned for few cores); this one is correct there too
(tested against ``selective_scan_ref``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .ops_selective_scan import _check_selective_scan_inputs, discretize_delta, gate_and_skip

# Steps per block: b - 1 launches for the in-block recurrence against 4 log2(S / b) for the scan over blocks.
# Defaults: the fastest of a sweep on an H200 (benchmarks/bench_gpu_torch_scan.py, gpu_torch_scan.md: blocks of 8,
# 16, 32 steps x segments of 2**25 .. 2**27 elements x matmul or multiply-sum contraction, at L 512 and 2048).
BLOCK = 32
# Cap on the elements of one (batch, S, N, dim) work tensor (512 MB in float32); forward holds two of them,
# backward about four (2 GB peak measured at dim 5120, L 2048). Lower it on a small GPU: 2**26 costs ~8 %.
SEGMENT_ELEMENTS = 1 << 27
# Up to this many blocks per segment the carry between blocks is a loop (one launch per block), beyond it doubling.
SEQUENTIAL_CARRY_BLOCKS = 24
# y_t = <C_t, h_t> as one batched (1 x N) @ (N x Dg) product per step (one read of h), else multiply and sum.
CONTRACT_BY_MATMUL = True


def _segment_bounds(length: int, row_elements: int, block: int, cap: int) -> List[Tuple[int, int]]:
    """Cut ``length`` (a multiple of ``block``) into near-equal segments of whole blocks, each with at most
    ``cap`` elements of ``row_elements`` per step (at least one block)."""
    max_steps = max(block, (cap // max(row_elements, 1)) // block * block)
    count = -(-length // max_steps)
    per = -(-length // count)
    per = -(-per // block) * block
    return [(start, min(start + per, length)) for start in range(0, length, per)]


def _carry(decay, drive, h0):
    """The states entering each of K blocks of ``h = decay_k h + drive_k`` from ``h0``, and the state after them.

    decay, drive: (batch, K, ...); h0: (batch, ...). Returns (starts (batch, K, ...), last (batch, ...)).
    """
    blocks = decay.shape[1]
    if blocks <= SEQUENTIAL_CARRY_BLOCKS:
        starts = torch.empty_like(drive)
        starts[:, 0] = h0
        for k in range(1, blocks):
            torch.addcmul(drive[:, k - 1], decay[:, k - 1], starts[:, k - 1], out=starts[:, k])
        return starts, torch.addcmul(drive[:, -1], decay[:, -1], starts[:, -1])
    # Hillis-Steele: after the pass with step s, entry k holds the scan of blocks (k - 2s, k] from a zero state.
    cum_decay, states = decay, drive
    step = 1
    while step < blocks:
        new_states = states.clone()
        new_states[:, step:].addcmul_(cum_decay[:, step:], states[:, :-step])
        new_decay = cum_decay.clone()
        new_decay[:, step:].mul_(cum_decay[:, :-step])
        states, cum_decay = new_states, new_decay
        step *= 2
    after = states.addcmul_(cum_decay, h0[:, None])  # the state after each block
    starts = torch.cat([h0[:, None], after[:, :-1]], dim=1)
    return starts, after[:, -1]


def _segment_states(x, dt, A, B, h0, block, keep_decay):
    """All states of one segment. x, dt: (batch, S, G, 1, Dg); A: (G, N, Dg); B: (batch, S, G, N, 1); h0:
    (batch, G, N, Dg); S a multiple of ``block``. Returns h (batch, S, G, N, Dg) and, if ``keep_decay``, the decays
    exp(dt A) of the same shape (else None)."""
    batch, steps, groups, _, per_group = x.shape
    state_size = A.shape[1]
    nblocks = steps // block
    blocked = (batch, nblocks, block, groups, state_size, per_group)
    decay = torch.mul(dt, A).exp_()
    h = torch.mul(x, B)
    hb, ab = h.view(blocked), decay.view(blocked)
    for i in range(1, block):
        hb[:, :, i].addcmul_(ab[:, :, i], hb[:, :, i - 1])
    cum_dt = dt.view(batch, nblocks, block, groups, 1, per_group).cumsum(2)
    block_decay = torch.mul(cum_dt[:, :, -1], A).exp_()  # (batch, K, G, N, Dg)
    starts, _ = _carry(block_decay, hb[:, :, -1], h0)
    # exp(A * cumulative dt inside the block): how much of the block's entering state reaches step t
    reach = ab if not keep_decay else torch.empty_like(ab)
    torch.mul(cum_dt, A, out=reach).exp_()
    hb.addcmul_(reach, starts[:, :, None])
    return h, (decay if keep_decay else None)


def _contract_c(C, h):
    """y_t = <C_t, h_t>: C (batch, S, G, N, 1), h (batch, S, G, N, Dg) -> (batch, S, G, 1, Dg)."""
    if CONTRACT_BY_MATMUL:
        return torch.matmul(C.transpose(-1, -2), h)
    return (h * C).sum(dim=-2, keepdim=True)


def _scan_forward(x, dt, A, B, C, h0, block, bounds, starts=None):
    """The whole scan without autograd. x, dt: (batch, Lp, G, 1, Dg); B, C: (batch, Lp, G, N, 1). Returns
    y (batch, Lp, G, 1, Dg) and the last state (batch, G, N, Dg); appends each segment's entering state to
    ``starts`` when given."""
    y = torch.empty_like(x)
    h_last = h0
    for start, end in bounds:
        if starts is not None:
            starts.append(h_last)
        h, _ = _segment_states(x[:, start:end], dt[:, start:end], A, B[:, start:end], h_last, block, False)
        y[:, start:end] = _contract_c(C[:, start:end], h)
        h_last = h[:, -1].clone()
        del h
    return y, h_last


class _BlockedScan(torch.autograd.Function):
    """Core scan (x = dt u given, no D / z), recomputing one segment at a time in backward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, block, bounds):
        starts = []
        y, h_last = _scan_forward(x, dt, A, B, C, h0, block, bounds, starts)
        ctx.block, ctx.bounds = block, bounds
        ctx.save_for_backward(x, dt, A, B, C, *starts)
        return y, h_last

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        x, dt, A, B, C, *starts = ctx.saved_tensors
        block, bounds = ctx.block, ctx.bounds
        batch, _, groups, _, per_group = x.shape
        state_size = A.shape[1]
        grad_x, grad_dt = torch.zeros_like(x), torch.zeros_like(dt)
        grad_B, grad_C = torch.zeros_like(B), torch.zeros_like(C)
        grad_A = torch.zeros_like(A)
        # gradient reaching the state at the end of the current segment from everything after it
        carry = grad_h_last if grad_h_last is not None else torch.zeros_like(starts[0])
        for index in reversed(range(len(bounds))):
            start, end = bounds[index]
            steps = end - start
            nblocks = steps // block
            blocked = (batch, nblocks, block, groups, state_size, per_group)
            xs, dts, Bs, Cs, h0 = x[:, start:end], dt[:, start:end], B[:, start:end], C[:, start:end], starts[index]
            h, decay = _segment_states(xs, dts, A, Bs, h0, block, True)
            gy = grad_y[:, start:end] if grad_y is not None else torch.zeros_like(xs)
            # adjoint: lambda_t = C_t gy_t + a_{t+1} lambda_{t+1}, first inside each block from the block's end
            lam = torch.mul(Cs, gy)
            lb, ab = lam.view(blocked), decay.view(blocked)
            for i in range(block - 2, -1, -1):
                lb[:, :, i].addcmul_(ab[:, :, i + 1], lb[:, :, i + 1])
            # the gradient entering block k's last step from the blocks after it: g_{k-1} = P_k g_k + a_k0 lam_k0
            cum_dt = dts.view(batch, nblocks, block, groups, 1, per_group).cumsum(2)
            total = cum_dt[:, :, -1:]
            block_decay = torch.mul(total[:, :, 0], A).exp_()
            drive = ab[:, :, 0] * lb[:, :, 0]
            entering, carry = _carry(block_decay.flip(1), drive.flip(1), carry)
            entering = entering.flip(1)
            # exp(A * sum of dt after step t in its block): how much of g_k reaches step t
            reach = torch.mul(total - cum_dt, A).exp_()
            lb.addcmul_(reach, entering[:, :, None])
            del reach
            grad_C[:, start:end] = torch.matmul(h, gy.transpose(-1, -2))
            grad_B[:, start:end] = torch.matmul(lam, xs.transpose(-1, -2))
            grad_x[:, start:end] = torch.matmul(Bs.transpose(-1, -2), lam)
            # d/d(dt A): lambda_t a_t h_{t-1}
            q = lam.mul_(decay)
            del decay
            q[:, 1:].mul_(h[:, :-1])
            q[:, 0].mul_(h0)
            del h
            grad_A += (q * dts).sum(dim=(0, 1))
            grad_dt[:, start:end] = q.mul_(A).sum(dim=3, keepdim=True)
            del q
        return grad_x, grad_dt, grad_A, grad_B, grad_C, carry, None, None


def selective_scan_blocked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
    return_final_state=False, block: Optional[int] = None, segment_elements: Optional[int] = None,
):
    """The blocked PyTorch selective scan (backend "torch" on CUDA); same contract as ``selective_scan``.

    ``block`` steps are scanned in lockstep across all blocks, segments of at most ``segment_elements`` elements
    per (batch, S, N, dim) work tensor at a time (see the module docstring). y comes back in u's layout.
    """
    groups = _check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape
    state_size = A.shape[1]
    per_group = dim // groups
    h0 = (
        initial_state.float().reshape(batch, groups, per_group, state_size).transpose(-1, -2).contiguous()
        if initial_state is not None
        else u.new_zeros(batch, groups, state_size, per_group, dtype=torch.float32)
    )
    if length == 0:
        y = u.new_zeros(batch, dim, 0)
        h_last = h0.transpose(-1, -2).reshape(batch, dim, state_size).clone()
        return (y, h_last) if return_final_state else y
    block = max(1, min(block or BLOCK, length))
    padded = -(-length // block) * block
    bounds = _segment_bounds(padded, batch * dim * state_size, block, segment_elements or SEGMENT_ELEMENTS)
    core_needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    )
    with torch.set_grad_enabled(core_needs_grad):
        dt = discretize_delta(delta, delta_bias, delta_softplus)
        x = dt * u.float()

        def time_major(t):  # (batch, dim, L) -> (batch, Lp, G, 1, Dg), zero-padded (dt = 0, x = 0 keep the state)
            t = t.transpose(1, 2)
            if padded != length:
                t = F.pad(t, (0, 0, 0, padded - length))
            return t.contiguous().view(batch, padded, groups, 1, per_group)

        def state_major(mat):  # (batch, [G,] N, L) -> (batch, Lp, G, N, 1)
            mat = (mat if mat.dim() == 4 else mat[:, None]).float().permute(0, 3, 1, 2)
            if padded != length:
                mat = F.pad(mat, (0, 0, 0, 0, 0, padded - length))
            return mat.contiguous().unsqueeze(-1)

        A_g = A.float().reshape(groups, per_group, state_size).transpose(1, 2).contiguous()
        args = (time_major(x), time_major(dt), A_g, state_major(B), state_major(C), h0)
        if core_needs_grad:
            y, h_last = _BlockedScan.apply(*args, block, bounds)
        else:
            y, h_last = _scan_forward(*args, block, bounds)
    y = y.view(batch, padded, dim)[:, :length].transpose(1, 2)  # (batch, dim, L), time-major
    y = gate_and_skip(y, u, D, z)
    if u.stride(-1) == 1 and length > 1 and dim > 1:
        y = y.contiguous()  # u's layout
    y = y.to(u.dtype)
    h_last = h_last.transpose(-1, -2).reshape(batch, dim, state_size)
    return (y, h_last) if return_final_state else y


def causal_conv1d_float32(x, weight, bias=None, initial_state=None, activation=None):
    """The causal depthwise conv of the "torch" backend on CUDA: ``causal_conv1d_shifted`` accumulated in float32
    whatever the weights' dtype, rounded once to x's dtype (as the fused kernels do; with bf16 weights the shifted
    adds would round after every tap). On a GPU the float32 temporaries cost little next to the scan."""
    from .ops_selective_scan import causal_conv1d_shifted

    if weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()
        bias = bias.float() if bias is not None else None
    return causal_conv1d_shifted(x, weight, bias, initial_state=initial_state, activation=activation)
