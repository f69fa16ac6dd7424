"""The fused Mamba LM decode step (kernels/decode_step and ``MambaBackbone._fused_decode_step``).

CPU: the step's orchestration on the naive reference ops equals the module-by-module decode step (float32, batch 1 and
3, residual in float32 or not, several steps, states included); which models may take the fused path (PEFT LoRA,
hooks, a forced backend, ``fused_decode = False`` fall back); the Triton kernels against the naive reference through
Triton's interpreter on small shapes, in a child process (when Triton is installed).
GPU (marked ``gpu``): the fused step against the module path at batch 1 and 16 in bf16 and float32, per layer on a
mamba-2.8b-shaped mixer; greedy tokens identical with and without CUDA graphs on the fused path; programmatic
dependent launch changes no bit of the results; a LoRA-wrapped model falls back to the module path and still decodes the same tokens either way.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import MambaConfig

from multimodal_mamba import MambaCausalLM
from multimodal_mamba.modeling import modeling_mamba_lm
from multimodal_mamba.modeling.modeling_mamba_lm import _plain_decode_modules

gpu = pytest.mark.gpu


def small_lm(device="cpu", dtype=torch.float32, seed=0, layers=3, hidden=64, residual_in_fp32=True, vocab=300):
    config = MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=16, expand=2,
                         conv_kernel=4, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                         residual_in_fp32=residual_in_fp32)
    torch.manual_seed(seed)
    model = MambaCausalLM(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # non-trivial conv biases, D and A, so that every term of the step is exercised
        for block in model.backbone.layers:
            block.mixer.conv1d.bias.normal_(0, 0.1)
            block.mixer.D.normal_(1, 0.3)
            block.mixer.A_log.add_(torch.randn_like(block.mixer.A_log) * 0.2)
            block.norm.weight.normal_(1, 0.2)
    model.generation_config.pad_token_id = 0
    return model


def naive_ops():
    from multimodal_mamba.kernels.decode_step import naive

    return naive


def compare_steps(model, ops, batch, steps=3, atol=1e-5, rtol=1e-4, prompt=6, scaled=False):
    """Prefill two caches identically, then decode ``steps`` tokens module by module on one and through
    ``_fused_decode_step(..., ops)`` on the other: the final hidden states and both states must agree."""
    device = model.backbone.embeddings.weight.device
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt + steps), generator=generator).to(device)
    backbone = model.backbone
    with torch.no_grad():
        cache_a = model.allocate_cache(batch)
        model(ids[:, :prompt], cache_params=cache_a, use_cache=True)
        cache_b = copy.deepcopy(cache_a)
        for t in range(prompt, prompt + steps):
            backbone.fused_decode = False
            try:
                ref = backbone(ids[:, t:t + 1], cache_params=cache_a, use_cache=True).last_hidden_state
            finally:
                backbone.fused_decode = True
            embeds = backbone.embeddings(ids[:, t:t + 1])
            out = backbone._fused_decode_step(embeds, cache_b, ops)
            cache_b.seqlen_offset += 1
            assert out.shape == ref.shape and out.dtype == ref.dtype
            close(out, ref, atol, rtol, scaled)
        close(cache_b.ssm_states, cache_a.ssm_states, atol, rtol, scaled)
        close(cache_b.conv_states, cache_a.conv_states, atol, rtol, scaled)


def close(actual, expected, atol, rtol, scaled):
    """assert_close, or with ``scaled``: max |actual - expected| <= atol * max |expected| (bf16 after several steps
    through several layers: the two paths' rounding differences grow along the residual stream, and a single
    element near zero can differ by more than any elementwise relative tolerance)."""
    if not scaled:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        return
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= atol * expected.float().abs().max().item(), (error, expected.float().abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_fused_step_on_naive_ops_equals_the_module_path(batch, residual_in_fp32):
    compare_steps(small_lm(residual_in_fp32=residual_in_fp32), naive_ops(), batch)


def test_fused_step_keeps_the_residual_in_the_model_dtype_when_asked():
    """bf16 with residual_in_fp32=False: the residual is rounded to bf16 after every add, as the module path does."""
    model = small_lm(dtype=torch.bfloat16, residual_in_fp32=False)
    compare_steps(model, naive_ops(), 2, steps=2, atol=2e-2, rtol=2e-2, scaled=True)


def partial_sum_ops(k_split):
    """The naive reference ops with out_proj handing float32 split-K partial sums to add_rms_norm (as the fused ops
    do where ``fused.OUT_PROJ_CONFIG`` routes out_proj to kernels/linear_rows)."""
    import types

    from multimodal_mamba.kernels.linear_rows.naive import linear_rows_partials_ref

    naive = naive_ops()
    ops = types.SimpleNamespace(**{name: getattr(naive, name) for name in dir(naive) if not name.startswith("__")})
    ops.out_projection = lambda y, linear: linear_rows_partials_ref(y, linear.weight, k_split)
    return ops


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_fused_step_with_out_proj_partial_sums_equals_the_module_path(residual_in_fp32):
    """out_proj's partial sums (3 K ranges of its 128 inputs) added by add_rms_norm, rounded to the model dtype first:
    the same step as the module path (float32; bf16 with the residual in bf16)."""
    compare_steps(small_lm(residual_in_fp32=residual_in_fp32), partial_sum_ops(48), 3)
    compare_steps(small_lm(dtype=torch.bfloat16, residual_in_fp32=residual_in_fp32), partial_sum_ops(48), 2,
                  steps=2, atol=2e-2, rtol=2e-2, scaled=True)


def test_which_models_take_the_fused_path():
    model = small_lm()
    backbone = model.backbone
    x = torch.zeros(1, 1, 64)
    assert _plain_decode_modules(backbone, torch.float32, x.device)
    assert not _plain_decode_modules(backbone, torch.bfloat16, x.device)  # weights in another dtype
    handle = backbone.layers[1].mixer.x_proj.register_forward_hook(lambda *args: None)
    assert not _plain_decode_modules(backbone, torch.float32, x.device)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *args: None)
    try:
        assert not _plain_decode_modules(backbone, torch.float32, x.device)
    finally:
        handle.remove()
    assert _plain_decode_modules(backbone, torch.float32, x.device)
    assert backbone._fused_decode_ops(x) is None  # a CPU tensor: the kernels need CUDA

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["x_proj"]))
    assert not _plain_decode_modules(lora.base_model.model.backbone, torch.float32, x.device)


def check_kernels_against_naive(device):
    """The Triton kernels (fused) against the naive reference on small shapes and odd sizes (interpreter or GPU)."""
    from multimodal_mamba.kernels.decode_step import fused, naive

    torch.manual_seed(0)
    for batch, dim, rank, state, width, with_bias in [(1, 64, 4, 16, 4, True), (3, 96, 5, 8, 4, False),
                                                         (2, 300, 20, 16, 3, True), (20, 80, 6, 16, 4, True)]:
        xz = torch.randn(batch, 2 * dim, device=device)
        conv_state = torch.randn(batch, dim, width, device=device)
        ssm_state = torch.randn(batch, dim, state, device=device)
        conv_w = torch.randn(dim, width, device=device) * 0.5
        conv_b = torch.randn(dim, device=device) * 0.1 if with_bias else None
        x_w = torch.randn(rank + 2 * state, dim, device=device) / dim**0.5
        dt_w = torch.randn(dim, rank, device=device) / rank**0.5
        dt_b = torch.randn(dim, device=device) - 2 if with_bias else None
        A_log = torch.randn(dim, state, device=device) * 0.5
        D = torch.randn(dim, device=device) if with_bias else None
        states = [(conv_state.clone(), ssm_state.clone()) for _ in range(2)]
        ref = naive.mixer_decode_step_ref(xz, *states[0], conv_w, conv_b, x_w, dt_w, dt_b, A_log, D)
        out = fused.mixer_decode_step(xz, *states[1], conv_w, conv_b, x_w, dt_w, dt_b, A_log, D)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(states[1][0], states[0][0])
        torch.testing.assert_close(states[1][1], states[0][1], atol=1e-4, rtol=1e-4)
        # a preallocated, larger partials buffer, output and counters give the same (and leave the counters zero)
        partials = torch.full((fused.split_count(dim), batch + 2, rank + 2 * state + 3), float("nan"), device=device)
        again = torch.empty(batch, dim, device=device)
        counters = torch.zeros(fused.counter_count(rank + 2 * state, batch) + 1, device=device, dtype=torch.int32)
        states2 = (conv_state.clone(), ssm_state.clone())
        fused.mixer_decode_step(xz, *states2, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, partials, again, counters)
        torch.testing.assert_close(again, out, atol=1e-6, rtol=1e-6)
        assert not counters.any()

        for hidden, has_delta, res_dtype in [(64, True, torch.float32), (100, False, torch.float32),
                                             (64, True, torch.bfloat16)]:
            res_in = torch.randn(batch, hidden, device=device)
            delta = torch.randn(batch, hidden, device=device).to(torch.bfloat16) if has_delta else None
            weight = torch.randn(hidden, device=device).to(torch.bfloat16)
            results = []
            for fn in (naive.add_rms_norm_ref, fused.add_rms_norm):
                res_out = torch.empty(batch, hidden, device=device, dtype=res_dtype)
                normed = torch.empty(batch, hidden, device=device, dtype=torch.bfloat16)
                fn(res_in, delta, weight, 1e-5, res_out, normed, torch.bfloat16)
                results.append((res_out, normed))
            torch.testing.assert_close(results[1][0], results[0][0])
            torch.testing.assert_close(results[1][1].float(), results[0][1].float(), atol=1.6e-2, rtol=1.6e-2)
            # delta as float32 split-K partial sums (out_proj on kernels/linear_rows), rounded to bf16 once summed
            # (the interpreter rounds float32 -> bf16 toward zero: one bf16 step of the summed delta, |delta| up to ~5,
            # i.e. 0.03, plus one of a bf16 residual, |res| up to ~4, i.e. 0.016)
            parts = torch.randn(3, batch, hidden, device=device)
            results = []
            for fn in (naive.add_rms_norm_ref, fused.add_rms_norm):
                res_out = torch.empty(batch, hidden, device=device, dtype=res_dtype)
                normed = torch.empty(batch, hidden, device=device, dtype=torch.bfloat16)
                fn(res_in, parts, weight, 1e-5, res_out, normed, torch.bfloat16, delta_dtype=torch.bfloat16)
                results.append((res_out, normed))
            torch.testing.assert_close(results[1][0].float(), results[0][0].float(), atol=5e-2, rtol=8e-3)
            torch.testing.assert_close(results[1][1].float(), results[0][1].float(), atol=3e-2, rtol=1.6e-2)
    # bad shapes: a clear ValueError
    with pytest.raises(ValueError, match="mixer_decode_step"):
        fused.mixer_decode_step(xz[:, :-1], *states[1], conv_w, conv_b, x_w, dt_w, dt_b, A_log, D)
    with pytest.raises(ValueError, match="partials"):
        fused.mixer_decode_step(xz, *states[1], conv_w, conv_b, x_w, dt_w, dt_b, A_log, D,
                                torch.empty(1, 1, 1, device=device))
    with pytest.raises(ValueError, match="add_rms_norm"):
        fused.add_rms_norm(res_in, None, weight[:-1], 1e-5, res_in.clone(), res_in.clone(), torch.float32)
    with pytest.raises(ValueError, match="delta_dtype"):  # partial sums without the dtype to round them to
        fused.add_rms_norm(res_in, parts, weight, 1e-5, res_in.clone(), res_in.clone(), torch.float32)


def check_rows_kernels_against_naive(device):
    """The several-rows-per-program mixer kernels (``fused.ROWS_*``) at every batch size of the shapes above, with
    small blocks (several splits, partial channel, output, rank and row blocks), partials summed in the state-update
    kernel and by the separate reduction."""
    from multimodal_mamba.kernels.decode_step import fused

    names = ("ROWS_MIN_BATCH", "ROWS_CONV_X_PROJ_CONFIG", "ROWS_SSM_STEP_CONFIG", "ROWS_REDUCE", "ROWS_EARLY_H",
             "ROWS_FOLD_REDUCE", "ROWS_PRE_WAIT")
    saved = {name: getattr(fused, name) for name in names}
    try:
        fused.ROWS_MIN_BATCH = 1
        # then the same with the state tile loaded before the PDL wait (the PDL launch itself needs a GPU of sm_90+),
        # the partials summed by the conv kernel's last program per tile, the conv, z and dt_proj's tile before the wait
        for conv_cfg, ssm_cfg, reduce, early, fold, pre in [
                ((16, 64, 32, 16, 4), (16, 16, 4), True, False, False, False),
                ((16, 32, 32, 32, 4), (32, 16, 4), False, False, False, False),
                ((16, 64, 32, 16, 4), (16, 16, 4), True, True, False, False),
                ((16, 32, 32, 32, 4), (32, 16, 4), False, True, False, False),
                ((16, 64, 32, 16, 4), (16, 16, 4), True, True, True, True),
                ((16, 32, 32, 32, 4), (32, 16, 4), True, True, True, False),
                ((16, 64, 32, 16, 4), (16, 16, 4), True, True, False, True)]:
            fused.ROWS_CONV_X_PROJ_CONFIG, fused.ROWS_SSM_STEP_CONFIG, fused.ROWS_REDUCE = conv_cfg, ssm_cfg, reduce
            fused.ROWS_EARLY_H, fused.ROWS_FOLD_REDUCE, fused.ROWS_PRE_WAIT = early, fold, pre
            check_kernels_against_naive(device)
    finally:
        for name, value in saved.items():
            setattr(fused, name, value)


def check_interpreted_model_step():
    """The whole decode step of a small LM on the Triton kernels (interpreter, CPU tensors) equals the module path."""
    from multimodal_mamba.kernels.decode_step import fused

    compare_steps(small_lm(layers=2), fused, 2, steps=2, atol=1e-4, rtol=1e-3)


def test_interpreter_decode_step_kernels(triton_interpreter):
    """The kernels and the whole step through Triton's interpreter (a child process: it must be switched on before
    Triton is first imported)."""
    code = (
        "import sys; sys.path.insert(0, %r); import tests.test_decode_step as t; "
        "from multimodal_mamba.kernels.decode_step import fused; fused.ROWS_MIN_BATCH = 10**9; "  # one row per program
        "t.check_kernels_against_naive('cpu'); t.check_interpreted_model_step(); "
        # small blocks: several x_proj splits, partial channel and output blocks, several rounds of the partial sums
        "from multimodal_mamba.kernels.decode_step import fused; "
        "fused.CONV_X_PROJ_CONFIG = (32, 16, 4); fused.SSM_STEP_CONFIG = (16, 2, 4); "
        "t.check_kernels_against_naive('cpu'); t.check_interpreted_model_step(); print('OK')" % os.getcwd()
    )
    triton_interpreter(code)
    # the several-rows kernels (all batch sizes through them), in a second process
    rows_code = (
        "import sys; sys.path.insert(0, %r); import tests.test_decode_step as t; "
        "from multimodal_mamba.kernels.decode_step import fused; "
        "t.check_rows_kernels_against_naive('cpu'); fused.ROWS_MIN_BATCH = 2; t.check_interpreted_model_step(); "
        "print('OK')" % os.getcwd()
    )
    triton_interpreter(rows_code)


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------
@gpu
def test_kernels_match_the_reference_on_the_gpu():
    check_kernels_against_naive("cuda")
    check_rows_kernels_against_naive("cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2, 4, 16, 24])
def test_fused_step_matches_the_module_path(dtype, batch):
    model = small_lm("cuda", dtype, layers=4, hidden=256, vocab=1000)
    kernels = modeling_mamba_lm._package_kernels()
    ops = model.backbone._fused_decode_ops(torch.zeros(1, 1, 256, device="cuda", dtype=dtype))
    assert ops is kernels["decode_step"]  # the model takes the fused path on its own
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=0, scaled=True)
    compare_steps(model, ops, batch, steps=4, **tol)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 16])
def test_fused_mixer_matches_the_module_path_on_a_mamba_2_8b_layer(dtype, batch):
    """One mamba-2.8b-shaped layer (d_model 2560, d_inner 5120, dt_rank 160): the fused mixer step against the
    unfused mixer's decode step (its own ops, cuBLAS / GEMV projections), output and states."""
    from multimodal_mamba.modeling.modeling_mamba_lm import MambaMixer

    torch.manual_seed(0)
    mixer = MambaMixer(2560, 16, 2, 4, layer_idx=0).to("cuda", dtype).eval()
    mixer.A_log.data = mixer.A_log.data.float()
    mixer.D.data = mixer.D.data.float()
    with torch.no_grad():
        mixer.conv1d.bias.normal_(0, 0.1)
    cache = modeling_mamba_lm.MambaStateCache(1, batch, 5120, 16, 4, device="cuda", dtype=dtype)
    cache.conv_states.normal_()
    cache.ssm_states.normal_()
    cache.seqlen_offset = 5
    other = copy.deepcopy(cache)
    hidden = torch.randn(batch, 1, 2560, device="cuda", dtype=dtype)
    ops = modeling_mamba_lm._package_kernels()["decode_step"]
    with torch.no_grad():
        ref = mixer(hidden, cache_params=cache)
        xz = mixer.in_proj(hidden[:, 0])
        y = ops.mixer_decode_step(xz, other.conv_states[0], other.ssm_states[0], mixer.conv1d.weight[:, 0],
                                  mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
                                  mixer.A_log, mixer.D)
        out = mixer.out_proj(y)[:, None]
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    scale = ref.float().abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= tol["atol"] * max(scale, 1.0) * 4, scale
    torch.testing.assert_close(other.conv_states, cache.conv_states)
    torch.testing.assert_close(other.ssm_states, cache.ssm_states, **tol)


