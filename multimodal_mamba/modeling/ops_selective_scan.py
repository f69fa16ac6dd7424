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
- ``selective_scan_chunked`` (backend ``"torch"``): the time axis is cut into chunks; inside a chunk all steps
  are computed at once (a log-space cumulative sum, or a doubling scan where the decay range of a chunk would
  overflow float32), and the state is carried between chunks. There is no Python loop over tokens, and its
  memory is O(batch * dim * N * chunk) plus the inputs: backward recomputes each chunk from the state saved at
  the chunk's start (as mamba-ssm's kernel does) instead of keeping an autograd graph over the whole sequence.
- fused GPU kernels, registered by ``multimodal_mamba.kernels`` when it can be imported.

Decode steps: ``selective_state_update`` (one token, state updated in place) and ``causal_conv1d_update``
(conv state rolled in place), so that a preallocated cache can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .ssm_backends import dispatch, register_backend

LOG2_E = 1.0 / math.log(2.0)
DEFAULT_CHUNK_SIZE = 32
# The log-space chunk multiplies by 2**(-E) with E the cumulative log2-decay inside the chunk; beyond this
# range a chunk is scanned by doubling instead (decays stay <= 1 there, nothing can overflow).
_MAX_LOG2_RANGE = 110.0


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


def _discretize_delta(delta, delta_bias, delta_softplus):
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _gate_and_skip(y, u, D, z):
    """y (batch, dim, L) float32 -> y + D u, gated by silu(z)."""
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


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
    dt = _discretize_delta(delta, delta_bias, delta_softplus)
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
    y = _gate_and_skip(y, u, D, z).to(u.dtype)
    return (y, h) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------
# Chunked PyTorch path.
# ----------------------------------------------------------------------------------------------------------------
def linear_recurrence_logspace(drive, log2_cum, h0, log2_start=None):
    """All states of ``h_t = 2**(E_t - E_{t-1}) h_{t-1} + drive_t`` at once, with E_{-1} = ``log2_start`` (0).

    drive, log2_cum (= E): (..., T); h0, log2_start: (...). Returns (..., T). Exact in real arithmetic; in
    float32 it needs |E| small enough that 2**(-E) * drive stays finite (callers check the range first).
    """
    scale = torch.exp2(-log2_cum)
    weighted = drive * scale
    weighted[..., 0] += h0 if log2_start is None else h0 * torch.exp2(-log2_start)
    return torch.cumsum(weighted, dim=-1) * torch.exp2(log2_cum)


def linear_recurrence_doubling(decay, drive, h0):
    """All states of ``h_t = decay_t h_{t-1} + drive_t`` by log2(T) doubling steps (Hillis-Steele).

    decay, drive: (..., T); h0: (...). Returns (..., T). Only products of decays are formed, so nothing
    overflows when the decays are <= 1, whatever their range.
    """
    length = decay.shape[-1]
    step = 1
    while step < length:
        drive = torch.cat([drive[..., :step], drive[..., step:] + decay[..., step:] * drive[..., :-step]], dim=-1)
        decay = torch.cat([decay[..., :step], decay[..., step:] * decay[..., :-step]], dim=-1)
        step *= 2
    return drive + decay * h0[..., None]


def _centered_log2_cumsum(dt, A2):
    """Cumulative log2-decay inside a chunk, shifted by half its final value.

    dt: (batch, G, Dg, T); A2: (G, Dg, N). Returns (E', E'_{-1}): E'_t = A2 * (cum_t - cum_T / 2) of shape
    (batch, G, Dg, N, T) and the start value E'_{-1} = -A2 * cum_T / 2 of shape (batch, G, Dg, N). The shift is
    a per-(d, n) constant, so it cancels between 2**E'_t and 2**(-E'_s) in the log-space scan, but it halves the
    largest exponent either side has to hold: a chunk may span twice the decay range.
    """
    cum = torch.cumsum(dt, dim=-1)
    half = 0.5 * cum[..., -1:]
    return (cum - half)[:, :, :, None, :] * A2[None, :, :, :, None], -half * A2[None]


