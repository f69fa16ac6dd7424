"""The shared mixer and MambaCausalLM against transformers' MambaForCausalLM (the reference LM)."""

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from multimodal_mamba import MambaCausalLM, MambaStateCache, last_backend, ssm_backend
from multimodal_mamba.kernels import cpu as cpp_kernels

AUTO_CPU_SCAN = "cpp" if cpp_kernels.available() else "torch"  # what "auto" runs a CPU inference scan on

CONFIGS = {
    "default": dict(),
    "state4_expand1": dict(state_size=4, expand=1),
    "conv2_rank3": dict(conv_kernel=2, time_step_rank=3),
    "state32_conv3_untied": dict(state_size=32, conv_kernel=3, tie_word_embeddings=False),
    "expand3_bias": dict(expand=3, use_bias=True, use_conv_bias=False, residual_in_fp32=False),
}


def make_pair(seed=0, **overrides):
    config = MambaConfig(**{**dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8), **overrides})
    torch.manual_seed(seed)
    reference = MambaForCausalLM(config).eval()
    ours = MambaCausalLM(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers_mamba(name, backend):
    """"auto" runs the scan on the C++ kernel where it builds (inference, float32), "torch" on the chunked scan."""
    reference, ours = make_pair(**CONFIGS[name])
    ids = torch.randint(0, 97, (2, 45))
    with torch.no_grad(), ssm_backend(backend):
        expected = reference(ids, use_cache=False).logits
        got = ours(ids, use_cache=False).logits
    assert (expected - got).abs().max() <= 1e-4
    assert last_backend("selective_scan") == (AUTO_CPU_SCAN if backend == "auto" else backend)


@pytest.mark.parametrize("name", ["default", "state32_conv3_untied"])
def test_greedy_generation_identical(name):
    reference, ours = make_pair(seed=1, **CONFIGS[name])
    ids = torch.randint(0, 97, (1, 7))
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, do_sample=False), expected)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False), expected)


def test_loads_folder_saved_by_transformers(tmp_path):
    reference, _ = make_pair(seed=2, tie_word_embeddings=False)
    reference.save_pretrained(tmp_path)
    ours = MambaCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max() <= 1e-4
    # and our own save loads back into transformers' class
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    again = MambaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (again(ids).logits - reference(ids).logits).abs().max() <= 1e-4


def test_tied_embeddings_share_storage():
    _, ours = make_pair()
    assert ours.lm_head.weight is ours.backbone.embeddings.weight


def test_cache_is_preallocated_and_updated_in_place():
    _, ours = make_pair(seed=3)
    ids = torch.randint(0, 97, (2, 9))
    cache = ours.allocate_cache(2)
    pointers = (cache.conv_states.data_ptr(), cache.ssm_states.data_ptr())
    with torch.no_grad():
        out = ours(ids, cache_params=cache, use_cache=True)
        assert out.cache_params is cache and cache.seqlen_offset == 9
        step = ours(ids[:, -1:], cache_params=cache, use_cache=True)
    assert (cache.conv_states.data_ptr(), cache.ssm_states.data_ptr()) == pointers
    assert cache.ssm_states.dtype == torch.float32 and cache.seqlen_offset == 10
    # the decode step equals the last position of a full forward over the 10 tokens
    with torch.no_grad():
        full = ours(torch.cat([ids, ids[:, -1:]], 1), use_cache=False).logits[:, -1]
    assert (step.logits[:, -1] - full).abs().max() <= 1e-4


def test_prefill_in_two_parts_equals_one():
    _, ours = make_pair(seed=4)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = ours(ids, use_cache=False).logits
        cache = ours.allocate_cache(2)
        first = ours(ids[:, :23], cache_params=cache, use_cache=True).logits
        second = ours(ids[:, 23:], cache_params=cache, use_cache=True).logits
    assert (torch.cat([first, second], 1) - full).abs().max() <= 1e-4


def test_reference_backend_can_be_forced_and_agrees():
    _, ours = make_pair(seed=5)
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        fast = ours(ids, use_cache=False).logits
        with ssm_backend("reference"):
            slow = ours(ids, use_cache=False).logits
        assert last_backend("selective_scan") == "reference"
    assert (fast - slow).abs().max() <= 1e-4
    ours.config.ssm_backend = "reference"
    with torch.no_grad():
        ours(ids, use_cache=False)
    assert last_backend("selective_scan") == "reference"
    with pytest.raises(ValueError, match="unknown ssm backend"):
        with ssm_backend("cuda-magic"):
            pass


def test_beam_search_and_sampling_run_with_the_cache():
    reference, ours = make_pair(seed=6)
    ids = torch.randint(0, 97, (2, 5))
    mask = torch.ones_like(ids)
    beams = ours.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(beams, reference.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False))
    torch.manual_seed(0)
    sampled = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (4, 11)


def test_wrong_cache_type_is_rejected():
    _, ours = make_pair()
    with pytest.raises(ValueError, match="MambaStateCache"):
        ours(torch.randint(0, 97, (1, 4)), cache_params=object(), use_cache=True)
    with pytest.raises(ValueError, match="holds 3 sequences"):
        ours(torch.randint(0, 97, (1, 4)), cache_params=ours.allocate_cache(3), use_cache=True)


def test_bf16_load_keeps_A_log_and_D_float32(tmp_path):
    _, ours = make_pair()
    ours.save_pretrained(tmp_path)
    loaded = MambaCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    mixer = loaded.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    with torch.no_grad():
        logits = loaded(torch.randint(0, 97, (1, 12))).logits
    assert torch.isfinite(logits).all()


def test_gradients_reach_every_projection():
    _, ours = make_pair()
    ours.train()
    ids = torch.randint(0, 97, (2, 33))
    ours(ids, labels=ids).loss.backward()
    mixer = ours.backbone.layers[0].mixer
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj", "conv1d"):
        grad = getattr(mixer, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert mixer.A_log.grad.abs().sum() > 0 and mixer.D.grad.abs().sum() > 0
