"""The fused backends (this package's Triton kernels, mamba-ssm / causal-conv1d) against the sequential references.

GPU tests (marked ``gpu``; skipped without CUDA): every registered backend of every op against the reference, in
float32 and bfloat16, forward and gradients, on fixed edge-case shapes (L = 1, L not a multiple of any block,
large N, groups, time-major and contiguous layouts) and on random shapes; whole-model parity (VL-Mamba's LM,
VL-Mamba, Coupled Mamba) across backends; LoRA on all four mixer projections receiving gradients on the fused
path; greedy generation equal across backends.

CPU tests (no CUDA, Triton importable): the same Triton kernels through Triton's interpreter
(``TRITON_INTERPRET=1``) on small shapes. Skipped when Triton is not installed.
"""

from __future__ import annotations

import importlib
import os
import random
import zlib

import pytest
import torch

from multimodal_mamba import available_backends, last_backend, ssm_backend
from multimodal_mamba.modeling import ops_mamba_ssm  # noqa: F401  (registers the "mamba_ssm" and "triton" backends)
from multimodal_mamba.modeling.ops_coupled_scan import coupled_selective_scan, coupled_selective_scan_ref
from multimodal_mamba.modeling.ops_selective_scan import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

FUSED = ("triton", "mamba_ssm", "torch")
TOL = {torch.float32: 2e-4, torch.bfloat16: 1.5e-2}
GRAD_TOL = {torch.float32: 5e-4, torch.bfloat16: 3e-2}


def _seed(shape):
    return zlib.crc32(repr(shape).encode()) % 10000