def _count_fused_steps(model, monkeypatch):
    calls = []
    original = type(model.backbone)._fused_decode_step

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model.backbone), "_fused_decode_step", counting)
    return calls


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 16, 24])
def test_greedy_tokens_identical_with_and_without_graphs_on_the_fused_step(dtype, batch, monkeypatch):
    model = small_lm("cuda", dtype, layers=4, hidden=128)
    calls = _count_fused_steps(model, monkeypatch)
    ids = torch.randint(2, 300, (batch, 7), generator=torch.Generator().manual_seed(1)).cuda()
    eager = model.generate(ids, decode_cuda_graph=False, max_new_tokens=16, do_sample=False)
    eager_calls = len(calls)
    graphed = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(eager, graphed)
    assert eager_calls >= 15  # every eager decode step took the fused path
    assert len(calls) > eager_calls  # and the captured graph was recorded from it


@gpu
@pytest.mark.parametrize("early_h, fold, pre_wait", [(False, False, False), (True, False, False), (True, True, True),
                                                     (False, True, True), (True, False, True)])
def test_early_state_load_changes_no_bit(early_h, fold, pre_wait, monkeypatch):
    """``fused.ROWS_EARLY_H`` (the state-update kernel reads its state tile before its PDL wait) on a mamba-2.8b-shaped
    mixer at batch 16: 12 mixer steps back to back on the same states, with no other kernel between them (the case
    where a step's early read could meet the previous step's write if the conv kernel let it launch too soon), give
    bit for bit the outputs and states of the same kernels launched without PDL; likewise with the x_proj partials
    summed by the conv kernel's last programs (ROWS_FOLD_REDUCE, one counter workspace for all 12 steps) and the conv,
    z and dt_proj tile read before the wait (ROWS_PRE_WAIT, which applies only with early_h)."""
    from multimodal_mamba.kernels import utils
    from multimodal_mamba.kernels.decode_step import fused

    monkeypatch.setattr(utils, "_PDL_DEVICES", {})
    monkeypatch.setattr(utils, "PDL", True)
    if not utils.pdl_available("cuda"):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 and Triton >= 3.4")
    monkeypatch.setattr(fused, "ROWS_EARLY_H", early_h)
    monkeypatch.setattr(fused, "ROWS_FOLD_REDUCE", fold)
    monkeypatch.setattr(fused, "ROWS_PRE_WAIT", pre_wait)
    torch.manual_seed(0)
    batch, dim, rank, n, width = 16, 5120, 160, 16, 4
    dtype = torch.bfloat16
    xzs = torch.randn(12, batch, 2 * dim, device="cuda", dtype=dtype)
    conv_w = (torch.randn(dim, width, device="cuda") * 0.5).to(dtype)
    conv_b = (torch.randn(dim, device="cuda") * 0.1).to(dtype)
    x_w = (torch.randn(rank + 2 * n, dim, device="cuda") / dim**0.5).to(dtype)
    dt_w = (torch.randn(dim, rank, device="cuda") / rank**0.5).to(dtype)
    dt_b = (torch.randn(dim, device="cuda") - 2).to(dtype)
    A_log = torch.randn(dim, n, device="cuda") * 0.5
    D = torch.randn(dim, device="cuda")
    conv0 = torch.randn(batch, dim, width, device="cuda", dtype=dtype)
    ssm0 = torch.randn(batch, dim, n, device="cuda")
    results = []
    for pdl in (True, False):
        monkeypatch.setattr(utils, "PDL", pdl)
        monkeypatch.setattr(utils, "_PDL_DEVICES", {})
        conv, ssm = conv0.clone(), ssm0.clone()
        partials = torch.empty(fused.split_count(dim, batch), batch, rank + 2 * n, device="cuda")
        outs = torch.empty(12, batch, dim, device="cuda", dtype=dtype)
        counters = torch.zeros(fused.counter_count(rank + 2 * n, batch), device="cuda", dtype=torch.int32)
        torch.cuda.synchronize()
        for i in range(12):
            fused.mixer_decode_step(xzs[i], conv, ssm, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, partials, outs[i],
                                    counters)
        torch.cuda.synchronize()
        assert not counters.any()
        results.append((outs, conv, ssm))
    (out_a, conv_a, ssm_a), (out_b, conv_b_, ssm_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(conv_a, conv_b_) and torch.equal(ssm_a, ssm_b)


@gpu
@pytest.mark.parametrize("early_h", [False, True])
@pytest.mark.parametrize("batch", [1, 16])
def test_programmatic_dependent_launch_changes_no_bit(batch, early_h, monkeypatch):
    """The fused step's kernels and the one-row GEMV launched with programmatic dependent launch (each loads its
    weights before waiting for the kernel before it) give bit-identical outputs, states and greedy tokens, eager and
    replayed from a CUDA graph, to the same kernels launched the ordinary way."""
    from multimodal_mamba.kernels import utils
    from multimodal_mamba.kernels.decode_step import fused

    monkeypatch.setattr(utils, "_PDL_DEVICES", {})
    monkeypatch.setattr(utils, "PDL", True)
    if not utils.pdl_available("cuda"):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 and Triton >= 3.4")
    monkeypatch.setattr(fused, "ROWS_EARLY_H", early_h)  # (the rows kernels run at batch 16)
    model = small_lm("cuda", torch.bfloat16, layers=3, hidden=256, vocab=1000)
    backbone = model.backbone
    ops = modeling_mamba_lm._package_kernels()["decode_step"]
    ids = torch.randint(2, 1000, (batch, 8), generator=torch.Generator().manual_seed(3)).cuda()
    results = []
    for pdl in (True, False):
        monkeypatch.setattr(utils, "PDL", pdl)
        monkeypatch.setattr(utils, "_PDL_DEVICES", {})
        assert utils.pdl_available("cuda") == pdl
        with torch.no_grad():
            cache = model.allocate_cache(batch)
            model(ids[:, :6], cache_params=cache, use_cache=True)
            steps = []
            for t in (6, 7):
                steps.append(backbone._fused_decode_step(backbone.embeddings(ids[:, t:t + 1]), cache, ops).clone())
                cache.seqlen_offset += 1
        model.decode_graphs.clear()  # captured again with this launch mode
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        results.append((steps, cache.conv_states.clone(), cache.ssm_states.clone(), tokens))
    (steps_a, conv_a, ssm_a, tokens_a), (steps_b, conv_b, ssm_b, tokens_b) = results
    assert all(torch.equal(a, b) for a, b in zip(steps_a, steps_b))
    assert torch.equal(conv_a, conv_b) and torch.equal(ssm_a, ssm_b) and torch.equal(tokens_a, tokens_b)


# kernels/linear_rows configurations for the small test LM (hidden 256: in_proj 256 -> 1024, out_proj 512 -> 256):
# pre-wait loads shorter than K, out_proj in 2 and 4 split-K partial sums
# (the third: TMA weight tiles, the kernels after each projection and the norm launched only after their waits / loops)
SMALL_IN_PROJ = [(64, 128, 0, 128, True, 4, 4), (32, 64, 0, 0, False, 4, 3), (128, 64, 0, 0, True, 4, 6, True, 2)]
SMALL_OUT_PROJ = [(64, 128, 256, 256, True, 4, 2), (32, 64, 128, 64, False, 4, 3), (32, 128, 256, 128, True, 4, 3,
                                                                                       False, 2)]


def use_projections(monkeypatch, which=0, fold=True):
    """fold: the x_proj partials summed by the conv kernel (ROWS_FOLD_REDUCE) and the state kernel's conv / z /
    dt_proj reads before its wait (ROWS_PRE_WAIT), as by default; False: both off (a reduction kernel between)."""
    from multimodal_mamba.kernels.decode_step import fused

    monkeypatch.setattr(fused, "IN_PROJ_CONFIG", SMALL_IN_PROJ[which])
    monkeypatch.setattr(fused, "OUT_PROJ_CONFIG", SMALL_OUT_PROJ[which])
    monkeypatch.setattr(fused, "ADD_NORM_TRIGGER_AFTER_WAIT", which == 2)
    for name in ("ROWS_FOLD_REDUCE", "ROWS_PRE_WAIT"):
        monkeypatch.setattr(fused, name, fold)


@gpu
@pytest.mark.parametrize("which, fold", [(0, True), (1, True), (2, True), (2, False)])
@pytest.mark.parametrize("batch", [4, 8, 16, 24])
def test_fused_step_with_few_rows_projections_matches_the_module_path(batch, which, fold, monkeypatch):
    """in_proj / out_proj on kernels/linear_rows (out_proj's partial sums added by add_rms_norm) from
    PROJ_MIN_BATCH rows on (batch 4: the module calls): the step equals the module path in bf16 (with the x_proj
    partials summed by the conv kernel and the state kernel's early reads, or without)."""
    from multimodal_mamba.kernels.decode_step import fused

    use_projections(monkeypatch, which, fold)
    routed = []
    original = fused.linear_rows_partials
    monkeypatch.setattr(fused, "linear_rows_partials", lambda *a, **k: routed.append(1) or original(*a, **k))
    model = small_lm("cuda", torch.bfloat16, layers=4, hidden=256, vocab=1000)
    compare_steps(model, fused, batch, steps=4, atol=3e-2, rtol=0, scaled=True)
    assert bool(routed) == (fused.PROJ_MIN_BATCH <= batch <= fused.PROJ_MAX_BATCH)


@gpu
@pytest.mark.parametrize("which, fold", [(0, True), (2, True), (2, False)])
@pytest.mark.parametrize("batch", [16, 24])
def test_greedy_tokens_identical_with_and_without_graphs_with_few_rows_projections(batch, which, fold, monkeypatch):
    use_projections(monkeypatch, which, fold)
    model = small_lm("cuda", torch.bfloat16, layers=4, hidden=256, vocab=1000)
    calls = _count_fused_steps(model, monkeypatch)
    ids = torch.randint(2, 1000, (batch, 7), generator=torch.Generator().manual_seed(1)).cuda()
    eager = model.generate(ids, decode_cuda_graph=False, max_new_tokens=16, do_sample=False)
    graphed = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(eager, graphed) and len(calls) >= 15


@gpu
@pytest.mark.parametrize("which, fold", [(0, True), (2, True), (2, False)])
def test_programmatic_dependent_launch_changes_no_bit_with_few_rows_projections(which, fold, monkeypatch):
    """As test_programmatic_dependent_launch_changes_no_bit at batch 16, with in_proj / out_proj on
    kernels/linear_rows (PDL-launched too, their first weight columns loaded before the wait), with and without the
    x_proj partials summed by the conv kernel and the state kernel's early reads."""
    from multimodal_mamba.kernels import utils

    use_projections(monkeypatch, which, fold)
    monkeypatch.setattr(utils, "_PDL_DEVICES", {})
    monkeypatch.setattr(utils, "PDL", True)
    if not utils.pdl_available("cuda"):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 and Triton >= 3.4")
    model = small_lm("cuda", torch.bfloat16, layers=3, hidden=256, vocab=1000)
    backbone = model.backbone
    ops = modeling_mamba_lm._package_kernels()["decode_step"]
    ids = torch.randint(2, 1000, (16, 8), generator=torch.Generator().manual_seed(3)).cuda()
    results = []
    for pdl in (True, False):
        monkeypatch.setattr(utils, "PDL", pdl)
        monkeypatch.setattr(utils, "_PDL_DEVICES", {})
        with torch.no_grad():
            cache = model.allocate_cache(16)
            model(ids[:, :6], cache_params=cache, use_cache=True)
            steps = []
            for t in (6, 7):
                steps.append(backbone._fused_decode_step(backbone.embeddings(ids[:, t:t + 1]), cache, ops).clone())
                cache.seqlen_offset += 1
        model.decode_graphs.clear()
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        results.append((steps, cache.conv_states.clone(), cache.ssm_states.clone(), tokens))
    (steps_a, conv_a, ssm_a, tokens_a), (steps_b, conv_b, ssm_b, tokens_b) = results
    assert all(torch.equal(a, b) for a, b in zip(steps_a, steps_b))
    assert torch.equal(conv_a, conv_b) and torch.equal(ssm_a, ssm_b) and torch.equal(tokens_a, tokens_b)


@gpu
def test_lora_model_falls_back_to_the_module_path(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = small_lm("cuda", torch.float32, layers=3)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["in_proj", "x_proj", "dt_proj"],
                                            init_lora_weights=False)).eval()
    calls = _count_fused_steps(model, monkeypatch)
    ids = torch.randint(2, 300, (2, 7), generator=torch.Generator().manual_seed(1)).cuda()
    eager = lora.generate(ids, decode_cuda_graph=False, max_new_tokens=12, do_sample=False)
    graphed = lora.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(eager, graphed) and not calls
    # The LoRA terms count on the module path: the merged model (plain modules again, so the fused path) gives the
    # LoRA model's decode-step logits.
    with torch.no_grad():
        cache = model.allocate_cache(2)
        lora(ids, cache_params=cache, use_cache=True)
        step = lora(eager[:, 7:8], cache_params=cache, use_cache=True).logits
        merged = lora.merge_and_unload()
        assert merged.backbone._fused_decode_ops(torch.zeros(1, 1, 64, device="cuda")) is not None
        cache = merged.allocate_cache(2)
        merged(ids, cache_params=cache, use_cache=True)
        merged_step = merged(eager[:, 7:8], cache_params=cache, use_cache=True).logits
    assert calls
    torch.testing.assert_close(merged_step, step, atol=1e-4, rtol=1e-4)