def _log2_range_ok(dt, A2):
    """Whether the log-space scan of a chunk stays inside float32 (|E'| <= _MAX_LOG2_RANGE everywhere).

    Valid for monotone decays (dt >= 0, A <= 0), where |E'| peaks at the chunk ends at half the total decay.
    """
    total = dt.sum(dim=-1)  # (batch, G, Dg)
    return bool((total[..., None] * A2[None]).min() >= -2 * _MAX_LOG2_RANGE)


def _selective_scan_chunk(u, dt, A2, B, C, h0, decay_monotone):
    """One chunk of the grouped scan, all steps at once (differentiable; used to recompute in backward).

    u, dt: (batch, G, Dg, T) float32; A2 = A * log2(e): (G, Dg, N); B, C: (batch, G, N, T); h0: (batch, G, Dg, N).
    Returns y (batch, G, Dg, T) = <C_t, h_t> and the last state (batch, G, Dg, N).
    """
    drive = (dt * u)[:, :, :, None, :] * B[:, :, None, :, :]  # (batch, G, Dg, N, T)
    states = None
    if decay_monotone and _log2_range_ok(dt, A2):
        log2_cum, log2_start = _centered_log2_cumsum(dt, A2)
        states = linear_recurrence_logspace(drive, log2_cum, h0, log2_start)
    if states is None or not bool(torch.isfinite(states[..., -1].sum())):
        decay = torch.exp2(dt[:, :, :, None, :] * A2[None, :, :, :, None])
        states = linear_recurrence_doubling(decay, drive, h0)
    y = (states * C[:, :, None, :, :]).sum(dim=3)
    # A copy, not a view: a view would keep the whole chunk's states alive (memory would grow with L).
    return y, states[..., -1].contiguous()


class _ChunkWorkspace:
    """Buffers of shape (batch, G, Dg, N, T) reused by every chunk of a no-grad forward.

    Reusing them (and working in place) avoids a fresh megabyte-sized allocation, with its page faults, for
    every intermediate of every chunk.
    """

    def __init__(self, shape, device):
        self.shape = shape
        self.buffers = tuple(torch.empty(shape, device=device) for _ in range(3))

    def get(self, length):
        if length == self.shape[-1]:
            return self.buffers
        return tuple(torch.empty(self.shape[:-1] + (length,), device=b.device) for b in self.buffers)


def _doubling_rows(u, dt, A2, B, C, h0, rows):
    """The chunk scan by doubling for the channels ``rows`` (a (batch, G, Dg) bool mask) only.

    Returns y (R, T) and last states (R, N) for the R selected channels, in ``rows.nonzero()`` order.
    """
    b_idx, g_idx, d_idx = rows.nonzero(as_tuple=True)
    dt_r, u_r = dt[b_idx, g_idx, d_idx], u[b_idx, g_idx, d_idx]  # (R, T)
    decay = torch.exp2(dt_r[:, None, :] * A2[g_idx, d_idx][:, :, None])  # (R, N, T)
    drive = (dt_r * u_r)[:, None, :] * B[b_idx, g_idx]
    states = linear_recurrence_doubling(decay, drive, h0[b_idx, g_idx, d_idx])
    return (states * C[b_idx, g_idx]).sum(dim=1), states[..., -1]