def rel(a, b):
    """||a - b|| / ||b||, with ||b|| floored at 1e-4 * sqrt(numel): a gradient that is zero in exact arithmetic
    (e.g. dA at L = 1 without an initial state, or an attention key bias) compares by its absolute error."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-4 * max(b.numel(), 1) ** 0.5)).item()


def clone_leaves(tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]


# ----------------------------------------------------------------------------------------------------------------
# Input builders (shared by GPU and interpreter tests)
# ----------------------------------------------------------------------------------------------------------------
def scan_inputs(batch, dim, length, state, groups=None, dtype=torch.float32, time_major=False, with_z=True,
                with_d=True, with_bias=True, with_h0=True, device="cuda", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    def act(scale=1.0, shift=0.0):
        if time_major:
            return (rand(batch, length, dim, scale=scale) + shift).to(dtype).transpose(1, 2)
        return (rand(batch, dim, length, scale=scale) + shift).to(dtype)

    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    return dict(
        u=act(), delta=act(0.5, -1.0), A=-torch.exp(rand(dim, state, scale=0.5)),
        B=rand(*bc_shape).to(dtype), C=rand(*bc_shape).to(dtype),
        D=rand(dim) if with_d else None, z=act() if with_z else None,
        delta_bias=rand(dim, scale=0.3) if with_bias else None,
        initial_state=rand(batch, dim, state) if with_h0 else None,
    )


SCAN_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_scan(fn, inputs, return_final_state=True):
    args = [inputs[k] for k in SCAN_KEYS]
    return fn(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True, initial_state=args[8],
              return_final_state=return_final_state)


def check_scan(fn, inputs, dtype, with_final_grad=True):
    """fn vs the sequential reference: output, final state, and the gradient of every input."""
    ours = dict(zip(SCAN_KEYS, clone_leaves([inputs[k] for k in SCAN_KEYS])))
    ref = dict(zip(SCAN_KEYS, clone_leaves([inputs[k] for k in SCAN_KEYS])))
    y, h = run_scan(fn, ours)
    y_ref, h_ref = run_scan(selective_scan_ref, ref)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape and h.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert rel(y, y_ref) <= TOL[dtype], rel(y, y_ref)
    assert rel(h, h_ref) <= TOL[torch.float32] * 10, rel(h, h_ref)
    gen = torch.Generator(device="cpu").manual_seed(1)
    gy = torch.randn(y_ref.shape, generator=gen).to(y_ref.device)
    gh = torch.randn(h_ref.shape, generator=gen).to(h_ref.device) if with_final_grad else None
    loss = (y.float() * gy).sum() + ((h * gh).sum() if gh is not None else 0)
    loss_ref = (y_ref.float() * gy).sum() + ((h_ref * gh).sum() if gh is not None else 0)
    loss.backward()
    loss_ref.backward()
    for key in SCAN_KEYS:
        if ours[key] is None:
            continue
        err = rel(ours[key].grad, ref[key].grad)
        assert err <= GRAD_TOL[dtype], (key, err)


# ----------------------------------------------------------------------------------------------------------------
# GPU: selective scan
# ----------------------------------------------------------------------------------------------------------------
# (batch, dim, L, N, groups, time_major, z, D, bias, h0)
SCAN_SHAPES = [
    (2, 64, 1, 16, None, False, True, True, True, True),  # L = 1
    (2, 64, 37, 16, None, True, True, True, True, True),  # L not a multiple of any block, mixer layout
    (1, 96, 300, 16, None, False, False, True, False, False),  # no z, no bias, no initial state
    (2, 40, 513, 4, None, True, True, False, True, True),
    (1, 32, 130, 64, None, False, True, True, True, True),  # large N
    (1, 16, 70, 128, None, True, True, True, True, False),  # larger N
    (2, 128, 200, 16, 4, True, True, True, True, False),  # groups (4-direction cross scan)
    (2, 64, 99, 8, 2, False, True, True, True, True),  # groups (bidirectional)
    (1, 36, 50, 8, 4, True, True, True, True, True),  # 9 channels per group: no block divides it
    (3, 24, 1000, 16, None, True, True, True, True, True),  # several chunks
    (1, 5, 17, 3, None, False, True, True, True, True),  # odd everything
]


def _random_shapes(count, seed=123):
    rng = random.Random(seed)
    shapes = []
    for _ in range(count):
        groups = rng.choice([None, None, 2, 4])
        per_group = rng.choice([1, 3, 8, 16, 24])
        dim = per_group * (groups or rng.choice([1, 2, 4]))
        shapes.append((rng.randint(1, 3), dim, rng.choice([1, 2, 15, 64, 65, 127, 257, 600]),
                       rng.choice([1, 2, 5, 16, 32]), groups, rng.random() < 0.5, rng.random() < 0.7,
                       rng.random() < 0.7, rng.random() < 0.7, rng.random() < 0.5))
    return shapes


def _scan_backend_fn(backend):
    def fn(*args, **kwargs):
        with ssm_backend(backend):
            return selective_scan(*args, **kwargs)
    return fn


def _backend_or_skip(op, backend):
    if backend not in available_backends(op):
        pytest.skip(f"backend {backend!r} is not available for {op} here")


@pytest.mark.gpu
def test_gpu_backends_registered():
    for op in ("selective_scan", "coupled_selective_scan", "causal_conv1d", "causal_conv1d_update",
               "selective_state_update"):
        assert "triton" in available_backends(op), op
    from multimodal_mamba.modeling import ops_mamba_ssm

    if ops_mamba_ssm.HAS_MAMBA_SSM:
        assert "mamba_ssm" in available_backends("selective_scan")
    if ops_mamba_ssm.HAS_CAUSAL_CONV1D:
        assert "mamba_ssm" in available_backends("causal_conv1d")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SCAN_SHAPES + _random_shapes(12), ids=str)
def test_gpu_selective_scan_matches_reference(backend, dtype, shape):
    _backend_or_skip("selective_scan", backend)
    batch, dim, length, state, groups, time_major, with_z, with_d, with_bias, with_h0 = shape
    if backend == "mamba_ssm":
        with_h0 = False  # it has no initial state (its accepts declines those calls: tested below)
        if length < 2:
            pytest.skip("the mamba_ssm backend declines L = 1 (mamba-ssm's bf16 backward gives NaN there)")
    inputs = scan_inputs(batch, dim, length, state, groups, dtype, time_major, with_z, with_d, with_bias, with_h0,
                         seed=_seed(shape))
    if backend == "mamba_ssm":
        def fn(*args, **kwargs):  # it drops the final state's gradient: that state is compared without one
            with ssm_backend(backend):
                y = selective_scan(*args, **{**kwargs, "return_final_state": False})
                with torch.no_grad():
                    _, h = selective_scan(*args, **kwargs)
            return y, h

        check_scan(fn, inputs, dtype, with_final_grad=False)
    else:
        check_scan(_scan_backend_fn(backend), inputs, dtype)
    assert last_backend("selective_scan") == backend


# backward kernel variants besides the default (fused.BWD_OPTS / BWD_BC_MODE): (gb_acc, da_store, excl_rev, bc_padded),
# dB / dC mode (1 contiguous atomics, 2 striped)
BWD_VARIANTS = [
    ((False, False, False, False), 2), ((True, True, False, True), 1), ((True, True, False, True), 2),
    ((True, True, True, True), 2), ((False, False, True, False), 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", BWD_VARIANTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SCAN_SHAPES + _random_shapes(4, seed=7), ids=str)
def test_gpu_selective_scan_backward_variants(variant, dtype, shape, monkeypatch):
    from multimodal_mamba.kernels.selective_scan import fused

    monkeypatch.setattr(fused, "BWD_OPTS", variant[0])
    monkeypatch.setattr(fused, "BWD_BC_MODE", variant[1])
    batch, dim, length, state, groups, time_major, with_z, with_d, with_bias, with_h0 = shape
    inputs = scan_inputs(batch, dim, length, state, groups, dtype, time_major, with_z, with_d, with_bias, with_h0,
                         seed=_seed(shape))
    check_scan(fused.selective_scan_triton, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=str)
def test_gpu_selective_scan_inference_path_matches_reference(dtype, shape):
    """Without gradients the Triton scan runs without an autograd node, its launch plan and compiled kernel cached
    (``CachedLaunch``): the first call (Triton's own launch) and the second (the cached one) equal the reference."""
    batch, dim, length, state, groups, time_major, with_z, with_d, with_bias, with_h0 = shape
    inputs = scan_inputs(batch, dim, length, state, groups, dtype, time_major, with_z, with_d, with_bias, with_h0,
                         seed=_seed(shape))
    y_ref, h_ref = run_scan(selective_scan_ref, inputs)
    with torch.no_grad(), ssm_backend("triton"):
        for _ in range(2):
            y, h = run_scan(selective_scan, inputs)
            assert rel(y, y_ref) <= TOL[dtype] and rel(h, h_ref) <= TOL[torch.float32] * 10
            y_only = run_scan(selective_scan, inputs, return_final_state=False)
            assert torch.equal(y_only, y)


if HAS_TRITON:
    import triton.language as tl

    from multimodal_mamba.kernels.selective_scan import fused as _scan_fused

    @triton.jit
    def _scan_pointwise_kernel(x_ptr, sp_ptr, sig_ptr, n, FAST_MATH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        tl.store(sp_ptr + offs, _scan_fused._softplus(x, FAST_MATH), mask=m)
        tl.store(sig_ptr + offs, _scan_fused._sigmoid(x, FAST_MATH), mask=m)


def _check_scan_pointwise_math(device, fast_math):
    """The scan kernels' softplus and sigmoid (``fused._softplus`` / ``_sigmoid`` at FAST_MATH ``fast_math``) against
    float64 torch over [-60, 60] (both sides of the softplus series / log2 split and of torch's threshold 20) and far
    out."""
    x = torch.cat([torch.linspace(-60, 60, 24001), torch.tensor([-2.0794, -2.0795, 1e4, -1e4, 0.0])]).to(device)
    sp, sig = torch.empty_like(x), torch.empty_like(x)
    _scan_pointwise_kernel[(triton.cdiv(x.numel(), 1024),)](x, sp, sig, x.numel(), FAST_MATH=fast_math, BLOCK=1024)
    ref_sp = torch.nn.functional.softplus(x.double())
    ref_sig = torch.sigmoid(x.double())
    err_sp = ((sp.double() - ref_sp).abs() / ref_sp.clamp_min(1e-300)).max().item()
    err_sig = ((sig.double() - ref_sig).abs() / ref_sig.clamp_min(1e-300)).max().item()
    assert err_sp <= 5e-6, err_sp  # measured: 3.4e-6 on the H200 (MUFU.LG2), 5.4e-7 with an exact log2
    assert err_sig <= 5e-6, err_sig


@pytest.mark.gpu
def test_gpu_selective_scan_softplus_sigmoid():
    """The scan kernels' softplus / sigmoid on the special-function unit (inline PTX, FAST_MATH 2) to < 5e-6."""
    _check_scan_pointwise_math("cuda", 2)


@pytest.mark.gpu
def test_gpu_cached_launch_equals_tritons_own_launch():
    """``CachedLaunch`` launches a compiled kernel directly once Triton's launch has specialized it for the same
    scalars, dtypes and pointer alignments; a call that would specialize differently (another length, a pointer off
    16-byte alignment, another dtype) goes through Triton again."""
    import triton

    from multimodal_mamba.kernels.transpose import fused as tr
    from multimodal_mamba.kernels.utils import CachedLaunch, fast_launch_supported

    launch = CachedLaunch(tr._transpose_kernel)
    base = torch.randn(2, 301, 2 * 96 + 1).cuda()
    cases = [base[..., :96], base[..., 96:192], base[..., 1:97], base[..., :96].bfloat16(), base[:, :77, :96]]
    for x in cases + cases:
        batch, length, channels = x.shape
        out = torch.full((batch, channels, length), float("nan"), device="cuda", dtype=x.dtype)
        launch((triton.cdiv(length, 64), triton.cdiv(channels, 64), batch), (x, out),
               (length, channels) + x.stride() + out.stride(), (64, 64), 4)
        assert torch.equal(out, x.transpose(1, 2))
    if fast_launch_supported():
        assert len(launch.cache) == 4  # the second pass hit the cache: (:96) and (96:192) share an entry


@pytest.mark.gpu
def test_gpu_mamba_ssm_declines_what_it_cannot_do():
    _backend_or_skip("selective_scan", "mamba_ssm")
    inputs = scan_inputs(1, 32, 40, 8, with_h0=True)
    with torch.no_grad():
        run_scan(selective_scan, inputs)  # auto: triton first
    assert last_backend("selective_scan") == "triton"
    with ssm_backend("mamba_ssm"), pytest.raises(ValueError, match="cannot run"):
        run_scan(selective_scan, inputs)
    no_h0 = dict(inputs, initial_state=None)
    with torch.no_grad(), ssm_backend("mamba_ssm"):
        y, h = run_scan(selective_scan, no_h0)
    y_ref, h_ref = run_scan(selective_scan_ref, no_h0)
    assert rel(y, y_ref) <= 2e-4 and rel(h, h_ref) <= 2e-3


@pytest.mark.gpu
def test_gpu_auto_dispatch_order_and_cpu_fallback():
    from multimodal_mamba.kernels import cpu as cpp_kernels

    inputs = scan_inputs(1, 16, 20, 4)
    with torch.no_grad():
        run_scan(selective_scan, inputs)
        assert last_backend("selective_scan") == "triton"
        run_scan(selective_scan, {k: (v.cpu() if v is not None else None) for k, v in inputs.items()})
        # CPU tensors: the C++ kernel where this machine can build it, else the PyTorch path
        assert last_backend("selective_scan") == ("cpp" if cpp_kernels.available() else "torch")
        double = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
        run_scan(selective_scan, double)  # float64: no fused kernel takes it
        assert last_backend("selective_scan") == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("segments", ["one", "many"])
def test_gpu_torch_backend_runs_the_blocked_scan(dtype, segments, monkeypatch):
    """On CUDA the "torch" backend is the blocked scan; with a small segment cap (several segments, each with the
    doubling carry between its blocks) it still matches the reference, forward and gradients."""
    from multimodal_mamba.modeling import ops_selective_scan_blocked as blocked

    calls = []
    original = blocked.selective_scan_blocked
    monkeypatch.setattr(blocked, "selective_scan_blocked", lambda *a, **k: calls.append(1) or original(*a, **k))
    if segments == "many":
        monkeypatch.setattr(blocked, "SEGMENT_ELEMENTS", 2 * 96 * 16 * 400)  # 2-3 segments of ~25 blocks
    inputs = scan_inputs(2, 96, 1000, 16, dtype=dtype, time_major=True, seed=11)
    check_scan(_scan_backend_fn("torch"), inputs, dtype)
    assert calls and last_backend("selective_scan") == "torch"


# ----------------------------------------------------------------------------------------------------------------
# GPU: coupled scan
# ----------------------------------------------------------------------------------------------------------------
def coupled_inputs(batch, chains, dim, length, state, dtype=torch.float32, time_major=False, with_z=True,
                   with_h0=True, device="cuda", seed=0, dt_shift=-1.0, decay_shift=0.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    def act(scale=1.0, shift=0.0):
        if time_major:
            return (rand(batch, chains, length, dim, scale=scale) + shift).to(dtype).transpose(-1, -2)
        return (rand(batch, chains, dim, length, scale=scale) + shift).to(dtype)

    return dict(
        u=act(), delta=act(0.5, dt_shift), A=-torch.exp(rand(chains, dim, state, scale=0.5)) - decay_shift,
        B=rand(batch, chains, state, length).to(dtype), C=rand(batch, chains, state, length).to(dtype),
        D=rand(chains, dim), z=act() if with_z else None, delta_bias=rand(chains, dim, scale=0.3),
        initial_state=rand(batch, dim, state) if with_h0 else None,
    )


def check_coupled(fn, inputs, dtype, coupling):
    ours = dict(zip(SCAN_KEYS, clone_leaves([inputs[k] for k in SCAN_KEYS])))
    ref = dict(zip(SCAN_KEYS, clone_leaves([inputs[k] for k in SCAN_KEYS])))

    def call(f, t):
        a = [t[k] for k in SCAN_KEYS]
        return f(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True, coupling=coupling,
                 initial_state=a[8], return_final_state=True)

    y, h = call(fn, ours)
    y_ref, h_ref = call(coupled_selective_scan_ref, ref)
    assert y.dtype == y_ref.dtype and torch.isfinite(y).all()
    assert rel(y, y_ref) <= TOL[dtype], rel(y, y_ref)
    assert rel(h, h_ref) <= 2e-3, rel(h, h_ref)
    gen = torch.Generator(device="cpu").manual_seed(2)
    gy = torch.randn(y_ref.shape, generator=gen).to(y.device)
    gh = torch.randn(h_ref.shape, generator=gen).to(y.device)
    ((y.float() * gy).sum() + (h * gh).sum()).backward()
    ((y_ref.float() * gy).sum() + (h_ref * gh).sum()).backward()
    for key in SCAN_KEYS:
        if ours[key] is not None:
            err = rel(ours[key].grad, ref[key].grad)
            assert err <= GRAD_TOL[dtype], (key, err)


# (batch, M, dim, L, N, time_major, z, h0)
COUPLED_SHAPES = [
    (2, 3, 32, 1, 16, False, True, True),
    (2, 3, 48, 77, 16, True, True, True),
    (1, 2, 16, 300, 8, False, False, False),
    (3, 3, 24, 129, 4, True, True, False),
    (1, 4, 8, 40, 32, False, True, True),
    (1, 1, 16, 33, 16, True, True, True),
    (2, 4, 12, 64, 3, False, True, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("coupling", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", COUPLED_SHAPES, ids=str)
def test_gpu_coupled_scan_matches_reference(backend, coupling, dtype, shape):
    _backend_or_skip("coupled_selective_scan", backend)
    batch, chains, dim, length, state, time_major, with_z, with_h0 = shape
    # "sum" grows like M^t where the decays are near 1: keep them small there (the contract's stability note)
    inputs = coupled_inputs(batch, chains, dim, length, state, dtype, time_major, with_z, with_h0,
                            seed=_seed(shape), dt_shift=2.0 if coupling == "sum" else -1.0,
                            decay_shift=1.0 if coupling == "sum" else 0.0)

    def fn(*args, **kwargs):
        with ssm_backend(backend):
            return coupled_selective_scan(*args, **kwargs)

    check_coupled(fn, inputs, dtype, coupling)
    assert last_backend("coupled_selective_scan") == backend


@pytest.mark.gpu
def test_gpu_coupled_scan_more_chains_than_the_kernel_falls_back():
    inputs = coupled_inputs(1, 5, 8, 30, 4)
    args = [inputs[k] for k in SCAN_KEYS]
    with torch.no_grad():
        y = coupled_selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7], initial_state=args[8])
    assert last_backend("coupled_selective_scan") == "torch"
    y_ref = coupled_selective_scan_ref(*args[:5], D=args[5], z=args[6], delta_bias=args[7], initial_state=args[8])
    assert rel(y, y_ref) <= TOL[torch.float32]


def _chain_lists(inputs, chains):
    """The stacked coupled-scan inputs as per-chain lists (views sharing strides)."""
    split = lambda t: [t[:, m] for m in range(chains)] if t is not None else None  # noqa: E731
    return dict(us=split(inputs["u"]), deltas=split(inputs["delta"]), zs=split(inputs["z"]), Bs=split(inputs["B"]),
                Cs=split(inputs["C"]))


def _separate_chain_inputs(batch, chains, dim, length, state, dtype, seed=0, with_z=True, device="cuda"):
    """Per-chain tensors laid out as a Coupled Mamba layer's activations: u, delta, z time-major views of separate
    (batch, L, .) tensors (z a half of a wider one, as in_proj's output), B and C N-contiguous column blocks of one
    (batch, L, R + 2N) tensor per chain (x_proj's output)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape, scale=1.0, shift=0.0: (torch.randn(*shape, generator=gen) * scale + shift).to(device)  # noqa
    us, deltas, zs, Bs, Cs = [], [], [], [], []
    for _ in range(chains):
        us.append(rand(batch, length, dim).to(dtype).transpose(1, 2))
        deltas.append(rand(batch, length, dim, scale=0.5, shift=-1.0).to(dtype).transpose(1, 2))
        zs.append(rand(batch, length, 2 * dim).to(dtype)[..., dim:].transpose(1, 2))
        params = rand(batch, length, 5 + 2 * state).to(dtype)
        Bs.append(params[..., 5:5 + state].transpose(1, 2))
        Cs.append(params[..., 5 + state:].transpose(1, 2))
    return dict(us=us, deltas=deltas, zs=zs if with_z else None, Bs=Bs, Cs=Cs,
                A=-torch.exp(rand(chains, dim, state, scale=0.5)), D=rand(chains, dim),
                delta_bias=rand(chains, dim, scale=0.3), initial_state=rand(batch, dim, state))


def _stacked_reference(lists, coupling, **kwargs):
    stack = lambda ts: torch.stack(list(ts), dim=1) if ts is not None else None  # noqa: E731
    return coupled_selective_scan_ref(stack(lists["us"]), stack(lists["deltas"]), lists["A"], stack(lists["Bs"]),
                                      stack(lists["Cs"]), D=lists.get("D"), z=stack(lists["zs"]),
                                      delta_bias=lists.get("delta_bias"), coupling=coupling, return_final_state=True,
                                      **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", COUPLED_SHAPES[:4], ids=str)
def test_gpu_coupled_scan_chunked_forward_matches_reference(dtype, shape, monkeypatch):
    """The chunked forward kernel (kept for N > 64 and as the alternative) against the reference."""
    from multimodal_mamba.kernels.coupled_scan import fused

    monkeypatch.setattr(fused, "FWD_IMPL", "chunked")
    batch, chains, dim, length, state, time_major, with_z, with_h0 = shape
    inputs = coupled_inputs(batch, chains, dim, length, state, dtype, time_major, with_z, with_h0, seed=_seed(shape))
    check_coupled(fused.coupled_selective_scan_triton, inputs, dtype, "mean")


# = SEQ_SWEEP of benchmarks/bench_gpu_coupled_scan.py: (block_d, num_warps, K)
SEQ_CONFIGS = [(16, 1, 4), (16, 1, 1), (16, 1, 2), (16, 1, 8), (8, 1, 4), (8, 1, 1), (8, 1, 2), (32, 1, 1), (32, 1, 2),
               (32, 1, 4), (64, 2, 1), (64, 2, 2), (4, 1, 2), (4, 1, 4),
               # (block_d, num_warps, K, prefetch_bc, bc_ahead): how B / C reach the registers (the defaults use both)
               (16, 1, 4, False, False), (16, 1, 4, True, False), (16, 1, 4, False, True), (8, 1, 4, True, True),
               (4, 1, 4, True, True), (16, 1, 8, True, True),
               # (..., xlane): K = lanes per channel, rows broadcast by shuffles (on by default where it applies)
               (8, 1, 4, True, True, False), (4, 1, 8, True, True, True), (16, 1, 2, True, True, True),
               (4, 1, 8, True, True, True, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("time_major", [False, True], ids=["lmajor", "tmajor"])
@pytest.mark.parametrize("config", SEQ_CONFIGS, ids=str)
def test_gpu_coupled_sequential_forward_configs(config, time_major):
    """Every launch configuration of the sequential forward (those the benchmark sweeps, with the sweep's
    specialization: bf16, dims multiples of 16) against the reference: output and final state. (Odd shapes, float32,
    saved states and gradients: the default configuration, in test_gpu_coupled_scan_matches_reference.)"""
    from multimodal_mamba.kernels.coupled_scan import sequential

    dtype = torch.bfloat16
    batch, chains, dim, length, state = 2, 3, 64, 160, 16
    inputs = coupled_inputs(batch, chains, dim, length, state, dtype, time_major, with_h0=False, seed=3)
    lists = _chain_lists(inputs, chains)
    with torch.no_grad():
        y, final, _ = sequential.coupled_scan_fwd_seq(
            lists["us"], lists["deltas"], lists["zs"], inputs["A"], lists["Bs"], lists["Cs"], inputs["D"],
            inputs["delta_bias"], True, "mean", None, config=config)
        args = [inputs[k] for k in SCAN_KEYS]
        y_ref, h_ref = coupled_selective_scan_ref(*args[:5], D=args[5], z=args[6], delta_bias=args[7],
                                                  return_final_state=True)
    assert rel(y, y_ref) <= TOL[dtype], rel(y, y_ref)
    assert rel(final, h_ref) <= 2e-3, rel(final, h_ref)


# (batch, M, dim, L, N, coupling, z)
CHAIN_SHAPES = [(2, 3, 64, 77, 16, "mean", True), (1, 1, 32, 1, 16, "mean", True), (3, 2, 24, 129, 3, "sum", False),
                (1, 4, 16, 40, 32, "mean", True), (2, 3, 16, 33, 64, "mean", True), (2, 4, 12, 64, 8, "sum", True)]


def check_pack_bc(device):
    """The sequential scan's B / C packing (one kernel for a layer's x_proj column views) equals the stacked
    float32 rows, for 1 - 4 chains, N not a power of two, L = 1, and float32 / bf16 / fp16 inputs."""
    from multimodal_mamba.kernels.coupled_scan import sequential

    gen = torch.Generator().manual_seed(5)
    for chains, state, length, dtype in [(3, 16, 37, torch.bfloat16), (2, 5, 9, torch.float32),
                                         (1, 4, 1, torch.bfloat16), (4, 64, 70, torch.float16)]:
        Bs, Cs = [], []
        for _ in range(chains):
            params = torch.randn(2, length, 7 + 2 * state, generator=gen).to(device, dtype)
            Bs.append(params[..., 7:7 + state].transpose(1, 2))
            Cs.append(params[..., 7 + state:].transpose(1, 2))
        packed = sequential._pack_bc(Bs, Cs)
        expected = torch.stack([t.transpose(-1, -2) for t in Bs + Cs], dim=2).float()
        assert packed.shape == expected.shape and torch.equal(packed, expected), (chains, state, length, dtype)
        views_b, views_c = sequential.prepare_bc(Bs, Cs)
        assert sequential.packed_bc(views_b, views_c) is not None
        assert all(torch.equal(a.float(), b) for a, b in zip(Bs + Cs, views_b + views_c))


@pytest.mark.gpu
def test_gpu_pack_bc():
    check_pack_bc("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CHAIN_SHAPES, ids=str)
def test_gpu_coupled_scan_chains_matches_reference(shape, dtype):
    """The chain-list entry point (a Coupled Mamba layer's per-modality activations read in place) without
    gradients: the Triton kernel, its output layout, and the stacking fallback of the other backends."""
    check_chains(shape, dtype, ("triton", "torch"))


def check_chains(shape, dtype, backends, device="cuda"):
    from multimodal_mamba.modeling.ops_coupled_scan import coupled_selective_scan_chains

    batch, chains, dim, length, state, coupling, with_z = shape
    lists = _separate_chain_inputs(batch, chains, dim, length, state, dtype, seed=_seed(shape), with_z=with_z,
                                   device=device)
    if coupling == "sum":
        lists["A"] = lists["A"] - 1.0
        lists["deltas"] = [d + 3.0 for d in lists["deltas"]]
    kwargs = dict(D=lists["D"], zs=lists["zs"], delta_bias=lists["delta_bias"], coupling=coupling,
                  initial_state=lists["initial_state"], return_final_state=True)
    args = (lists["us"], lists["deltas"], lists["A"], lists["Bs"], lists["Cs"])
    with torch.no_grad():
        y_ref, h_ref = _stacked_reference(lists, coupling, initial_state=lists["initial_state"])
        for backend in backends:
            with ssm_backend(backend):
                y, h = coupled_selective_scan_chains(*args, **kwargs)
            assert last_backend("coupled_selective_scan") == backend
            assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
            assert rel(y, y_ref) <= TOL[dtype], (backend, rel(y, y_ref))
            assert rel(h, h_ref) <= 2e-3, (backend, rel(h, h_ref))
            if backend == "triton" and length > 1:  # (M, batch, L, dim) memory: out_proj reads y[:, m] densely
                assert all(y[:, m].transpose(1, 2).is_contiguous() for m in range(chains))
            # y written over copies of u (the Coupled Mamba layer's inference: no memory for y)
            us = [u.clone() for u in lists["us"]]
            storage = [u.data_ptr() for u in us]
            with ssm_backend(backend):
                ys, h = coupled_selective_scan_chains(us, *args[1:], **kwargs, outs=us)
            assert [t.data_ptr() for t in ys] == storage
            assert rel(torch.stack(ys, dim=1), y_ref) <= TOL[dtype], (backend, "in place")
            assert rel(h, h_ref) <= 2e-3, (backend, "in place")


@pytest.mark.gpu
@pytest.mark.parametrize("coupling", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_coupled_mamba_inference_equal_across_backends(coupling, dtype):
    """Inference (no gradients, eval): the Triton chain-list path of the Coupled Mamba layer (no stacking copies,
    residual sums written in place) equals the sequential reference and the PyTorch path, with padding masks."""
    check_coupled_inference(coupling, dtype, ("reference", "torch", "triton"))


def check_coupled_inference(coupling, dtype, backends, device="cuda", length=70, hidden=32, state=16):
    from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel

    config = CoupledMambaConfig(modality_dims={"text": 12, "audio": 6, "vision": 9}, hidden_size=hidden,
                                num_hidden_layers=3, state_size=state, coupling=coupling)
    torch.manual_seed(0)
    model = CoupledMambaModel(config).to(device, dtype).eval()
    if coupling == "sum":
        # At the default init (dt ~ 0.001 .. 0.1, A = -1 .. -N) the "sum" state grows like M^t = 3^70 ~ 1e33 (the
        # contract's stability note), and the next layer's norm overflows: NaN on every backend. Decays <= ~0.12
        # per chain keep sum_m a^m below 1, so the outputs are finite and comparable.
        with torch.no_grad():
            for block in model.modules():
                if hasattr(block, "A_log") and hasattr(block, "dt_proj"):
                    block.A_log.add_(0.5)
                    block.dt_proj.bias.fill_(1.0)
    feats = {name: torch.randn(3, length, d, device=device, dtype=dtype) for name, d in config.modality_dims.items()}
    mask = {name: torch.ones(3, length, dtype=torch.bool, device=device) for name in config.modality_dims}
    mask["audio"][1, length - 20:] = False
    mask["vision"][2] = False
    outs = {}
    with torch.no_grad():
        for backend in backends:
            with ssm_backend(backend):
                outs[backend] = model(input_features=feats, attention_mask=mask)
            if coupling != "none":
                assert last_backend("coupled_selective_scan") == backend
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for backend in backends[1:]:
        for key in ("last_hidden_state", "pooler_output"):
            assert rel(outs[backend][key].float(), outs[backends[0]][key].float()) <= tol, (backend, key)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["dict", "packed"])
def test_gpu_coupled_mamba_inference_cuda_graphs(packed):
    """config.inference_cuda_graphs: the replayed graph gives the eager forward's outputs for new inputs of the same
    shape, captures again for a new shape, returns results that stay valid after the next call, sees parameters
    updated in place, still rejects non-finite features, and leaves masked calls and gradients to the eager path."""
    from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel

    config = CoupledMambaConfig(modality_dims={"text": 12, "audio": 6, "vision": 9}, hidden_size=32,
                                num_hidden_layers=2, state_size=16)
    torch.manual_seed(0)
    model = CoupledMambaModel(config).to("cuda", torch.bfloat16).eval()

    def features(length, seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        feats = {n: torch.randn(3, length, d, device="cuda", generator=gen).to(torch.bfloat16)
                 for n, d in config.modality_dims.items()}
        return torch.cat(list(feats.values()), dim=-1) if packed else feats

    def run(feats, graphs):
        model.config.inference_cuda_graphs = graphs
        try:
            with torch.no_grad():
                return model(input_features=feats)
        finally:
            model.config.inference_cuda_graphs = False

    first, second, longer = features(40, 1), features(40, 2), features(56, 3)
    eager = [run(f, False) for f in (first, second, longer)]
    graphed_first = run(first, True)  # captures
    kept = graphed_first.last_hidden_state.clone()
    graphed = [graphed_first, run(second, True), run(longer, True)]  # replay, then a new capture
    assert len(model._forward_graphs) == 2
    for ours, ref in zip(graphed, eager):  # same kernels on the same inputs (cuBLAS may pick other algorithms)
        for key in ("last_hidden_state", "pooler_output", "modality_embeds"):
            assert rel(ours[key].float(), ref[key].float()) <= 5e-3, key
    assert torch.equal(graphed_first.last_hidden_state, kept)  # not overwritten by the later replays
    with torch.no_grad():  # in place, as optimizers do: the replay reads the new values
        model.norm_f["text"].weight.mul_(3.0)
    changed = run(second, True).last_hidden_state.float()
    assert rel(changed, run(second, False).last_hidden_state.float()) <= 5e-3
    assert rel(changed, graphed[1].last_hidden_state.float()) > 0.3
    bad = features(40, 4)
    if packed:
        bad[0, 3, 0] = float("nan")
    else:
        bad["audio"][0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        run(bad, True)  # a replay: the graph's own finiteness flags
    bad_new_shape = features(48, 5)
    if packed:
        bad_new_shape[2, 7, 1] = float("inf")
    else:
        bad_new_shape["vision"][2, 7, 1] = float("inf")
    with pytest.raises(ValueError, match="'vision' contain NaN or inf" if not packed else "NaN or inf"):
        run(bad_new_shape, True)  # a first call (capture): rejected before, nothing kept for its shape
    assert len(model._forward_graphs) == 2
    mask = torch.ones(3, 40, device="cuda")
    mask[1, 30:] = 0
    model.config.inference_cuda_graphs = True
    try:
        with torch.no_grad():
            masked = model(input_features=first, attention_mask=mask)
        out = model(input_features=first)  # gradients enabled: eager, with a graph
        assert out.pooler_output.requires_grad
    finally:
        model.config.inference_cuda_graphs = False
    with torch.no_grad():
        assert torch.equal(masked.pooler_output, model(input_features=first, attention_mask=mask).pooler_output)
    assert len(model._forward_graphs) == 2


def _check_layer_norm(layer_norm, device, dtype, tol):
    """The Triton LayerNorm against F.layer_norm: strided 3-D slices read in place, 2-D and 4-D inputs, widths that
    are not powers of two or span several rows per program, with and without weight / bias."""
    gen = torch.Generator(device=device).manual_seed(0)
    stream = torch.randn(4, 3, 37, 48, device=device, generator=gen).to(dtype) * 3 + 1  # (batch, M, L, hidden)
    cases = [stream[:, 1], stream.reshape(-1, 48), stream, torch.randn(5, 7, 100, device=device, generator=gen)
             .to(dtype), torch.randn(9, 1, device=device, generator=gen).to(dtype)]
    for x in cases:
        hidden = x.shape[-1]
        weight = torch.randn(hidden, device=device, generator=gen).to(dtype)
        bias = torch.randn(hidden, device=device, generator=gen).to(dtype)
        for w, b in ((weight, bias), (weight, None), (None, None)):
            out = layer_norm(x, w, b, 1e-5)
            ref = torch.nn.functional.layer_norm(x.float(), (hidden,), None if w is None else w.float(),
                                                 None if b is None else b.float(), 1e-5)
            assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
            torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_layer_norm_matches_torch(dtype):
    """kernels/layer_norm against F.layer_norm, and CoupledMambaLayerNorm: the kernel without gradients, PyTorch's
    (differentiable) path with them, the same values either way."""
    from multimodal_mamba.kernels.layer_norm import layer_norm_triton
    from multimodal_mamba.modeling.modeling_coupled_mamba import CoupledMambaLayerNorm

    _check_layer_norm(layer_norm_triton, "cuda", dtype, 1e-5 if dtype == torch.float32 else 2e-2)
    norm = CoupledMambaLayerNorm(256).to("cuda", dtype)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(8, 3, 40, 256, device="cuda", dtype=dtype)[:, 2]
    with torch.no_grad():
        fast = norm(x)
    x.requires_grad_(True)
    slow = norm(x)
    slow.sum().backward()
    assert x.grad is not None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.float(), slow.detach().float(), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_forward_graph_captures_keep_little_per_shape():
    """Each new input shape captures a graph; what stays allocated afterwards is its static inputs and outputs, not a
    cuBLAS workspace for a fresh warm-up stream per capture (32 MiB each on an H200 before the warm-up stream was made
    persistent)."""
    from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel

    config = CoupledMambaConfig(modality_dims={"text": 12, "audio": 6, "vision": 9}, hidden_size=32,
                                num_hidden_layers=2, state_size=16, inference_cuda_graphs=True)
    torch.manual_seed(0)
    model = CoupledMambaModel(config).to("cuda", torch.bfloat16).eval()
    kept = []
    for length in (24, 32, 40, 48):
        feats = {n: torch.randn(2, length, d, device="cuda", dtype=torch.bfloat16) for n, d in config.modality_dims.items()}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            model(input_features=feats)
        torch.cuda.synchronize()
        kept.append(torch.cuda.memory_allocated() - base)
    assert len(model._forward_graphs) == 4
    # the first capture may create the process's warm-up and branch streams' workspaces; later ones reuse them
    assert max(kept[1:]) < 4 * 2**20, kept


@pytest.mark.gpu
def test_gpu_coupled_mamba_inference_in_chunks():
    """config.inference_chunk_size on CUDA (the Triton coupled scan and conv, states carried between chunks): the
    same outputs as the whole forward (with and without padding, eager and as a CUDA graph) at a fraction of its
    peak memory (length 8 x the chunk)."""
    from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel

    config = CoupledMambaConfig(modality_dims={"text": 12, "audio": 6, "vision": 9}, hidden_size=64,
                                num_hidden_layers=2, state_size=16)
    torch.manual_seed(0)
    model = CoupledMambaModel(config).to("cuda", torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    feats = {n: torch.randn(4, 512, d, device="cuda", generator=gen).to(torch.bfloat16)
             for n, d in config.modality_dims.items()}
    mask = torch.ones(4, 3, 512, device="cuda")
    mask[1, 0, 300:] = 0
    mask[2, 2, :70] = 0

    def run(chunk, graphs=False, attention_mask=None, keep_last=True):
        model.config.inference_chunk_size, model.config.inference_cuda_graphs = chunk, graphs
        try:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), ssm_backend("triton"):
                out = model(input_features=feats, attention_mask=attention_mask, return_last_hidden_state=keep_last)
            torch.cuda.synchronize()
            return out, torch.cuda.max_memory_allocated() - base
        finally:
            model.config.inference_chunk_size, model.config.inference_cuda_graphs = None, False

    run(64)  # builds the kernels first: their one-time allocations do not count below
    whole, whole_peak = run(None)
    chunked, chunked_peak = run(64)
    assert last_backend("coupled_selective_scan") == "triton"
    for key in ("last_hidden_state", "pooler_output", "modality_embeds"):
        assert rel(chunked[key].float(), whole[key].float()) <= 5e-3, key
    assert chunked_peak < 0.4 * whole_peak, (chunked_peak, whole_peak)
    # without the (batch, M, L, hidden) final states the chunked forward holds one chunk's activations only
    lean, lean_peak = run(64, keep_last=False)
    assert lean.last_hidden_state is None and rel(lean.pooler_output.float(), whole.pooler_output.float()) <= 5e-3
    final_states_bytes = whole.last_hidden_state.numel() * whole.last_hidden_state.element_size()
    assert lean_peak <= chunked_peak - 0.9 * final_states_bytes, (lean_peak, chunked_peak, final_states_bytes)
    from multimodal_mamba.modeling import forward_graphs

    forward_graphs._BRANCH_STREAMS.clear()
    graphed = [run(64, graphs=True)[0] for _ in range(2)]  # capture, then replay
    assert len(model._forward_graphs) == 1
    # the capture put the modalities' branches on their own streams (concurrent at replay)
    assert len(forward_graphs._BRANCH_STREAMS.get(torch.device("cuda", torch.cuda.current_device()), [])) == 2
    model._forward_graphs.clear()
    for out in graphed:
        assert rel(out.last_hidden_state.float(), whole.last_hidden_state.float()) <= 5e-3
        assert rel(out.pooler_output.float(), whole.pooler_output.float()) <= 5e-3
    graphed_lean = [run(64, graphs=True, keep_last=False)[0] for _ in range(2)]
    model._forward_graphs.clear()
    for out in graphed_lean:
        assert out.last_hidden_state is None and rel(out.pooler_output.float(), whole.pooler_output.float()) <= 5e-3
    masked_whole, masked_chunked = run(None, attention_mask=mask)[0], run(64, attention_mask=mask)[0]
    for key in ("last_hidden_state", "pooler_output"):
        assert rel(masked_chunked[key].float(), masked_whole[key].float()) <= 5e-3, key


# ----------------------------------------------------------------------------------------------------------------
# GPU: causal conv and the decode steps
# ----------------------------------------------------------------------------------------------------------------
# (batch, dim, L, W, initial_state, activation, time_major)
CONV_SHAPES = [
    (2, 64, 1, 4, False, "silu", True),
    (2, 64, 37, 4, True, "silu", True),
    (1, 48, 300, 3, False, None, False),
    (3, 32, 129, 2, True, "silu", False),
    (1, 24, 1000, 4, True, "silu", True),
    (2, 13, 50, 5, True, None, False),  # width 5, odd dim: triton and torch only
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_gpu_causal_conv1d_matches_reference(backend, dtype, shape):
    _backend_or_skip("causal_conv1d", backend)
    batch, dim, length, width, with_init, activation, time_major = shape
    gen = torch.Generator(device="cpu").manual_seed(_seed(shape))
    x = torch.randn(batch, length, dim, generator=gen).transpose(1, 2) if time_major else torch.randn(
        batch, dim, length, generator=gen)
    tensors = [x.to(dtype), torch.randn(dim, width, generator=gen).to(dtype), torch.randn(dim, generator=gen).to(dtype),
               torch.randn(batch, dim, width - 1, generator=gen).to(dtype) if with_init else None]
    tensors = [t.cuda() if t is not None else None for t in tensors]
    ours, ref = clone_leaves(tensors), clone_leaves(tensors)
    if backend == "mamba_ssm" and not ops_mamba_ssm.accepts_causal_conv1d(*ours[:3], initial_state=ours[3],
                                                                          activation=activation):
        pytest.skip("outside what causal-conv1d supports (its accepts declines it)")
    with ssm_backend(backend):
        y = causal_conv1d(ours[0], ours[1], ours[2], initial_state=ours[3], activation=activation)
    y_ref = causal_conv1d_ref(ref[0], ref[1], ref[2], initial_state=ref[3], activation=activation)
    assert last_backend("causal_conv1d") == backend
    assert rel(y, y_ref) <= TOL[dtype]
    g = torch.randn(y_ref.shape, generator=gen).to(y.device)
    (y.float() * g).sum().backward()
    (y_ref.float() * g).sum().backward()
    for a, b in zip(ours, ref):
        if a is not None:
            assert rel(a.grad, b.grad) <= GRAD_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_conv_state_out_and_overwrite(dtype):
    """On the GPU the conv writes over x only where (channel block, batch) programs fill the GPU (a Coupled Mamba
    chunk: batch 32, dim 512), else into a new tensor; both write the conv state and equal the reference."""
    from multimodal_mamba.kernels.causal_conv1d import fused
    from multimodal_mamba.kernels.utils import sm_count

    def in_place(shape):
        batch, dim = shape[:2]
        return -(-dim // fused.IN_PLACE_BLOCK_D) * batch >= 2 * sm_count()

    shapes = [(32, 512, 167, 4, True), (32, 512, 100, 4, False), (64, 512, 3, 4, True), (1, 512, 300, 4, True),
              (2, 1536, 77, 4, False)]
    assert in_place(shapes[0]) and not in_place(shapes[3])  # (both paths run)
    check_conv_state_and_overwrite(fused.causal_conv1d_triton, "cuda", dtype, shapes, TOL[dtype], in_place)
    x = torch.randn(32, 100, 1024, device="cuda", dtype=dtype).transpose(1, 2)[:, :512]
    weight = torch.randn(512, 4, device="cuda", dtype=dtype)
    state = torch.empty(32, 512, 4, device="cuda", dtype=dtype)
    with ssm_backend("triton"):
        causal_conv1d(x, weight, conv_state_out=state, overwrite_x=True)
    assert last_backend("causal_conv1d") == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64, 16, None), (4, 96, 16, 3), (3, 40, 5, None), (2, 512, 64, 2)], ids=str)
def test_gpu_selective_state_update_matches_reference(backend, dtype, shape):
    _backend_or_skip("selective_state_update", backend)
    batch, dim, state, groups = shape
    gen = torch.Generator(device="cpu").manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=gen).cuda()  # noqa: E731
    bc = (batch, state) if groups is None else (batch, groups, state)
    h = rand(batch, dim, state)
    args = [rand(batch, dim).to(dtype), (rand(batch, dim) - 1).to(dtype), -torch.exp(rand(dim, state) * 0.5),
            rand(*bc).to(dtype), rand(*bc).to(dtype)]
    kwargs = dict(D=rand(dim), z=rand(batch, dim).to(dtype), dt_bias=rand(dim) * 0.3, dt_softplus=True)
    if backend == "mamba_ssm" and not ops_mamba_ssm.accepts_selective_state_update(h, *args, **kwargs):
        pytest.skip("outside what mamba-ssm's decode step supports (its accepts declines it)")
    h_ours, h_ref = h.clone(), h.clone()
    with torch.no_grad():
        with ssm_backend(backend):
            y = selective_state_update(h_ours, *args, **kwargs)
        y_ref = selective_state_update_ref(h_ref, *args, **kwargs)
    assert last_backend("selective_state_update") == backend
    assert rel(y, y_ref) <= TOL[dtype] and rel(h_ours, h_ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64, 4), (4, 96, 3), (2, 40, 2), (3, 512, 4)], ids=str)
def test_gpu_causal_conv1d_update_matches_reference(backend, dtype, shape):
    _backend_or_skip("causal_conv1d_update", backend)
    batch, dim, width = shape
    gen = torch.Generator(device="cpu").manual_seed(4)
    rand = lambda *s: torch.randn(*s, generator=gen).cuda().to(dtype)  # noqa: E731
    x, state, weight, bias = rand(batch, dim), rand(batch, dim, width), rand(dim, width), rand(dim)
    s_ours, s_ref = state.clone(), state.clone()
    with torch.no_grad():
        with ssm_backend(backend):
            y = causal_conv1d_update(x, s_ours, weight, bias, activation="silu")
        y_ref = causal_conv1d_update_ref(x, s_ref, weight, bias, activation="silu")
    assert last_backend("causal_conv1d_update") == backend
    assert rel(y, y_ref) <= TOL[dtype] and torch.equal(s_ours, s_ref)


# ----------------------------------------------------------------------------------------------------------------
# GPU: whole models across backends, LoRA on the fused path, generation
# ----------------------------------------------------------------------------------------------------------------
def _lm(dtype=torch.float32, seed=0, **overrides):
    from transformers import MambaConfig

    from multimodal_mamba import MambaCausalLM

    config = MambaConfig(**{**dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, state_size=16), **overrides})
    torch.manual_seed(seed)
    return MambaCausalLM(config).to(device="cuda", dtype=dtype)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _run_backend(model, backend, fn):
    model.zero_grad(set_to_none=True)
    with ssm_backend(backend):
        out = fn(model)
    out.backward()
    return out.detach(), _grads(model)


def _compare_backends(model, fn, backends, tol, grad_tol):
    ref_out, ref_grads = _run_backend(model, "reference", fn)
    for backend in backends:
        out, grads = _run_backend(model, backend, fn)
        assert rel(out, ref_out) <= tol, (backend, rel(out, ref_out))
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            assert rel(grads[name], ref_grads[name]) <= grad_tol, (backend, name, rel(grads[name], ref_grads[name]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_mamba_lm_forward_backward_equal_across_backends(dtype):
    model = _lm(dtype)
    ids = torch.randint(0, 97, (2, 150), device="cuda")
    backends = [b for b in FUSED if b in available_backends("selective_scan")]

    def fn(m):
        return m(ids, labels=ids, use_cache=False).loss

    _compare_backends(model, fn, backends, 1e-4 if dtype == torch.float32 else 2e-2,
                      1e-3 if dtype == torch.float32 else 8e-2)


@pytest.mark.gpu
def test_gpu_deep_mamba_lm_float32_logits_equal_across_backends():
    """A deep model with transformers' default (hot) init in float32: every backend's logits within 1e-4 of the
    sequential reference's, so that a per-layer discrepancy cannot hide behind bf16 noise (gpu_parity.md: in bf16
    such a model amplifies rounding to O(1) differences between any two paths)."""
    model = _lm(torch.float32, seed=5, hidden_size=256, num_hidden_layers=16, vocab_size=500).eval()
    ids = torch.randint(0, 500, (1, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), ssm_backend("reference"):
        ref = model(ids, use_cache=False).logits[0, -8:]
    for backend in [b for b in FUSED if b in available_backends("selective_scan")]:
        with torch.no_grad(), ssm_backend(backend):
            out = model(ids, use_cache=False).logits[0, -8:]
        assert rel(out, ref) <= 1e-4, (backend, rel(out, ref))


@pytest.mark.gpu
def test_gpu_vl_mamba_forward_backward_equal_across_backends():
    from multimodal_mamba.tiny import build_tiny_vl_mamba, random_image

    for scan_type in ("bidirectional", "cross"):
        model, processor = build_tiny_vl_mamba(["what", "color"], projector_type="vss_l2", scan_type=scan_type)
        model = model.cuda().train()
        inputs = processor(text=["<image> what color ?"], images=[random_image(0)], return_tensors="pt")
        inputs = {k: v.cuda() for k, v in inputs.items()}

        def fn(m):
            return m(**inputs, labels=inputs["input_ids"]).loss

        backends = [b for b in FUSED if b in available_backends("selective_scan")]
        _compare_backends(model, fn, backends, 1e-4, 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("coupling", ["mean", "none"])
def test_gpu_coupled_mamba_forward_backward_equal_across_backends(coupling):
    from multimodal_mamba import CoupledMambaConfig, CoupledMambaForSequenceClassification

    config = CoupledMambaConfig(modality_dims={"text": 12, "audio": 6, "vision": 9}, hidden_size=32,
                                num_hidden_layers=2, state_size=8, coupling=coupling)
    torch.manual_seed(0)
    model = CoupledMambaForSequenceClassification(config).cuda().train()
    feats = {name: torch.randn(2, 60, d, device="cuda") for name, d in config.modality_dims.items()}
    labels = torch.randn(2, device="cuda")

    def fn(m):
        return m(input_features=feats, labels=labels).loss

    _compare_backends(model, fn, ["triton", "torch"], 1e-4, 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "mamba_ssm"])
def test_gpu_lora_on_all_mixer_projections_gets_gradients_on_fused_path(backend):
    """LoRA on in_proj, x_proj, dt_proj and out_proj of VL-Mamba's LM: every adapter trains on the fused path
    (transformers' own fused Mamba path passes raw weights, and LoRA on x_proj / dt_proj / out_proj trains nothing)."""
    _backend_or_skip("selective_scan", backend)
    from peft import get_peft_model

    from multimodal_mamba.tiny import build_tiny_vl_mamba, random_image
    from multimodal_mamba.training import vl_mamba_lora_config

    model, processor = build_tiny_vl_mamba(["what", "color"], projector_type="vss_l2")
    peft_model = get_peft_model(model.cuda().train(), vl_mamba_lora_config(r=4, init_lora_weights=False))
    inputs = processor(text=["<image> what color ?"], images=[random_image(0)], return_tensors="pt")
    inputs = {k: v.cuda() for k, v in inputs.items()}
    with ssm_backend(backend):
        loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
    assert last_backend("selective_scan") == backend
    loss.backward()
    seen = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name and "language_model" in name:
            proj = next(p for p in ("in_proj", "x_proj", "dt_proj", "out_proj") if f".{p}." in name)
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            seen[proj] = seen.get(proj, 0) + 1
    assert set(seen) == {"in_proj", "x_proj", "dt_proj", "out_proj"}


@pytest.mark.gpu
def test_gpu_greedy_generation_equal_across_backends():
    model = _lm(torch.float32, seed=3).eval()
    ids = torch.randint(0, 97, (2, 12), device="cuda")
    outputs = {}
    for backend in [b for b in FUSED if b in available_backends("selective_scan")]:
        with ssm_backend(backend):
            outputs[backend] = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert last_backend("selective_state_update") == backend
    first = next(iter(outputs.values()))
    for backend, out in outputs.items():
        assert torch.equal(out, first), backend


# ----------------------------------------------------------------------------------------------------------------
# CPU: the Triton kernels through Triton's interpreter (small shapes)
# ----------------------------------------------------------------------------------------------------------------
# The interpreter must be switched on before Triton is first imported, so these tests run in a child pytest process
# started with TRITON_INTERPRET=1 (``test_interpreter_kernels``); in this process they only run inside that child.
_CHILD = os.environ.get("MULTIMODAL_MAMBA_INTERPRETER_CHILD") == "1"
interpreter = pytest.mark.skipif(not _CHILD, reason="runs inside test_interpreter_kernels' child process")


@pytest.mark.skipif(HAS_CUDA or not HAS_TRITON or _CHILD, reason="needs Triton and no CUDA device")
def test_interpreter_kernels():
    """Every ``test_interpreter_*`` test below, in a child process with TRITON_INTERPRET=1 (about 30 s)."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", MULTIMODAL_MAMBA_INTERPRETER_CHILD="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreter_"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.fixture(scope="module")
def interpreted():
    """The kernel modules (imported in the child process, where TRITON_INTERPRET=1 from the start)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    return {
        "selective_scan": importlib.import_module("multimodal_mamba.kernels.selective_scan.fused"),
        "coupled_scan": importlib.import_module("multimodal_mamba.kernels.coupled_scan.fused"),
        "causal_conv1d": importlib.import_module("multimodal_mamba.kernels.causal_conv1d.fused"),
        "state_update": importlib.import_module("multimodal_mamba.kernels.state_update.fused"),
    }


@interpreter
def test_interpreter_layer_norm():
    fused = importlib.import_module("multimodal_mamba.kernels.layer_norm.fused")
    _check_layer_norm(fused.layer_norm_triton, "cpu", torch.float32, 1e-5)


@interpreter
@pytest.mark.parametrize("shape", [
    (2, 8, 20, 4, None, False, True, True, True, True),
    (1, 8, 37, 3, 2, True, True, True, True, True),
    (2, 6, 9, 4, 2, False, False, False, True, False),  # 3 channels per group: per-row groups
    (1, 4, 1, 4, None, True, True, True, False, True),
], ids=str)
def test_interpreter_selective_scan(interpreted, shape):
    batch, dim, length, state, groups, time_major, with_z, with_d, with_bias, with_h0 = shape
    fused = interpreted["selective_scan"]
    inputs = scan_inputs(batch, dim, length, state, groups, torch.float32, time_major, with_z, with_d, with_bias,
                         with_h0, device="cpu")
    check_scan(fused.selective_scan_triton, inputs, torch.float32)


@interpreter
@pytest.mark.parametrize("save_mode", [1, 0], ids=["uniform-pointer-saves", "tile-saves"])
def test_interpreter_selective_scan_several_chunks_and_partials(interpreted, save_mode, monkeypatch):
    """Several chunks, states saved mid-chunk for the backward in both forward save modes (FWD_SAVE_MODE; 0 is the
    earlier store, kept for bench_gpu_selective_scan.py's --saves comparison), atomics into shared partials."""
    fused = interpreted["selective_scan"]
    monkeypatch.setattr(fused, "FWD_SAVE_MODE", save_mode)
    monkeypatch.setattr(fused, "FWD_CONFIGS", {"lmajor": (4, 16, 4, True), "tmajor": (4, 16, 4, False)})
    monkeypatch.setattr(fused, "BWD_CONFIGS", {"lmajor": (4, 32, 4, False), "tmajor": (4, 16, 4, False)})
    check_scan(fused.selective_scan_triton, scan_inputs(2, 8, 50, 4, device="cpu"), torch.float32)
    # forward chunks longer than the backward's: it saves states mid-chunk
    monkeypatch.setattr(fused, "FWD_CONFIGS", {"lmajor": (4, 32, 4, False), "tmajor": (8, 32, 4, False)})
    monkeypatch.setattr(fused, "BWD_CONFIGS", {"lmajor": (4, 16, 4, False), "tmajor": (8, 16, 4, False)})
    check_scan(fused.selective_scan_triton, scan_inputs(1, 8, 70, 3, 2, time_major=True, device="cpu", seed=3),
               torch.float32)
    monkeypatch.setattr(fused, "PARTIALS_MAX_BYTES", 1)  # atomics into one partial
    check_scan(fused.selective_scan_triton, scan_inputs(1, 12, 33, 2, time_major=True, device="cpu", seed=5),
               torch.float32)


@interpreter
@pytest.mark.parametrize("partials", [1, 16, 37])
def test_interpreter_selective_scan_bc_partials_sum(interpreted, partials):
    """The backward's epilogue: dB and dC partials summed in one launch (tiles of up to 16 partials, so 37 takes
    three tiles, the last one masked), cast to B's and C's dtype, or to each one's own when they differ."""
    fused = interpreted["selective_scan"]
    gen = torch.Generator().manual_seed(partials)
    part = torch.randn(2, partials, 2, 3, 4, 45, generator=gen)  # (dB / dC, partials, batch, G, N, L)
    dB, dC = fused._sum_bc_partials(part, torch.float32, torch.float32)
    torch.testing.assert_close(dB, part[0].sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dC, part[1].sum(0), rtol=1e-5, atol=1e-5)
    dB, dC = fused._sum_bc_partials(part, torch.float32, torch.float64)
    assert dB.dtype == torch.float32 and dC.dtype == torch.float64
    torch.testing.assert_close(dC, part[1].sum(0).double(), rtol=1e-5, atol=1e-5)


@interpreter
def test_interpreter_selective_scan_softplus_sigmoid(interpreted):
    """The scan kernels' softplus / sigmoid formulas (series for log1p near 0, log2 above; reciprocal) to < 5e-6 (the
    libdevice formula they replace fails this: 0.16 off near x = -15)."""
    assert _scan_fused is interpreted["selective_scan"]
    _check_scan_pointwise_math("cpu", 1)


@interpreter
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "nofold"])
def test_interpreter_selective_scan_forward_carry_variants(interpreted, fold, monkeypatch):
    """The forward's carried state folded into the first drive or added after the scan (FWD_FOLD_H / BWD_FOLD_H), and
    without saves passed on by a warp sum (FWD_CARRY_SUM) or a masked store: several chunks, with and without grads,
    an odd N."""
    fused = interpreted["selective_scan"]
    monkeypatch.setattr(fused, "FWD_FOLD_H", fold)
    monkeypatch.setattr(fused, "BWD_FOLD_H", fold)
    monkeypatch.setattr(fused, "FWD_CONFIGS", {"lmajor": (4, 16, 4, False), "tmajor": (4, 16, 4, False)})
    monkeypatch.setattr(fused, "BWD_CONFIGS", {"lmajor": (4, 16, 4, False), "tmajor": (4, 16, 4, False)})
    for carry_sum in (True, False):
        monkeypatch.setattr(fused, "FWD_CARRY_SUM", carry_sum)
        inputs = scan_inputs(2, 8, 50, 5, device="cpu", seed=11)
        check_scan(fused.selective_scan_triton, inputs, torch.float32)
        y_ref, h_ref = run_scan(selective_scan_ref, inputs)
        with torch.no_grad():
            y, h = run_scan(fused.selective_scan_triton, inputs)
        assert rel(y, y_ref) <= TOL[torch.float32] and rel(h, h_ref) <= TOL[torch.float32] * 10


@interpreter
@pytest.mark.parametrize("variant", [((False, False, False, False), 2), ((True, True, False, True), 2)], ids=str)
def test_interpreter_selective_scan_backward_variants(interpreted, variant, monkeypatch):
    """The backward kernel's variants other than the default, several chunks, atomics into shared partials."""
    fused = interpreted["selective_scan"]
    monkeypatch.setattr(fused, "BWD_OPTS", variant[0])
    monkeypatch.setattr(fused, "BWD_BC_MODE", variant[1])
    monkeypatch.setattr(fused, "BWD_CONFIGS", {"lmajor": (4, 16, 4, False), "tmajor": (4, 16, 4, True)})
    monkeypatch.setattr(fused, "PARTIALS_MAX_BYTES", 1)
    check_scan(fused.selective_scan_triton, scan_inputs(2, 8, 50, 4, device="cpu"), torch.float32)
    check_scan(fused.selective_scan_triton, scan_inputs(1, 8, 37, 3, 2, time_major=True, device="cpu", seed=3),
               torch.float32)
    check_scan(fused.selective_scan_triton, scan_inputs(1, 4, 1, 4, device="cpu", seed=4), torch.float32)


@interpreter
@pytest.mark.parametrize("coupling", ["mean", "sum"])
def test_interpreter_coupled_scan(interpreted, coupling, monkeypatch):
    fused = interpreted["coupled_scan"]
    monkeypatch.setattr(fused, "FWD_CONFIGS", {"lmajor": (4, 16, 4), "tmajor": (4, 16, 4)})
    monkeypatch.setattr(fused, "BWD_CONFIGS", {"lmajor": (4, 16, 4), "tmajor": (4, 16, 4)})
    check_coupled(fused.coupled_selective_scan_triton,
                  coupled_inputs(2, 3, 8, 21, 4, device="cpu", dt_shift=0.5 if coupling == "sum" else -1.0),
                  torch.float32, coupling)
    check_coupled(fused.coupled_selective_scan_triton,
                  coupled_inputs(1, 2, 4, 5, 3, time_major=True, with_h0=False, device="cpu", seed=1),
                  torch.float32, coupling)


@interpreter
def test_interpreter_causal_conv1d_and_decode_steps(interpreted):
    conv = interpreted["causal_conv1d"]
    step = interpreted["state_update"]
    gen = torch.Generator().manual_seed(0)
    for batch, dim, length, width, with_init, activation, time_major in [
        (2, 8, 20, 4, True, "silu", False), (1, 5, 3, 2, False, None, True), (2, 7, 1, 3, True, "silu", True),
    ]:
        x = torch.randn(batch, length, dim, generator=gen).transpose(1, 2) if time_major else torch.randn(
            batch, dim, length, generator=gen)
        tensors = [x, torch.randn(dim, width, generator=gen), torch.randn(dim, generator=gen),
                   torch.randn(batch, dim, width - 1, generator=gen) if with_init else None]
        ours, ref = clone_leaves(tensors), clone_leaves(tensors)
        y = conv.causal_conv1d_triton(*ours[:3], initial_state=ours[3], activation=activation)
        y_ref = causal_conv1d_ref(*ref[:3], initial_state=ref[3], activation=activation)
        assert rel(y, y_ref) <= 1e-5
        g = torch.randn(y_ref.shape, generator=gen)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        for a, b in zip(ours, ref):
            if a is not None:
                assert rel(a.grad, b.grad) <= 1e-5
    x, state, weight, bias = (torch.randn(3, 6, generator=gen), torch.randn(3, 6, 4, generator=gen),
                              torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen))
    s_ours, s_ref = state.clone(), state.clone()
    y = conv.causal_conv1d_update_triton(x, s_ours, weight, bias, "silu")
    assert rel(y, causal_conv1d_update_ref(x, s_ref, weight, bias, "silu")) <= 1e-5 and torch.equal(s_ours, s_ref)
    h = torch.randn(2, 6, 5, generator=gen)
    args = [torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen), -torch.rand(6, 5, generator=gen),
            torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)]
    kwargs = dict(D=torch.randn(6, generator=gen), z=torch.randn(2, 6, generator=gen),
                  dt_bias=torch.randn(6, generator=gen), dt_softplus=True)
    h_ours, h_ref = h.clone(), h.clone()
    y = step.selective_state_update_triton(h_ours, *args, **kwargs)
    y_ref = selective_state_update_ref(h_ref, *args, **kwargs)
    assert rel(y, y_ref) <= 1e-5 and rel(h_ours, h_ref) <= 1e-5


