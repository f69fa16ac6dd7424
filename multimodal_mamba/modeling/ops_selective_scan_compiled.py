"""Backend "torch_compile": the selective scan and the causal conv as ``torch.compile`` (inductor) kernels, for CPU.

Opt in with ``ssm_backend("torch_compile")`` or ``config.ssm_backend = "torch_compile"``; ``"auto"`` never picks it
(see "Why opt-in" below). Same contracts as ``ops_selective_scan`` (its module docstring), same results to float32
rounding (tested against ``selective_scan_ref`` in ``tests/test_ops_compiled.py``).

The scan is one compiled function: a scan over chunks of ``CHUNK`` (32) steps (``torch._higher_order_ops.scan``, a loop
that inductor runs in its C++ wrapper, not in Python), whose body does, for one chunk:

- dt = softplus(delta + delta_bias) and x = dt u for the chunk's steps;
- the 32 steps of ``h_t = exp(dt_t A) h_{t-1} + x_t B_t`` unrolled one after the other on the (dim, N) state, and
  ``y_t = <C_t, h_t>``. Inductor turns this into one loop over the channels with the state in registers: one
  exponential per (step, channel, state), the minimum, no pass over memory per step. The state is laid out (dim, N)
  with N innermost (as ``initial_state``). ``exp`` is computed as ``2**x`` with an inline polynomial (about 2
  ulp, see ``exp2_inline``) instead of a call into the vector math library: a call inside the
  unrolled loop makes the compiler spill every live register around it, which made the loop about 2x slower;
- y + D u, gated by silu(z).

Its inputs are float32 chunk-major copies (chunks, batch, CHUNK, G, .) of delta, u, z, B and C, padded at the end to
whole chunks (and to at least two chunks, so that the number of chunks is never specialized as 1): delta is padded with
-inf (softplus) or -delta_bias (no softplus), so that dt = 0 there and the state passes through unchanged. (Handing
the scan the mixers' strided views directly made inductor's loop about 20x slower; the copies cost ~0.5 ms for a
(2048, 512) layer.) The number of chunks is a dynamic size: one compilation serves every prompt length for a given
batch / width / state size. Compared with an earlier version that called a compiled chunk from a Python loop with
separate prologue and epilogue passes, a (1, 512, 2048, N 16) scan went from ~13-14 ms to ~9 ms on 2 cores (no
Python per chunk, no float32 round trips of dt, x and y).

The causal conv (+ bias + SiLU) is one compiled pass over time-major memory (the eager path makes W + 1 passes).

Calls that need gradients, CUDA tensors, and calls made while ``torch.compile`` is already tracing run the eager
``"torch"`` backend instead (``last_backend`` then says ``"torch"``): training keeps the chunked scan's memory-lean
recompute backward. So do calls beyond dynamo's recompile limit (8 variants of a function).

Compile cost. The first call of a process compiles (inductor writes C++ and runs the system compiler): measured in
``benchmarks/results/cpu_prefill.md`` (about 30-35 s on the 2-core benchmark machine with a cold cache; about 20 s in a
later process: inductor's FX graph cache does not take graphs with a ``scan`` ("Can't cache HigherOrderOperator"), so
each process traces and generates code again and only the compiled C++ kernels come from the disk cache; the earlier
Python-loop design started in ~6 s but ran each scan ~35% slower). If compilation fails (no C++ compiler, an unsupported Python), a
warning is issued once and everything runs on the eager ``"torch"`` backend.

Why opt-in. ``generate()`` on a short prompt takes a fraction of a second on the eager path; a silent first-call compile
of tens of seconds (and its C++ toolchain requirement) would be a bad default for that user and for test suites.
For long prompts, repeated calls and servers the compiled path is the faster one: turn it on explicitly.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F

from .ops_selective_scan import (
    LOG2_E,
    _check_conv_inputs,
    _check_selective_scan_inputs,
    causal_conv1d_shifted,
    selective_scan_chunked,
)
from .ssm_backends import record_backend, register_backend

CHUNK = 32  # steps per iteration of the compiled scan (64: a loop body too large for the registers, 4x slower)

_lock = threading.Lock()
_compiled = {}
_failure = None  # the first compile error, once compilation has failed


try:  # inductor's fused multiply-add (one rounding): its C++ code is compiled with -ffp-contract=off, so a * b + c
    import torch._inductor.inductor_prims  # noqa: F401  (registers torch.ops.prims.fma)

    _fma = torch.ops.prims.fma
except (ImportError, AttributeError):  # an older torch: a multiply and an add
    def _fma(a, b, c):
        return a * b + c

# x + 1.5 * 2**23 rounds x (|x| < 2**22) to an integer held in the low mantissa bits; the extra 127 is the exponent bias
_EXP2_SHIFTER = 12583039.0
_EXP2_POLY = (1.32647e-3, 9.67151e-3, 5.550734e-2, 2.4022242e-1, 6.9314698e-1, 1.0)


def exp2_inline(x, clamp_upper: bool = True):
    """2**x in float32 with plain arithmetic: n = round(x) by the shifter trick, a degree-5 polynomial for 2**(x - n) on
    [-1/2, 1/2] (a relative-error minimax fit, 9e-8 in exact arithmetic, under 2e-7 (about 2 ulp) evaluated in float32,
    in fused multiply-adds where inductor compiles it), 2**n built in the exponent bits. 0 below 2**-126.5 (the
    reference gives a denormal there, an absolute difference below 1e-38), 2**127 * p at the top instead of inf; NaN
    stays NaN (through the polynomial).

    ``clamp_upper=False`` leaves out the clamp at +127: only for x that cannot exceed it, as dt A with
    dt = softplus(.) >= 0 and A <= 0.

    Cost per exponential in the scan's inner loop (AVX-512, counted in the generated code): the clamp, 3 operations for
    n and x - n (instead of 6 with floor, a float -> int conversion and the bias add), 5 fused multiply-adds (instead of
    5 multiplies and 5 adds), the shift and the final product: one (1, 512, 2048, N 16) scan 7.3-9.2 -> 6.1-6.7 ms
    on 2 cores (benchmarks/results/cpu_prefill.md).
    """
    x = x.clamp(-127.0, 127.0) if clamp_upper else x.clamp(min=-127.0)
    shifted = x + _EXP2_SHIFTER  # x in [-127, 127]: its low mantissa bits hold round(x) + 127, in [0, 254]
    f = x - (shifted - _EXP2_SHIFTER)  # x - round(x), exact
    p = _fma(f, torch.tensor(_EXP2_POLY[0]), torch.tensor(_EXP2_POLY[1]))
    for coefficient in _EXP2_POLY[2:]:
        p = _fma(p, f, torch.tensor(coefficient))
    # 2**round(x): the biased exponent shifted into the exponent field (the shifter's own bits fall off the top)
    return p * (shifted.view(torch.int32) << 23).view(torch.float32)


def _scan_body(h, chunk, A2, Dv, bias, softplus: bool, gate: bool, clamp_upper: bool):
    """One chunk of T steps, float32. h: (batch, G, Dg, N), the state before the chunk; chunk = (delta, u, z, B, C):
    (batch, T, G, Dg) x 3 and (batch, T, G, N) x 2; A2 = A log2(e): (G, Dg, N); Dv, bias: (G, Dg). Returns the state
    after the chunk and y = (<C_t, h_t> + D u_t) * silu(z_t): (batch, T, G, Dg). ``clamp_upper``: see
    ``exp2_inline`` (False only when dt >= 0 and A <= 0)."""
    delta, u, z, B, C = chunk
    dt = delta + bias
    if softplus:
        dt = F.softplus(dt)
    x = dt * u
    ys = []
    for t in range(delta.shape[1]):
        h = exp2_inline(dt[:, t, :, :, None] * A2, clamp_upper) * h + x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, 1) + Dv * u
    if gate:  # z: (batch, T, 1, S), the gate in its last G * Dg elements (see _gate_rows)
        y = y * F.silu(z[..., z.shape[-1] - y.shape[-2] * y.shape[-1] :].reshape(y.shape))
    return h.clone(), y  # (a scan's carry may not alias its input)


def _scan_chunks(h0, delta, u, z, B, C, A2, Dv, bias, softplus: bool, gate: bool, clamp_upper: bool):
    """All chunks: inputs chunk-major (chunks, batch, T, G, .), z (chunks, batch, T, 1, S) (see ``_gate_rows``);
    returns the last state and y (chunks, batch, T, G, Dg)."""
    from torch._higher_order_ops.scan import scan

    return scan(lambda h, chunk: _scan_body(h, chunk, A2, Dv, bias, softplus, gate, clamp_upper), h0, (delta, u, z, B, C))


def _conv_chunk(x, prefix, weight, bias, activation: bool):
    """Causal depthwise conv over time-major memory, float32. x: (batch, L, dim); prefix: (batch, W - 1, dim), the
    inputs before x; weight: (W, dim), tap k multiplies the input W - 1 - k steps back; bias: (dim,)."""
    width = weight.shape[0]
    length = x.shape[1]
    padded = torch.cat([prefix, x], dim=1)
    out = bias + padded[:, width - 1 :] * weight[width - 1]
    for k in range(width - 1):
        out = out + padded[:, k : k + length] * weight[k]
    return F.silu(out) if activation else out


def _compiled_fn(name, fn, dynamic=True, options=None):
    with _lock:
        if name not in _compiled:
            _compiled[name] = torch.compile(fn, dynamic=dynamic, fullgraph=True, options=options)
        return _compiled[name]


def _no_duck_sizing():
    """Dynamo would otherwise give equal sizes one symbol ("duck sizing": say, a number of chunks equal to the batch or
    a conv prompt as long as the width) and compile again when they differ later; symbols of their own keep one
    compiled graph for every length."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)


