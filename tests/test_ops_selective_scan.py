"""The selective scan, its decode step and the causal conv: every registered backend against the references.

The references (``selective_scan_ref``: the sequential loop; ``causal_conv1d_ref``: ``F.conv1d``) are the definition
of correct. Float32 results must agree to float32 rounding (the block form of the "torch" backend is compared at
tolerances near the reference's own error against float64); bfloat16 inputs are compared with the reference run on
the same bfloat16 inputs.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from multimodal_mamba import available_backends, last_backend, ssm_backend
from multimodal_mamba.kernels import cpu as cpp_kernels
from multimodal_mamba.modeling.ops_selective_scan import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
    linear_recurrence_doubling,
    linear_recurrence_logspace,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

CPU_BACKENDS = ("torch", "reference")  # GPU backends, where registered, are tested in test_gpu_kernels.py; "cpp"
# (inference only) in test_cpu_kernels.py
# What "auto" runs a CPU float32 scan without gradients on: the C++ kernel, where it can be built
AUTO_CPU_SCAN = "cpp" if cpp_kernels.available() else "torch"


def cpu_backends(op):
    return [name for name in available_backends(op) if name in CPU_BACKENDS]


def make_inputs(batch=1, dim=8, length=20, state=4, groups=1, *, z=True, D=True, delta_bias=True, initial_state=False,
                time_major=False, dtype=torch.float32, A_scale=1.0, delta_shift=-1.0, seed=0):
    """Random scan inputs; time_major gives (batch, dim, L) views of (batch, L, dim) memory, as the mixers pass."""
    gen = torch.Generator().manual_seed(seed)

    def seq(channels):  # (batch, channels, L)
        if time_major:
            return torch.randn(batch, length, channels, generator=gen).transpose(1, 2)
        return torch.randn(batch, channels, length, generator=gen)

    def bc():
        mat = torch.randn(batch, length, groups * state, generator=gen).transpose(1, 2) if time_major else (
            torch.randn(batch, groups * state, length, generator=gen))
        return mat if groups == 1 else mat.unflatten(1, (groups, state))

    inputs = {
        "u": seq(dim),
        "delta": seq(dim) * 0.5 + delta_shift,
        "A": -torch.exp(torch.randn(dim, state, generator=gen)) * A_scale,
        "B": bc(),
        "C": bc(),
        "D": torch.randn(dim, generator=gen) if D else None,
        "z": seq(dim) if z else None,
        "delta_bias": 0.1 * torch.randn(dim, generator=gen) if delta_bias else None,
        "initial_state": torch.randn(batch, dim, state, generator=gen) if initial_state else None,
    }
    for name in ("u", "delta", "B", "C", "z"):
        if inputs[name] is not None:
            inputs[name] = inputs[name].to(dtype)
    return inputs


def scan_grads(fn, inputs, seed=1, **kwargs):
    """Run fn(**inputs), backpropagate fixed random cotangents into y and the final state; return outputs and grads."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y, h = fn(**leaves, return_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (y.float() * torch.randn(y.shape, generator=gen)).sum() + (h * torch.randn(h.shape, generator=gen)).sum()
    loss.backward()
    return y, h, {k: v.grad for k, v in leaves.items() if v is not None}


def assert_close_scaled(actual, expected, rtol=1e-5, what=""):
    """|actual - expected| <= rtol * max|expected| + 1e-8: float32 rounding relative to the tensor's scale."""
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * scale + 1e-8, msg=what)


def torch_chunked(chunk_size):
    return lambda **kw: selective_scan_chunked(**kw, chunk_size=chunk_size)


def via_backend(name):
    def run(**kw):
        with ssm_backend(name):
            out = selective_scan(**kw)
        assert last_backend("selective_scan") == name
        return out
    return run


