"""The coupled selective scan of Coupled Mamba (Li et al., NeurIPS 2024, Eq. 6): contract, reference, PyTorch path.

Contract of ``coupled_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
coupling="mean", initial_state=None, return_final_state=False)``, for M modalities (chains):

- ``u``, ``delta``, ``z``: (batch, M, dim, L); ``A``: (M, dim, N) float32; ``B``, ``C``: (batch, M, N, L);
  ``D``, ``delta_bias``: (M, dim); ``initial_state``: (batch, dim, N) float32, the coupled state H before step 0
  (zeros when None).
- ``dt^m = softplus(delta^m + delta_bias^m)``; ``a^m_t = exp(dt^m_t A^m)``; ``b^m_t = dt^m_t B^m_t u^m_t``.
- Every chain reads the one coupled state: ``h^m_t = a^m_t * H_{t-1} + b^m_t``, then
  ``H_t = sum_m h^m_t`` (``coupling="sum"``, the paper's Eq. 6) or ``(1/M) sum_m h^m_t`` (``"mean"``, the default).
- ``y^m_t = <C^m_t, h^m_t> + D^m u^m_t``, gated by ``silu(z^m_t)``. Output (batch, M, dim, L) in u's dtype; the
  final state H_{L-1} (batch, dim, N) is float32.

Why "mean" is the default: with "sum" the decay of H is ``sum_m a^m_t`` in (0, M], so H grows like M^t wherever
the learned decays are close to 1 (small dt, the usual initialization) and overflows float32 within about
88 / ln(M) steps (80 for M = 3). "mean" makes H_t a convex combination of the chains' candidate states and cannot
overflow. Both are offered; a "sum" call whose output is not finite although its inputs are raises
``CoupledScanOverflowError`` (a ``FloatingPointError``) naming the first bad step, instead of returning inf/NaN.

The coupled state obeys an ordinary diagonal linear recurrence (the paper's "global convolution kernel" form):

    H_t = S_t * H_{t-1} + U_t,   S_t = c * sum_m a^m_t,   U_t = c * sum_m b^m_t,   c = 1 (sum) or 1/M (mean)

so it is computed by one parallel scan over time; the per-chain readouts then need only the shifted H:
``y^m_t = <C^m_t, a^m_t * H_{t-1}> + dt^m_t u^m_t <C^m_t, B^m_t>``.

Implementations:

- ``coupled_selective_scan_ref``: the sequential loop over time in float32, the definition of correct (backend
  ``"reference"``, never chosen automatically).
- ``coupled_selective_scan_chunked`` (backend ``"torch"``): the time axis is cut into chunks; inside a chunk the
  recurrence of H is solved for all steps at once (a log-space cumulative sum, or a doubling scan for the
  channels whose decay range in the chunk is too wide for float32, e.g. a growing "sum" state), and H is carried
  between chunks. No Python loop over steps. Memory is O(batch * M * dim * N * chunk) besides the inputs: the
  backward recomputes each chunk from the state saved at its start instead of keeping an autograd graph over the
  whole sequence; its gradients come from a reverse diagonal scan per chunk (no autograd graph at all).
"""

from __future__ import annotations

import math

import torch

from .ops_selective_scan import discretize_delta, gate_and_skip, linear_recurrence_doubling, linear_recurrence_logspace
from .ssm_backends import _LAST, _REGISTRY, dispatch, forced_backend, register_backend

COUPLINGS = ("mean", "sum")
LOG2_E = 1.0 / math.log(2.0)
# The log-space form scales by 2**(-E'), E' the centred cumulative log2-decay of H inside a chunk; a channel
# whose half-range of E' exceeds this is scanned by doubling instead.
_MAX_LOG2_RANGE = 110.0
# S_t is clamped at this before its log is taken (an S below it makes H_{t-1}'s contribution vanish anyway).
_TINY = 2.0**-126
# The chunked path picks its chunk length so that one (batch, M, dim, N, chunk) float32 tensor holds about this
# many elements, within [_MIN_CHUNK, _MAX_CHUNK] steps.
_CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNK, _MAX_CHUNK = 8, 64


class CoupledScanOverflowError(FloatingPointError):
    """The coupled state overflowed float32 (coupling="sum" with decays close to 1 over many steps)."""


