"""The selective scan, its decode step and the causal depthwise conv: contracts, references, PyTorch paths.

Contract of ``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
initial_state=None, return_final_state=False)``:

- ``u``, ``delta``, ``z``: (batch, dim, L); ``A``: (dim, N) float32; ``B``, ``C``: (batch, N, L) or
  (batch, G, N, L) with G dividing dim (channel d reads group d // (dim // G)); ``D``, ``delta_bias``: (dim,);
  ``initial_state``: (batch, dim, N) float32.
- ``dt = softplus(delta + delta_bias)``; ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t``;
  ``y_t = <C_t, h_t> + D u_t``; ``y = y * silu(z)``. Output in u's dtype; the final state is float32.

Three implementations live here:

- ``selective_scan_ref``: the sequential loop over time, in float32. It is the definition of correct and the
  reference every other backend is tested against; it is never chosen automatically.
- ``selective_scan_chunked`` (backend ``"torch"``): the time axis is cut into chunks of blocks of 8 steps; inside
  a block all steps are computed at once (log space with an exponent centered on the block, the prefix sum and the
  contraction with C as one small batched matrix product; a doubling scan for the rare blocks whose decay range
  is too wide for float32), and the state is carried between blocks and chunks. There is no Python loop over
  tokens, and its memory is O(batch * dim * N * chunk) plus the inputs: backward recomputes each chunk from the
  state saved at the chunk's start (as mamba-ssm's kernel does) instead of keeping an autograd graph over the
  whole sequence. Details and the exactness argument: the notes above ``_BLOCK_SIZE``.
- fused GPU kernels, registered by ``multimodal_mamba.kernels`` when it can be imported;
- the opt-in CPU backend ``"torch_compile"`` (``ops_selective_scan_compiled``: the scan and the conv compiled by
  ``torch.compile``).

Decode steps: ``selective_state_update`` (one token, state updated in place) and ``causal_conv1d_update``
(conv state rolled in place), so that a preallocated cache can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .ssm_backends import choose_backend, dispatch, record_backend, register_backend

LOG2_E = 1.0 / math.log(2.0)
DEFAULT_CHUNK_SIZE = 64


# ----------------------------------------------------------------------------------------------------------------
# Input checks shared by every backend (a clear ValueError instead of a shape error deep inside).
# ----------------------------------------------------------------------------------------------------------------
def _check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> int:
    """Validate shapes against the contract and return the number of groups G."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got shape {tuple(A.shape)}")
    state_size = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        if mat.dim() == 3:
            expected = (batch, state_size, length)
        elif mat.dim() == 4:
            expected = (batch, mat.shape[1], state_size, length)
        else:
            raise ValueError(f"selective_scan: {name} must be (batch, N, L) or (batch, G, N, L), got {tuple(mat.shape)}")
        if tuple(mat.shape) != expected:
            raise ValueError(f"selective_scan: {name} must have shape {expected}, got {tuple(mat.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"selective_scan: B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    groups = 1 if B.dim() == 3 else B.shape[1]
    if groups < 1 or dim % groups != 0:
        raise ValueError(f"selective_scan: the number of groups G={groups} must divide dim={dim}")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must have shape ({dim},), got {tuple(vec.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, state_size):
        raise ValueError(
            f"selective_scan: initial_state must be (batch, dim, N) = {(batch, dim, state_size)}, "
            f"got {tuple(initial_state.shape)}"
        )
    return groups


def discretize_delta(delta, delta_bias, delta_softplus):
    """dt = softplus(delta + delta_bias) in float32. delta (batch, ..., dim, L); delta_bias (..., dim), i.e. delta's
    shape without batch and L (the selective scan's (dim,), the coupled scan's (M, dim))."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[..., None]
    return F.softplus(dt) if delta_softplus else dt


def gate_and_skip(y, u, D, z):
    """y (batch, ..., dim, L) float32 -> y + D u, gated by silu(z); D of delta_bias's shape (see above).

    Works in place on y when nothing needs a gradient (y is then the caller's own fresh tensor).
    """
    in_place = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y, u, D, z)))
    if D is not None:
        if in_place:
            y.addcmul_(u.float(), D.float()[..., None])
        else:
            y = y + u.float() * D.float()[..., None]
    if z is not None:
        gate = _silu_in_memory_order(z.float())
        y = y.mul_(gate) if in_place else y * gate
    return y


def _silu_in_memory_order(z):
    """silu(z), computed along z's memory: for a time-major view (the mixers' gate is half of in_proj's output, read
    as (batch, dim, L) with L the strided axis) F.silu would write a channel-major result with strided reads, about
    five times slower than running over the memory in order."""
    if z.dim() >= 2 and z.stride(-1) != 1 and z.stride(-2) == 1:
        return F.silu(z.transpose(-1, -2)).transpose(-1, -2)
    return F.silu(z)


# ----------------------------------------------------------------------------------------------------------------
# Reference: the sequential loop (the definition of correct).
# ----------------------------------------------------------------------------------------------------------------
def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
    return_final_state=False,
):
    """Sequential float32 selective scan; the test reference for every backend. Memory O(batch*dim*L*N)."""
    groups = _check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape
    dt = discretize_delta(delta, delta_bias, delta_softplus)
    Bf, Cf = B.float(), C.float()
    if Bf.dim() == 3:
        Bf, Cf = Bf[:, None], Cf[:, None]
    Bf = Bf.repeat_interleave(dim // groups, dim=1)  # (batch, dim, N, L)
    Cf = Cf.repeat_interleave(dim // groups, dim=1)
    decay = torch.exp(dt[..., None] * A.float()[:, None, :])  # (batch, dim, L, N)
    drive = (dt * u.float())[..., None] * Bf.transpose(2, 3)  # (batch, dim, L, N)
    h = (
        initial_state.float().clone()
        if initial_state is not None
        else torch.zeros(batch, dim, A.shape[1], device=u.device, dtype=torch.float32)
    )
    ys = []
    for t in range(length):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append((h * Cf[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0, dtype=torch.float32)
    y = gate_and_skip(y, u, D, z).to(u.dtype)
    return (y, h) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------
# Chunked PyTorch path.
# ----------------------------------------------------------------------------------------------------------------
#
# The time axis is cut into blocks of ``block`` (8) steps. Inside a block the states are written in log space with an
# exponent centered on the block:
#
#     h_t = 2**E_t (g + sum_{s<=t} B_s w_s),  w_s = 2**(-E_s) x_s,  E_t = A2 (cum_t - tot / 2),  g = 2**(-E_{-1}) h_{-1}
#
# with A2 = A log2(e), x = dt u, cum_t the cumulative dt inside the block and tot its total (so |E| <= |A2| tot / 2
# when dt >= 0), and h_{-1} the state before the block. For each state n this is one small matrix product
# M @ [g; w] with M[t, 0] = C_t, M[t, 1 + s] = C_t B_s [s <= t] for t < b (the prefix sum, C and the carried state
# at once) and a last row [1, B_0 .. B_b-1] that gives the block's end state; then y_t = sum_n 2**E_t (M @ [g; w])_t.
#
# No-grad forward (``_scan_inference``), per chunk of ``chunk_size`` steps: the exponent, exp2 and times x for all its
# blocks at once; then block after block the batched ((b + 1) x (b + 1)) @ ((b + 1) x Dg) product, whose last row,
# times one small factor, is the next block's carried state; then divide by 2**(-E) and sum over N for all blocks at
# once. What is per block (centering, 2**(A2 tot / 2), the matrices) is computed for a group of chunks in a few ops.
# Training: the forward also keeps the state at each chunk start; backward recomputes one chunk at a time
# (``_chunk_forward``: the same block form with all blocks of the chunk in each op, through autograd).
#
# Exactness: float32 holds 2**(+-E) while |E| stays well inside its exponent range; |E| <= _MAX_LOG2_EXPONENT, which
# also bounds the rounding of the exponent itself (a relative error of about |E| 2**-24 per term). The errors against
# float64 come out at the level of the sequential float32 reference's own. A (block, channel) whose decay is wider
# than that (dt |A| above ~5.5 per step on average over the block, for its fastest state) is scanned by doubling on
# its own, with products of decays as the reference forms them, and a result that is not finite (a drive beyond
# ~1e28) is recomputed by doubling.

_BLOCK_SIZE = 8
# Bound on |E| in the block form: 2**32 leaves room for any drive below ~1e28 and keeps the rounding of the
# exponent at a few float32 ulps; a block may then span a decay of 2**-64 for its fastest state. 8-step blocks:
# the (9 x 9) products cost less than 16-step ones and the exponent range per step is twice as wide.
_MAX_LOG2_EXPONENT = 32.0
# Cap (elements) on chunk * batch * dim * N: keeps each per-chunk work tensor (forward, and backward's recompute)
# within a few MB whatever the batch and width; beyond that the passes over them fall out of the caches.
_WORK_ELEMENTS = 1 << 20


def linear_recurrence_logspace(drive, log2_cum, h0, log2_start=None):
    """All states of ``h_t = 2**(E_t - E_{t-1}) h_{t-1} + drive_t`` at once, with E_{-1} = ``log2_start`` (0).

    drive, log2_cum (= E): (..., T); h0, log2_start: (...). Returns (..., T). Exact in real arithmetic; in
    float32 it needs |E| small enough that 2**(-E) * drive stays finite (callers check the range first).
    """
    scale = torch.exp2(-log2_cum)
    weighted = drive * scale
    weighted[..., 0] += h0 if log2_start is None else h0 * torch.exp2(-log2_start)
    return torch.cumsum(weighted, dim=-1) * torch.exp2(log2_cum)


def _doubling_scan(decay, drive):
    """Hillis-Steele scan over the last dim: (prod_{s<=t} decay_s, the states from a zero state), each (..., T)."""
    length = decay.shape[-1]
    step = 1
    while step < length:
        shifted = torch.addcmul(drive[..., step:], decay[..., step:], drive[..., :-step])
        drive = torch.cat([drive[..., :step], shifted], dim=-1)
        decay = torch.cat([decay[..., :step], decay[..., step:] * decay[..., :-step]], dim=-1)
        step *= 2
    return decay, drive


def linear_recurrence_doubling(decay, drive, h0):
    """All states of ``h_t = decay_t h_{t-1} + drive_t`` by log2(T) doubling steps (Hillis-Steele).

    decay, drive: (..., T); h0: (...). Returns (..., T). Only products of decays are formed, so nothing
    overflows when the decays are <= 1, whatever their range.
    """
    cum_decay, states = _doubling_scan(decay, drive)
    return torch.addcmul(states, cum_decay, h0[..., None])


def _centering_matrix(block, device):
    """V (block + 1, block): V @ dt gives, per block, rows t < block: tot/2 - cum_t (= -E_t / A2), row block: tot/2."""
    matrix = torch.full((block + 1, block), 0.5, device=device)
    matrix[:block] -= torch.ones(block, block, device=device).tril()
    return matrix


def _block_mask(block, device):
    """(block, block + 1): [t, 0] = 1 (the carried state reaches every step), [t, 1 + s] = [s <= t]."""
    return torch.ones(block, block + 1, device=device).tril(diagonal=1)


def _wide_blocks(centered, A2_max, block, nonneg_dt):
    """Bool mask of the (block, channel) pairs whose exponent |E| would exceed _MAX_LOG2_EXPONENT for some state.

    centered: (..., b + 1, Dg) from the centering matrix; A2_max: max_n |A2|, broadcastable to (..., Dg).
    max_t |cum_t - tot/2| is tot/2 when dt >= 0.
    """
    span = centered[..., block, :].abs() if nonneg_dt else centered[..., :block, :].abs().amax(dim=-2)
    return span * A2_max > _MAX_LOG2_EXPONENT


def _chunk_doubling(x, dt, A2, B, C, h0):
    """One chunk by a doubling scan over all its steps (the robust path; differentiable).

    x, dt: (batch, G, T, Dg); A2: (G, N, Dg); B, C: (batch, G, N, T); h0: (batch, G, N, Dg). Returns y (batch, G, T, Dg)
    and the last state (batch, G, N, Dg).
    """
    decay = torch.exp2(A2[None, :, :, None, :] * dt[:, :, None])  # (batch, G, N, T, Dg)
    drive = x[:, :, None] * B[..., None]
    states = linear_recurrence_doubling(decay.transpose(-1, -2), drive.transpose(-1, -2), h0)  # (batch, G, N, Dg, T)
    y = (states * C[:, :, :, None, :]).sum(dim=2).transpose(-1, -2)
    return y, states[..., -1]


def _chunk_forward(x, dt, A2, B, C, h0, block):
    """One chunk by the block form, differentiable (backward recomputes each chunk with it): the math of
    ``_scan_inference``, with all blocks of the chunk in each op. Arguments and results as ``_chunk_doubling``; T must
    be a multiple of ``block``."""
    batch, groups, length, per_group = x.shape
    state_size = A2.shape[1]
    nblocks = length // block
    centered = torch.matmul(_centering_matrix(block, x.device), dt.reshape(batch, groups, nblocks, block, per_group))
    A2_max = A2.detach().abs().amax(dim=1)[None, :, None, :]  # (1, G, 1, Dg)
    if bool(_wide_blocks(centered.detach(), A2_max, block, bool(dt.min() >= 0)).any()):
        return _chunk_doubling(x, dt, A2, B, C, h0)
    A2_5 = A2[None, :, :, None, :]  # (1, G, N, 1, Dg)
    scale = torch.exp2(A2_5[..., None, :] * centered[:, :, None, :, :block])  # 2**(-E): (batch, G, N, K, b, Dg)
    weighted = scale * x.reshape(batch, groups, 1, nblocks, block, per_group)
    Bb = B.reshape(batch, groups, state_size, nblocks, block)
    Cb = C.reshape(batch, groups, state_size, nblocks, block)
    to_end = torch.exp2(A2_5 * centered[:, :, None, :, block])  # 2**(A2 tot / 2), (batch, G, N, K, Dg)
    local = torch.matmul(Bb[..., None, :], weighted).squeeze(-2) * to_end  # each block's end state from zero
    decay = to_end * to_end
    states = [h0]
    for k in range(nblocks):
        states.append(torch.addcmul(local[..., k, :], decay[..., k, :], states[-1]))
    carried = torch.stack(states[:-1], dim=-2) * to_end  # 2**(-E_{-1}) h_{-1} per block
    ext = torch.cat([carried[..., None, :], weighted], dim=-2)  # (batch, G, N, K, b + 1, Dg)
    matrices = (Cb[..., :, None] * _block_mask(block, x.device)) * F.pad(Bb, (1, 0), value=1.0)[..., None, :]
    y = (torch.matmul(matrices, ext) / scale).sum(dim=2).reshape(batch, groups, length, per_group)
    h_last = states[-1]
    if not bool(torch.isfinite(y.detach().sum() + h_last.detach().sum())):
        return _chunk_doubling(x, dt, A2, B, C, h0)
    return y, h_last


def _block_matrices(Bb, Cb):
    """Bb, Cb (..., b) -> M (..., b + 1, b + 1) acting on [carried state; 2**(-E_s) x_s]: rows t < b give
    C_t (g + sum_{s<=t} B_s w_s), row b the block's end state g + sum_s B_s w_s (both still times 2**E)."""
    block = Bb.shape[-1]
    mask = torch.ones(block + 1, block + 1, device=Bb.device).tril(diagonal=1)
    mask[block] = 1.0
    c_ext = F.pad(Cb, (0, 1), value=1.0)
    b_ext = F.pad(Bb, (1, 0), value=1.0)
    return (c_ext[..., :, None] * mask).mul_(b_ext[..., None, :])


class _ChunkWorkspace:
    """Work tensors of the no-grad scan for a chunk of K blocks, reused by every chunk of that size, with the views
    the per-block products take. Reusing them (and working in place) avoids fresh megabyte-sized allocations, with
    their page faults, per chunk. Layout (K, batch, G, N, rows, Dg)."""

    def __init__(self, batch, groups, state_size, block, per_group, device):
        self.lead = (batch, groups, state_size)
        self.block, self.per_group, self.device = block, per_group, device
        self.cache = {}

    def get(self, nblocks):
        if nblocks not in self.cache:
            block, per_group = self.block, self.per_group
            shape = (nblocks,) + self.lead
            rows = math.prod(self.lead)
            scale = torch.empty(shape + (block, per_group), device=self.device)  # 2**(-E)
            ext = torch.empty(shape + (block + 1, per_group), device=self.device)  # [carried state, 2**(-E) x]
            out = torch.empty(shape + (block + 1, per_group), device=self.device)  # M @ ext
            self.cache[nblocks] = (
                scale, ext[..., 1:, :], out[..., :block, :], ext[..., 0, :].unbind(0), out[..., block, :].unbind(0),
                ext.view(nblocks, rows, block + 1, per_group).unbind(0),
                out.view(nblocks, rows, block + 1, per_group).unbind(0),
            )
        return self.cache[nblocks]


def _scan_inference(x, dt, A2, B, C, h0, block, chunk_blocks, y, starts=None, nonneg_dt=None):
    """The block form over the whole sequence without autograd, in place in reused buffers.

    x, dt: (batch, G, Lp, Dg), Lp a multiple of ``block``; A2: (G, N, Dg); B, C: (batch, G, N, Lp); h0:
    (batch, G, N, Dg); y: a (batch, G, Lp, Dg) tensor (any strides) that receives the output. Appends the state at
    each chunk start to ``starts`` when given. Returns the last state.

    Per chunk of K blocks: the exponent, exp2 and times x for all K blocks at once; then block after block one
    batched ((b + 1) x (b + 1)) @ ((b + 1) x Dg) product per state (the prefix sum, C and the carried state; its
    last row is the block's end state, which becomes the next block's carried state by one small product); then
    the division by 2**(-E) and the sum over N for all K blocks at once. What is per block (centering,
    2**(A2 tot / 2), the matrices) is computed for a group of chunks at once.
    """
    batch, groups, length, per_group = x.shape
    state_size = A2.shape[1]
    nblocks = length // block
    if nonneg_dt is None:
        nonneg_dt = bool(dt.min() >= 0)
    device = x.device
    centering = _centering_matrix(block, device)
    A2_5 = A2[None, None]  # (1, 1, G, N, Dg) for (blocks, batch, G, N, Dg)
    A2_6 = A2_5[..., None, :]  # for (blocks, batch, G, N, b, Dg)
    A2_max = A2.abs().amax(dim=1)  # (G, Dg)
    # Block-major views (Lp / b, batch, G, ...) of the inputs and the output.
    x_blocks = x.view(batch, groups, nblocks, block, per_group).permute(2, 0, 1, 3, 4)
    dt_blocks = dt.view(batch, groups, nblocks, block, per_group).permute(2, 0, 1, 3, 4)
    Bk = B.view(batch, groups, state_size, nblocks, block).permute(3, 0, 1, 2, 4)  # (Lp / b, batch, G, N, b)
    Ck = C.view(batch, groups, state_size, nblocks, block).permute(3, 0, 1, 2, 4)
    y_blocks = y.unflatten(2, (nblocks, block)).permute(2, 0, 1, 3, 4)  # (Lp / b, batch, G, b, Dg)
    rows = batch * groups * state_size
    workspace = _ChunkWorkspace(batch, groups, state_size, block, per_group, device)
    group_blocks = 8 * chunk_blocks
    h = h0
    for g0 in range(0, nblocks, group_blocks):
        g1 = min(g0 + group_blocks, nblocks)
        centered = torch.matmul(centering, dt_blocks[g0:g1])  # (Kg, batch, G, b + 1, Dg)
        wide = _wide_blocks(centered, A2_max, block, nonneg_dt)  # (Kg, batch, G, Dg)
        wide_blocks = wide.flatten(1).any(dim=1).tolist()
        if any(wide_blocks):
            # Finite stand-ins (E = 0, so 2**(A2 tot / 2) = 1 and the carried state is h itself); those
            # (block, channel) pairs are redone by doubling.
            centered.mul_(~wide[..., None, :])
        to_end = torch.mul(A2_5, centered[..., None, block, :]).exp2_()  # 2**(A2 tot / 2): (Kg, batch, G, N, Dg)
        matrices = _block_matrices(Bk[g0:g1], Ck[g0:g1]).view(g1 - g0, rows, block + 1, block + 1).unbind(0)
        exponents = centered[..., None, :block, :]  # (Kg, batch, G, 1, b, Dg)
        factors = to_end.unbind(0)
        # From a block's end state, still times 2**(-E_end), to the next block's carried state 2**(-E_{-1}) h.
        steps = (to_end[:-1] * to_end[1:]).unbind(0)
        for c0 in range(0, g1 - g0, chunk_blocks):
            c1 = min(c0 + chunk_blocks, g1 - g0)
            k0, k1 = g0 + c0, g0 + c1
            if starts is not None:
                starts.append(h)
            scale, weighted, out_y, carried, out_end, ext_flat, out_flat = workspace.get(c1 - c0)
            torch.mul(A2_6, exponents[c0:c1], out=scale)
            scale.exp2_()  # 2**(-E)
            torch.mul(scale, x_blocks[k0:k1, :, :, None], out=weighted)
            torch.mul(h, factors[c0], out=carried[0])  # 2**(-E_{-1}) h_{-1}, with 2**(-E_{-1}) = 2**(A2 tot / 2)
            fixes = []
            for k in range(c1 - c0):  # block after block: the carried state links them
                fix = None
                if wide_blocks[c0 + k]:
                    fix = _wide_rows_scan(
                        x_blocks[k0 + k], dt_blocks[k0 + k], A2, Bk[k0 + k], Ck[k0 + k], wide[c0 + k], carried[k]
                    )
                    fixes.append((k, fix))
                torch.bmm(matrices[c0 + k], ext_flat[k], out=out_flat[k])
                if k + 1 < c1 - c0:
                    torch.mul(out_end[k], steps[c0 + k], out=carried[k + 1])
                    if fix is not None:
                        (b_i, g_i, d_i), _, end_rows = fix
                        carried[k + 1][b_i, g_i, :, d_i] = end_rows * factors[c0 + k + 1][b_i, g_i, :, d_i]
                else:
                    h = out_end[k] * factors[c0 + k]  # the state after the chunk: times 2**E_end = 2**(A2 tot / 2)
                    if fix is not None:
                        (b_i, g_i, d_i), _, end_rows = fix
                        h[b_i, g_i, :, d_i] = end_rows
            out_y.div_(scale)
            torch.sum(out_y, dim=3, out=y_blocks[k0:k1])
            for k, ((b_i, g_i, d_i), y_rows, _) in fixes:
                y_blocks[k0 + k][b_i, g_i, :, d_i] = y_rows
    if not bool(torch.isfinite(y.sum() + h.sum())):
        # Something overflowed in the block form (a drive beyond ~1e28): redo every chunk by doubling.
        if starts is not None:
            starts.clear()
        h = h0
        for k0 in range(0, nblocks, chunk_blocks):
            start, end = k0 * block, min(k0 + chunk_blocks, nblocks) * block
            if starts is not None:
                starts.append(h)
            y[:, :, start:end], h = _chunk_doubling(
                x[:, :, start:end], dt[:, :, start:end], A2, B[..., start:end], C[..., start:end], h
            )
    return h


def _wide_rows_scan(x_block, dt_block, A2, Bb, Cb, wide, h):
    """The channels of one block marked ``wide`` (batch, G, Dg), by doubling (R of them, each (N, b)).

    x_block, dt_block: (batch, G, b, Dg); Bb, Cb: (batch, G, N, b); h: (batch, G, N, Dg), the state before the block
    (in those channels). Returns their (b, g, d) indices, y (R, b) and the state after the block (R, N).
    """
    b_i, g_i, d_i = wide.nonzero(as_tuple=True)
    dt_rows, x_rows = dt_block[b_i, g_i, :, d_i], x_block[b_i, g_i, :, d_i]  # (R, b)
    cum_decay, local = _doubling_scan(
        torch.exp2(A2[g_i, :, d_i][:, :, None] * dt_rows[:, None, :]), x_rows[:, None, :] * Bb[b_i, g_i]
    )  # (R, N, b)
    states = torch.addcmul(local, cum_decay, h[b_i, g_i, :, d_i][..., None])
    return (b_i, g_i, d_i), (Cb[b_i, g_i] * states).sum(1), states[..., -1]


class _ChunkedSelectiveScan(torch.autograd.Function):
    """Core recurrence y_t = <C_t, h_t> in float32, chunk by chunk, with recompute-per-chunk backward.

    x (= dt u), dt: (batch, G, Lp, Dg) with Lp a multiple of ``block`` (zero-padded steps leave the state alone);
    A2 = A log2(e): (G, N, Dg); B, C: (batch, G, N, Lp); h0: (batch, G, N, Dg). Returns y (batch, Lp, G, Dg), i.e.
    time-major, and the last state (batch, G, N, Dg). Saves only its inputs and the state at each chunk start, so
    training memory does not grow with L beyond the inputs themselves.
    """

    @staticmethod
    def forward(ctx, x, dt, A2, B, C, h0, chunk_blocks, block):
        batch, groups, length, per_group = x.shape
        y = x.new_empty(batch, length, groups, per_group)
        starts = []
        h = _scan_inference(x, dt, A2, B, C, h0.contiguous(), block, chunk_blocks, y.permute(0, 2, 1, 3), starts)
        ctx.block, ctx.chunk_blocks = block, chunk_blocks
        ctx.save_for_backward(x, dt, A2, B, C, *starts)
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        x, dt, A2, B, C, *starts = ctx.saved_tensors
        block, chunk_blocks = ctx.block, ctx.chunk_blocks
        length = x.shape[2]
        grad_x, grad_dt = torch.empty_like(x), torch.empty_like(dt)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A2 = torch.zeros_like(A2)
        grad_h = grad_h_last if grad_h_last is not None else torch.zeros_like(starts[0])
        grad_y = grad_y.permute(0, 2, 1, 3) if grad_y is not None else None
        for index in reversed(range(len(starts))):
            start = index * chunk_blocks * block
            end = min(start + chunk_blocks * block, length)
            with torch.enable_grad():
                chunk = (x[:, :, start:end], dt[:, :, start:end], A2, B[..., start:end], C[..., start:end])
                inputs = [t.detach().requires_grad_() for t in chunk + (starts[index],)]
                y_c, h_out = _chunk_forward(*inputs, block)
                grad_y_c = grad_y[:, :, start:end] if grad_y is not None else torch.zeros_like(y_c)
                grads = torch.autograd.grad((y_c, h_out), inputs, (grad_y_c, grad_h), allow_unused=True)
            g_x, g_dt, g_A2, g_B, g_C, g_h = (torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs))
            grad_x[:, :, start:end] = g_x
            grad_dt[:, :, start:end] = g_dt
            grad_B[..., start:end] = g_B
            grad_C[..., start:end] = g_C
            grad_A2 += g_A2
            grad_h = g_h
        return grad_x, grad_dt, grad_A2, grad_B, grad_C, grad_h, None, None


def _time_blocks(t, groups, padded_length):
    """(batch, dim, L) -> (batch, G, Lp, Dg) contiguous float32, zero-padded at the end of time (a view when the
    input is time-major, G = 1 and L = Lp)."""
    batch, dim, length = t.shape
    t = t.float().transpose(1, 2).reshape(batch, length, groups, dim // groups).transpose(1, 2)
    if padded_length != length:
        t = F.pad(t, (0, 0, 0, padded_length - length))
    return t.contiguous()


def _grouped_bc(mat, padded_length):
    """B or C, (batch, N, L) or (batch, G, N, L) -> (batch, G, N, Lp) contiguous float32, zero-padded."""
    mat = (mat if mat.dim() == 4 else mat[:, None]).float()
    if padded_length != mat.shape[-1]:
        mat = F.pad(mat, (0, padded_length - mat.shape[-1]))
    return mat.contiguous()


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
    return_final_state=False, chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """The chunked PyTorch selective scan (backend "torch"); same contract as ``selective_scan``.

    Blocks of 8 steps computed at once, the state carried between them (see the notes above ``_BLOCK_SIZE``);
    ``chunk_size`` steps are recomputed at a time in backward. Memory beyond the inputs is
    O(batch * dim * N * chunk_size) in forward and backward. Works on any memory layout; y comes back in u's layout
    (time-major for a transposed (batch, L, dim) input, as the mixers pass it).
    """
    groups = _check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")
    batch, dim, length = u.shape
    state_size = A.shape[1]
    per_group = dim // groups
    h0 = (
        initial_state.float().reshape(batch, groups, per_group, state_size).transpose(-1, -2)
        if initial_state is not None
        else u.new_zeros(batch, groups, state_size, per_group, dtype=torch.float32)
    )
    if length == 0:
        y = u.new_zeros(batch, dim, 0)
        h_last = h0.transpose(-1, -2).reshape(batch, dim, state_size).clone()
        return (y, h_last) if return_final_state else y
    block = min(_BLOCK_SIZE, chunk_size, length)
    # Blocks per chunk: chunk_size steps, fewer when batch * dim * N is large (see _WORK_ELEMENTS).
    chunk_blocks = max(1, min(chunk_size // block, _WORK_ELEMENTS // (batch * dim * state_size * block)))
    padded = -(-length // block) * block
    grad_enabled = torch.is_grad_enabled()
    core_needs_grad = grad_enabled and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    )
    with torch.set_grad_enabled(core_needs_grad):
        dt = discretize_delta(delta, delta_bias, delta_softplus)
        x = dt * u.float()
        A2 = (A.float() * LOG2_E).reshape(groups, per_group, state_size).transpose(1, 2).contiguous()
        blocks = (_time_blocks(x, groups, padded), _time_blocks(dt, groups, padded), A2, _grouped_bc(B, padded),
                  _grouped_bc(C, padded))
        if core_needs_grad:
            y, h_last = _ChunkedSelectiveScan.apply(*blocks, h0, chunk_blocks, block)
        else:
            y = x.new_empty(batch, padded, groups, per_group)
            nonneg_dt = True if delta_softplus else None  # softplus >= 0; otherwise _scan_inference checks
            h_last = _scan_inference(
                *blocks, h0.contiguous(), block, chunk_blocks, y.permute(0, 2, 1, 3), nonneg_dt=nonneg_dt
            )
    y = y[:, :length].reshape(batch, length, dim).transpose(1, 2)  # (batch, dim, L), time-major
    y = gate_and_skip(y, u, D, z)  # in place when nothing needs its graph (y is ours)
    if u.stride(-1) == 1 and length > 1 and dim > 1:
        y = y.contiguous()  # u's layout
    y = y.to(u.dtype)
    h_last = h_last.transpose(-1, -2).reshape(batch, dim, state_size)
    return (y, h_last) if return_final_state else y


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
    return_final_state=False,
):
    """The selective scan (contract in this module's docstring), on the best available backend.

    Returns y (batch, dim, L) in u's dtype, and the final state (batch, dim, N) float32 when
    ``return_final_state``. Force a backend with ``multimodal_mamba.ssm_backend(name)``.
    """
    _check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return dispatch(
        "selective_scan", u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, return_final_state=return_final_state,
    )


# ----------------------------------------------------------------------------------------------------------------
# Decode step: one token, state updated in place.
# ----------------------------------------------------------------------------------------------------------------
def _check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias):
    if state.dim() != 3:
        raise ValueError(f"selective_state_update: state must be (batch, dim, N), got {tuple(state.shape)}")
    batch, dim, state_size = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, dim):
            raise ValueError(f"selective_state_update: {name} must be (batch, dim) = {(batch, dim)}, got {tuple(t.shape)}")
    if tuple(A.shape) != (dim, state_size):
        raise ValueError(f"selective_state_update: A must be {(dim, state_size)}, got {tuple(A.shape)}")
    for name, mat in (("B", B), ("C", C)):
        ok = (mat.dim() == 2 and tuple(mat.shape) == (batch, state_size)) or (
            mat.dim() == 3 and mat.shape[0] == batch and mat.shape[2] == state_size and dim % mat.shape[1] == 0
        )
        if not ok:
            raise ValueError(f"selective_state_update: {name} must be (batch, N) or (batch, G, N), got {tuple(mat.shape)}")
    for name, vec in (("D", D), ("dt_bias", dt_bias)):
        if vec is not None and tuple(vec.shape) != (dim,):
            raise ValueError(f"selective_state_update: {name} must be ({dim},), got {tuple(vec.shape)}")


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """One step of the scan. state (batch, dim, N) float32 is updated in place; x, dt, z: (batch, dim);
    B, C: (batch, N) or (batch, G, N). Returns y (batch, dim) in x's dtype."""
    _check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    dim = state.shape[1]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    Bf, Cf = B.float(), C.float()
    if Bf.dim() == 3:
        Bf = Bf.repeat_interleave(dim // Bf.shape[1], dim=1)  # (batch, dim, N)
        Cf = Cf.repeat_interleave(dim // Cf.shape[1], dim=1)
    else:
        Bf, Cf = Bf[:, None, :], Cf[:, None, :]
    new_state = torch.exp(dt[..., None] * A.float()) * state.float() + (dt * x.float())[..., None] * Bf
    state.copy_(new_state)
    y = (new_state * Cf).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """Decode step of the selective scan on the best backend (see ``selective_state_update_ref``)."""
    _check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    return dispatch("selective_state_update", state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


# ----------------------------------------------------------------------------------------------------------------
# Causal depthwise conv (prefill with an optional carried state) and its decode step.
# ----------------------------------------------------------------------------------------------------------------
def _activate(x, activation):
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"causal_conv1d: unsupported activation {activation!r} (expected None, 'silu' or 'swish')")


def _check_conv_inputs(x, weight, initial_state):
    dim, width = weight.shape
    if x.dim() != 3 or x.shape[1] != dim:
        raise ValueError(f"causal_conv1d: x must be (batch, dim={dim}, L), got {tuple(x.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (x.shape[0], dim, width - 1):
        raise ValueError(
            f"causal_conv1d: initial_state must be {(x.shape[0], dim, width - 1)}, got {tuple(initial_state.shape)}"
        )


def causal_conv1d_ref(x, weight, bias=None, initial_state=None, activation=None):
    """Causal depthwise conv. x (batch, dim, L); weight (dim, W); bias (dim,); initial_state (batch, dim, W-1):
    the W-1 inputs that precede x (zeros when None). Returns (batch, dim, L) in x's dtype."""
    _check_conv_inputs(x, weight, initial_state)
    dim, width = weight.shape
    length = x.shape[-1]
    if initial_state is not None:
        padded = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    else:
        padded = F.pad(x, (width - 1, 0))
    out = F.conv1d(padded.to(weight.dtype), weight[:, None, :], bias, groups=dim)
    return _activate(out[..., :length], activation).to(x.dtype)


def causal_conv1d_shifted(x, weight, bias=None, initial_state=None, activation=None):
    """``causal_conv1d_ref`` as W shifted multiply-adds over time-major memory (backend "torch").

    A depthwise conv is W multiply-adds per element; done on (batch, L, dim) memory each is one dense vectorized
    pass (with the taps as contiguous (dim,) rows), several times faster on CPU than a depthwise ``F.conv1d``.
    Returns a (batch, dim, L) view of time-major memory.
    """
    _check_conv_inputs(x, weight, initial_state)
    dim, width = weight.shape
    length = x.shape[-1]
    time_major = x.transpose(1, 2)  # (batch, L, dim)
    if time_major.stride(-1) != 1:
        time_major = time_major.contiguous()
    time_major = time_major.to(weight.dtype)
    taps = weight.t().contiguous()  # (W, dim): tap k multiplies the input k - (W - 1) steps back
    if bias is not None:
        out = torch.addcmul(bias.to(weight.dtype), time_major, taps[width - 1])
    else:
        out = time_major * taps[width - 1]
    for k in range(width - 1):
        shift = width - 1 - k
        if shift < length:
            out[:, shift:].addcmul_(time_major[:, : length - shift], taps[k])
    if initial_state is not None:  # the W - 1 inputs before x reach the first W - 1 outputs
        prefix = initial_state.transpose(1, 2).to(weight.dtype)  # (batch, W - 1, dim)
        for k in range(width - 1):
            count = min(width - 1 - k, length)
            out[:, :count].addcmul_(prefix[:, k : k + count], taps[k])
    if activation is not None:
        out = _activate(out, activation)
    return out.to(x.dtype).transpose(1, 2)


def write_conv_state(conv_state, x, initial_state=None):
    """conv_state (batch, dim, W) <- the last W inputs of the padded sequence [initial_state (zeros when None), x]
    (x (batch, dim, L), initial_state (batch, dim, W - 1)): what a following decode step or chunk reads. Only the
    last W inputs are gathered (concatenating all of x would copy a whole prompt)."""
    width = conv_state.shape[-1]
    if x.shape[-1] >= width:
        conv_state.copy_(x[..., -width:])
        return
    prefix = initial_state if initial_state is not None else x.new_zeros(x.shape[0], x.shape[1], width - 1)
    history = torch.cat([prefix.to(conv_state.dtype), x.to(conv_state.dtype)], dim=-1)[..., -width:]
    conv_state.copy_(history)


def _conv_state_out_error(x, weight, initial_state, conv_state_out):
    """A message naming what is wrong with ``conv_state_out``, or None."""
    expected = (x.shape[0], weight.shape[0], weight.shape[1])
    if not isinstance(conv_state_out, torch.Tensor) or tuple(conv_state_out.shape) != expected:
        return f"conv_state_out must be (batch, dim, W) = {expected}, got {tuple(getattr(conv_state_out, 'shape', ()))}"
    if conv_state_out.device != x.device:
        return f"conv_state_out is on {conv_state_out.device}, x on {x.device}"
    for name, other in (("x", x), ("initial_state", initial_state)):
        if other is not None and _spans_overlap(other, conv_state_out):
            return f"conv_state_out must not share memory with {name} (it is written while {name} is read)"
    return None


def _spans_overlap(a, b) -> bool:
    """Whether the memory spans of two (non-negatively strided) tensors overlap: from the first element's address
    to one past the last's."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t):
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a_first, a_end), (b_first, b_end) = span(a), span(b)
    return a_first < b_end and b_first < a_end


def causal_conv1d(x, weight, bias=None, initial_state=None, activation=None, conv_state_out=None, overwrite_x=False):
    """Causal depthwise conv on the best backend (see ``causal_conv1d_ref``).

    conv_state_out: (batch, dim, W) or None; receives the last W inputs of the padded sequence (``write_conv_state``:
    the state a following chunk or decode step reads), in the same kernel where the "triton" backend runs.
    overwrite_x: the output may be written over x, whose values are then lost (a memory saving the caller allows
    when it no longer needs x). Only the "triton" backend takes it, and only without autograd and where a program
    per channel block and sequence fills the GPU; use the returned tensor, which may or may not be x.
    """
    if conv_state_out is None and not overwrite_x:
        return dispatch("causal_conv1d", x, weight, bias, initial_state=initial_state, activation=activation)
    _check_conv_inputs(x, weight, initial_state)
    if conv_state_out is not None:
        problem = _conv_state_out_error(x, weight, initial_state, conv_state_out)
        if problem is not None:
            raise ValueError(f"causal_conv1d: {problem}")
    name, fn = choose_backend("causal_conv1d", x, weight, bias, initial_state=initial_state, activation=activation)
    record_backend("causal_conv1d", name)
    if name == "triton":  # (the one backend that takes the two arguments)
        return fn(x, weight, bias, initial_state=initial_state, activation=activation, conv_state_out=conv_state_out,
                  overwrite_x=overwrite_x)
    if conv_state_out is not None:
        with torch.no_grad():
            write_conv_state(conv_state_out, x, initial_state)
    return fn(x, weight, bias, initial_state=initial_state, activation=activation)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One decode step. x (batch, dim); conv_state (batch, dim, W) holds the last W inputs and is rolled in
    place; weight (dim, W). Returns (batch, dim) in x's dtype."""
    dim, width = weight.shape
    if tuple(conv_state.shape[1:]) != (dim, width) or x.shape != conv_state.shape[:2]:
        raise ValueError(
            f"causal_conv1d_update: expected x (batch, {dim}) and conv_state (batch, {dim}, {width}), got "
            f"{tuple(x.shape)} and {tuple(conv_state.shape)}"
        )
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = (conv_state.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return _activate(out, activation).to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Decode step of the causal conv on the best backend (see ``causal_conv1d_update_ref``)."""
    return dispatch("causal_conv1d_update", x, conv_state, weight, bias, activation=activation)


def _selective_scan_torch(u, *args, **kwargs):
    """Backend "torch": on CUDA tensors the GPU-suited blocked scan (``ops_selective_scan_blocked``), else the
    chunked scan above."""
    if u.is_cuda:
        from .ops_selective_scan_blocked import selective_scan_blocked

        return selective_scan_blocked(u, *args, **kwargs)
    return selective_scan_chunked(u, *args, **kwargs)


def _causal_conv1d_torch(x, *args, **kwargs):
    """Backend "torch": on CUDA tensors accumulated in float32 (``ops_selective_scan_blocked``), else as above."""
    if x.is_cuda:
        from .ops_selective_scan_blocked import causal_conv1d_float32

        return causal_conv1d_float32(x, *args, **kwargs)
    return causal_conv1d_shifted(x, *args, **kwargs)


register_backend("selective_scan", "torch", _selective_scan_torch)
register_backend("selective_scan", "reference", selective_scan_ref)
# The decode step and the conv have no sequence to chunk: their references are already vectorized.
register_backend("causal_conv1d", "torch", _causal_conv1d_torch)
register_backend("causal_conv1d", "reference", causal_conv1d_ref)
for _backend in ("torch", "reference"):
    register_backend("selective_state_update", _backend, selective_state_update_ref)
    register_backend("causal_conv1d_update", _backend, causal_conv1d_update_ref)

try:  # registers the "torch_compile" backend (that module imports this one, so it comes last; a circular import of
    # the two, when that module is imported first, lands here and it registers itself when it finishes)
    from .ops_selective_scan_compiled import selective_scan_compiled  # noqa: E402,F401
except ImportError:
    pass
