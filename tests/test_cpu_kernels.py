"""The C++ CPU kernels (backend "cpp": the selective scan, the causal conv) against their references, and how dispatch
uses them.

The kernel is built on first use with the system C++ compiler; where none is found these tests are skipped (and the
fallback test below still runs, in a child interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from multimodal_mamba import causal_conv1d, last_backend, selective_scan, selective_scan_ref, ssm_backend
from multimodal_mamba.modeling.ops_selective_scan import causal_conv1d_ref
from multimodal_mamba.kernels import cpu as cpp
from multimodal_mamba.kernels.cpu import build

needs_cpp = pytest.mark.skipif(not cpp.available(), reason="the C++ CPU kernels cannot be built here")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(batch, dim, length, state, groups, *, extras=True, initial_state=False, layout="token", seed=0,
                delta_shift=-1.0):
    """Random float32 scan inputs. layout: "token" = (batch, dim, L) views of (batch, L, dim) memory (what the
    mixers pass); "channel" = contiguous (batch, dim, L); "strided" = views into wider buffers with gaps between
    channels and steps (neither dim nor L contiguous)."""
    gen = torch.Generator().manual_seed(seed)

    def seq(channels):
        if layout == "token":
            return torch.randn(batch, length, channels, generator=gen).transpose(1, 2)
        if layout == "channel":
            return torch.randn(batch, channels, length, generator=gen)
        wide = torch.randn(batch, 2 * length + 1, 3 * channels, generator=gen)
        return wide[:, 1::2, ::3].transpose(1, 2)

    def bc():
        if layout == "token":
            mat = torch.randn(batch, length, groups * state, generator=gen).transpose(1, 2)
        elif layout == "channel":
            mat = torch.randn(batch, groups * state, length, generator=gen)
        else:
            mat = torch.randn(batch, length, 2 * groups * state, generator=gen)[..., ::2].transpose(1, 2)
        return mat if groups == 1 else mat.unflatten(1, (groups, state))

    return {
        "u": seq(dim),
        "delta": seq(dim) * 0.5 + delta_shift,
        "A": -torch.exp(torch.randn(dim, state, generator=gen)),
        "B": bc(),
        "C": bc(),
        "D": torch.randn(dim, generator=gen) if extras else None,
        "z": seq(dim) if extras else None,
        "delta_bias": 0.1 * torch.randn(dim, generator=gen) if extras else None,
        "initial_state": torch.randn(batch, dim, state, generator=gen) if initial_state else None,
    }


def assert_close_scaled(actual, expected, rtol=1e-5, what=""):
    """|actual - expected| <= rtol * max|expected| + 1e-8 (float32 rounding relative to the tensor's scale)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-8, msg=what)


# (batch, dim, L, N, G, extras, initial_state, layout). The kernel puts 16 (AVX-512), 8 or 4 channels in a vector:
# dims 1, 5, 17 and 40 leave partial vectors, groups of 20 channels end in one; N 16 / 8 / 4 have unrolled loops,
# N 1, 5, 32 and 256 (the largest) the general one; L 1 is a single step.
SCAN_CASES = [
    (1, 1, 1, 1, 1, True, False, "token"),
    (2, 5, 9, 5, 1, False, True, "channel"),
    (1, 16, 64, 16, 1, True, True, "token"),
    (2, 17, 33, 16, 1, True, False, "strided"),
    (1, 40, 70, 8, 2, True, True, "token"),
    (3, 64, 21, 4, 4, True, True, "channel"),
    (1, 48, 129, 32, 1, False, False, "token"),
    (2, 40, 12, 16, 2, True, True, "strided"),
    (1, 24, 10, 256, 1, True, True, "channel"),
]


@needs_cpp
@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "b{}-d{}-L{}-N{}-G{}-{}".format(*c[:5], c[7]))
def test_scan_matches_reference(case, delta_softplus):
    batch, dim, length, state, groups, extras, init, layout = case
    # without softplus, delta itself is dt: keep it positive (a negative dt makes the state grow without bound)
    inputs = make_inputs(batch, dim, length, state, groups, extras=extras, initial_state=init, layout=layout,
                         seed=length, delta_shift=-1.0 if delta_softplus else 1.5)
    if not delta_softplus:
        inputs["delta"] = inputs["delta"].abs()
        if inputs["delta_bias"] is not None:
            inputs["delta_bias"] = inputs["delta_bias"].abs()
    y, h = cpp.selective_scan_cpp(**inputs, delta_softplus=delta_softplus, return_final_state=True)
    y_ref, h_ref = selective_scan_ref(**inputs, delta_softplus=delta_softplus, return_final_state=True)
    assert y.shape == (batch, dim, length) and y.dtype == torch.float32
    assert h.shape == (batch, dim, state) and h.dtype == torch.float32
    assert_close_scaled(y, y_ref, what="y")
    assert_close_scaled(h, h_ref, what="final state")
    if layout == "token" and dim > 1 and length > 1:  # y comes back in u's memory order, as the torch path returns it
        assert y.stride(1) == 1
    y_only = cpp.selective_scan_cpp(**inputs, delta_softplus=delta_softplus)
    assert torch.equal(y_only, y)


