"""The opt-in "torch_compile" CPU backend (ops_selective_scan_compiled) against the references.

These tests compile with inductor. To keep their CI time small they run the scan with chunks of 4 steps instead of 32
(the chunk length is the only constant of the kernel; ragged tails and several chunks are exercised the same way) and
few distinct shapes: about a minute on 2 cores with a cold inductor cache, seconds with a warm one.
"""

import warnings

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

import multimodal_mamba.modeling.ops_selective_scan_compiled as compiled_ops
from multimodal_mamba import MambaCausalLM, last_backend, ssm_backend
from multimodal_mamba.modeling.ops_selective_scan import (
    causal_conv1d,
    causal_conv1d_ref,
    selective_scan,
    selective_scan_ref,
)
from multimodal_mamba.modeling.ssm_backends import available_backends

from test_ops_selective_scan import assert_close_scaled, make_inputs, scan_grads

compiled_ops_available = pytest.mark.skipif(not compiled_ops.compile_available(), reason="compilation failed here")


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch):
    monkeypatch.setattr(compiled_ops, "CHUNK", 4)


def compiled_scan(**kwargs):
    with ssm_backend("torch_compile"):
        out = selective_scan(**kwargs)
    return out


# (batch, dim, L, N, G, z/D/delta_bias, initial_state, time_major): L = 1, below one chunk, several chunks with a
# ragged tail; batch 2 with grouped B and C, without the optional inputs. Few distinct shapes: each (batch 1 or more,
# one group or more) class compiles the chunk once; the language model below reuses the first one (width 8, N 4).
CASES = [
    (1, 8, 1, 4, 1, True, True, True),
    (1, 8, 5, 4, 1, True, False, True),
    (1, 8, 45, 4, 1, True, True, True),
    (2, 8, 29, 4, 2, False, True, False),
    (1, 8, 16, 4, 1, True, False, True),  # whole chunks at batch 1: contiguous float32 inputs are read in place
]


@compiled_ops_available
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-L{}-N{}-G{}".format(*c[:5]))
def test_compiled_scan_matches_reference(case):
    batch, dim, length, state, groups, extras, init, time_major = case
    inputs = make_inputs(batch, dim, length, state, groups, z=extras, D=extras, delta_bias=extras,
                         initial_state=init, time_major=time_major, seed=length)
    with torch.no_grad():
        y, h = compiled_scan(**inputs, return_final_state=True)
        assert last_backend("selective_scan") == "torch_compile"
        y_ref, h_ref = selective_scan_ref(**inputs, return_final_state=True)
    assert y.shape == y_ref.shape and y.dtype == torch.float32 and h.dtype == torch.float32
    assert_close_scaled(y, y_ref, what="y")
    assert_close_scaled(h, h_ref, what="final state")
    if time_major:
        assert y.stride(1) == 1  # time-major in, time-major out


@compiled_ops_available
def test_chunk_major_copies_only_when_needed():
    contiguous = torch.randn(1, 8, 1, 3)  # (batch, L, G, F): two whole chunks of 4 steps
    assert compiled_ops._chunk_major(contiguous, 2).data_ptr() == contiguous.data_ptr()
    padded = compiled_ops._chunk_major(contiguous[:, :6], 2, float("-inf"))
    assert padded.data_ptr() != contiguous.data_ptr() and padded.shape == (2, 1, 4, 1, 3)
    assert torch.equal(padded[0, 0], contiguous[0, :4]) and torch.equal(padded[1, 0, :2], contiguous[0, 4:6])
    assert torch.isinf(padded[1, 0, 2:]).all()
    batch2 = torch.randn(2, 8, 1, 3)
    chunks = compiled_ops._chunk_major(batch2, 2)
    assert torch.equal(chunks[1, 1], batch2[1, 4:]) and chunks.is_contiguous()


