"""The blocked PyTorch selective scan (``ops_selective_scan_blocked``, backend "torch" on CUDA) against the sequential
reference, on CPU: forward, final state and every gradient, on small shapes that exercise groups, an initial state,
L not a multiple of the block, L = 1, several memory segments and both carries between blocks (loop and doubling)."""

from __future__ import annotations

import pytest
import torch

from multimodal_mamba.modeling import ops_selective_scan_blocked as blocked
from multimodal_mamba.modeling.ops_selective_scan import selective_scan_ref


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def make_inputs(batch, dim, length, state, groups, seed, with_h0=True, time_major=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    u = rand(batch, length, dim).transpose(1, 2) if time_major else rand(batch, dim, length)
    bc = (batch, state, length) if groups is None else (batch, groups, state, length)
    return dict(
        u=u.to(dtype), delta=rand(batch, dim, length).to(dtype), A=-(torch.rand(dim, state, generator=gen) * 3 + 0.1),
        B=rand(*bc).to(dtype), C=rand(*bc).to(dtype), D=rand(dim), z=rand(batch, dim, length).to(dtype),
        delta_bias=rand(dim) * 0.5, initial_state=rand(batch, dim, state) if with_h0 else None,
    )


CASES = [
    # (batch, dim, L, N, groups, block, segment_elements)
    (2, 8, 37, 4, None, None, None),  # L not a multiple of the block
    (1, 12, 1, 3, 3, None, None),  # L = 1, groups
    (2, 6, 100, 5, 2, 4, 1000),  # 7 segments of 4 blocks
    (1, 4, 100, 2, None, 2, None),  # 50 blocks: the doubling carry
    (3, 10, 50, 16, 5, 4, 5000),  # groups, 7 segments of 2 blocks
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_blocked_scan_matches_reference_with_gradients(case):
    batch, dim, length, state, groups, block, segment = case
    inputs = make_inputs(batch, dim, length, state, groups, seed=length)
    ours = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y, h = blocked.selective_scan_blocked(**ours, return_final_state=True, block=block, segment_elements=segment)
    y_ref, h_ref = selective_scan_ref(**ref, return_final_state=True)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5
    gen = torch.Generator().manual_seed(7)
    gy, gh = torch.randn(y.shape, generator=gen), torch.randn(h.shape, generator=gen)
    ((y * gy).sum() + (h * gh).sum()).backward()
    ((y_ref * gy).sum() + (h_ref * gh).sum()).backward()
    for name in ours:
        if ours[name] is not None:
            assert rel(ours[name].grad, ref[name].grad) < 2e-5, name
    with torch.no_grad():  # the inference path (no saved states) gives the same
        y2, h2 = blocked.selective_scan_blocked(**inputs, return_final_state=True, block=block, segment_elements=segment)
    assert rel(y2, y_ref) < 1e-5 and rel(h2, h_ref) < 1e-5


def test_blocked_scan_options_layouts_and_bf16():
    # no initial state, no z / D / bias, no softplus, contiguous (batch, dim, L) input: y keeps u's layout
    inputs = make_inputs(2, 8, 21, 4, None, seed=3, with_h0=False, time_major=False)
    for key in ("z", "D", "delta_bias", "initial_state"):
        inputs[key] = None
    inputs["delta"] = inputs["delta"].abs()
    y = blocked.selective_scan_blocked(**inputs, delta_softplus=False, block=4)
    y_ref = selective_scan_ref(**inputs, delta_softplus=False)
    assert rel(y, y_ref) < 1e-5 and y.is_contiguous()
    # bf16 inputs: output in bf16, close to the float32 reference on the same inputs
    inputs = make_inputs(1, 16, 40, 8, 2, seed=4, dtype=torch.bfloat16)
    y = blocked.selective_scan_blocked(**inputs)
    assert y.dtype == torch.bfloat16
    assert rel(y, selective_scan_ref(**inputs)) < 1e-2
    # L = 0
    empty = make_inputs(1, 4, 0, 2, None, seed=5)
    y, h = blocked.selective_scan_blocked(**empty, return_final_state=True)
    assert y.shape == (1, 4, 0) and torch.equal(h, empty["initial_state"])


def test_blocked_scan_wide_decays_stay_finite():
    # dt |A| of hundreds per step (as in a hot random init): products of decays only, nothing overflows
    inputs = make_inputs(1, 8, 64, 16, None, seed=6)
    inputs["delta"] = inputs["delta"] * 40
    inputs["A"] = inputs["A"] * 10
    y, h = blocked.selective_scan_blocked(**inputs, return_final_state=True, block=8)
    y_ref, h_ref = selective_scan_ref(**inputs, return_final_state=True)
    assert torch.isfinite(y).all() and rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


def test_segment_bounds_cover_the_sequence_in_whole_blocks():
    for length, row, block, cap in [(64, 10, 4, 100), (2048, 81920, 16, 1 << 26), (16, 5, 16, 1), (96, 1, 8, 1 << 20)]:
        bounds = blocked._segment_bounds(length, row, block, cap)
        assert bounds[0][0] == 0 and bounds[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all((end - start) % block == 0 for start, end in bounds)
        assert all((end - start) * row <= max(cap, block * row) for start, end in bounds)


def test_causal_conv1d_float32_accumulates_once():
    """The CUDA "torch" conv: bf16 in and out, float32 inside; at least as close to the float32 conv as the
    bf16 shifted adds, and equal to the float32 computation rounded once."""
    from multimodal_mamba.modeling.ops_selective_scan import causal_conv1d_ref, causal_conv1d_shifted

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 300, 64, generator=gen).transpose(1, 2).to(torch.bfloat16)
    weight = torch.randn(64, 4, generator=gen).to(torch.bfloat16)
    bias = torch.randn(64, generator=gen).to(torch.bfloat16)
    state = torch.randn(2, 64, 3, generator=gen).to(torch.bfloat16)
    exact = causal_conv1d_ref(x.float(), weight.float(), bias.float(), state.float(), activation="silu")
    ours = blocked.causal_conv1d_float32(x, weight, bias, initial_state=state, activation="silu")
    shifted = causal_conv1d_shifted(x, weight, bias, initial_state=state, activation="silu")
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, exact.to(torch.bfloat16)) or rel(ours, exact) <= 1.01 * rel(exact.to(torch.bfloat16), exact)
    assert rel(ours, exact) <= rel(shifted, exact)