# ----------------------------------------------------------------------------------------------------------------
# Selective scan: forward and gradients against the sequential reference.
# ----------------------------------------------------------------------------------------------------------------
# (batch, dim, L, N, G, z/D/delta_bias, initial_state, time_major). With chunk_size 16 the torch path runs blocks of
# 8 steps: L = 1, 5 (below a block), 16 (one chunk), 40 (above, not a multiple), 67 (several chunks, ragged).
SCAN_CASES = [
    (1, 4, 1, 1, 1, True, False, False),
    (2, 8, 5, 4, 1, False, True, True),
    (1, 8, 16, 16, 2, True, True, False),
    (2, 12, 40, 4, 4, True, False, True),
    (1, 16, 67, 16, 1, True, True, True),
    (2, 8, 23, 1, 2, False, False, False),
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "b{}-d{}-L{}-N{}-G{}".format(*c[:5]))
@pytest.mark.parametrize("backend", ["torch", "reference", "torch-chunk16"])
def test_selective_scan_matches_reference(case, backend):
    batch, dim, length, state, groups, extras, init, time_major = case
    inputs = make_inputs(batch, dim, length, state, groups, z=extras, D=extras, delta_bias=extras,
                         initial_state=init, time_major=time_major, seed=length)
    fn = torch_chunked(16) if backend == "torch-chunk16" else via_backend(backend)
    y, h, grads = scan_grads(fn, inputs)
    y_ref, h_ref, grads_ref = scan_grads(selective_scan_ref, inputs)
    assert y.shape == y_ref.shape == (batch, dim, length) and y.dtype == torch.float32
    assert h.shape == (batch, dim, state) and h.dtype == torch.float32
    assert_close_scaled(y, y_ref, what="y")
    assert_close_scaled(h, h_ref, what="final state")
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert_close_scaled(grads[name], grads_ref[name], rtol=2e-5, what=f"grad of {name}")


@pytest.mark.parametrize("return_final_state", [False, True])
def test_selective_scan_outputs_and_no_grad(return_final_state):
    inputs = make_inputs(2, 8, 33, 4, time_major=True, initial_state=True)
    with torch.no_grad():
        out = selective_scan(**inputs, return_final_state=return_final_state)
        ref = selective_scan_ref(**inputs, return_final_state=return_final_state)
    if return_final_state:
        assert isinstance(out, tuple) and len(out) == 2
        assert_close_scaled(out[1], ref[1])
        out, ref = out[0], ref[0]
    assert torch.is_tensor(out)
    assert_close_scaled(out, ref)
    assert last_backend("selective_scan") == AUTO_CPU_SCAN  # "auto" on CPU


def test_selective_scan_grad_through_gate_only():
    """Only D and z need gradients: the scan core runs without autograd, the gate still gets its graph."""
    inputs = make_inputs(2, 8, 30, 4, 2, initial_state=True)
    grads = []
    for fn in (selective_scan_chunked, selective_scan_ref):
        D, z = inputs["D"].clone().requires_grad_(), inputs["z"].clone().requires_grad_()
        y = fn(**{**inputs, "D": D, "z": z})
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads.append((y.detach(), D.grad, z.grad))
    for ours, ref in zip(*grads):
        assert_close_scaled(ours, ref)


def test_selective_scan_zero_length():
    inputs = make_inputs(2, 8, 0, 4, initial_state=True)
    y, h = selective_scan_chunked(**inputs, return_final_state=True)
    assert y.shape == (2, 8, 0)
    torch.testing.assert_close(h, inputs["initial_state"])


def test_selective_scan_bfloat16():
    inputs = make_inputs(2, 16, 45, 16, 2, time_major=True, initial_state=True, dtype=torch.bfloat16)
    y, h, grads = scan_grads(torch_chunked(16), inputs)
    y_ref, h_ref, grads_ref = scan_grads(selective_scan_ref, inputs)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close_scaled(y, y_ref, rtol=1e-2, what="y")  # both round the same float32 values to bf16
    assert_close_scaled(h, h_ref, rtol=1e-5, what="final state")  # kept in float32 from the same bf16 inputs
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype
        assert_close_scaled(grads[name], grads_ref[name], rtol=2e-2, what=f"grad of {name}")


@pytest.mark.parametrize(
    "regime, A_scale, delta_shift",
    [
        ("fast", 300.0, 1.0),  # dt |A| up to thousands per step: decays underflow to 0 within a step
        ("slow", 1e-4, -4.0),  # decays within 1e-6 of 1 over the whole sequence
        ("mixed", None, 0.0),  # per channel from 1e-4 to 1e4: some blocks fall back to doubling, others do not
    ],
)
def test_selective_scan_extreme_decays(regime, A_scale, delta_shift):
    inputs = make_inputs(2, 16, 70, 8, 2, time_major=True, initial_state=True, delta_shift=delta_shift, seed=3,
                         A_scale=1.0 if A_scale is None else A_scale)
    if A_scale is None:
        inputs["A"] = inputs["A"] * torch.logspace(-4, 4, 16)[:, None]
    y, h, grads = scan_grads(torch_chunked(32), inputs)
    y_ref, h_ref, grads_ref = scan_grads(selective_scan_ref, inputs)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert_close_scaled(y, y_ref, what="y")
    assert_close_scaled(h, h_ref, what="final state")
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name
        assert_close_scaled(grads[name], grads_ref[name], rtol=1e-4, what=f"grad of {name}")