# ----------------------------------------------------------------------------------------------------------------
# Input checks shared by every backend.
# ----------------------------------------------------------------------------------------------------------------
def _check_coupled_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, coupling):
    """Validate shapes against the contract (a ValueError naming the argument); returns (batch, M, dim, L, N)."""
    if coupling not in COUPLINGS:
        raise ValueError(f"coupled_selective_scan: coupling must be one of {COUPLINGS}, got {coupling!r}")
    if not isinstance(u, torch.Tensor) or u.dim() != 4:
        raise ValueError(
            f"coupled_selective_scan: u must be (batch, M, dim, L), got shape {tuple(getattr(u, 'shape', ()))}"
        )
    batch, chains, dim, length = u.shape
    if chains < 1:
        raise ValueError("coupled_selective_scan: u has M = 0 modalities; at least one chain is needed")
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"coupled_selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"coupled_selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 3 or tuple(A.shape[:2]) != (chains, dim):
        raise ValueError(f"coupled_selective_scan: A must be (M={chains}, dim={dim}, N), got shape {tuple(A.shape)}")
    state_size = A.shape[2]
    for name, mat in (("B", B), ("C", C)):
        if tuple(mat.shape) != (batch, chains, state_size, length):
            raise ValueError(
                f"coupled_selective_scan: {name} must be (batch, M, N, L) = {(batch, chains, state_size, length)}, "
                f"got {tuple(mat.shape)}"
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (chains, dim):
            raise ValueError(f"coupled_selective_scan: {name} must be (M, dim) = {(chains, dim)}, got {tuple(vec.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, state_size):
        raise ValueError(
            f"coupled_selective_scan: initial_state must be (batch, dim, N) = {(batch, dim, state_size)}, "
            f"got {tuple(initial_state.shape)}"
        )
    return batch, chains, dim, length, state_size


def _coupling_scale(coupling, chains):
    return 1.0 / chains if coupling == "mean" else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Reference: the sequential loop (the definition of correct).
# ----------------------------------------------------------------------------------------------------------------
def coupled_selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, coupling="mean", initial_state=None,
    return_final_state=False,
):
    """Sequential float32 coupled scan, step by step as the contract reads; the test reference for every backend.

    Shapes as in the module docstring. Returns y (batch, M, dim, L) in u's dtype, and the final coupled state
    (batch, dim, N) float32 when ``return_final_state``. Memory O(batch * M * dim * L * N).
    """
    batch, chains, dim, length, state_size = _check_coupled_inputs(
        u, delta, A, B, C, D, z, delta_bias, initial_state, coupling
    )
    scale = _coupling_scale(coupling, chains)
    dt = discretize_delta(delta, delta_bias, delta_softplus)
    decay = torch.exp(dt[..., None] * A.float()[None, :, :, None, :])  # (batch, M, dim, L, N)
    drive = (dt * u.float())[..., None] * B.float().transpose(2, 3)[:, :, None]  # (batch, M, dim, L, N)
    Cf = C.float()
    H = (
        initial_state.float().clone()
        if initial_state is not None
        else torch.zeros(batch, dim, state_size, device=u.device, dtype=torch.float32)
    )
    ys = []
    for t in range(length):
        h = decay[:, :, :, t] * H[:, None] + drive[:, :, :, t]  # (batch, M, dim, N): every chain reads H_{t-1}
        ys.append((h * Cf[:, :, None, :, t]).sum(-1))
        H = scale * h.sum(dim=1)
    y = torch.stack(ys, dim=-1) if ys else torch.zeros(batch, chains, dim, 0, device=u.device)
    y = gate_and_skip(y, u, D, z).to(u.dtype)
    return (y, H) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------
# Chunked PyTorch path.
# ----------------------------------------------------------------------------------------------------------------
def diagonal_recurrence(decay, drive, h0):
    """All states of ``h_t = decay_t * h_{t-1} + drive_t`` at once (h_{-1} = h0), for decays of any size.

    decay (> 0), drive: (..., T); h0: (...). Returns (..., T) float32. Channels whose cumulative log2-decay spans
    at most 2 * ``_MAX_LOG2_RANGE`` use the log-space form (one cumulative sum, centred so that a chunk may both
    shrink and grow, as a "sum"-coupled state does); the others, and any channel the log-space form would
    overflow, use the doubling scan (which forms only products of decays and is exact up to the true result's
    own range). Differentiable.
    """
    if decay.shape[-1] == 0:
        return drive.clone()
    log2_cum = torch.cumsum(torch.log2(decay.clamp_min(_TINY)), dim=-1)
    high = log2_cum.amax(dim=-1).clamp_min(0.0)  # the range of E over t = -1 .. T-1, with E_{-1} = 0
    low = log2_cum.amin(dim=-1).clamp_max(0.0)
    center = 0.5 * (high + low)
    wide = (high - low) > 2.0 * _MAX_LOG2_RANGE
    any_wide = bool(wide.any())
    if any_wide and bool(wide.float().mean() > 0.5):
        return linear_recurrence_doubling(decay, drive, h0)
    if any_wide:  # a finite stand-in for the wide channels; they are recomputed by doubling below
        log2_cum = log2_cum.masked_fill(wide[..., None], 0.0)
        center = center.masked_fill(wide, 0.0)
    states = linear_recurrence_logspace(drive, log2_cum - center[..., None], h0, -center)
    if any_wide:
        states = states.clone()
        states[wide] = linear_recurrence_doubling(decay[wide], drive[wide], h0[wide])
    if not bool(torch.isfinite(states[..., -1]).all()) and bool(torch.isfinite(drive).all()):
        # 2**(-E') * drive left float32 although the result may not: redo the chunk by doubling.
        return linear_recurrence_doubling(decay, drive, h0)
    return states


def _coupled_chunk(u, dt, A2, B, C, H0, scale):
    """One chunk of the coupled scan, all steps at once (differentiable, though the chunked path's backward is
    ``_coupled_chunk_backward``).

    u, dt: (batch, M, dim, T) float32; A2 = A * log2(e): (M, dim, N); B, C: (batch, M, N, T); H0: (batch, dim, N).
    Returns y (batch, M, dim, T) = <C^m_t, h^m_t> and the last coupled state H_{T-1} (batch, dim, N).
    The M chains are looped over (M is small) so that every op is a dense broadcast over (batch, dim, N, T).
    """
    in_place = not torch.is_grad_enabled()
    du = dt * u  # (batch, M, dim, T)
    decays, S, U = [], None, None
    for m in range(u.shape[1]):
        decay = torch.exp2(dt[:, m, :, None, :] * A2[m][None, :, :, None])  # a^m_t: (batch, dim, N, T)
        drive = du[:, m, :, None, :] * B[:, m, None, :, :]  # b^m_t
        if S is None:
            S, U = decay.clone(), drive
        else:
            S = S.add_(decay) if in_place else S + decay
            U = U.add_(drive) if in_place else U + drive
        decays.append(decay)
    if scale != 1.0:
        S = S.mul_(scale) if in_place else S * scale
        U = U.mul_(scale) if in_place else U * scale
    H = diagonal_recurrence(S, U, H0)  # H_t: (batch, dim, N, T)
    H_prev = torch.cat([H0[..., None], H[..., :-1]], dim=-1)  # H_{t-1}
    ys = []
    for m, decay in enumerate(decays):
        weighted = decay.mul_(H_prev) if in_place else decay * H_prev  # a^m_t * H_{t-1}
        weighted = weighted.mul_(C[:, m, None]) if in_place else weighted * C[:, m, None]
        ys.append(weighted.sum(dim=2))
    y = torch.stack(ys, dim=1) + du * (B * C).sum(dim=2)[:, :, None, :]  # <C^m_t, b^m_t> = dt u <C^m_t, B^m_t>
    # A copy, not a view: a view would keep the chunk's states alive.
    return y, H[..., -1].contiguous()


@torch.no_grad()
def _coupled_chunk_backward(u, dt, A, B, C, H0, scale, grad_y, grad_H_last):
    """Gradients of one chunk of ``_coupled_chunk`` (same inputs; A unscaled), given grad_y (batch, M, dim, T) of
    its y and grad_H_last (batch, dim, N) of its last state. Returns the gradients of u, dt (batch, M, dim, T),
    A (M, dim, N), B, C (batch, M, N, T) and H0 (batch, dim, N).

    With W^m_t = a^m_t H_{t-1} and G_t = dL/dH_t, the gradient of H_{t-1} obeys the reverse diagonal recurrence
    Q_t = S_t Q_{t+1} + sum_m (grad_y^m_t outer C^m_t) a^m_t, Q_T = grad_H_last (so G_t = Q_{t+1}), and every
    chain's b^m_t gets P^m_t = grad_y^m_t outer C^m_t + c G_t, its decay a^m_t gets P^m_t H_{t-1}.
    """
    chains = u.shape[1]
    du = dt * u
    A2 = A * LOG2_E
    decays, S, U = [], None, None
    for m in range(chains):  # a^m_t, S_t and U_t as in the forward chunk
        decay = torch.exp2(dt[:, m, :, None, :] * A2[m][None, :, :, None])  # (batch, dim, N, T)
        drive = du[:, m, :, None, :] * B[:, m, None, :, :]
        S = decay.clone() if S is None else S.add_(decay)
        U = drive if U is None else U.add_(drive)
        decays.append(decay)
    S.mul_(scale)
    U.mul_(scale)
    H = diagonal_recurrence(S, U, H0)
    H_prev = torch.cat([H0[..., None], H[..., :-1]], dim=-1)
    del H, U
    R = None  # readout gradient of H_{t-1}: sum_m (grad_y^m outer C^m) a^m
    for m, decay in enumerate(decays):
        term = decay * C[:, m, None] * grad_y[:, m, :, None, :]
        R = term if R is None else R.add_(term)
    Q = diagonal_recurrence(S.flip(-1), R.flip(-1), grad_H_last).flip(-1)  # Q_t = dL/dH_{t-1}
    del R, S
    G = torch.cat([Q[..., 1:], grad_H_last[..., None]], dim=-1)  # dL/dH_t
    grad_H0 = Q[..., 0].contiguous()
    del Q
    gy_du = (grad_y * du).sum(dim=2)  # (batch, M, T)
    grad_du = grad_y * (B * C).sum(dim=2)[:, :, None]
    grad_B = C * gy_du[:, :, None]
    grad_C = B * gy_du[:, :, None]
    grad_dt = torch.empty_like(dt)
    grad_A = torch.empty_like(A)
    for m, decay in enumerate(decays):
        W = decay.mul_(H_prev)  # a^m_t H_{t-1}
        gy = grad_y[:, m, :, None, :]  # (batch, dim, 1, T)
        grad_C[:, m] += (W * gy).sum(dim=1)
        grad_du[:, m] += scale * (G * B[:, m, None]).sum(dim=2)
        grad_B[:, m] += scale * (G * du[:, m, :, None, :]).sum(dim=1)
        E = (gy * C[:, m, None]).add_(G, alpha=scale).mul_(W)  # dL/d(dt A): (grad_y outer C + c G) * W
        grad_dt[:, m] = (E * A[m][None, :, :, None]).sum(dim=2)
        grad_A[m] = (E * dt[:, m, :, None, :]).sum(dim=(0, 3))
    grad_dt.add_(grad_du * u)
    return grad_du * dt, grad_dt, grad_A, grad_B, grad_C, grad_H0


def _default_chunk_size(batch, chains, dim, state_size):
    per_step = max(1, batch * chains * dim * state_size)
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, _CHUNK_ELEMENTS // per_step)))


def _chunk_slices(tensors, start, end):
    return [t[..., start:end].contiguous() for t in tensors]


class _ChunkedCoupledScan(torch.autograd.Function):
    """Core recurrence y^m_t = <C^m_t, h^m_t> in float32, chunk by chunk; the backward recomputes each chunk's
    states from the one saved at its start and runs the reverse scan of ``_coupled_chunk_backward``.

    u, dt: (batch, M, dim, L); A: (M, dim, N); B, C: (batch, M, N, L); H0: (batch, dim, N); L >= 1.
    Saves its inputs and the coupled state at each chunk start only.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, H0, scale, chunk_size):
        length = u.shape[-1]
        A2 = A * LOG2_E
        y = torch.empty(u.shape, device=u.device, dtype=torch.float32)
        starts = []
        H = H0.contiguous()
        with torch.no_grad():
            for start in range(0, length, chunk_size):
                end = min(start + chunk_size, length)
                starts.append(H)
                u_c, dt_c, B_c, C_c = _chunk_slices((u, dt, B, C), start, end)
                y[..., start:end], H = _coupled_chunk(u_c, dt_c, A2, B_c, C_c, H, scale)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.save_for_backward(u, dt, A, B, C, *starts)
        return y, H

    @staticmethod
    def backward(ctx, grad_y, grad_H_last):
        u, dt, A, B, C, *starts = ctx.saved_tensors
        chunk_size, length = ctx.chunk_size, u.shape[-1]
        grad_u, grad_dt = torch.empty_like(u), torch.empty_like(dt)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A)
        grad_H = grad_H_last if grad_H_last is not None else torch.zeros_like(starts[0])
        if grad_y is None:
            grad_y = torch.zeros_like(u)
        for index in reversed(range(len(starts))):
            start = index * chunk_size
            end = min(start + chunk_size, length)
            u_c, dt_c, B_c, C_c, gy_c = _chunk_slices((u, dt, B, C, grad_y), start, end)
            g_u, g_dt, g_A, g_B, g_C, grad_H = _coupled_chunk_backward(
                u_c, dt_c, A, B_c, C_c, starts[index], ctx.scale, gy_c, grad_H
            )
            grad_u[..., start:end] = g_u
            grad_dt[..., start:end] = g_dt
            grad_B[..., start:end] = g_B
            grad_C[..., start:end] = g_C
            grad_A += g_A
        return grad_u, grad_dt, grad_A, grad_B, grad_C, grad_H, None, None


def coupled_selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, coupling="mean", initial_state=None,
    return_final_state=False, chunk_size=None,
):
    """The chunked, parallel-over-time PyTorch coupled scan (backend "torch"); same contract as
    ``coupled_selective_scan``. ``chunk_size`` (steps per chunk) defaults to a size that keeps one
    (batch, M, dim, N, chunk) float32 tensor near 4 MB."""
    batch, chains, dim, length, state_size = _check_coupled_inputs(
        u, delta, A, B, C, D, z, delta_bias, initial_state, coupling
    )
    if chunk_size is None:
        chunk_size = _default_chunk_size(batch, chains, dim, state_size)
    if int(chunk_size) < 1:
        raise ValueError(f"coupled_selective_scan: chunk_size must be >= 1, got {chunk_size}")
    dt = discretize_delta(delta, delta_bias, delta_softplus)
    H0 = (
        initial_state.float()
        if initial_state is not None
        else torch.zeros(batch, dim, state_size, device=u.device, dtype=torch.float32)
    )
    if length == 0:
        y = torch.zeros(batch, chains, dim, 0, device=u.device, dtype=u.dtype)
        return (y, H0.clone()) if return_final_state else y
    y, H_last = _ChunkedCoupledScan.apply(
        u.float(), dt, A.float(), B.float(), C.float(), H0, _coupling_scale(coupling, chains), int(chunk_size)
    )
    y = gate_and_skip(y, u, D, z).to(u.dtype)
    return (y, H_last) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------------------------
def _raise_if_overflowed(y, final_state, coupling, inputs):
    """Raise ``CoupledScanOverflowError`` when a "sum" scan produced inf/NaN from finite inputs."""
    bad_y = not bool(torch.isfinite(y).all())
    bad_state = final_state is not None and not bool(torch.isfinite(final_state).all())
    if not (bad_y or bad_state):
        return
    for name, tensor in inputs:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            return  # non-finite in, non-finite out: not an overflow of the scan
    length = y.shape[-1]
    if bad_y:
        steps = (~torch.isfinite(y)).flatten(0, 2).any(dim=0).nonzero()
        where = f"first at step {int(steps[0])} of {length}"
    else:
        where = f"in the final state (L = {length})"
    raise CoupledScanOverflowError(
        f"coupled_selective_scan(coupling={coupling!r}): the coupled state overflowed float32 ({where}) although "
        f"every input is finite. With coupling='sum' (the paper's Eq. 6) the state's decay sum_m exp(dt^m A^m) can "
        f"reach M = {y.shape[1]} and the state grows like M^t where the decays are close to 1. Use "
        f"coupling='mean' (the stable default), shorter sequences, or larger dt / more negative A."
    )


def coupled_selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, coupling="mean", initial_state=None,
    return_final_state=False,
):
    """The coupled selective scan (contract in this module's docstring) on the best available backend.

    u, delta, z: (batch, M, dim, L); A: (M, dim, N); B, C: (batch, M, N, L); D, delta_bias: (M, dim);
    initial_state: (batch, dim, N). Returns y (batch, M, dim, L) in u's dtype, and the final coupled state
    (batch, dim, N) float32 when ``return_final_state``. coupling: "mean" (default, stable) or "sum" (the
    paper's Eq. 6; raises ``CoupledScanOverflowError`` if the state overflows). Force a backend with
    ``multimodal_mamba.ssm_backend(name)``; ``last_backend("coupled_selective_scan")`` says which ran.
    """
    _check_coupled_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, coupling)
    result = dispatch(
        "coupled_selective_scan", u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        coupling=coupling, initial_state=initial_state, return_final_state=return_final_state,
    )
    if coupling == "sum":
        y, final_state = result if return_final_state else (result, None)
        inputs = (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                  ("delta_bias", delta_bias), ("initial_state", initial_state))
        _raise_if_overflowed(y, final_state, coupling, inputs)
    return result


def _chains_kernel():
    """(function, accepts) of the "triton" backend's chain-list entry, when that backend is registered here."""
    entry = _REGISTRY.get("coupled_selective_scan", {}).get("triton")
    fn = getattr(entry[0], "chains", None) if entry else None
    return (fn, getattr(entry[0], "chains_accepts", None)) if fn is not None else (None, None)


def coupled_selective_scan_chains(
    us, deltas, A, Bs, Cs, D=None, zs=None, delta_bias=None, delta_softplus=True, coupling="mean",
    initial_state=None, return_final_state=False, outs=None,
):
    """``coupled_selective_scan`` with the M chains given as lists: us, deltas, zs (or None): M tensors
    (batch, dim, L); Bs, Cs: M tensors (batch, N, L); A (M, dim, N); D, delta_bias (M, dim) or None.

    Same result as stacking the lists along dim 1 and calling ``coupled_selective_scan`` (which is what runs on
    every backend but one). The exception: on the "triton" backend (chosen or forced) without gradients, the
    kernel reads every chain where it lies and writes y in the inputs' layout, so a Coupled Mamba layer's
    per-modality activations are never copied into stacked (batch, M, dim, L) tensors.

    outs: M tensors (batch, dim, L) of us' dtype, or None. When given (without gradients only), chain m's y is
    written into outs[m] and the list ``outs`` is the result instead of a (batch, M, dim, L) tensor. outs may be
    ``us`` itself: the Triton kernel reads each u before it writes the y at its place, so inference needs no
    memory for y (other backends compute y, then copy it in).
    """
    if outs is not None:
        if torch.is_grad_enabled():
            raise ValueError("coupled_selective_scan_chains: outs (y written in place) needs gradients disabled")
        if len(outs) != len(us) or any(tuple(o.shape) != tuple(us[0].shape) or o.dtype != us[0].dtype for o in outs):
            raise ValueError(
                f"coupled_selective_scan_chains: outs must be {len(us)} tensors of shape {tuple(us[0].shape)} and "
                f"dtype {us[0].dtype}, like us"
            )
    fn, accepts = _chains_kernel()
    args = (us, deltas, A, Bs, Cs)
    kwargs = dict(D=D, zs=zs, delta_bias=delta_bias, delta_softplus=delta_softplus, coupling=coupling,
                  initial_state=initial_state, return_final_state=return_final_state)
    # the kernel writes into outs itself, except for "sum", which reads its inputs after the scan to tell an overflow
    kernel_writes_outs = outs is not None and coupling != "sum"
    if kernel_writes_outs:
        kwargs["outs"] = outs
    if fn is not None and forced_backend() in ("auto", "triton") and accepts(*args, **kwargs):
        _check_coupled_inputs(us[0][:, None], deltas[0][:, None], A[:1], Bs[0][:, None], Cs[0][:, None],
                              D[:1] if D is not None else None, zs[0][:, None] if zs is not None else None,
                              delta_bias[:1] if delta_bias is not None else None, initial_state, coupling)
        _LAST["coupled_selective_scan"] = "triton"  # (what dispatch records)
        result = fn(*args, **kwargs)
        if coupling == "sum":
            y, final_state = result if return_final_state else (result, None)
            named = [("u", t) for t in us] + [("delta", t) for t in deltas] + [("B", t) for t in Bs] + [
                ("C", t) for t in Cs] + [("z", t) for t in (zs or ())] + [
                ("A", A), ("D", D), ("delta_bias", delta_bias), ("initial_state", initial_state)]
            _raise_if_overflowed(y, final_state, coupling, named)
        if outs is None or kernel_writes_outs:
            return result
    else:
        stack = lambda ts: torch.stack(list(ts), dim=1)  # noqa: E731
        result = coupled_selective_scan(
            stack(us), stack(deltas), A, stack(Bs), stack(Cs), D, z=stack(zs) if zs is not None else None,
            delta_bias=delta_bias, delta_softplus=delta_softplus, coupling=coupling, initial_state=initial_state,
            return_final_state=return_final_state,
        )
        if outs is None:
            return result
    y, final_state = result if return_final_state else (result, None)
    for out, chain_y in zip(outs, y.unbind(1)):
        out.copy_(chain_y)
    return (list(outs), final_state) if return_final_state else list(outs)


register_backend("coupled_selective_scan", "torch", coupled_selective_scan_chunked)
register_backend("coupled_selective_scan", "reference", coupled_selective_scan_ref)