def _selective_scan_chunk_inference(u, dt, A2, B, C, h0, decay_monotone, workspace):
    """``_selective_scan_chunk`` without autograd, in place in ``workspace``; same inputs and outputs.

    Channels whose decay over the chunk is too wide for the log-space form are scanned by doubling on their
    own, so one extreme channel does not send the whole chunk down the slower path.
    """
    if not decay_monotone:
        return _selective_scan_chunk(u, dt, A2, B, C, h0, decay_monotone)
    drive, expo, scale = workspace.get(u.shape[-1])
    cum = torch.cumsum(dt, dim=-1)
    half = 0.5 * cum[..., -1:]  # (batch, G, Dg, 1)
    wide = (half * A2[None]).amin(dim=-1) < -_MAX_LOG2_RANGE  # (batch, G, Dg): |E'| would leave range
    any_wide = bool(wide.any())
    if any_wide:
        if bool(wide.float().mean() > 0.5):
            return _selective_scan_chunk(u, dt, A2, B, C, h0, False)
        half = half.masked_fill(wide[..., None], 0.0)
        cum = cum.masked_fill(wide[..., None], 0.0)  # a finite stand-in; these channels are redone below
    torch.mul((dt * u)[:, :, :, None, :], B[:, :, None, :, :], out=drive)
    torch.mul((half - cum)[:, :, :, None, :], A2[None, :, :, :, None], out=expo)  # -E'
    torch.exp2(expo, out=scale)  # 2**(-E')
    drive.mul_(scale)
    drive[..., 0] += h0 * torch.exp2(half * A2[None])  # h0 * 2**(-E'_{-1})
    states = torch.cumsum(drive, dim=-1, out=expo)
    states.div_(scale)  # * 2**E'
    y = torch.mul(states, C[:, :, None, :, :], out=scale).sum(dim=3)
    h_last = states[..., -1].clone()
    if any_wide:
        y_rows, h_rows = _doubling_rows(u, dt, A2, B, C, h0, wide)
        y[wide] = y_rows
        h_last[wide] = h_rows
    if not bool(torch.isfinite(h_last.sum())):  # drive too large for 2**(-E'): redo the chunk by doubling
        return _selective_scan_chunk(u, dt, A2, B, C, h0, False)
    return y, h_last


def _chunk_slices(tensors, start, end):
    """Contiguous copies of ``t[..., start:end]``: the chunk's inputs, small enough to copy, laid out for the
    outer products (a strided slice of a (batch, L, dim) tensor makes those several times slower)."""
    return [t[..., start:end].contiguous() for t in tensors]


def _empty_like_layout(reference, shape):
    """An empty float32 tensor of ``shape`` (batch, ..., L) laid out as ``reference`` is: time-major when the
    reference's last dim is not contiguous (the mixers keep activations as (batch, L, dim)), else contiguous."""
    if reference.stride(-1) != 1:
        perm = (0, reference.dim() - 1) + tuple(range(1, reference.dim() - 1))
        inverse = [perm.index(i) for i in range(len(perm))]
        return torch.empty([shape[i] for i in perm], device=reference.device).permute(*inverse)
    return torch.empty(shape, device=reference.device)