def test_selective_scan_huge_drive_and_growth():
    # Drives near 1e30 overflow 2**32-scaled block sums: the chunk must be redone by doubling, not come back inf.
    inputs = make_inputs(1, 8, 40, 4, time_major=True, seed=5)
    inputs["u"] = inputs["u"] * 1e30
    y = selective_scan_chunked(**inputs)
    y_ref = selective_scan_ref(**inputs)
    assert torch.isfinite(y_ref).all() and torch.isfinite(y).all()
    assert_close_scaled(y, y_ref)
    # Without softplus, dt takes both signs: decays above and below 1 (non-monotone exponents).
    inputs = make_inputs(2, 8, 50, 4, 2, delta_shift=0.0, initial_state=True, seed=6)
    y, h, grads = scan_grads(torch_chunked(16), inputs, delta_softplus=False)
    y_ref, h_ref, grads_ref = scan_grads(selective_scan_ref, inputs, delta_softplus=False)
    assert_close_scaled(y, y_ref)
    assert_close_scaled(h, h_ref)
    for name in grads:
        assert_close_scaled(grads[name], grads_ref[name], rtol=1e-4, what=f"grad of {name}")


def test_selective_scan_layouts_agree():
    """Time-major views and contiguous inputs give the same result; y keeps u's layout."""
    inputs = make_inputs(2, 16, 37, 4, 2, time_major=True, initial_state=True)
    contiguous = {k: (v.contiguous() if v is not None else None) for k, v in inputs.items()}
    y_view = selective_scan_chunked(**inputs)
    y_contig = selective_scan_chunked(**contiguous)
    torch.testing.assert_close(y_view, y_contig, rtol=0, atol=1e-6)
    assert y_view.stride(1) == 1  # time-major in, time-major out
    assert y_contig.is_contiguous()


# ----------------------------------------------------------------------------------------------------------------
# The recurrence helpers (reused by the coupled scan).
# ----------------------------------------------------------------------------------------------------------------
def test_linear_recurrences_match_loop():
    gen = torch.Generator().manual_seed(0)
    decay = torch.rand(3, 5, 37, generator=gen)
    drive = torch.randn(3, 5, 37, generator=gen)
    h0 = torch.randn(3, 5, generator=gen)
    h, expected = h0, []
    for t in range(37):
        h = decay[..., t] * h + drive[..., t]
        expected.append(h)
    expected = torch.stack(expected, -1)
    torch.testing.assert_close(linear_recurrence_doubling(decay, drive, h0), expected, rtol=1e-5, atol=1e-6)
    log2_cum = torch.cumsum(torch.log2(decay), -1)
    torch.testing.assert_close(linear_recurrence_logspace(drive, log2_cum, h0), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Decode step and causal conv.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends("selective_state_update"))
@pytest.mark.parametrize("groups", [0, 1, 4])  # 0: B, C of shape (batch, N)
def test_selective_state_update(backend, groups):
    gen = torch.Generator().manual_seed(groups)
    batch, dim, state = 3, 8, 4
    bc_shape = (batch, state) if groups == 0 else (batch, groups, state)
    args = dict(x=torch.randn(batch, dim, generator=gen), dt=torch.randn(batch, dim, generator=gen),
                A=-torch.rand(dim, state, generator=gen), B=torch.randn(bc_shape, generator=gen),
                C=torch.randn(bc_shape, generator=gen), D=torch.randn(dim, generator=gen),
                z=torch.randn(batch, dim, generator=gen), dt_bias=torch.randn(dim, generator=gen))
    state0 = torch.randn(batch, dim, state, generator=gen)
    ours, ref = state0.clone(), state0.clone()
    with ssm_backend(backend):
        y = selective_state_update(ours, **args)
    assert last_backend("selective_state_update") == backend
    y_ref = selective_state_update_ref(ref, **args)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ours, ref)  # updated in place
    assert not torch.equal(ours, state0)
    # It is the same step as the scan over one token from that state.
    scan_args = {k: args[k] for k in ("A", "D")}
    y_scan, h_scan = selective_scan_ref(
        args["x"][..., None], args["dt"][..., None], B=args["B"][..., None], C=args["C"][..., None],
        z=args["z"][..., None], delta_bias=args["dt_bias"], initial_state=state0, return_final_state=True, **scan_args)
    torch.testing.assert_close(y, y_scan[..., 0])
    torch.testing.assert_close(ours, h_scan)


