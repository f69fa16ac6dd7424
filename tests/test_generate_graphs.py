"""CUDA-graph decode inside generate() (modeling/decode_graphs.py).

GPU tests (marked ``gpu``, skipped without CUDA): greedy, sampling, beam search, streaming, left-padded batches and
stopping criteria give the same tokens with graphs as without; graphs are reused across generate calls and
captured again when the weights' storage changes; in-place weight updates are seen; a stale cache is refused;
a capture that fails falls back to eager decoding, said once; VL-Mamba (image in the prompt) and a PEFT LoRA
model decode through the graph too.

Prompt prefill graphs (GPU): captured the second time a prompt shape is seen, same logits, states and tokens as the
eager prefill (greedy, sampling, beam search, left padding), switched off by ``config.prefill_cuda_graph``, dropped
when the weights move, a failed capture falls back.

CPU tests: buckets, the eager fallback on CPU (said once, same tokens), cache views and invalidation.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import MambaConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from multimodal_mamba import MambaCausalLM
from multimodal_mamba.modeling import decode_graphs
from multimodal_mamba.modeling.decode_graphs import bucket_size
from multimodal_mamba.modeling.modeling_mamba_lm import MambaStateCache

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def small_lm(device="cpu", dtype=torch.float32, seed=0, layers=3):
    config = MambaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=layers, state_size=16, expand=2,
                         conv_kernel=4, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    model = MambaCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompts(batch, length=7, device="cpu", seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 300, (batch, length), generator=generator).to(device)


def generate_both(model, input_ids, **kwargs):
    """Tokens with and without CUDA-graph decode (same arguments, same seed)."""
    torch.manual_seed(123)
    eager = model.generate(input_ids, decode_cuda_graph=False, **kwargs)
    torch.manual_seed(123)
    graphed = model.generate(input_ids, **kwargs)
    return eager, graphed


# ----------------------------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------------------------
def test_bucket_sizes():
    assert [bucket_size(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 256)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 24, 256]
    assert bucket_size(257) is None and bucket_size(0) is None


def test_cpu_generate_decodes_eagerly_and_says_so_once(caplog):
    model = small_lm()
    decode_graphs._said.discard("no-cuda")
    with caplog.at_level(logging.INFO, logger=decode_graphs.__name__):
        eager, graphed = generate_both(model, prompts(2), max_new_tokens=6, do_sample=False)
        model.generate(prompts(2), max_new_tokens=3, do_sample=False)
    assert torch.equal(eager, graphed)
    said = [r for r in caplog.records if "CUDA-graph decode needs a CUDA device" in r.getMessage()]
    assert len(said) == 1
    assert model.decode_graphs.buckets() == {}


def test_cache_rows_are_views_and_an_invalidated_cache_is_refused():
    model = small_lm()
    full = MambaStateCache.for_config(model.config, 4)
    view = full.rows(3)
    assert view.conv_states.data_ptr() == full.conv_states.data_ptr() and view.batch_size == 3
    view.ssm_states.fill_(2.0)
    assert full.ssm_states[:, :3].eq(2.0).all() and full.ssm_states[:, 3].eq(0.0).all()
    model(prompts(3), cache_params=view, use_cache=True)  # prefill into the view
    view.invalidate("a later generate() call reuses its CUDA-graph buffers")
    with pytest.raises(ValueError, match="can no longer be used: a later generate"):
        model(prompts(3, length=1), cache_params=view, use_cache=True)


def test_copied_model_has_its_own_graphs():
    import copy

    model = small_lm()
    graphs = model.decode_graphs
    copied = copy.deepcopy(model)
    assert copied.decode_graphs is not graphs
    assert copied.decode_graphs._decode_fn.__self__ is copied


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2, 4, 16])
def test_greedy_tokens_identical_with_graphs(dtype, batch):
    model = small_lm("cuda", dtype)
    eager, graphed = generate_both(model, prompts(batch, device="cuda"), max_new_tokens=24, do_sample=False)
    assert torch.equal(eager, graphed)
    assert model.decode_graphs.buckets() == {batch: True}


@gpu
def test_batch_below_its_bucket():
    model = small_lm("cuda")
    eager, graphed = generate_both(model, prompts(3, device="cuda"), max_new_tokens=16, do_sample=False)
    assert torch.equal(eager, graphed)
    assert model.decode_graphs.buckets() == {4: True}


@gpu
def test_sampling_and_beam_search_identical_with_graphs():
    model = small_lm("cuda")
    ids = prompts(2, device="cuda")
    eager, graphed = generate_both(model, ids, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(eager, graphed)
    eager, graphed = generate_both(model, ids, max_new_tokens=12, num_beams=3, do_sample=False)
    assert torch.equal(eager, graphed)
    assert model.decode_graphs.buckets()[8] is True  # 2 prompts x 3 beams


@gpu
def test_left_padded_batch_equals_each_prompt_alone():
    model = small_lm("cuda")
    long, short = prompts(1, 9, "cuda", seed=3), prompts(1, 5, "cuda", seed=4)
    input_ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long, device="cuda"), short], 1)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    batch = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    alone = [model.generate(p, max_new_tokens=12, do_sample=False, decode_cuda_graph=False) for p in (long, short)]
    assert torch.equal(batch[0, 9:], alone[0][0, 9:])
    assert torch.equal(batch[1, 9:], alone[1][0, 5:])


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.detach().cpu().reshape(-1))

    def end(self):
        self.ended = True


class StopAfter(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@gpu
def test_streaming_and_stopping_criteria():
    model = small_lm("cuda")
    ids = prompts(1, device="cuda")
    streamer = CollectingStreamer()
    out = model.generate(ids, max_new_tokens=10, do_sample=False, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat(streamer.chunks), out[0].cpu())
    stop_token = int(out[0, ids.shape[1] + 4])
    eager, graphed = generate_both(model, ids, max_new_tokens=30, do_sample=False,
                                   stopping_criteria=StoppingCriteriaList([StopAfter(stop_token)]))
    assert torch.equal(eager, graphed) and graphed.shape[1] <= ids.shape[1] + 5
    eager, graphed = generate_both(model, ids, max_new_tokens=30, do_sample=False, eos_token_id=stop_token)
    assert torch.equal(eager, graphed) and int(graphed[0, -1]) == stop_token


@gpu
def test_graph_reused_then_recaptured_when_weights_move():
    model = small_lm("cuda")
    ids = prompts(2, device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False)
    bucket = next(iter(model.decode_graphs._buckets.values()))
    graph = bucket.graph
    out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert bucket.graph is graph  # reused, not captured again
    # in-place weight updates (an optimizer step) are seen by the replayed graph, A_log's included
    with torch.no_grad():
        model.backbone.layers[1].mixer.out_proj.weight.mul_(1.5)
        model.backbone.layers[0].mixer.A_log.add_(0.3)
    eager, graphed = generate_both(model, ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(eager, graphed) and bucket.graph is graph
    # new storage (dtype round trip): the stale graph is dropped and captured again
    model.to(torch.float64).to(torch.float32)
    eager, graphed = generate_both(model, ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(eager, graphed) and bucket.graph is not graph
    # the cache returned by an earlier call now serves later calls: refused, not silently wrong
    stale = out.past_key_values  # the MambaStateCache of that call
    with pytest.raises(ValueError, match="can no longer be used"):
        model(ids[:, :1], cache_params=stale, use_cache=True)


def lm_whose_capture_fails(monkeypatch, graphed_fn: str, said_key: str):
    """A small CUDA LM whose decode graphs' ``graphed_fn`` ("_decode_fn" or "_prefill_fn") ends with a host sync (not
    capturable in a CUDA graph), its capture-failure message (``said_key``) not yet said in this process."""
    model = small_lm("cuda")
    logits_fn = getattr(model.decode_graphs, graphed_fn)

    def syncing(*args):
        logits = logits_fn(*args)
        float(logits.sum())
        return logits

    monkeypatch.setattr(model.decode_graphs, graphed_fn, syncing)
    decode_graphs._said.discard(said_key)
    return model


@gpu
def test_capture_failure_falls_back_and_says_so_once(caplog, monkeypatch):
    model = lm_whose_capture_fails(monkeypatch, "_decode_fn", "capture")
    ids = prompts(1, device="cuda")
    with caplog.at_level(logging.WARNING, logger=decode_graphs.__name__):
        eager, graphed = generate_both(model, ids, max_new_tokens=10, do_sample=False)
        again = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(eager, graphed) and torch.equal(eager, again)
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1
    # the failed capture left CUDA's random number generator usable: sampling (and randn) still work
    torch.randn(3, device="cuda")
    sampled = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=20)
    assert sampled.shape == (1, ids.shape[1] + 4)


@gpu
def test_vl_mamba_decodes_through_the_graph(words):
    from multimodal_mamba.tiny import build_tiny_vl_mamba, random_image

    model, processor = build_tiny_vl_mamba(words, projector_type="vss_l2", scan_type="cross")
    model = model.cuda().eval()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=[random_image(0), random_image(1)], text=[text, text], return_tensors="pt").to("cuda")
    eager, graphed = generate_both(model, **inputs, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(eager, graphed)
    assert model.language_model.decode_graphs.buckets() == {2: True}


@gpu
def test_peft_lora_model_decodes_through_the_graph():
    from peft import LoraConfig, get_peft_model

    model = small_lm("cuda")
    # (PEFT refuses out_proj on model_type "mamba", transformers' own Mamba ignores it on its fused path)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["in_proj", "x_proj", "dt_proj"],
                                            init_lora_weights=False))
    lora.eval()
    ids = prompts(2, device="cuda")
    eager, graphed = generate_both(lora, ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(eager, graphed)
    assert model.decode_graphs.buckets() == {2: True}


def test_A_follows_in_place_updates_and_the_decode_step_leaves_no_override():
    model = small_lm()
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        mixer.ssm_A()
        mixer.A_log.add_(0.5)  # as an optimizer step would (fused AdamW does not even bump the version counter)
        assert torch.equal(mixer.ssm_A(), -torch.exp(mixer.A_log.float()))
        cache = model.allocate_cache(2)
        model(prompts(2), cache_params=cache, use_cache=True)
        graph_step = model._decode_step_logits(prompts(2, length=1), cache)
    assert "_A_override" not in mixer.__dict__
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model(prompts(2), cache_params=cache, use_cache=True)
        eager_step = model(prompts(2, length=1), cache_params=cache, use_cache=True).logits
    assert torch.allclose(graph_step, eager_step, atol=1e-6)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rms_norm_matches_the_module(dtype):
    from multimodal_mamba.kernels.rms_norm.naive import rms_norm_ref
    from multimodal_mamba.kernels.rms_norm import rms_norm_triton

    weight = torch.randn(2560, device="cuda").to(dtype)
    for x in (torch.randn(3, 7, 2560, device="cuda") * 3, torch.randn(1, 2560, device="cuda")):
        for input_dtype in (dtype, torch.float32):
            ref = rms_norm_ref(x, weight, 1e-5, input_dtype)
            out = rms_norm_triton(x, weight, 1e-5, input_dtype)
            assert out.dtype == ref.dtype and out.shape == ref.shape
            tol = 1e-6 if out.dtype == torch.float32 and dtype == torch.float32 else 1e-2
            assert (out.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_transpose_is_exact_and_differentiable(dtype):
    from multimodal_mamba.kernels.transpose import channel_major_triton
    from multimodal_mamba.kernels.transpose.naive import channel_major_ref

    for shape in ((1, 2048, 5120), (3, 77, 130), (2, 1, 9)):
        base = torch.randn(shape[0], shape[1], 2 * shape[2], device="cuda", dtype=dtype)
        x = base[..., : shape[2]].detach().requires_grad_()  # a strided view, as the in_proj chunks
        out = channel_major_triton(x)
        assert out.is_contiguous() and torch.equal(out, channel_major_ref(x))
        grad = torch.randn_like(out)
        out.backward(grad)
        assert torch.equal(x.grad, grad.transpose(1, 2))


@gpu
def test_triton_transpose_of_several_tensors_in_one_launch():
    from multimodal_mamba.kernels.transpose import channel_major_many

    base = torch.randn(2, 300, 3 * 96, device="cuda", dtype=torch.bfloat16)
    parts = base[..., :96], base[..., 96:192], base[..., 192:]
    for count in (1, 2, 3):
        outs = channel_major_many(*parts[:count])
        assert len(outs) == count
        for out, part in zip(outs, parts):
            assert out.is_contiguous() and torch.equal(out, part.transpose(1, 2))
    with pytest.raises(ValueError, match="same shape"):
        channel_major_many(parts[0], base[..., :95])


@gpu
def test_triton_transpose_of_a_prefills_five_tensors_in_one_launch():
    """x, z, delta (one width) and B, C (another, strided views of x_proj's output) in one launch; more than five
    take several."""
    from multimodal_mamba.kernels.transpose import channel_major_group, time_contiguous_group

    wide = torch.randn(2, 300, 3 * 96, device="cuda", dtype=torch.bfloat16)
    narrow = torch.randn(2, 300, 5 + 2 * 16, device="cuda", dtype=torch.bfloat16)
    parts = [wide[..., :96], wide[..., 96:192], wide[..., 192:], narrow[..., 5:21], narrow[..., 21:]]
    for tensors in (parts, parts[3:], parts + parts[:3]):
        outs = channel_major_group(*tensors)
        assert len(outs) == len(tensors)
        for out, part in zip(outs, tensors):
            assert out.is_contiguous() and torch.equal(out, part.transpose(1, 2))
        # the same from the (batch, C, L) views the mixer holds
        outs = time_contiguous_group(*(t.transpose(1, 2) for t in tensors))
        for out, part in zip(outs, tensors):
            assert out.is_contiguous() and torch.equal(out, part.transpose(1, 2))
    with pytest.raises(ValueError, match="same batch, length and dtype"):
        channel_major_group(parts[0], narrow[:1, :, 5:21])


def test_attention_mask_has_padding_skips_only_the_check():
    model = small_lm()
    ids = prompts(2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        for m in (mask, torch.ones_like(ids)):
            auto = model.backbone(ids, attention_mask=m).last_hidden_state
            told = model.backbone(ids, attention_mask=m, attention_mask_has_padding=not bool(m.all())).last_hidden_state
            assert torch.equal(auto, told)


# ----------------------------------------------------------------------------------------------------------------
# Prompt prefill graphs (GPU)
# ----------------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_prefill_graph_on_second_sight_gives_the_eager_tokens(dtype, batch):
    model = small_lm("cuda", dtype)
    runs = []
    for seed in (1, 2, 3):  # the same shape, other tokens: first sight eager, then capture, then a plain replay
        ids = prompts(batch, length=11, device="cuda", seed=seed)
        eager, graphed = generate_both(model, ids, max_new_tokens=10, do_sample=False)
        assert torch.equal(eager, graphed)
        runs.append(model.decode_graphs.prefill_graphs()[bucket_size(batch)])
    assert runs[0] == [] and len(runs[1]) == 1 and runs[2] == runs[1]
    assert runs[1][0][:3] == (batch, 11, False)


@gpu
def test_prefill_graph_logits_and_states_equal_the_eager_prefill():
    model = small_lm("cuda", torch.bfloat16)
    with torch.no_grad():
        for seed in (1, 2, 3):
            ids = prompts(4, length=9, device="cuda", seed=seed)
            cache = model._graph_generation_cache(4, ids.device)
            graphed = model(ids, cache_params=cache, use_cache=True, logits_to_keep=1).logits
            states = cache.conv_states.clone(), cache.ssm_states.clone()
            assert cache.seqlen_offset == 9
            eager_cache = model.allocate_cache(4)
            eager = model(ids, cache_params=eager_cache, use_cache=True, logits_to_keep=1).logits
            assert torch.equal(graphed, eager)
            assert torch.equal(states[0], eager_cache.conv_states) and torch.equal(states[1], eager_cache.ssm_states)
    assert len(model.decode_graphs.prefill_graphs()[4]) == 1


@gpu
def test_prefill_graph_with_left_padding_sampling_and_beams():
    model = small_lm("cuda")
    ids = prompts(2, length=9, device="cuda", seed=5)
    for pad in (4, 2, 3):  # one padded-mask graph serves every padding pattern of that shape
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        eager, graphed = generate_both(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert torch.equal(eager, graphed)
    assert [k[2] for k in model.decode_graphs.prefill_graphs()[2]] == [True]
    for _ in range(3):
        eager, graphed = generate_both(model, ids, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
        assert torch.equal(eager, graphed)
        eager, graphed = generate_both(model, ids, max_new_tokens=8, num_beams=3, do_sample=False)
        assert torch.equal(eager, graphed)
    assert len(model.decode_graphs.prefill_graphs()[8]) == 1  # 2 prompts x 3 beams


@gpu
def test_prefill_graph_switch_limits_and_recapture():
    from multimodal_mamba.modeling.decode_graphs import PREFILL_MAX_LENGTH

    model = small_lm("cuda")
    model.config.prefill_cuda_graph = False
    ids = prompts(1, device="cuda")
    for _ in range(3):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    assert model.decode_graphs.prefill_graphs() == {1: []}
    model.config.prefill_cuda_graph = True
    long = prompts(1, length=PREFILL_MAX_LENGTH + 1, device="cuda")
    for _ in range(3):
        eager, graphed = generate_both(model, long, max_new_tokens=4, do_sample=False)
        assert torch.equal(eager, graphed)
    assert model.decode_graphs.prefill_graphs() == {1: []}  # too long: host-bound no more
    for _ in range(2):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    entry = model.decode_graphs._buckets[next(iter(model.decode_graphs._buckets))].prefills
    (captured,) = entry.values()
    with torch.no_grad():  # in-place updates are read at replay
        model.backbone.layers[0].mixer.in_proj.weight.mul_(1.5)
    eager, graphed = generate_both(model, ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(eager, graphed) and next(iter(entry.values())) is captured
    model.to(torch.float64).to(torch.float32)  # new storage: the prefill graph is dropped, then captured again
    for _ in range(2):
        eager, graphed = generate_both(model, ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(eager, graphed)
    bucket = next(iter(model.decode_graphs._buckets.values()))
    assert len(bucket.prefills) == 1 and next(iter(bucket.prefills.values())) is not captured


@gpu
def test_prefill_capture_failure_falls_back_and_says_so_once(caplog, monkeypatch):
    model = lm_whose_capture_fails(monkeypatch, "_prefill_fn", "prefill-capture")
    graphs = model.decode_graphs
    ids = prompts(1, device="cuda")
    with caplog.at_level(logging.WARNING, logger=decode_graphs.__name__):
        for _ in range(3):
            eager, graphed = generate_both(model, ids, max_new_tokens=10, do_sample=False)
            assert torch.equal(eager, graphed)
    assert len([r for r in caplog.records if "CUDA-graph prefill: capture failed" in r.getMessage()]) == 1
    assert graphs.prefill_graphs() == {1: []} and graphs.buckets() == {1: True}
    torch.randn(3, device="cuda")  # CUDA's generator still usable
    assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=20).shape[1] == 11