def compile_available() -> bool:
    """False once a compilation has failed in this process (everything then runs on the eager backend)."""
    return _failure is None


def _fail(op, error):
    global _failure
    if _failure is None:
        _failure = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"ssm backend 'torch_compile': compiling {op} failed ({_failure.splitlines()[0][:300]}); "
            "running the eager 'torch' backend instead for the rest of this process",
            RuntimeWarning,
            stacklevel=3,
        )


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _accepts(*tensors):
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and _failure is None
        and not torch.compiler.is_compiling()
        and not _needs_grad(*tensors)
    )


def selective_scan_compiled(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None,
    return_final_state=False,
):
    """The selective scan on compiled chunks (backend "torch_compile"); contract as ``selective_scan``. Falls back to
    ``selective_scan_chunked`` (and records backend "torch") where the compiled path does not apply."""
    groups = _check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, initial_state=initial_state,
                  return_final_state=return_final_state)
    if not _accepts(u, delta, A, B, C, D, z, delta_bias, initial_state) or u.shape[-1] == 0:
        record_backend("selective_scan", "torch")
        return selective_scan_chunked(u, delta, A, B, C, **kwargs)
    try:
        with torch.no_grad():
            return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, groups)
    except Exception as error:  # compilation failed: warn once, run eager from now on
        if _failure is not None or not _is_compile_error(error):
            raise
        if not _is_recompile_limit(error):
            _fail("the selective scan", error)
        record_backend("selective_scan", "torch")
        return selective_scan_chunked(u, delta, A, B, C, **kwargs)