@pytest.mark.parametrize("backend", cpu_backends("causal_conv1d"))
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 3, 30])
def test_causal_conv1d(backend, width, length):
    gen = torch.Generator().manual_seed(width * 100 + length)
    batch, dim = 2, 6
    x_tm = torch.randn(batch, length, dim, generator=gen).transpose(1, 2)
    weight, bias = torch.randn(dim, width, generator=gen), torch.randn(dim, generator=gen)
    init = torch.randn(batch, dim, width - 1, generator=gen)
    for x in (x_tm, x_tm.contiguous()):
        for kwargs in ({}, {"bias": bias, "activation": "silu"}, {"bias": bias, "initial_state": init},
                       {"initial_state": init, "activation": "swish"}):
            with ssm_backend(backend):
                out = causal_conv1d(x, weight, **kwargs)
            assert last_backend("causal_conv1d") == backend
            torch.testing.assert_close(out, causal_conv1d_ref(x, weight, **kwargs), rtol=1e-5, atol=1e-5)
    # Splitting the sequence, with the tail of the first part as the second part's initial state, changes nothing.
    if length > 1:
        cut = length // 2
        full = causal_conv1d(x_tm, weight, bias, initial_state=init)
        head = causal_conv1d(x_tm[..., :cut], weight, bias, initial_state=init)
        carried = torch.cat([init, x_tm[..., :cut]], -1)[..., -(width - 1):] if width > 1 else init
        tail = causal_conv1d(x_tm[..., cut:], weight, bias, initial_state=carried)
        torch.testing.assert_close(torch.cat([head, tail], -1), full, rtol=1e-5, atol=1e-5)


def _last_inputs(x, init, width):
    """The last ``width`` inputs of [initial_state (zeros when None), x], as a decode step reads them."""
    prefix = init if init is not None else x.new_zeros(x.shape[0], x.shape[1], width - 1)
    return torch.cat([prefix, x], -1)[..., -width:]


@pytest.mark.parametrize("backend", cpu_backends("causal_conv1d"))
@pytest.mark.parametrize("length", [1, 2, 9])
def test_causal_conv1d_writes_conv_state_out(backend, length):
    """conv_state_out receives the last W inputs of the padded sequence (the initial state's, or zeros, where x is
    shorter than W) on every backend; overwrite_x, which the CPU backends do not take, changes no result."""
    gen = torch.Generator().manual_seed(length)
    batch, dim, width = 2, 5, 4
    x = torch.randn(batch, length, 2 * dim, generator=gen).transpose(1, 2)[:, :dim]  # in_proj's half, time-major
    weight, bias = torch.randn(dim, width, generator=gen), torch.randn(dim, generator=gen)
    for init in (None, torch.randn(batch, dim, width - 1, generator=gen)):
        state = torch.full((batch, dim, width), float("nan"))
        original = x.clone()
        with ssm_backend(backend):
            out = causal_conv1d(x, weight, bias, initial_state=init, activation="silu", conv_state_out=state,
                                overwrite_x=True)
        assert last_backend("causal_conv1d") == backend
        torch.testing.assert_close(out, causal_conv1d_ref(original, weight, bias, initial_state=init,
                                                          activation="silu"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, _last_inputs(original, init, width))


def test_causal_conv1d_rejects_a_bad_conv_state_out():
    x, weight = torch.randn(2, 5, 7), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"conv_state_out must be \(batch, dim, W\) = \(2, 5, 4\)"):
        causal_conv1d(x, weight, conv_state_out=torch.zeros(2, 5, 3))
    buffer = torch.zeros(2, 5, 11)
    with pytest.raises(ValueError, match="must not share memory with x"):
        causal_conv1d(buffer[..., :7], weight, conv_state_out=buffer[..., 7:])
    init = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="must not share memory with initial_state"):
        causal_conv1d(x, weight, initial_state=init[..., 1:], conv_state_out=init)