class _ChunkedSelectiveScan(torch.autograd.Function):
    """Core recurrence y_t = <C_t, h_t> in float32, chunk by chunk, with recompute-per-chunk backward.

    u, dt: (batch, G, Dg, L); A: (G, Dg, N); B, C: (batch, G, N, L); h0: (batch, G, Dg, N). Any strides.
    Saves only its inputs and the state at each chunk start, so training memory does not grow with L beyond
    the inputs themselves. y comes back in u's memory layout.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk_size):
        length = u.shape[-1]
        A2 = A * LOG2_E
        decay_monotone = bool(dt.min() >= 0) and bool(A.max() <= 0) if length else True
        y = _empty_like_layout(u, u.shape)
        starts = []
        h = h0.contiguous()
        batch, groups, per_group, _ = u.shape
        workspace = _ChunkWorkspace((batch, groups, per_group, A.shape[-1], min(chunk_size, length)), u.device)
        with torch.no_grad():
            for start in range(0, length, chunk_size):
                end = min(start + chunk_size, length)
                starts.append(h)
                u_c, dt_c, B_c, C_c = _chunk_slices((u, dt, B, C), start, end)
                y[..., start:end], h = _selective_scan_chunk_inference(
                    u_c, dt_c, A2, B_c, C_c, h, decay_monotone, workspace
                )
        ctx.chunk_size = chunk_size
        ctx.decay_monotone = decay_monotone
        ctx.save_for_backward(u, dt, A, B, C, *starts)
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        u, dt, A, B, C, *starts = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        length = u.shape[-1]
        grad_u, grad_dt = _empty_like_layout(u, u.shape), _empty_like_layout(dt, dt.shape)
        grad_B, grad_C = torch.empty_like(B, dtype=torch.float32), torch.empty_like(C, dtype=torch.float32)
        grad_A = torch.zeros_like(A)
        grad_h = grad_h_last if grad_h_last is not None else torch.zeros_like(starts[0] if starts else A)
        for index in reversed(range(len(starts))):
            start = index * chunk_size
            end = min(start + chunk_size, length)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in _chunk_slices((u, dt, B, C), start, end)]
                A_leaf = A.detach().requires_grad_()
                h_leaf = starts[index].detach().requires_grad_()
                u_c, dt_c, B_c, C_c = leaves
                y_c, h_out = _selective_scan_chunk(u_c, dt_c, A_leaf * LOG2_E, B_c, C_c, h_leaf, ctx.decay_monotone)
                grad_y_c = grad_y[..., start:end] if grad_y is not None else torch.zeros_like(y_c)
                inputs = leaves + [A_leaf, h_leaf]
                grads = torch.autograd.grad((y_c, h_out), inputs, (grad_y_c, grad_h), allow_unused=True)
            g_u, g_dt, g_B, g_C, g_A, g_h = (g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs))
            grad_u[..., start:end] = g_u
            grad_dt[..., start:end] = g_dt
            grad_B[..., start:end] = g_B
            grad_C[..., start:end] = g_C
            grad_A += g_A
            grad_h = g_h
        return grad_u, grad_dt, grad_A, grad_B, grad_C, grad_h, None


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
    return_final_state=False, chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """The chunked PyTorch selective scan (backend "torch"); same contract as ``selective_scan``.

    Works on any memory layout; for a time-major input (a transposed (batch, L, dim) tensor, as the mixers
    pass it) every elementwise op runs on dense time-major memory and y comes back time-major too.
    """
    groups = _check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")
    batch, dim, length = u.shape
    state_size = A.shape[1]
    per_group = dim // groups
    dt = _discretize_delta(delta, delta_bias, delta_softplus)
    Bg = (B if B.dim() == 4 else B[:, None]).float()
    Cg = (C if C.dim() == 4 else C[:, None]).float()
    h0 = (
        initial_state.float().reshape(batch, groups, per_group, state_size)
        if initial_state is not None
        else u.new_zeros(batch, groups, per_group, state_size, dtype=torch.float32)
    )
    y, h_last = _ChunkedSelectiveScan.apply(
        u.float().unflatten(1, (groups, per_group)),
        dt.unflatten(1, (groups, per_group)),
        A.float().reshape(groups, per_group, state_size),
        Bg,
        Cg,
        h0,
        int(chunk_size),
    )
    y = _gate_and_skip(y.flatten(1, 2), u, D, z).to(u.dtype)
    return (y, h_last.reshape(batch, dim, state_size)) if return_final_state else y


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

    A depthwise conv is W multiply-adds per element; done on (batch, L, dim) memory each is one dense
    vectorized pass, several times faster on CPU than a depthwise ``F.conv1d``. Returns a (batch, dim, L) view
    of time-major memory.
    """
    _check_conv_inputs(x, weight, initial_state)
    dim, width = weight.shape
    length = x.shape[-1]
    time_major = x.transpose(1, 2).to(weight.dtype)  # (batch, L, dim)
    if initial_state is not None:
        prefix = initial_state.transpose(1, 2).to(weight.dtype)
    else:
        prefix = time_major.new_zeros(x.shape[0], width - 1, dim)
    padded = torch.cat([prefix, time_major], dim=1)  # (batch, W-1+L, dim)
    out = padded[:, width - 1 :] * weight[:, width - 1]
    if bias is not None:
        out += bias
    for k in range(width - 1):
        out.addcmul_(padded[:, k : k + length], weight[:, k])
    return _activate(out, activation).to(x.dtype).transpose(1, 2)


def causal_conv1d(x, weight, bias=None, initial_state=None, activation=None):
    """Causal depthwise conv on the best backend (see ``causal_conv1d_ref``)."""
    return dispatch("causal_conv1d", x, weight, bias, initial_state=initial_state, activation=activation)


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


register_backend("selective_scan", "torch", selective_scan_chunked)
register_backend("selective_scan", "reference", selective_scan_ref)
# The decode step and the conv have no sequence to chunk: their references are already vectorized.
register_backend("causal_conv1d", "torch", causal_conv1d_shifted)
register_backend("causal_conv1d", "reference", causal_conv1d_ref)
for _backend in ("torch", "reference"):
    register_backend("selective_state_update", _backend, selective_state_update_ref)
    register_backend("causal_conv1d_update", _backend, causal_conv1d_update_ref)