@needs_cpp
def test_scan_same_bits_on_one_or_two_threads():
    inputs = make_inputs(2, 96, 50, 16, 2, initial_state=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.selective_scan_cpp(**inputs, return_final_state=True)
        torch.set_num_threads(2)
        two = cpp.selective_scan_cpp(**inputs, return_final_state=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_cpp
def test_scan_nonfinite_inputs_as_the_reference():
    """NaN in delta poisons the same outputs as in the reference; delta -inf (softplus 0: the step is skipped) and
    huge decays (exp underflows to 0) give the reference's finite values."""
    inputs = make_inputs(1, 20, 30, 16, 1, initial_state=True)
    inputs["delta"] = inputs["delta"].clone()
    inputs["delta"][0, 3, 7] = float("nan")
    inputs["delta"][0, 5, 2] = float("-inf")
    inputs["delta"][0, 6, 4] = 60.0  # dt 60: exp(60 A) underflows for every state
    y, h = cpp.selective_scan_cpp(**inputs, return_final_state=True)
    y_ref, h_ref = selective_scan_ref(**inputs, return_final_state=True)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().any()
    assert torch.equal(h.isnan(), h_ref.isnan())
    finite = ~y_ref.isnan()
    assert_close_scaled(y[finite], y_ref[finite])


@needs_cpp
def test_dispatch_uses_cpp_for_inference_only():
    inputs = make_inputs(2, 24, 40, 16, 1, initial_state=True)
    expected = selective_scan_ref(**inputs, return_final_state=True)
    got = selective_scan(**inputs, return_final_state=True)
    assert last_backend("selective_scan") == "cpp"  # "auto" on CPU float32 without gradients
    assert_close_scaled(got[0], expected[0])
    assert_close_scaled(got[1], expected[1])

    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    selective_scan(**leaves).sum().backward()  # needs gradients: the chunked torch path
    assert last_backend("selective_scan") == "torch"
    assert leaves["u"].grad is not None

    with torch.no_grad():
        selective_scan(**leaves)
    assert last_backend("selective_scan") == "cpp"

    as_bf16 = dict(inputs, u=inputs["u"].bfloat16())
    selective_scan(**as_bf16)
    assert last_backend("selective_scan") == "torch"  # float32 only

    with ssm_backend("cpp"):  # forced: calls it does not take run on its fallback, "torch"
        selective_scan(**leaves).sum().backward()
        assert last_backend("selective_scan") == "torch"
        forced = selective_scan(**inputs)
        assert last_backend("selective_scan") == "cpp"
    assert torch.equal(forced, got[0])


@needs_cpp
@pytest.mark.parametrize("openmp", [True, False])
def test_scan_with_and_without_openmp(openmp, tmp_path, monkeypatch):
    """The kernel threads through OpenMP where the compiler has it (torch's own runtime), else through std::thread:
    both builds give the reference's results on several threads."""
    from multimodal_mamba.kernels.cpu import selective_scan as module

    flags = tuple(f for f in build.ARCH_FLAGS if ("-fopenmp" in f) == openmp)
    monkeypatch.setattr(build, "ARCH_FLAGS", flags)
    monkeypatch.setattr(build, "_libraries", {})
    monkeypatch.setattr(build, "_failures", {})
    monkeypatch.setattr(module.KERNEL, "_fn", None)
    monkeypatch.setenv("MULTIMODAL_MAMBA_CACHE", str(tmp_path))
    try:
        uses_openmp = build.library(module.SOURCE).mm_scan_openmp()
    except build.CppKernelUnavailable:
        pytest.skip(f"the compiler does not build it {'with' if openmp else 'without'} OpenMP")
    assert uses_openmp == int(openmp)
    inputs = make_inputs(2, 100, 40, 16, 2, initial_state=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, h = module.selective_scan_cpp(**inputs, return_final_state=True)
    finally:
        torch.set_num_threads(before)
    y_ref, h_ref = selective_scan_ref(**inputs, return_final_state=True)
    assert_close_scaled(y, y_ref)
    assert_close_scaled(h, h_ref)


# (batch, dim, L, width, initial_state, bias, activation, layout): L 1 and L 2 < width - 1 read the initial state
# from every tap; dims 5 and 37 leave partial vectors.
CONV_CASES = [
    (1, 16, 1, 4, True, True, "silu", "token"),
    (2, 5, 2, 4, True, False, None, "channel"),
    (1, 37, 50, 4, False, True, "silu", "strided"),
    (3, 64, 33, 2, True, True, "swish", "token"),
    (1, 24, 70, 1, False, False, None, "token"),
    (2, 40, 19, 7, True, True, "silu", "channel"),
]


@needs_cpp
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "b{}-d{}-L{}-W{}-{}".format(*c[:4], c[7]))
def test_conv_matches_reference(case):
    batch, dim, length, width, init, bias, activation, layout = case
    x = make_inputs(batch, dim, length, 1, 1, layout=layout, seed=length)["u"]
    gen = torch.Generator().manual_seed(width)
    weight = torch.randn(dim, width, generator=gen)
    b = torch.randn(dim, generator=gen) if bias else None
    state = torch.randn(batch, dim, width - 1, generator=gen) if init else None
    got = cpp.causal_conv1d_cpp(x, weight, b, state, activation)
    expected = causal_conv1d_ref(x, weight, b, state, activation)
    assert got.shape == (batch, dim, length) and got.dtype == torch.float32
    assert got.stride(1) == 1 or dim == 1  # token-major memory, as the torch path returns it
    assert_close_scaled(got, expected)


@needs_cpp
def test_conv_dispatch_and_bad_input():
    x = torch.randn(2, 40, 24).transpose(1, 2).contiguous().transpose(1, 2)
    weight, bias = torch.randn(40, 4), torch.randn(40)
    out = causal_conv1d(x, weight, bias, activation="silu")
    assert last_backend("causal_conv1d") == "cpp"
    assert_close_scaled(out, causal_conv1d_ref(x, weight, bias, activation="silu"))
    leaf = weight.clone().requires_grad_()
    causal_conv1d(x, leaf, bias, activation="silu").sum().backward()
    assert last_backend("causal_conv1d") == "torch" and leaf.grad is not None
    with pytest.raises(ValueError, match="initial_state must be"):
        causal_conv1d(x, weight, bias, initial_state=torch.zeros(2, 40, 2))
    with pytest.raises(ValueError, match="x must be"):
        cpp.causal_conv1d_cpp(x, torch.randn(39, 4))


@needs_cpp
def test_training_mode_modules_skip_the_inference_kernels():
    """A module in training mode runs the same kernels with and without gradients (what reentrant gradient
    checkpointing needs: tests/test_coupled_training.py compares its gradients); eval mode takes the C++ kernels."""
    from transformers import MambaConfig

    from multimodal_mamba import MambaCausalLM

    model = MambaCausalLM(MambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, state_size=16)).train()
    ids = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        train_logits = model(ids).logits
        assert (last_backend("selective_scan"), last_backend("causal_conv1d")) == ("torch", "torch")
        eval_logits = model.eval()(ids).logits
        assert (last_backend("selective_scan"), last_backend("causal_conv1d")) == ("cpp", "cpp")
        with ssm_backend("cpp"):  # a forced backend still applies in training mode
            model.train()(ids)
            assert last_backend("selective_scan") == "cpp"
    assert_close_scaled(eval_logits, train_logits)


def _child(code: str, **env):
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


PROBE = """
    import warnings
    import torch
    from multimodal_mamba import last_backend, selective_scan, selective_scan_ref
    torch.manual_seed(0)
    u, delta, z = torch.randn(3, 1, 16, 20).unbind(0)
    A, B, C = -torch.rand(16, 4), torch.randn(1, 4, 20), torch.randn(1, 4, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = selective_scan(u, delta, A, B, C, z=z)
        selective_scan(u, delta, A, B, C, z=z)
    ok = torch.allclose(y, selective_scan_ref(u, delta, A, B, C, z=z), atol=1e-5)
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    print("BACKEND", last_backend("selective_scan"), "CLOSE", ok, "WARNINGS", len(warned))
    print(*warned, sep="\\n")
"""


def test_no_compiler_falls_back_to_torch_with_one_warning(tmp_path):
    out = _child(PROBE, CXX=str(tmp_path / "no-such-compiler"), MULTIMODAL_MAMBA_CACHE=str(tmp_path / "cache"))
    assert "BACKEND torch CLOSE True WARNINGS 1" in out
    assert "C++ CPU selective scan is not available" in out and "no-such-compiler" in out


def test_turned_off_falls_back_to_torch_silently(tmp_path):
    out = _child(PROBE, MULTIMODAL_MAMBA_CPP="0", MULTIMODAL_MAMBA_CACHE=str(tmp_path / "cache"))
    assert "BACKEND torch CLOSE True WARNINGS 0" in out


@needs_cpp
def test_build_is_cached_for_later_processes(tmp_path):
    cache = tmp_path / "cache"
    first = _child(PROBE, MULTIMODAL_MAMBA_CACHE=str(cache))
    assert "BACKEND cpp CLOSE True WARNINGS 0" in first
    built = sorted((cache / "cpu_kernels").glob("selective_scan-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = _child(PROBE, MULTIMODAL_MAMBA_CACHE=str(cache))
    assert "BACKEND cpp CLOSE True WARNINGS 0" in second
    assert sorted((cache / "cpu_kernels").glob("*")) == built and built[0].stat().st_mtime_ns == stamp


def test_failed_build_reports_the_compiler_output(tmp_path, monkeypatch):
    """A source the compiler rejects: CppKernelUnavailable names the file and carries the compiler's error."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    monkeypatch.setenv("MULTIMODAL_MAMBA_CACHE", str(tmp_path / "cache"))
    if build.find_compiler() is None:
        pytest.skip("no C++ compiler here")
    with pytest.raises(build.CppKernelUnavailable, match="building broken.cpp"):
        build.library("broken.cpp")
    with pytest.raises(build.CppKernelUnavailable, match="building broken.cpp"):  # not retried: the same reason
        build.library("broken.cpp")
    assert not list((tmp_path / "cache" / "cpu_kernels").glob("broken-*"))  # no partial file left behind