@pytest.mark.parametrize("backend", cpu_backends("causal_conv1d_update"))
def test_causal_conv1d_update_rolls_state_in_place(backend):
    gen = torch.Generator().manual_seed(0)
    batch, dim, width, steps = 2, 6, 4, 5
    weight, bias = torch.randn(dim, width, generator=gen), torch.randn(dim, generator=gen)
    xs = torch.randn(batch, dim, steps, generator=gen)
    init = torch.randn(batch, dim, width, generator=gen)
    ours, ref = init.clone(), init.clone()
    outs = []
    for t in range(steps):
        with ssm_backend(backend):
            outs.append(causal_conv1d_update(xs[..., t], ours, weight, bias, activation="silu"))
        torch.testing.assert_close(outs[-1], causal_conv1d_update_ref(xs[..., t], ref, weight, bias, activation="silu"))
        torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours[..., -1], xs[..., -1])  # newest input last
    # The decode steps continue the prefill conv whose initial state is the last W - 1 inputs.
    expected = causal_conv1d_ref(xs, weight, bias, initial_state=init[..., 1:], activation="silu")
    torch.testing.assert_close(torch.stack(outs, -1), expected, rtol=1e-5, atol=1e-5)


def test_prefill_then_decode_matches_full_scan():
    inputs = make_inputs(2, 16, 41, 8, 2, time_major=True, initial_state=True)
    y_full, h_full = selective_scan(**inputs, return_final_state=True)
    head = {k: (v[..., :-1] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
    y_head, state = selective_scan(**head, return_final_state=True)
    y_last = selective_state_update(
        state, inputs["u"][..., -1], inputs["delta"][..., -1], inputs["A"], inputs["B"][..., -1],
        inputs["C"][..., -1], D=inputs["D"], z=inputs["z"][..., -1], dt_bias=inputs["delta_bias"])
    assert_close_scaled(y_head, y_full[..., :-1])
    assert_close_scaled(y_last, y_full[..., -1])
    assert_close_scaled(state, h_full)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and backend selection.
# ----------------------------------------------------------------------------------------------------------------
def _bad(**changes):
    inputs = make_inputs(2, 8, 10, 4)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_chunked, selective_scan_ref])
@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(u=torch.randn(8, 10)), r"u must be \(batch, dim, L\)"),
        (dict(delta=torch.randn(2, 8, 11)), "delta must have u's shape"),
        (dict(A=torch.randn(7, 4)), r"A must be \(dim=8, N\)"),
        (dict(B=torch.randn(2, 4, 9)), "B must have shape"),
        (dict(C=torch.randn(2, 4)), r"C must be \(batch, N, L\) or \(batch, G, N, L\)"),
        (dict(B=torch.randn(2, 3, 4, 10), C=torch.randn(2, 3, 4, 10)), "groups G=3 must divide dim=8"),
        (dict(D=torch.randn(7)), r"D must have shape \(8,\)"),
        (dict(z=torch.randn(2, 8, 9)), "z must have u's shape"),
        (dict(initial_state=torch.randn(2, 8, 5)), r"initial_state must be \(batch, dim, N\)"),
    ],
)
def test_selective_scan_rejects_bad_shapes(fn, changes, match):
    with pytest.raises(ValueError, match=match):
        fn(**_bad(**changes))


def test_other_ops_reject_bad_inputs():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        selective_scan_chunked(**make_inputs(), chunk_size=0)
    state = torch.zeros(2, 8, 4)
    good = dict(x=torch.randn(2, 8), dt=torch.randn(2, 8), A=-torch.rand(8, 4), B=torch.randn(2, 4),
                C=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"state must be \(batch, dim, N\)"):
        selective_state_update(torch.zeros(8, 4), **good)
    with pytest.raises(ValueError, match=r"x must be \(batch, dim\)"):
        selective_state_update(state, **{**good, "x": torch.randn(2, 7)})
    with pytest.raises(ValueError, match=r"B must be \(batch, N\) or \(batch, G, N\)"):
        selective_state_update(state, **{**good, "B": torch.randn(2, 3, 4)})
    with pytest.raises(ValueError, match="causal_conv1d: x must be"):
        causal_conv1d(torch.randn(2, 5, 10), torch.randn(6, 4))
    with pytest.raises(ValueError, match="causal_conv1d: initial_state must be"):
        causal_conv1d(torch.randn(2, 6, 10), torch.randn(6, 4), initial_state=torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="unsupported activation 'relu'"):
        causal_conv1d(torch.randn(2, 6, 10), torch.randn(6, 4), activation="relu")
    with pytest.raises(ValueError, match="causal_conv1d_update: expected x"):
        causal_conv1d_update(torch.randn(2, 6), torch.zeros(2, 6, 3), torch.randn(6, 4))


