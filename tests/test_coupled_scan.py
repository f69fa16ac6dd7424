"""The coupled selective scan: the chunked PyTorch path against the sequential reference (forward, final state,
gradients, float32 / bfloat16), its reductions to the plain selective scan, overflow detection, memory, errors."""

import pytest
import torch

from multimodal_mamba import (
    CoupledScanOverflowError,
    coupled_selective_scan,
    coupled_selective_scan_ref,
    last_backend,
    selective_scan_ref,
    ssm_backend,
)
from multimodal_mamba.modeling.ops_coupled_scan import coupled_selective_scan_chunked, diagonal_recurrence


def make_inputs(batch, chains, dim, length, state, dtype=torch.float32, seed=0, dt_shift=0.0, a_scale=1.0,
                with_extras=True, initial=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    inputs = dict(
        u=randn(batch, chains, dim, length),
        delta=(torch.randn(batch, chains, dim, length, generator=g) * 0.5 + dt_shift).to(dtype),
        A=-(torch.rand(chains, dim, state, generator=g) * 2 + 0.2) * a_scale,
        B=randn(batch, chains, state, length),
        C=randn(batch, chains, state, length),
    )
    if with_extras:
        inputs.update(
            D=torch.randn(chains, dim, generator=g),
            z=randn(batch, chains, dim, length),
            delta_bias=torch.randn(chains, dim, generator=g) * 0.3,
        )
    if initial:
        inputs["initial_state"] = torch.randn(batch, dim, state, generator=g)
    return inputs


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("coupling", ["mean", "sum"])
@pytest.mark.parametrize(
    "batch,chains,dim,length,state",
    [(2, 2, 3, 1, 4), (1, 3, 5, 17, 8), (2, 4, 4, 40, 6), (1, 3, 2, 70, 16)],
)
@pytest.mark.parametrize("initial", [False, True])
def test_chunked_matches_reference_float32(coupling, batch, chains, dim, length, state, initial):
    # "sum": a shift of dt keeps sum_m exp(dt A) mostly below 1, so the state stays finite over 70 steps.
    inputs = make_inputs(batch, chains, dim, length, state, dt_shift=1.0 if coupling == "sum" else 0.0, initial=initial)
    y_ref, h_ref = coupled_selective_scan_ref(**inputs, coupling=coupling, return_final_state=True)
    y, h = coupled_selective_scan_chunked(**inputs, coupling=coupling, return_final_state=True, chunk_size=16)
    assert y.shape == (batch, chains, dim, length) and y.dtype == torch.float32
    assert h.shape == (batch, dim, state) and h.dtype == torch.float32
    assert torch.isfinite(y_ref).all()
    assert rel_err(y, y_ref) < 2e-5
    assert rel_err(h, h_ref) < 2e-5


def test_chunked_matches_reference_without_optional_inputs():
    inputs = make_inputs(2, 3, 4, 25, 8, with_extras=False, initial=False)
    inputs["delta"] = inputs["delta"].abs()  # used as dt directly (delta_softplus=False)
    for coupling in ("mean", "sum"):
        y_ref = coupled_selective_scan_ref(**inputs, coupling=coupling, delta_softplus=False)
        y = coupled_selective_scan_chunked(**inputs, coupling=coupling, delta_softplus=False, chunk_size=8)
        assert rel_err(y, y_ref) < 2e-5


def test_bfloat16_forward_matches_reference():
    inputs = make_inputs(2, 3, 8, 45, 8, dtype=torch.bfloat16)
    y_ref, h_ref = coupled_selective_scan_ref(**inputs, return_final_state=True)
    y, h = coupled_selective_scan_chunked(**inputs, return_final_state=True, chunk_size=16)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    # Both compute in float32 from the same bf16 inputs; only the final rounding to bf16 differs.
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(h, h_ref) < 1e-4


def test_wide_decay_channels_use_doubling_and_match():
    # Large dt * |A| in some channels: a chunk's decay range leaves float32's exponent range (log-space cannot
    # hold it), the others stay narrow; both kinds must match the reference.
    inputs = make_inputs(1, 3, 6, 48, 8, seed=3)
    inputs["A"][:, :2] *= 400.0
    y_ref, h_ref = coupled_selective_scan_ref(**inputs, return_final_state=True)
    y, h = coupled_selective_scan_chunked(**inputs, return_final_state=True, chunk_size=32)
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < 2e-5 and rel_err(h, h_ref) < 2e-5


def test_diagonal_recurrence_growing_and_shrinking():
    g = torch.Generator().manual_seed(0)
    decay = torch.rand(3, 5, 40, generator=g) * 2.5 + 0.05  # between 0.05 and 2.55: grows and shrinks
    decay[0, 0] = 1e-30  # a state that is reset every step
    drive = torch.randn(3, 5, 40, generator=g)
    h0 = torch.randn(3, 5, generator=g)
    states = diagonal_recurrence(decay, drive, h0)
    h, expected = h0.clone(), []
    for t in range(40):
        h = decay[..., t] * h + drive[..., t]
        expected.append(h)
    assert rel_err(states, torch.stack(expected, -1)) < 1e-5


# ---------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("coupling", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chains,length", [(3, 37), (2, 1), (4, 20)])
def test_gradients_match_reference(coupling, dtype, chains, length):
    inputs = make_inputs(2, chains, 4, length, 6, dtype=dtype, dt_shift=1.0 if coupling == "sum" else 0.0, seed=5)
    names = list(inputs)
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(2, chains, 4, length, generator=g)
    w_h = torch.randn(2, 4, 6, generator=g)

    def grads(fn, **kwargs):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y, h = fn(**leaves, coupling=coupling, return_final_state=True, **kwargs)
        ((y.float() * w_y).sum() + (h * w_h).sum()).backward()
        return {k: leaves[k].grad for k in names}

    ref = grads(coupled_selective_scan_ref)
    got = grads(coupled_selective_scan_chunked, chunk_size=16)
    tol = 3e-4 if dtype == torch.float32 else 2e-2
    for name in names:
        assert got[name] is not None and torch.isfinite(got[name]).all(), name
        assert rel_err(got[name], ref[name]) < tol, (name, rel_err(got[name], ref[name]))


def test_gradients_match_reference_with_wide_decays_and_state_only_loss():
    inputs = make_inputs(1, 3, 6, 40, 8, seed=3)
    inputs["A"][:, :2] *= 400.0  # channels scanned by doubling in forward and backward
    ref_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    got_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    _, h_ref = coupled_selective_scan_ref(**ref_leaves, return_final_state=True)
    _, h = coupled_selective_scan_chunked(**got_leaves, return_final_state=True, chunk_size=16)
    h_ref.pow(2).sum().backward()  # the loss reads only the final state: grad_y is None inside
    h.pow(2).sum().backward()
    for name in inputs:
        if ref_leaves[name].grad is None:
            assert got_leaves[name].grad is None or not got_leaves[name].grad.any(), name
            continue
        assert rel_err(got_leaves[name].grad, ref_leaves[name].grad) < 3e-4, name


# ---------------------------------------------------------------------------------------------------- semantics
def test_single_chain_is_the_plain_selective_scan():
    inputs = make_inputs(2, 1, 5, 30, 8)
    plain = selective_scan_ref(
        inputs["u"][:, 0], inputs["delta"][:, 0], inputs["A"][0], inputs["B"][:, 0], inputs["C"][:, 0],
        D=inputs["D"][0], z=inputs["z"][:, 0], delta_bias=inputs["delta_bias"][0],
        initial_state=inputs["initial_state"], return_final_state=True,
    )
    for coupling in ("mean", "sum"):
        y, h = coupled_selective_scan(**inputs, coupling=coupling, return_final_state=True)
        assert rel_err(y[:, 0], plain[0]) < 2e-5 and rel_err(h, plain[1]) < 2e-5


def test_identical_chains_under_mean_coupling_are_each_the_plain_scan():
    one = make_inputs(1, 1, 4, 25, 8, seed=7)
    stacked = {k: (v.repeat(1, 3, 1, 1) if k in ("u", "delta", "z", "B", "C") else v) for k, v in one.items()}
    stacked["A"] = one["A"].repeat(3, 1, 1)
    stacked["D"] = one["D"].repeat(3, 1)
    stacked["delta_bias"] = one["delta_bias"].repeat(3, 1)
    y = coupled_selective_scan(**stacked, coupling="mean")
    plain = selective_scan_ref(
        one["u"][:, 0], one["delta"][:, 0], one["A"][0], one["B"][:, 0], one["C"][:, 0], D=one["D"][0],
        z=one["z"][:, 0], delta_bias=one["delta_bias"][0], initial_state=one["initial_state"],
    )
    for m in range(3):
        assert rel_err(y[:, m], plain) < 2e-5


def test_every_chain_sees_the_others_past_but_not_their_present():
    inputs = make_inputs(1, 3, 4, 12, 4, initial=False)
    base = coupled_selective_scan(**inputs)
    changed = dict(inputs)
    changed["u"] = inputs["u"].clone()
    changed["u"][:, 0, :, 5] += 3.0  # chain 0's input at step 5
    out = coupled_selective_scan(**changed)
    diff = (out - base).abs().amax(dim=2)[0]  # (M, L)
    assert torch.all(diff[:, :5] == 0)  # nothing before step 5 changes
    assert diff[1, 5] == 0 and diff[2, 5] == 0  # the other chains read H_{t-1}: not yet at step 5
    assert diff[1, 6] > 0 and diff[2, 6] > 0  # ... and see it from step 6 on


# ---------------------------------------------------------------------------------------------------- dispatch
def test_dispatch_default_and_forced_reference():
    inputs = make_inputs(1, 2, 3, 10, 4)
    y = coupled_selective_scan(**inputs)
    assert last_backend("coupled_selective_scan") == "torch"
    with ssm_backend("reference"):
        y_ref = coupled_selective_scan(**inputs)
    assert last_backend("coupled_selective_scan") == "reference"
    assert rel_err(y, y_ref) < 2e-5


def test_zero_length_returns_initial_state():
    inputs = make_inputs(2, 3, 4, 0, 5)
    y, h = coupled_selective_scan(**inputs, return_final_state=True)
    assert y.shape == (2, 3, 4, 0)
    assert torch.equal(h, inputs["initial_state"])


# ---------------------------------------------------------------------------------------------------- overflow
def test_sum_coupling_overflow_raises_clearly_and_mean_stays_finite():
    # Decays close to 1 (small dt, as the mixers' init): the "sum" state grows like 3^t and leaves float32.
    inputs = make_inputs(1, 3, 4, 150, 8, dt_shift=-6.0, with_extras=False, initial=False)
    with pytest.raises(CoupledScanOverflowError, match=r"coupling='sum'.*overflowed float32.*first at step \d+ of 150"):
        coupled_selective_scan(**inputs, coupling="sum")
    with ssm_backend("reference"), pytest.raises(CoupledScanOverflowError):
        coupled_selective_scan(**inputs, coupling="sum")
    y = coupled_selective_scan(**inputs, coupling="mean")
    assert torch.isfinite(y).all()
    # A short sequence of the same inputs stays finite under "sum" and does not raise.
    short = {k: v[..., :20] if k in ("u", "delta", "B", "C") else v for k, v in inputs.items()}
    assert torch.isfinite(coupled_selective_scan(**short, coupling="sum")).all()


def test_non_finite_input_is_not_reported_as_overflow():
    inputs = make_inputs(1, 2, 3, 10, 4, with_extras=False, initial=False)
    inputs["u"][0, 0, 0, 3] = float("nan")
    y = coupled_selective_scan(**inputs, coupling="sum")  # NaN in, NaN out: not the scan's overflow
    assert torch.isnan(y).any()


# ---------------------------------------------------------------------------------------------------- memory
def test_backward_saves_only_inputs_and_chunk_states():
    # The autograd graph must not hold (batch, M, dim, N, L) tensors: only the inputs and one state per chunk.
    batch, chains, dim, length, state = 1, 3, 32, 512, 64
    inputs = {k: v.requires_grad_() for k, v in make_inputs(batch, chains, dim, length, state, initial=False).items()}
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = coupled_selective_scan_chunked(**inputs, chunk_size=32)
    full_states = batch * chains * dim * state * length
    inputs_size = sum(v.numel() for v in inputs.values())
    assert sum(saved) < 6 * inputs_size  # the inputs, dt, a few (batch, M, dim, L) activations, chunk states
    assert sum(saved) < full_states / 4
    y.sum().backward()
    assert torch.isfinite(inputs["A"].grad).all()


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda i: i.update(u=i["u"][0]), r"u must be \(batch, M, dim, L\)"),
        (lambda i: i.update(delta=i["delta"][:, :2]), "delta must have u's shape"),
        (lambda i: i.update(z=i["z"][..., :3]), "z must have u's shape"),
        (lambda i: i.update(A=i["A"][:2]), r"A must be \(M=3"),
        (lambda i: i.update(B=i["B"][:, :2]), r"B must be \(batch, M, N, L\)"),
        (lambda i: i.update(C=i["C"][..., :4]), r"C must be \(batch, M, N, L\)"),
        (lambda i: i.update(D=i["D"][0]), r"D must be \(M, dim\)"),
        (lambda i: i.update(delta_bias=i["delta_bias"][:, :1]), r"delta_bias must be \(M, dim\)"),
        (lambda i: i.update(initial_state=i["initial_state"][:, :, :2]), r"initial_state must be \(batch, dim, N\)"),
        (lambda i: i.update(coupling="product"), "coupling must be one of"),
    ],
)
def test_bad_shapes_raise_value_error_naming_the_argument(change, message):
    inputs = make_inputs(2, 3, 4, 6, 5)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        coupled_selective_scan(**inputs)


