"""One-row GEMV for decode steps (kernels/gemv) and ``DecodeLinear``, the projections' module class.

CPU: ``DecodeLinear`` is an ``nn.Linear`` (same parameters and state_dict, same results, PEFT LoRA wraps it and trains);
the Triton kernel through Triton's interpreter (when Triton is installed) in a child process.
GPU (marked ``gpu``): every kernel configuration against the float32 reference on the mamba-2.8b projection shapes;
programmatic dependent launch changes no bit; the self-measured dispatch keeps one choice per shape and is never used
for a shape first seen during CUDA-graph capture; a decode step through DecodeLinear equals ``F.linear`` to rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import MambaConfig

from multimodal_mamba import MambaCausalLM
from multimodal_mamba.modeling.modeling_mamba_lm import DecodeLinear

gpu = pytest.mark.gpu

# (N, K, bias): the projections of a mamba-2.8b-shaped layer (in_proj, x_proj, dt_proj, out_proj) and the LM head.
MODEL_SHAPES = [(10240, 2560, False), (192, 5120, False), (5120, 160, True), (2560, 5120, False), (50280, 2560, False)]
SMALL_SHAPES = [(48, 96, False), (37, 130, True), (200, 33, True), (5, 1000, False)]


def check_all_configs(shapes, device):
    from multimodal_mamba.kernels.gemv import gemv_triton
    from multimodal_mamba.kernels.gemv.fused import CANDIDATES
    from multimodal_mamba.kernels.gemv.naive import linear_ref

    torch.manual_seed(0)
    for n, k, with_bias in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
            x = torch.randn(1, 1, k, device=device, dtype=dtype)
            bias = torch.randn(n, device=device, dtype=dtype) if with_bias else None
            ref = linear_ref(x, weight, bias)
            for config in CANDIDATES:
                out = gemv_triton(x, weight, bias, *config)
                assert out.shape == ref.shape and out.dtype == ref.dtype
                err = (out.float() - ref.float()).abs().max().item()
                tol = 2e-5 if dtype == torch.float32 else 1.6e-2  # bf16: one rounding of the output
                assert err <= tol * (ref.float().abs().max().item() + 1), (n, k, dtype, config, err)


def test_decode_linear_is_an_nn_linear_with_the_same_results():
    torch.manual_seed(0)
    layer = DecodeLinear(16, 24)
    plain = nn.Linear(16, 24)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
    rows = torch.randn(3, 5, 16)
    assert torch.equal(layer(rows), plain(rows))
    layer(x).sum().backward()  # with gradients: F.linear, differentiable
    assert layer.weight.grad is not None


def test_model_projections_are_decode_linears_and_peft_wraps_them():
    from peft import LoraConfig, get_peft_model

    config = MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4)
    torch.manual_seed(0)
    model = MambaCausalLM(config)
    mixer = model.backbone.layers[0].mixer
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        assert type(getattr(mixer, name)) is DecodeLinear
    assert type(model.lm_head) is DecodeLinear
    # (PEFT refuses out_proj for model_type "mamba"; the Coupled Mamba tests put LoRA on out_proj too.)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["in_proj", "x_proj", "dt_proj"]))
    ids = torch.randint(0, 64, (2, 9))
    lora(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert len(grads) == 2 * 3 * 2 and all(g is not None for g in grads)


def test_interpreter_gemv_kernel(triton_interpreter):
    """All kernel configurations on small shapes, through Triton's interpreter (a child process: it must be switched on
    before Triton is first imported)."""
    code = (
        "import sys; sys.path.insert(0, %r); import tests.test_gemv as t; "
        "t.check_all_configs(t.SMALL_SHAPES, 'cpu'); print('OK')" % os.getcwd()
    )
    triton_interpreter(code)


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------
@gpu
def test_every_config_matches_the_reference_on_model_shapes():
    check_all_configs(MODEL_SHAPES, "cuda")


@gpu
def test_every_config_gives_the_same_bits_with_programmatic_dependent_launch(monkeypatch):
    from multimodal_mamba.kernels import utils
    from multimodal_mamba.kernels.gemv import gemv_triton
    from multimodal_mamba.kernels.gemv.fused import CANDIDATES

    monkeypatch.setattr(utils, "_PDL_DEVICES", {})
    if not utils.pdl_available("cuda"):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 and Triton >= 3.4")
    torch.manual_seed(0)
    for n, k, with_bias in MODEL_SHAPES[:4] + SMALL_SHAPES:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_bias else None
        for config in CANDIDATES:
            monkeypatch.setattr(utils, "PDL", True)
            with_pdl = gemv_triton(x, weight, bias, *config)
            monkeypatch.setattr(utils, "PDL", False)
            assert torch.equal(gemv_triton(x, weight, bias, *config), with_pdl), (n, k, config)


@gpu
def test_dispatch_measures_once_and_stays_out_of_graph_capture():
    from multimodal_mamba.kernels.gemv import fused

    weight = torch.randn(192, 5120, device="cuda", dtype=torch.bfloat16) / 70
    x = torch.randn(1, 1, 5120, device="cuda", dtype=torch.bfloat16)
    out = fused.linear_one_row(x, weight)
    key = (weight.device.index, (192, 5120), torch.bfloat16, False, None)
    assert key in fused.measured_choices()
    assert (out.float() - F.linear(x, weight).float()).abs().max().item() <= 1.6e-2 * out.float().abs().max().item()
    choice = fused.measured_choices()[key]
    fused.linear_one_row(x, weight)
    assert fused.measured_choices()[key] == choice  # measured once
    # A shape first seen while a CUDA graph is captured runs F.linear and is not measured (timing needs syncs).
    other = torch.randn(96, 640, device="cuda", dtype=torch.bfloat16)
    x_small = torch.randn(1, 640, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            captured = fused.linear_one_row(x_small, other)
    graph.replay()
    torch.cuda.synchronize()
    assert (other.device.index, (96, 640), torch.bfloat16, False, None) not in fused.measured_choices()
    assert torch.equal(captured, F.linear(x_small, other))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_linear_one_row_matches_f_linear(dtype):
    torch.manual_seed(0)
    for n, k, with_bias in MODEL_SHAPES[:4]:
        layer = DecodeLinear(k, n, bias=with_bias).to("cuda", dtype)
        x = torch.randn(1, 1, k, device="cuda", dtype=dtype)
        with torch.no_grad():
            out, ref = layer(x), F.linear(x, layer.weight, layer.bias)
        tol = 2e-5 if dtype == torch.float32 else 1.6e-2
        assert out.shape == ref.shape and (out.float() - ref.float()).abs().max().item() <= tol * (
            ref.float().abs().max().item() + 1
        )