def check_conv_state_and_overwrite(conv_fn, device, dtype, shapes, tol, expect_in_place=None):
    """``conv_fn`` (the Triton conv) with conv_state_out and overwrite_x on in_proj-like halves (x: the first half of
    time-major (batch, L, 2 dim) memory): y equals the reference of the original x, the state is the last W inputs,
    the other half is untouched; ``expect_in_place(shape)`` says whether y must be x itself."""
    gen = torch.Generator().manual_seed(7)
    for shape in shapes:
        batch, dim, length, width, with_init = shape
        both = torch.randn(batch, length, 2 * dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        x, other = both[:, :dim], both[:, dim:]
        weight = torch.randn(dim, width, generator=gen).to(device=device, dtype=dtype)
        bias = torch.randn(dim, generator=gen).to(device=device, dtype=dtype)
        init = torch.randn(batch, dim, width, generator=gen).to(device=device, dtype=dtype)[..., 1:] if with_init else None
        original, other_before = x.clone(), other.clone()
        state = torch.full((batch, dim, width), float("nan"), device=device, dtype=dtype)
        with torch.no_grad():
            y = conv_fn(x, weight, bias, initial_state=init, activation="silu", conv_state_out=state, overwrite_x=True)
        y_ref = causal_conv1d_ref(original.float(), weight.float(), bias.float(),
                                  initial_state=init.float() if init is not None else None, activation="silu")
        assert rel(y, y_ref) <= tol, shape
        prefix = init if init is not None else original.new_zeros(batch, dim, width - 1)
        assert torch.equal(state, torch.cat([prefix, original], -1)[..., -width:]), shape
        assert torch.equal(other, other_before), shape
        if expect_in_place is not None:
            assert (y.data_ptr() == x.data_ptr()) == expect_in_place(shape), shape
        # without overwrite_x, x is left as it was
        state_kept = torch.empty_like(state)
        with torch.no_grad():
            y_new = conv_fn(original, weight, bias, initial_state=init, activation="silu", conv_state_out=state_kept)
        assert y_new.data_ptr() != original.data_ptr() and torch.equal(state_kept, state)
        assert rel(y_new, y_ref) <= tol, shape


@interpreter
def test_interpreter_conv_state_out_and_overwrite(interpreted):
    """The conv's state output and in-place variant (the interpreter always takes it for time-major x): several
    64-step tiles walked backwards, a partial last tile, L < W, with and without an initial state."""
    shapes = [(2, 12, 150, 4, True), (1, 8, 64, 4, False), (2, 5, 2, 4, True), (1, 6, 1, 3, False), (1, 70, 9, 4, True)]
    check_conv_state_and_overwrite(interpreted["causal_conv1d"].causal_conv1d_triton, "cpu", torch.float32, shapes,
                                   1e-5, expect_in_place=lambda shape: True)


@interpreter
def test_interpreter_coupled_sequential_forward(interpreted):
    """The sequential forward kernel on its launch shapes (2 or 4 lanes per channel, chunks of 1..8 steps), every
    chain count, odd N, both layouts, saved states, against the reference."""
    from multimodal_mamba.kernels.coupled_scan import sequential

    cases = [  # (batch, M, dim, L, N, time_major, config, coupling, save_every, z, D, bias, h0)
        (2, 3, 8, 21, 4, False, (8, 1, 4), "mean", 0, True, True, True, True),
        (2, 3, 8, 21, 4, True, (8, 1, 1), "sum", 8, True, True, True, True),
        (1, 1, 16, 9, 3, False, (16, 1, 2), "mean", 4, False, True, False, True),
        (1, 2, 5, 13, 16, True, (4, 1, 2), "mean", 0, True, False, True, False),
        (2, 4, 12, 7, 8, False, (8, 1, 8), "sum", 8, True, True, True, True),
        (1, 3, 4, 1, 16, False, (4, 1, 1), "mean", 0, True, True, True, True),
        (1, 3, 40, 10, 4, True, (32, 1, 2), "mean", 4, True, True, True, False),
        # B / C rows loaded a step ahead (and the L1 prefetch, a no-op under the interpreter): chunk ends, L = 1
        (2, 3, 8, 21, 4, False, (8, 1, 4, True, True), "mean", 8, True, True, True, True),
        (1, 4, 12, 7, 8, True, (4, 1, 2, False, True), "sum", 4, True, True, True, True),
        (1, 3, 4, 1, 16, False, (4, 1, 1, True, True), "mean", 0, True, True, True, False),
        # L a multiple of K: no padded step, the look-ahead rows of the last step clamped to L - 1
        (2, 3, 8, 24, 16, False, (16, 1, 4, True, True), "mean", 8, True, True, True, True),
        (1, 3, 12, 16, 16, True, (8, 1, 4, True, True), "sum", 8, True, True, True, False),
        (1, 2, 6, 8, 4, False, (8, 1, 8), "mean", 0, False, True, False, True),
        # XLANE (K = lanes per channel: rows by shuffles, the readout reduce-scattered once per chunk; under the
        # interpreter its plain-sum emulation) and the same configs without it
        (2, 3, 12, 21, 16, True, (4, 1, 8, True, True, True), "mean", 8, True, True, True, True),
        (1, 4, 8, 19, 8, False, (4, 1, 8, True, False, True), "sum", 0, True, True, True, False),
        (2, 3, 8, 13, 16, True, (8, 1, 4, True, True, False), "mean", 4, True, True, True, True),
        (1, 2, 20, 9, 5, False, (16, 1, 2, False, True, True), "mean", 4, True, False, True, True),
        # dim and L multiples of (block_d, K): unmasked tiles (SEQ_EVEN_TILES), the last look-ahead re-reading L - 1
        (2, 3, 16, 24, 16, True, (8, 1, 4, True, True, True), "mean", 8, True, True, True, True),
        (1, 3, 16, 16, 16, False, (8, 1, 4, True, True), "sum", 8, True, True, False, True),
    ]
    _check_sequential_cases(sequential, cases)


@interpreter
def test_interpreter_coupled_sequential_forward_int64_offsets(interpreted, monkeypatch):
    """The kernel's 64-bit offset path (OFF64: taken where a batch element's offsets could pass 2^31, which small
    inputs never do, so forced here)."""
    from multimodal_mamba.kernels.coupled_scan import sequential

    monkeypatch.setattr(sequential, "_offsets_fit_int32", lambda *args: False)
    _check_sequential_cases(sequential, [
        (2, 3, 8, 21, 4, False, (8, 1, 4, True, True), "mean", 8, True, True, True, True),
        (2, 3, 12, 21, 16, True, (4, 1, 8, True, True, True), "sum", 8, True, True, True, True),
        (1, 3, 16, 16, 16, True, (8, 1, 4, True, True, True), "mean", 0, True, True, True, False),
    ])


@interpreter
def test_interpreter_coupled_prepare_bc_views(interpreted):
    """B / C packed by ``prepare_bc`` (one (batch, L, 2M, N) float32 tensor) pass into the kernel as they are, and
    give the result of packing inside the call; float32 N-contiguous rows of another layout are repacked."""
    from multimodal_mamba.kernels.coupled_scan import sequential

    inputs = coupled_inputs(2, 3, 8, 13, 16, torch.float32, True, True, False, device="cpu", seed=5)
    lists = _chain_lists(inputs, 3)
    Bs, Cs = sequential.prepare_bc(lists["Bs"], lists["Cs"])
    packed = sequential.packed_bc(Bs, Cs)
    assert packed is not None and packed.shape == (2, 13, 6, 16) and packed.is_contiguous()
    assert torch.equal(packed[:, :, 1], lists["Bs"][1].transpose(1, 2)) and torch.equal(
        packed[:, :, 3 + 2], lists["Cs"][2].transpose(1, 2))
    again = sequential.prepare_bc(Bs, Cs)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(again[0] + again[1], Bs + Cs))
    # N-contiguous float32 rows of one tensor per chain (not prepare_bc's layout): not taken as packed
    separate = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in lists["Bs"] + lists["Cs"]]
    assert sequential.packed_bc(separate[:3], separate[3:]) is None

    def run(B_list, C_list):
        return sequential.coupled_scan_fwd_seq(lists["us"], lists["deltas"], lists["zs"], inputs["A"], B_list, C_list,
                                               inputs["D"], inputs["delta_bias"], True, "mean", None,
                                               config=(8, 1, 4))[0]

    direct = run(lists["Bs"], lists["Cs"])
    assert torch.equal(run(Bs, Cs), direct) and torch.equal(run(separate[:3], separate[3:]), direct)


