"""Few-rows projections for decode steps at batch 8 - 32 (kernels/linear_rows).

CPU: the references (split-K partial sums add up to ``F.linear``); the Triton kernel through Triton's interpreter
(when Triton is installed) in a child process.
GPU (marked ``gpu``): ``linear_rows`` and ``linear_rows_partials`` against the float32 references for many
configurations, shapes (odd N, K and row counts, the mamba-2.8b in_proj / out_proj) and dtypes; programmatic dependent
launch changes no bit; bad arguments raise.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

gpu = pytest.mark.gpu

# (block_n, block_k, k_split, pre_k, swap, warps, stages[, tma[, trigger]]): whole-K and split-K, swapped and not,
# weight columns loaded before the PDL wait (pre_k) shorter than, equal to and longer than a split
CONFIGS = [(16, 16, 0, 0, True, 4, 2), (32, 16, 0, 32, False, 4, 2), (16, 32, 48, 32, True, 4, 2),
           (32, 16, 64, 128, False, 4, 3), (16, 16, 32, 0, False, 4, 1), (16, 32, 0, 0, True, 4, 2, True, 2),
           (32, 16, 64, 16, False, 4, 2, True, 1)]
GPU_CONFIGS = [(64, 128, 0, 0, True, 4, 4), (64, 128, 0, 256, True, 4, 4), (32, 128, 0, 512, True, 4, 4),
               (16, 256, 0, 2048, True, 8, 2), (64, 128, 0, 256, False, 4, 3), (64, 128, 512, 512, True, 8, 2),
               (32, 256, 1024, 1024, True, 8, 2), (64, 128, 640, 512, True, 4, 2), (32, 128, 1024, 256, False, 4, 3),
               (16, 256, 2560, 512, True, 4, 3), (128, 64, 0, 128, False, 4, 4),
               # weight tiles through TMA descriptors; the kernels after it launched after its wait / its K loop
               (128, 64, 0, 0, True, 4, 6, True, 2), (64, 64, 1024, 0, True, 4, 8, True, 0),
               (32, 128, 1024, 512, True, 4, 3, False, 1), (64, 64, 0, 128, False, 4, 4, True, 2)]


def test_partial_sums_add_up_to_the_linear():
    from multimodal_mamba.kernels.linear_rows import naive

    torch.manual_seed(0)
    x, w = torch.randn(5, 70, dtype=torch.float64), torch.randn(9, 70, dtype=torch.float64)
    parts = naive.linear_rows_partials_ref(x, w, 32)
    assert parts.shape == (3, 5, 9) and parts.dtype == torch.float32
    torch.testing.assert_close(parts[2], F.linear(x[:, 64:], w[:, 64:]).float())
    torch.testing.assert_close(naive.sum_partials_ref(parts, torch.float64), x @ w.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(naive.linear_rows_ref(x.float(), w.float()), (x @ w.T).float())


def check_against_reference(device, configs, shapes, dtypes):
    from multimodal_mamba.kernels.linear_rows import fused, naive

    torch.manual_seed(0)
    for rows, n_out, k_in, with_bias in shapes:
        for dtype in dtypes:
            x = torch.randn(rows, k_in, device=device).to(dtype)
            w = (torch.randn(n_out, k_in, device=device) / k_in**0.5).to(dtype)
            bias = torch.randn(n_out, device=device).to(dtype) if with_bias else None
            ref = naive.linear_rows_ref(x, w, bias)
            scale = ref.float().abs().max().item() + 1
            for config in configs:
                out = fused.linear_rows(x, w, bias, config)
                assert out.shape == ref.shape and out.dtype == dtype
                err = (out.float() - ref.float()).abs().max().item()
                tol = 2e-5 if dtype == torch.float32 else 1.6e-2  # 16-bit: one rounding of the output
                assert err <= tol * scale, (rows, n_out, k_in, dtype, config, err)
                # split-K partial sums, each against the reference's own K range
                parts = fused.linear_rows_partials(x, w, config)
                k_split = fused._blocks(config, k_in)[2]
                expected = naive.linear_rows_partials_ref(x, w, k_split)
                assert parts.shape == expected.shape == (fused.split_count(k_in, config), rows, n_out)
                assert parts.dtype == torch.float32
                err = (parts - expected).abs().max().item()
                assert err <= 2e-5 * (expected.abs().max().item() + 1), (rows, n_out, k_in, dtype, config, err)
                # a preallocated output: the same values
                again = torch.full_like(parts, float("nan"))
                fused.linear_rows_partials(x, w, config, out=again)
                assert torch.equal(again, parts)


SMALL_SHAPES = [(3, 40, 100, True), (16, 64, 96, False), (20, 33, 160, True), (8, 17, 48, False)]


def test_interpreter_linear_rows(triton_interpreter):
    code = ("import sys; sys.path.insert(0, %r); import torch, tests.test_linear_rows as t; "
            "t.check_against_reference('cpu', t.CONFIGS, t.SMALL_SHAPES, [torch.float32]); print('OK')" % os.getcwd())
    triton_interpreter(code)


@gpu
def test_linear_rows_matches_the_reference_on_small_shapes():
    shapes = SMALL_SHAPES + [(32, 300, 200, True), (24, 50, 75, False)]
    check_against_reference("cuda", CONFIGS + GPU_CONFIGS[:3], shapes, [torch.float32, torch.bfloat16, torch.float16])


@gpu
@pytest.mark.parametrize("rows", [8, 16, 24, 32])
def test_linear_rows_matches_the_reference_on_mamba_2_8b_projections(rows):
    """in_proj (2560 -> 10240) and out_proj (5120 -> 2560) of a mamba-2.8b layer, every configuration, bf16."""
    check_against_reference("cuda", GPU_CONFIGS, [(rows, 10240, 2560, False), (rows, 2560, 5120, False)],
                            [torch.bfloat16])


@gpu
def test_programmatic_dependent_launch_changes_no_bit(monkeypatch):
    from multimodal_mamba.kernels import utils
    from multimodal_mamba.kernels.linear_rows import fused

    monkeypatch.setattr(utils, "_PDL_DEVICES", {})
    monkeypatch.setattr(utils, "PDL", True)
    if not utils.pdl_available("cuda"):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 and Triton >= 3.4")
    torch.manual_seed(0)
    x = torch.randn(16, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2560, 5120, device="cuda", dtype=torch.bfloat16) / 70
    results = []
    for pdl in (True, False):
        monkeypatch.setattr(utils, "PDL", pdl)
        monkeypatch.setattr(utils, "_PDL_DEVICES", {})
        outs = []
        for config in GPU_CONFIGS[:2] + GPU_CONFIGS[5:7] + GPU_CONFIGS[-4:]:
            # a chain: each call's input is written by the one before it (the PDL wait must hold the reads back)
            y = x.clone()
            for _ in range(3):
                part = fused.linear_rows_partials(y, w, config)
                y = torch.cat([part.sum(0).to(y.dtype)] * 2, dim=1)
                y = fused.linear_rows(y, w, None, config)[:, :2560].repeat(1, 2).contiguous()
            outs.append(y)
        torch.cuda.synchronize()
        results.append(outs)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@gpu
def test_bad_arguments_raise():
    from multimodal_mamba.kernels.linear_rows import fused

    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="linear_rows"):
        fused.linear_rows(x[:, :-1], w)
    with pytest.raises(ValueError, match="linear_rows"):
        fused.linear_rows(x.float(), w)
    with pytest.raises(ValueError, match="pre_k"):
        fused.linear_rows(x, w, None, (16, 32, 0, 48, True, 4, 2))
    with pytest.raises(ValueError, match="linear_rows_partials"):
        fused.linear_rows_partials(x, w, (16, 32, 32, 32, True, 4, 2), out=torch.empty(1, 4, 32, device="cuda"))