@compiled_ops_available
@pytest.mark.parametrize("length", [16, 14])
def test_gate_read_in_place_from_in_proj_rows(length):
    """The mixer's gate is the second half of in_proj's (batch, L, 2 dim) output. At batch 1 and whole chunks the scan
    reads it in place (rows of 2 dim, z in their last dim elements); otherwise it copies it. Both match the reference."""
    inputs = make_inputs(1, 8, length, 4, z=True, D=True, delta_bias=True, time_major=True, seed=3)
    xz = torch.randn(1, length, 16)
    inputs["z"] = xz[..., 8:].transpose(1, 2)  # (1, 8, L): unit stride over channels, rows of 16
    chunks = max(2, -(-length // compiled_ops.CHUNK))
    rows = compiled_ops._gate_rows(inputs["z"], chunks)
    if length % compiled_ops.CHUNK == 0 and length // compiled_ops.CHUNK >= 2:
        assert rows.data_ptr() == xz.data_ptr() and rows.shape == (chunks, 1, compiled_ops.CHUNK, 1, 16)
        assert torch.equal(rows.reshape(length, 16), xz[0])
    else:
        assert rows.untyped_storage().data_ptr() != xz.untyped_storage().data_ptr() and rows.shape[-1] == 8
    with torch.no_grad():
        y, h = compiled_scan(**inputs, return_final_state=True)
        y_ref, h_ref = selective_scan_ref(**inputs, return_final_state=True)
    assert_close_scaled(y, y_ref, what="y")
    assert_close_scaled(h, h_ref, what="final state")


def test_compiled_scan_without_softplus():
    """dt of both signs: decays above and below 1."""
    inputs = make_inputs(1, 8, 45, 4, time_major=True, initial_state=True, delta_shift=0.0, seed=6)
    with torch.no_grad():
        y, h = compiled_scan(**inputs, delta_softplus=False, return_final_state=True)
        y_ref, h_ref = selective_scan_ref(**inputs, delta_softplus=False, return_final_state=True)
    assert torch.isfinite(y_ref).all()
    assert_close_scaled(y, y_ref, what="y")
    assert_close_scaled(h, h_ref, what="final state")


@compiled_ops_available
def test_compiled_scan_bfloat16():
    inputs = make_inputs(1, 8, 45, 4, time_major=True, initial_state=True, dtype=torch.bfloat16)
    with torch.no_grad():
        y, h = compiled_scan(**inputs, return_final_state=True)
        y_ref, h_ref = selective_scan_ref(**inputs, return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close_scaled(y, y_ref, rtol=1e-2, what="y")
    assert_close_scaled(h, h_ref, rtol=1e-5, what="final state")


def test_calls_that_need_gradients_run_the_chunked_scan():
    """Training keeps the eager chunked scan (and its recompute backward): no compilation, same gradients."""
    inputs = make_inputs(2, 8, 23, 4, 2, time_major=True, initial_state=True)
    y, h, grads = scan_grads(compiled_scan, inputs)
    assert last_backend("selective_scan") == "torch"
    y_ref, h_ref, grads_ref = scan_grads(selective_scan_ref, inputs)
    assert_close_scaled(y, y_ref)
    assert_close_scaled(h, h_ref)
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert_close_scaled(grads[name], grads_ref[name], rtol=2e-5, what=f"grad of {name}")


@compiled_ops_available
def test_compiled_causal_conv1d():
    gen = torch.Generator().manual_seed(0)
    batch, dim, length, width = 2, 6, 30, 4
    x = torch.randn(batch, length, 2 * dim, generator=gen)[..., :dim].transpose(1, 2)  # as the mixer passes it
    weight, bias = torch.randn(dim, width, generator=gen), torch.randn(dim, generator=gen)
    init = torch.randn(batch, dim, width - 1, generator=gen)
    for part, kwargs in ((x, {"bias": bias, "activation": "silu"}), (x, {"initial_state": init}),
                         (x[..., :3], {"bias": bias, "initial_state": init, "activation": "silu"})):
        with torch.no_grad(), ssm_backend("torch_compile"):
            out = causal_conv1d(part, weight, **kwargs)
        assert last_backend("causal_conv1d") == "torch_compile"
        torch.testing.assert_close(out, causal_conv1d_ref(part, weight, **kwargs), rtol=1e-5, atol=1e-5)


def test_exp2_inline_accuracy():
    x = torch.cat([torch.linspace(-130.0, 130.0, 100001), torch.tensor([0.0, -0.5, 0.5, 1e-8, -1e-8])])
    ours, ref = compiled_ops.exp2_inline(x), torch.exp2(x.double())
    normal = (x > -126) & (x < 127)
    rel = ((ours.double() - ref) / ref)[normal].abs().max().item()
    assert rel < 4e-7, rel  # a few float32 ulps
    assert (ours[x < -127] == 0).all() and (ours[x <= -126] < 2e-38).all()  # underflow: 0 instead of a denormal
    assert torch.isnan(compiled_ops.exp2_inline(torch.tensor([float("nan")]))).all()
    # without the upper clamp (the scan's form when dt >= 0 and A <= 0): the same values wherever x <= 127
    below = x <= 127
    assert torch.equal(compiled_ops.exp2_inline(x[below], clamp_upper=False), ours[below])


@compiled_ops_available
def test_compiled_scan_softplus_with_positive_A():
    """Some A > 0 (growing states): the scan keeps the exponential's upper clamp and still matches the reference."""
    inputs = make_inputs(1, 8, 45, 4, time_major=True, initial_state=True, seed=7)
    inputs["A"] = inputs["A"].abs() * 0.05
    with torch.no_grad():
        y, h = compiled_scan(**inputs, return_final_state=True)
        y_ref, h_ref = selective_scan_ref(**inputs, return_final_state=True)
    assert torch.isfinite(y_ref).all()
    assert_close_scaled(y, y_ref, what="y")
    assert_close_scaled(h, h_ref, what="final state")


def _lm_pair(seed=0):
    # width 8 and state 4, as the scan tests above: the compiled chunk is reused
    config = MambaConfig(vocab_size=97, hidden_size=8, expand=1, num_hidden_layers=2, state_size=4)
    torch.manual_seed(seed)
    reference = MambaForCausalLM(config).eval()
    ours = MambaCausalLM(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@compiled_ops_available
def test_language_model_on_the_compiled_backend():
    """Forcing "torch_compile" covers every op of the model (the decode steps run on its fallback, "torch"): same
    logits as transformers' MambaForCausalLM, and greedy generation gives the same tokens."""
    assert "torch_compile" in available_backends("selective_scan")
    reference, ours = _lm_pair()
    ids = torch.randint(0, 97, (1, 37))
    ours.config.ssm_backend = "torch_compile"
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        got = ours(ids, use_cache=False).logits
        assert last_backend("selective_scan") == "torch_compile"
        assert last_backend("causal_conv1d") == "torch_compile"
        assert (expected - got).abs().max() <= 1e-4
        tokens = ours.generate(ids[:, :9], max_new_tokens=5, do_sample=False)
        assert last_backend("selective_state_update") == "torch"
        assert torch.equal(tokens, reference.generate(ids[:, :9], max_new_tokens=5, do_sample=False))


def test_compile_failure_warns_once_and_runs_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(compiled_ops, "_compiled", {})
    monkeypatch.setattr(compiled_ops, "_failure", None)
    monkeypatch.setattr(compiled_ops.torch, "compile", broken_compile)
    inputs = make_inputs(1, 8, 20, 4, time_major=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = compiled_scan(**inputs)
        assert last_backend("selective_scan") == "torch"
        compiled_scan(**inputs)
    assert [str(w.message) for w in caught if "torch_compile" in str(w.message)] and len(caught) == 1
    assert not compiled_ops.compile_available()
    assert_close_scaled(y, selective_scan_ref(**inputs))