def _check_sequential_cases(sequential, cases):
    """Each (batch, M, dim, L, N, time_major, config, coupling, save_every, z, D, bias, h0) case of the sequential
    forward against the reference: output, final state and saved states."""
    for batch, chains, dim, length, state, time_major, config, coupling, save, with_z, with_d, with_bias, with_h0 in cases:
        inputs = coupled_inputs(batch, chains, dim, length, state, torch.float32, time_major, with_z, with_h0,
                                device="cpu", seed=dim + length, dt_shift=2.0 if coupling == "sum" else -1.0,
                                decay_shift=1.0 if coupling == "sum" else 0.0)
        D = inputs["D"] if with_d else None
        bias = inputs["delta_bias"] if with_bias else None
        lists = _chain_lists(inputs, chains)
        y, final, states = sequential.coupled_scan_fwd_seq(
            lists["us"], lists["deltas"], lists["zs"], inputs["A"], lists["Bs"], lists["Cs"], D, bias, True,
            coupling, inputs["initial_state"], save_every=save, config=config)
        y_ref, h_ref = coupled_selective_scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"],
                                                  inputs["C"], D=D, z=inputs["z"], delta_bias=bias, coupling=coupling,
                                                  initial_state=inputs["initial_state"], return_final_state=True)
        assert rel(y, y_ref) <= 1e-5 and rel(final, h_ref) <= 1e-5, (config, rel(y, y_ref), rel(final, h_ref))
        for j in range(1, triton_cdiv(length, save) if save else 0):
            _, h_j = coupled_selective_scan_ref(
                inputs["u"][..., :j * save], inputs["delta"][..., :j * save], inputs["A"],
                inputs["B"][..., :j * save], inputs["C"][..., :j * save], D=D, delta_bias=bias, coupling=coupling,
                initial_state=inputs["initial_state"], return_final_state=True)
            assert rel(states[:, :, j], h_j) <= 1e-5, (config, j)