@pytest.mark.parametrize("coupling", ["mean", "sum"])
def test_chains_write_y_into_outs_even_over_the_inputs(coupling):
    """coupled_selective_scan_chains(outs=...): chain m's y lands in outs[m] (the list is the result), also when outs
    are the us themselves (the Coupled Mamba layer's inference), with the same values as without outs; outs with
    gradients on, or of the wrong shape or dtype, raise a ValueError."""
    from multimodal_mamba.modeling.ops_coupled_scan import coupled_selective_scan_chains

    inputs = make_inputs(2, 3, 5, 9, 4, seed=3)
    A, D, h0 = inputs["A"], inputs["D"], inputs["initial_state"]
    lists = lambda t: [t[:, m].clone() for m in range(t.shape[1])]  # noqa: E731
    us, deltas, Bs, Cs, zs = (lists(inputs[k]) for k in ("u", "delta", "B", "C", "z"))
    with torch.no_grad():
        y, h = coupled_selective_scan_chains(us, deltas, A, Bs, Cs, D, zs=zs, coupling=coupling, initial_state=h0,
                                             return_final_state=True)
        outs = [torch.empty_like(t) for t in us]
        got = coupled_selective_scan_chains(us, deltas, A, Bs, Cs, D, zs=zs, coupling=coupling, outs=outs)
        assert isinstance(got, list) and all(a is b for a, b in zip(got, outs))
        torch.testing.assert_close(torch.stack(outs, dim=1), coupled_selective_scan_chains(
            us, deltas, A, Bs, Cs, D, zs=zs, coupling=coupling))
        over = [t.clone() for t in us]
        got, h_over = coupled_selective_scan_chains(over, deltas, A, Bs, Cs, D, zs=zs, coupling=coupling,
                                                    initial_state=h0, return_final_state=True, outs=over)
    assert all(a is b for a, b in zip(got, over))
    torch.testing.assert_close(torch.stack(over, dim=1), y)
    torch.testing.assert_close(h_over, h)
    with pytest.raises(ValueError, match="needs gradients disabled"):
        coupled_selective_scan_chains(us, deltas, A, Bs, Cs, D, zs=zs, coupling=coupling, outs=outs)
    with torch.no_grad(), pytest.raises(ValueError, match="outs must be 3 tensors"):
        coupled_selective_scan_chains(us, deltas, A, Bs, Cs, D, zs=zs, coupling=coupling, outs=outs[:2])
    with torch.no_grad(), pytest.raises(ValueError, match="outs must be 3 tensors"):
        coupled_selective_scan_chains(us, deltas, A, Bs, Cs, D, zs=zs, coupling=coupling,
                                      outs=[o.double() for o in outs])