def _is_compile_error(error) -> bool:
    """Errors of the compiler stack (dynamo, inductor, the C++ toolchain), not shape or value errors of ours."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch.fx", "subprocess")) or isinstance(
        error, (OSError, RuntimeError, NotImplementedError)
    )


def _is_recompile_limit(error) -> bool:
    """Dynamo refuses to compile yet another variant of a function (its recompile limit, 8 by default): that call
    runs eager, the variants already compiled keep serving the others."""
    return "RecompileLimit" in type(error).__name__


def _time_major(t, groups, per_group):
    """(batch, dim, L) -> a detached (batch, L, G, Dg) view, any strides (``_chunk_major`` copies it once, or reads it
    in place when it is already contiguous)."""
    return t.detach().transpose(1, 2).unflatten(2, (groups, per_group))


def _chunk_major(t, chunks, pad_value=0.0):
    """(batch, L, G, F) -> float32 (chunks, batch, CHUNK, G, F) contiguous, the steps past L filled with pad_value (a
    number, or a (G, F) tensor). At batch 1 without padding a contiguous float32 input already has that layout: it is
    returned as a view (the conv output and dt_proj's output in the mixer, a prefill of a multiple of 32 tokens)."""
    batch, length = t.shape[:2]
    if batch == 1 and length == chunks * CHUNK and t.dtype == torch.float32 and t.is_contiguous():
        return t.view((chunks, 1, CHUNK) + tuple(t.shape[2:]))
    out = t.new_empty((chunks, batch, CHUNK) + tuple(t.shape[2:]), dtype=torch.float32)
    blocks = out.transpose(0, 1)  # (batch, chunks, CHUNK, G, F)
    full, rest = divmod(length, CHUNK)
    blocks[:, :full].copy_(t[:, : full * CHUNK].unflatten(1, (full, CHUNK)))
    if rest:
        blocks[:, full, :rest].copy_(t[:, full * CHUNK :])
        blocks[:, full, rest:] = pad_value
    blocks[:, full + (1 if rest else 0) :] = pad_value
    return out


def _gate_rows(z, chunks):
    """The gate z (batch, dim, L) as the scan reads it: (chunks, batch, CHUNK, 1, S) float32, z's channels the last
    ``dim`` of each row's S elements.

    In the mixer z is the second half of in_proj's (batch, L, 2 dim) output: a view with unit stride over channels and
    rows of 2 dim. At batch 1 and a whole number of chunks those rows are already chunk-major: they are read in place
    (the first half of each row, x, is read past), instead of copying z (a pass over 4 MB and its fresh pages for a
    (2048, 512) layer: one scan on 2 cores 8.15 -> 7.33 ms). Elsewhere z is copied, S = dim.
    """
    batch, dim, length = z.shape
    row = z.stride(2)
    start = z.storage_offset() - (row - dim)
    if (batch == 1 and length == chunks * CHUNK and z.dtype == torch.float32 and z.stride(1) == 1 and row >= dim
            and start >= 0):
        # (the last element read is z's own last element: the view stays inside z's storage)
        return z.detach().as_strided((chunks, 1, CHUNK, 1, row), (CHUNK * row, length * row, row, row, 1), start)
    return _chunk_major(_time_major(z, 1, dim), chunks)


def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, groups):
    scan_chunks = _compiled_fn("scan_chunks", _scan_chunks, dynamic=None, options={"cpp_wrapper": True})
    batch, dim, length = u.shape
    state_size = A.shape[1]
    per_group = dim // groups
    chunks = max(2, -(-length // CHUNK))
    u4 = _time_major(u, groups, per_group)
    d4 = _time_major(delta, groups, per_group)
    gate = z is not None
    zeros = u.new_zeros(groups, per_group, dtype=torch.float32)
    bias = delta_bias.detach().float().view(groups, per_group) if delta_bias is not None else zeros
    # Padded steps get dt = 0 (no decay, no input): softplus(-inf) = 0, or delta + bias = 0 without softplus.
    delta_pad = float("-inf") if delta_softplus else -bias
    inputs = [_chunk_major(d4, chunks, delta_pad), _chunk_major(u4, chunks)]
    inputs.append(_gate_rows(z, chunks) if gate else inputs[1].flatten(-2).unsqueeze(-2))  # (not read without z)
    for mat in (B, C):  # (batch, N, L) or (batch, G, N, L) -> (batch, L, G, N)
        inputs.append(_chunk_major((mat if mat.dim() == 4 else mat[:, None]).permute(0, 3, 1, 2).detach(), chunks))
    for t in inputs:
        torch._dynamo.maybe_mark_dynamic(t, 0)  # the number of chunks: one compilation for every length
    A2 = (A.detach().float() * LOG2_E).view(groups, per_group, state_size).contiguous()
    Dv = D.detach().float().view(groups, per_group) if D is not None else zeros
    if initial_state is not None:
        h = initial_state.detach().float().reshape(batch, groups, per_group, state_size).clone()
    else:
        h = u.new_zeros(batch, groups, per_group, state_size, dtype=torch.float32)
    # With softplus dt >= 0, so dt A <= 0 whenever A <= 0 (always, for A = -exp(A_log)): no clamp at the top needed.
    clamp_upper = not (delta_softplus and bool((A2 <= 0).all()))
    with _no_duck_sizing():
        h, y = scan_chunks(h, *inputs, A2, Dv, bias, delta_softplus, gate, clamp_upper)
    y = y.transpose(0, 1).reshape(batch, chunks * CHUNK, dim)[:, :length].to(u.dtype)
    y = y.transpose(1, 2)  # (batch, dim, L), time-major
    if u.stride(-1) == 1 and length > 1 and dim > 1:
        y = y.contiguous()  # u's layout
    if return_final_state:
        return y, h.reshape(batch, dim, state_size)
    return y


def causal_conv1d_compiled(x, weight, bias=None, initial_state=None, activation=None):
    """The causal depthwise conv (+ bias + SiLU) as one compiled pass (backend "torch_compile"); contract as
    ``causal_conv1d``. Returns a (batch, dim, L) view of time-major memory."""
    _check_conv_inputs(x, weight, initial_state)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: unsupported activation {activation!r} (expected None, 'silu' or 'swish')")
    if not _accepts(x, weight, bias, initial_state) or x.shape[-1] == 0:
        record_backend("causal_conv1d", "torch")
        return causal_conv1d_shifted(x, weight, bias, initial_state=initial_state, activation=activation)
    try:
        with torch.no_grad():
            return _conv(x, weight, bias, initial_state, activation)
    except Exception as error:
        if _failure is not None or not _is_compile_error(error):
            raise
        if not _is_recompile_limit(error):
            _fail("the causal conv", error)
        record_backend("causal_conv1d", "torch")
        return causal_conv1d_shifted(x, weight, bias, initial_state=initial_state, activation=activation)


def _conv(x, weight, bias, initial_state, activation):
    fn = _compiled_fn("causal_conv1d", _conv_chunk)
    batch, dim, length = x.shape
    width = weight.shape[1]
    time_major = x.transpose(1, 2)
    if time_major.stride(-1) != 1:
        time_major = time_major.contiguous()
    time_major = time_major.float()
    if initial_state is not None:
        prefix = initial_state.transpose(1, 2).float()
    else:
        prefix = x.new_zeros(batch, width - 1, dim, dtype=torch.float32)
    bias = bias.float() if bias is not None else x.new_zeros(dim, dtype=torch.float32)
    with _no_duck_sizing():
        out = fn(time_major, prefix, weight.float().t().contiguous(), bias, activation is not None)
    return out.to(x.dtype).transpose(1, 2)


register_backend("selective_scan", "torch_compile", selective_scan_compiled)
register_backend("causal_conv1d", "torch_compile", causal_conv1d_compiled)
