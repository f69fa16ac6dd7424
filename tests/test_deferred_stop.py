"""transformers' deferred stop check, enabled for CUDA decoding from a decode-graph cache (modeling/deferred_stop.py).

CPU: the extension decides only the case it adds (CUDA, graph-bucket MambaStateCache, cache not returned, not an
assistant) and leaves every other decision to transformers; installing it twice wraps once.
GPU (marked ``gpu``): generate() with graphs uses the deferred check, and its tokens, early stops (eos per row at
different steps, stopping criteria), streamed tokens and scores equal eager decoding's, which checks every step;
with ``return_dict_in_generate`` (the cache goes back to the caller) or a cache passed in, nothing is deferred.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MambaConfig
from transformers.generation import utils as generation_utils

from multimodal_mamba import MambaCausalLM
from multimodal_mamba.modeling.deferred_stop import allow_deferred_stop_check
from multimodal_mamba.modeling.modeling_mamba_lm import MambaStateCache

from test_generate_graphs import CollectingStreamer

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
DeferredStopCheck = generation_utils.DeferredStopCheck


@pytest.fixture
def restore_is_supported():
    original = DeferredStopCheck.__dict__["is_supported"]
    yield
    DeferredStopCheck.is_supported = original


def small_config():
    return MambaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, state_size=16, expand=2, conv_kernel=4,
                       pad_token_id=0, eos_token_id=1, bos_token_id=1)


def graph_cache(config):
    cache = MambaStateCache.for_config(config, 2)
    cache.graph_bucket = object()  # what DecodeGraphs.make_cache sets on the views it hands to generate
    return cache


def test_extension_adds_only_cuda_graph_cache_decoding(restore_is_supported):
    original = DeferredStopCheck.is_supported
    config = small_config()
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    user_cache = MambaStateCache.for_config(config, 2)
    assert not DeferredStopCheck.is_supported(cuda, graph_cache(config), False, is_assistant=False)
    assert allow_deferred_stop_check() is True
    assert DeferredStopCheck.is_supported(cuda, graph_cache(config), False, is_assistant=False)
    # Every other case is transformers' own decision.
    for args in [
        (cuda, graph_cache(config), True, False),  # the cache is returned to the caller
        (cuda, graph_cache(config), False, True),  # an assistant model
        (cuda, user_cache, False, False),  # a cache without a graph bucket (e.g. passed in by the user)
        (cuda, None, False, False),
        (cpu, graph_cache(config), False, False),
        (mps, None, False, False),
        (mps, user_cache, True, False),
    ]:
        assert DeferredStopCheck.is_supported(args[0], args[1], args[2], is_assistant=args[3]) == original(
            args[0], args[1], args[2], is_assistant=args[3]
        ), args
    assert DeferredStopCheck.is_supported(mps, None, False, is_assistant=False)  # transformers' case, kept
    # transformers' own rule on mps reads is_croppable: a state cache cannot roll back, so only when not returned.
    assert DeferredStopCheck.is_supported(mps, user_cache, False, is_assistant=False)
    assert not DeferredStopCheck.is_supported(mps, user_cache, True, is_assistant=False)


def test_a_cache_passed_to_generate_is_marked_as_the_users():
    config = small_config()
    torch.manual_seed(0)
    model = MambaCausalLM(config).eval()
    cache = model.allocate_cache(2)
    model.generate(torch.randint(2, 300, (2, 5)), max_new_tokens=3, do_sample=False, pad_token_id=0,
                   cache_params=cache)
    assert cache._is_user_defined and cache.seqlen_offset == 5 + 2  # transformers' mark: it outlives generate


def test_installing_twice_wraps_once(restore_is_supported):
    assert allow_deferred_stop_check() and allow_deferred_stop_check()
    installed = DeferredStopCheck.__dict__["is_supported"].__func__
    assert installed._extends_for_graph_caches
    assert not getattr(installed.__closure__[0].cell_contents, "_extends_for_graph_caches", False)


def test_cpu_generate_leaves_transformers_decision_alone(restore_is_supported):
    config = small_config()
    torch.manual_seed(0)
    model = MambaCausalLM(config).eval()
    before = DeferredStopCheck.__dict__["is_supported"]
    model.generate(torch.randint(2, 300, (2, 5)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert DeferredStopCheck.__dict__["is_supported"] is before  # no graph cache on CPU: nothing installed


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------
def cuda_lm(dtype=torch.float32):
    # An untied head and no default eos: with the head tied to the embeddings, greedy decoding of this tiny random
    # model repeats one token per row from the first step on (so no eos is first reached late), and the config's
    # eos (1) would end the unconstrained runs that the tests pick their eos from.
    config = small_config()
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = MambaCausalLM(config).to("cuda", dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def first_new_token(row, start):
    """(step, token): the first token of ``row`` that appears for the first time at a step >= start."""
    for step in range(start, len(row)):
        if row[step] not in row[:step]:
            return step, row[step]
    raise AssertionError(f"greedy decoding repeats itself from the start: {row}")


@pytest.fixture
def stop_checks(monkeypatch):
    """Counts the stop-check objects transformers' sampling loop builds, by kind."""
    made = {"deferred": 0, "plain": 0}
    deferred_init, plain_init = generation_utils.DeferredStopCheck.__init__, generation_utils.StopCheck.__init__

    def count_deferred(self, *args, **kwargs):
        made["deferred"] += 1
        deferred_init(self, *args, **kwargs)

    def count_plain(self, *args, **kwargs):
        if type(self) is generation_utils.StopCheck:
            made["plain"] += 1
        plain_init(self, *args, **kwargs)

    monkeypatch.setattr(generation_utils.DeferredStopCheck, "__init__", count_deferred)
    monkeypatch.setattr(generation_utils.StopCheck, "__init__", count_plain)
    return made


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_defers_the_stop_check_with_identical_tokens(stop_checks, dtype):
    model = cuda_lm(dtype)
    ids = torch.randint(2, 300, (3, 6), generator=torch.Generator().manual_seed(1)).cuda()
    free = model.generate(ids, max_new_tokens=24, do_sample=False, decode_cuda_graph=False)
    # An eos that row 0 first reaches at a later step (the others at other steps or never): the loop stops early,
    # one step late.
    eos_step, eos = first_new_token(free[0, ids.shape[1]:].tolist(), 5)
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=eos)
    eager = model.generate(ids, decode_cuda_graph=False, **kwargs)
    assert stop_checks["deferred"] == 0 and stop_checks["plain"] == 2
    streamer = CollectingStreamer()
    graphed = model.generate(ids[:1], streamer=streamer, **kwargs)
    assert stop_checks["deferred"] == 1
    assert torch.equal(torch.cat(streamer.chunks), graphed[0].cpu()) and streamer.ended
    assert graphed.shape[1] == ids.shape[1] + eos_step + 1 and int(graphed[0, -1]) == eos
    graphed = model.generate(ids, **kwargs)
    assert stop_checks["deferred"] == 2
    assert torch.equal(eager, graphed)
    # Sampling goes through the same loop.
    torch.manual_seed(5)
    eager = model.generate(ids, decode_cuda_graph=False, do_sample=True, top_k=30, max_new_tokens=20, eos_token_id=eos)
    torch.manual_seed(5)
    graphed = model.generate(ids, do_sample=True, top_k=30, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(eager, graphed) and stop_checks["deferred"] == 3


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_no_deferral_when_the_cache_goes_back_to_the_caller(stop_checks):
    model = cuda_lm()
    ids = torch.randint(2, 300, (2, 6), generator=torch.Generator().manual_seed(2)).cuda()
    free = model.generate(ids, max_new_tokens=16, do_sample=False, decode_cuda_graph=False)
    eos = first_new_token(free[0, ids.shape[1]:].tolist(), 3)[1]
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, return_dict_in_generate=True,
                         output_scores=True)
    assert stop_checks["deferred"] == 0
    eager = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, return_dict_in_generate=True,
                           output_scores=True, decode_cuda_graph=False)
    assert torch.equal(out.sequences, eager.sequences) and len(out.scores) == len(eager.scores)
    # A cache the user passes in is theirs: no extra step may touch it.
    cache = model.allocate_cache(2, device="cuda")
    model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, cache_params=cache)
    assert stop_checks["deferred"] == 0