def test_backend_forcing_and_last_backend():
    inputs = make_inputs(1, 8, 12, 4)
    for op in ("selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update"):
        assert cpu_backends(op) == ["torch", "reference"], op  # both are covered by the tests above
    with ssm_backend("reference"):
        y_ref = selective_scan(**inputs)
        assert last_backend("selective_scan") == "reference"
        with ssm_backend("torch"):  # the innermost context wins
            y_torch = selective_scan(**inputs)
            assert last_backend("selective_scan") == "torch"
        selective_scan(**inputs)
        assert last_backend("selective_scan") == "reference"
    assert_close_scaled(y_torch, y_ref)
    selective_scan(**inputs)
    assert last_backend("selective_scan") == AUTO_CPU_SCAN  # "auto" on CPU tensors (GPU backends do not take them)
    with pytest.raises(ValueError, match="unknown ssm backend"):
        with ssm_backend("fastest"):
            pass
    if "triton" not in available_backends("selective_scan"):
        with ssm_backend("triton"), pytest.raises(ValueError, match="was forced but is not available"):
            selective_scan(**inputs)


# ----------------------------------------------------------------------------------------------------------------
# Memory: the torch path keeps O(batch * dim * N * chunk) beyond inputs and outputs, in forward and in backward.
# ----------------------------------------------------------------------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops run under it allocate, while Python still references them.

    Every op output (views included) counts a reference to its storage until that tensor object is collected;
    storages of the ``exclude`` tensors (the inputs) are never counted.
    """

    def __init__(self, exclude=()):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
        self.refs = {}
        self.current = self.peak = 0

    def _release(self, key):
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in self.external or nbytes == 0:
                continue
            if key not in self.refs:
                self.refs[key] = [nbytes, 0]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            self.refs[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


def forward_peak_bytes(fn, inputs):
    with torch.no_grad(), LiveTensorBytes(exclude=inputs.values()) as tracker:
        out = fn(**inputs)
        del out
    return tracker.peak


def saved_for_backward_bytes(fn, inputs):
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(**leaves)
    y.sum().backward()
    return sum(storages.values())


@pytest.fixture
def one_thread():
    """Memory accounting does not depend on threads; one thread keeps these many-op runs fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_memory_does_not_grow_with_length_beyond_inputs(one_thread):
    dim, state = 64, 16  # an O(L * dim * N) implementation would need >= 16x the input growth per (L, dim) tensor

    def inputs_at(length):
        return make_inputs(1, dim, length, state, time_major=True, initial_state=True, seed=length)

    def growth(measure, fn, short, long):
        per_tensor = 4 * dim * (long - short)  # bytes one (dim, L) float32 tensor grows by
        return (measure(fn, inputs_at(long)) - measure(fn, inputs_at(short))) / per_tensor

    # Forward: the extra live memory grows like a handful of (dim, L) tensors (dt, dt u, y, the gate), not like N.
    ours = growth(forward_peak_bytes, selective_scan_chunked, 256, 2048)
    assert ours <= 8, f"forward peak grows like {ours:.1f} (dim, L) tensors"
    assert growth(forward_peak_bytes, selective_scan_ref, 128, 256) >= 2 * state  # the check can fail: the loop does
    # Backward: what is saved for it is the inputs, a few (dim, L) tensors and one state per chunk.
    saved = growth(saved_for_backward_bytes, torch_chunked(128), 256, 1024)
    assert saved <= 10, f"saved-for-backward grows like {saved:.1f} (dim, L) tensors"
    assert growth(saved_for_backward_bytes, selective_scan_ref, 64, 128) >= 2 * state


def test_backward_peak_does_not_grow_with_length(one_thread):
    dim, state = 64, 16

    def growth(fn, short, long):
        def peak(length):
            inputs = make_inputs(1, dim, length, state, time_major=True, seed=length)
            leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
            y = fn(**leaves)
            grad = torch.randn(y.shape)
            with LiveTensorBytes(exclude=[*leaves.values(), y, grad]) as tracker:
                torch.autograd.backward(y, grad)
            return tracker.peak

        return (peak(long) - peak(short)) / (4 * dim * (long - short))

    ours = growth(torch_chunked(128), 256, 1024)  # recomputes one chunk at a time from the saved chunk-start states
    assert ours <= 12, f"backward peak grows like {ours:.1f} (dim, L) tensors"
    assert growth(selective_scan_ref, 64, 128) >= 2 * state  # autograd through the loop keeps every step's state