def triton_cdiv(a, b):
    return -(-a // b)


@interpreter
def test_interpreter_pack_bc(interpreted):
    check_pack_bc("cpu")


@interpreter
def test_interpreter_coupled_chains_and_layer(interpreted, monkeypatch):
    """The chain-list entry point and a Coupled Mamba model's inference on the "triton" backend (registered for
    this test), against the reference; and the chunked forward kernel, which the sequential one replaced."""
    import copy

    from multimodal_mamba import CoupledMambaConfig, CoupledMambaModel
    from multimodal_mamba.kernels import register_backends
    from multimodal_mamba.modeling import ssm_backends
    from multimodal_mamba.modeling.ops_coupled_scan import coupled_selective_scan_chains

    fused = interpreted["coupled_scan"]
    monkeypatch.setattr(ssm_backends, "_REGISTRY", copy.copy(ssm_backends._REGISTRY))
    register_backends(ssm_backends.register_backend, ops=("coupled_selective_scan", "causal_conv1d"), force=True)
    inputs = coupled_inputs(2, 3, 6, 11, 4, device="cpu", time_major=True, seed=4)
    lists = dict(_chain_lists(inputs, 3), A=inputs["A"], D=inputs["D"], delta_bias=inputs["delta_bias"])
    with torch.no_grad(), ssm_backend("triton"):
        y, h = coupled_selective_scan_chains(lists["us"], lists["deltas"], inputs["A"], lists["Bs"], lists["Cs"],
                                             inputs["D"], zs=lists["zs"], delta_bias=inputs["delta_bias"],
                                             initial_state=inputs["initial_state"], return_final_state=True)
    assert last_backend("coupled_selective_scan") == "triton"
    y_ref, h_ref = _stacked_reference(lists, "mean", initial_state=inputs["initial_state"])
    assert rel(y, y_ref) <= 1e-5 and rel(h, h_ref) <= 1e-5
    assert all(y[:, m].transpose(1, 2).is_contiguous() for m in range(3))
    us = [u.clone() for u in lists["us"]]  # time-major, as a layer's conv outputs: y written over them
    assert all(u.stride(-2) == 1 for u in us)
    with torch.no_grad(), ssm_backend("triton"):
        ys, h = coupled_selective_scan_chains(us, lists["deltas"], inputs["A"], lists["Bs"], lists["Cs"], inputs["D"],
                                              zs=lists["zs"], delta_bias=inputs["delta_bias"],
                                              initial_state=inputs["initial_state"], return_final_state=True, outs=us)
    assert all(a is b for a, b in zip(ys, us))
    assert rel(torch.stack(ys, dim=1), y_ref) <= 1e-5 and rel(h, h_ref) <= 1e-5

    check_chains((2, 3, 8, 9, 3, "sum", True), torch.float32, ("triton", "torch"), device="cpu")
    check_chains((2, 3, 8, 12, 3, "mean", True), torch.float32, ("triton", "torch"), device="cpu")
    for coupling in ("mean", "sum"):
        check_coupled_inference(coupling, torch.float32, ("reference", "triton"), device="cpu", length=12, hidden=8,
                                state=4)
    config = CoupledMambaConfig(modality_dims={"text": 5, "audio": 3}, hidden_size=8, num_hidden_layers=2,
                                state_size=4, coupling="mean")
    torch.manual_seed(0)
    model = CoupledMambaModel(config).eval()
    feats = {name: torch.randn(2, 9, d) for name, d in config.modality_dims.items()}
    with torch.no_grad():
        with ssm_backend("triton"):
            out = model(input_features=feats).last_hidden_state
        assert last_backend("coupled_selective_scan") == "triton"
        with ssm_backend("reference"):
            ref = model(input_features=feats).last_hidden_state
    assert rel(out, ref) <= 1e-5

    monkeypatch.setattr(fused, "FWD_IMPL", "chunked")
    monkeypatch.setattr(fused, "FWD_CONFIGS", {"lmajor": (4, 16, 4), "tmajor": (4, 16, 4)})
    monkeypatch.setattr(fused, "BWD_CONFIGS", {"lmajor": (4, 16, 4), "tmajor": (4, 16, 4)})
    check_coupled(fused.coupled_selective_scan_triton, coupled_inputs(1, 3, 8, 37, 4, device="cpu", seed=2),
                  torch.float32, "mean")


@interpreter
def test_interpreter_grouped_transposes():
    """Both grouped transposes (from (batch, L, C) tensors and from the mixers' (batch, C, L) views), one launch per
    five tensors of two widths, and their shared input check."""
    transpose = importlib.import_module("multimodal_mamba.kernels.transpose.fused")
    wide, narrow = torch.randn(2, 30, 3 * 12), torch.randn(2, 30, 5 + 2 * 4)
    parts = [wide[..., :12], wide[..., 12:24], wide[..., 24:], narrow[..., 5:9], narrow[..., 9:]]
    for tensors in (parts, parts[3:], parts + parts[:3]):
        for outs in (transpose.channel_major_group(*tensors),
                     transpose.time_contiguous_group(*(t.transpose(1, 2) for t in tensors))):
            assert len(outs) == len(tensors)
            for out, part in zip(outs, tensors):
                assert out.is_contiguous() and torch.equal(out, part.transpose(1, 2))
    with pytest.raises(ValueError, match="channel_major_group: every tensor needs the same batch, length and dtype"):
        transpose.channel_major_group(parts[0], narrow[:1, :, 5:9])
    with pytest.raises(ValueError, match="time_contiguous_group: every tensor needs the same batch, length and dtype"):
        transpose.time_contiguous_group(parts[0].transpose(1, 2), narrow[:, :20, 5:9].transpose(1, 2))
