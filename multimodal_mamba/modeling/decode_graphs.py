"""CUDA-graph decode for the Mamba language model: the whole one-token step captured once, replayed per token.

A decode step of a Mamba LM is a few hundred small kernels (per layer: norm, in_proj, conv update, x_proj, dt_proj,
state update, out_proj, residual add) whose launch cost, not their work, dominates at batch 1. Like mamba-ssm's
``cg=True``, the step is captured in a ``torch.cuda.CUDAGraph`` and replayed; unlike it, this sits inside the
standard ``model.generate()``: ``MambaGenerationMixin`` asks ``DecodeGraphs`` for the generation cache, and the
model's forward hands eligible decode steps (one new token per row, no gradients) to ``DecodeGraphs.step``.

Graphs are kept per batch-size bucket (1, 2, 4, 8, then multiples of 8 up to ``MAX_BUCKET``): a bucket owns a
static ``MambaStateCache`` of its full size, and a generate call of ``batch <= bucket`` rows gets a cache whose
tensors are the first ``batch`` rows of it (prefill, beam reordering and the graph all update those rows in place;
the other rows are computed on and ignored). A graph is captured on the first decode step of a bucket and reused
by every later generate call of that bucket, as long as the model's parameters, their storage and the forced op
backend are unchanged (otherwise it is captured again). A cache handed out by an earlier generate call on the
same bucket is then invalidated: using it raises a ValueError instead of reading another call's state.

Prompt prefills (``prefill``): a generate call's prompt prefill writes the same static cache, so it can be replayed
from a graph too. At short prompts the prefill is bound by the host's launches (mamba-2.8b, 16 tokens: ~30 ms of
Python and launches for a few ms of kernels; benchmarks/results/gpu_generate.md), a cost that generate() pays once per
call. A prefill graph is keyed by (rows, prompt length, left padding or not, logits kept) within a bucket and captured
the second time its key is seen (a prompt length used once never pays a capture), for prompts of up to
``PREFILL_MAX_LENGTH`` tokens and ``PREFILL_MAX_TOKENS`` rows x tokens; a bucket keeps its ``PREFILL_GRAPHS`` most
recently used ones. The prefill of a fresh cache only writes the states (it reads none), so a replay equals the eager
prefill bit for bit. The LM's ``config.prefill_cuda_graph = False`` turns this off. Only token-id prompts of the LM's
own forward take it (VL-Mamba prefills from embeddings, eagerly).

Not reentrant: one generate call per model at a time. Python forward hooks on the modules run at capture, not at
replay. Without CUDA, while training, or when capture fails, decoding runs eagerly (the failure is logged once).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

MAX_BUCKET = 256
MAX_LIVE_BUCKETS = 4  # least recently used buckets beyond this are freed
# Prefill graphs: only where the prefill is bound by host launches (short prompts), and bounded in memory (each graph
# keeps a private pool for its activations: ~100 MB at 2048 tokens of the 2.8b shape).
PREFILL_MAX_LENGTH = 128
PREFILL_MAX_TOKENS = 2048
PREFILL_GRAPHS = 4  # per bucket, least recently used first out
PREFILL_SEEN = 64  # keys remembered as seen once, per bucket


def bucket_size(batch: int) -> Optional[int]:
    """The graph bucket for ``batch`` rows: 1, 2, 4, 8, then the next multiple of 8; None above MAX_BUCKET."""
    if batch < 1 or batch > MAX_BUCKET:
        return None
    if batch <= 8:
        return 1 << (batch - 1).bit_length()
    return -(-batch // 8) * 8


_said = set()


def _say_once(key, message: str, level=logging.WARNING, log: logging.Logger = logger) -> None:
    """Log ``message`` on ``log`` the first time ``key`` is seen in this process."""
    if key not in _said:
        _said.add(key)
        log.log(level, message)


def _no_graphs():
    return None


def _close_failed_capture(device) -> None:
    """Undo what a capture that failed part-way leaves behind in CUDA's random number generator.

    ``torch.cuda.graph`` puts the device's generator in capture mode when a capture begins and takes it out only
    when the capture ends successfully; after an invalidated capture (a host sync inside it, say) every later CUDA
    random op of the process (sampling in ``generate``, ``torch.randn``) raised "Offset increment outside graph
    capture encountered unexpectedly" (seen on an H200 with torch 2.11). A tiny capture that succeeds ends it.
    """
    try:
        scratch = torch.zeros(1, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            scratch.add_(1)
        del graph
    except Exception as error:  # pragma: no cover - depends on the CUDA / torch state
        _say_once("capture-cleanup", f"CUDA-graph decode: could not close the failed capture ({error})")


_CAPTURE_STREAMS: dict = {}  # torch.device -> the one side stream every capture (and its warm-up) runs on


def _capture_stream(device) -> "torch.cuda.Stream":
    """The side stream for captures and their warm-ups on ``device``, made once per process. cuBLAS keeps a
    workspace per (handle, stream) for the process's lifetime (32 MiB on an H200): a new warm-up stream per capture
    (from PyTorch's pool of 32) left one more workspace allocated after each capture of a new shape (measured:
    ``benchmarks/diag_graph_memory.py``), and warming up on a stream other than the capture's costs one more."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def capture_graph(fn: Callable, device, warmups: int = 1, pool=None, after_warmup: Optional[Callable] = None):
    """``fn()`` run ``warmups`` times on a side stream (Triton compilation, cuBLAS workspaces: work a capture must not
    do), then ``after_warmup()`` once they have finished (undoing what the warm-ups changed), then ``fn()`` captured in
    a new CUDA graph (in ``pool``, else a private pool), all without gradients. Returns (graph, fn's output, in the
    graph's memory). Raises what the warm-up or the capture raises: the caller then calls ``_close_failed_capture``
    and runs eagerly. Used by the decode step and prefill graphs here and by ``forward_graphs.ForwardGraphs``."""
    stream = _capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream), torch.no_grad():
        output = fn()
    return graph, output


class _Prefill:
    """A captured prompt prefill: its static inputs, the graph and its output logits."""

    __slots__ = ("graph", "input_ids", "attention_mask", "logits")

    def __init__(self, graph, input_ids, attention_mask, logits):
        self.graph, self.input_ids, self.attention_mask, self.logits = graph, input_ids, attention_mask, logits


class _Bucket:
    """Static cache, static input and (once captured) the graph and its output for one batch-size bucket."""

    def __init__(self, size: int, cache):
        self.size = size
        self.cache = cache  # MambaStateCache of ``size`` rows (the graph's static state)
        self.input_ids = torch.zeros(size, 1, dtype=torch.long, device=cache.conv_states.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None  # (size, 1, vocab) float32, written by every replay
        self.signature = None
        self.current_signature = None  # the model's signature when the current generate call got its cache
        self.owner = None  # the MambaStateCache view handed to the current generate call
        self.failed = False
        # Prompt prefills: key -> _Prefill (None: capture failed), keys seen once, and the signature they were captured
        # under (the decode graph may be captured later or never, so it has its own).
        self.prefills: "OrderedDict[tuple, Optional[_Prefill]]" = OrderedDict()
        self.prefill_seen: "OrderedDict[tuple, None]" = OrderedDict()
        self.prefill_signature = None


class DecodeGraphs:
    """Per-bucket CUDA graphs of one language model's decode step.

    ``make_cache(batch)`` -> (batch, ...) views of a bucket's static cache (or None: decode eagerly);
    ``step(input_ids (batch, 1), cache)`` -> logits (batch, 1, vocab) float32, the cache advanced by one token.

    ``prefill(input_ids (batch, L), attention_mask (batch, L) or None, cache, logits_to_keep)`` -> logits (batch, L or
    logits_to_keep, vocab) float32 of a prompt prefill replayed from a graph, or None (run it eagerly).

    ``decode_fn(input_ids (B, 1), cache) -> logits (B, 1, vocab)`` is the model's own eager decode step; it is what
    gets captured. ``prefill_fn(input_ids, attention_mask or None (None: no padding), cache, logits_to_keep) ->
    logits`` is its eager prompt prefill (captured likewise; None: no prefill graphs). ``allocate(batch, device,
    dtype)`` allocates a ``MambaStateCache``; ``signature()`` returns something that changes whenever a captured graph
    would be stale (parameter storage, op backend).
    """

    def __init__(self, decode_fn: Callable, allocate: Callable, signature: Callable,
                 prefill_fn: Optional[Callable] = None):
        self._decode_fn = decode_fn
        self._prefill_fn = prefill_fn
        self._allocate = allocate
        self._signature = signature
        self._buckets: "OrderedDict[Tuple[int, str, torch.dtype], _Bucket]" = OrderedDict()
        self._pool = None

    # ------------------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Free every captured graph and static cache (caches handed out become invalid)."""
        for bucket in self._buckets.values():
            if bucket.owner is not None:
                bucket.owner.invalidate("the model's decode graphs were cleared")
        self._buckets.clear()
        self._pool = None

    def make_cache(self, batch: int, device: torch.device, dtype: torch.dtype):
        """A cache for a generate call of ``batch`` rows backed by a bucket's static cache, or None if graph
        decoding does not apply (no CUDA device, batch above MAX_BUCKET, capture failed before)."""
        device = torch.device(device)
        if device.type != "cuda":
            _say_once("no-cuda", "CUDA-graph decode needs a CUDA device; decoding eagerly", logging.INFO)
            return None
        size = bucket_size(batch)
        if size is None:
            _say_once(f"batch-{batch}", f"CUDA-graph decode: batch {batch} is above {MAX_BUCKET}; decoding eagerly")
            return None
        key = (size, str(device), dtype)
        bucket = self._buckets.get(key)
        signature = self._signature()
        if bucket is not None and bucket.signature is not None and bucket.signature != signature:
            bucket.graph, bucket.logits, bucket.signature = None, None, None  # parameters or backend changed
        if bucket is not None and bucket.prefill_signature is not None and bucket.prefill_signature != signature:
            bucket.prefills.clear()
            bucket.prefill_signature = None
        if bucket is None:
            bucket = _Bucket(size, self._allocate(size, device, dtype))
            self._buckets[key] = bucket
            while len(self._buckets) > MAX_LIVE_BUCKETS:
                _, old = self._buckets.popitem(last=False)
                if old.owner is not None:
                    old.owner.invalidate("its decode graph bucket was freed (too many batch sizes in use)")
        self._buckets.move_to_end(key)
        if bucket.failed:
            return None
        if bucket.owner is not None:
            bucket.owner.invalidate("a later generate() call reuses its CUDA-graph buffers")
        view = bucket.cache.rows(batch)
        view.graph_bucket = bucket
        bucket.owner = view
        bucket.current_signature = signature
        return view

    # ------------------------------------------------------------------------------------------------------------
    def step(self, input_ids: torch.Tensor, cache) -> Optional[torch.Tensor]:
        """One decode step through the bucket's graph (captured on first use). Returns None if capture fails
        (the caller then runs the step eagerly; this bucket stays eager from then on)."""
        bucket = self._owned_bucket(cache)
        batch = input_ids.shape[0]
        if bucket.graph is None:
            if not self._capture(bucket, input_ids, cache):
                return None
        bucket.input_ids[:batch].copy_(input_ids)
        bucket.graph.replay()
        cache.seqlen_offset += 1
        return bucket.logits[:batch].clone()

    @staticmethod
    def _owned_bucket(cache) -> _Bucket:
        """The bucket behind ``cache``; a ValueError when a later generate call took its buffers over."""
        bucket: _Bucket = cache.graph_bucket
        if bucket.owner is not cache:
            raise ValueError("this cache_params belongs to an earlier generate() call whose CUDA-graph buffers "
                             "were reused; pass a fresh cache")
        return bucket

    def _capture(self, bucket: _Bucket, input_ids, cache) -> bool:
        static = bucket.cache
        batch = input_ids.shape[0]
        # Warm-up runs (cuBLAS handles, Triton compilation) execute the step for real: save the live rows.
        saved = (static.conv_states.clone(), static.ssm_states.clone())
        static.seqlen_offset = max(1, cache.seqlen_offset)
        bucket.input_ids.zero_()
        bucket.input_ids[:batch].copy_(input_ids)

        def restore_states():
            static.conv_states.copy_(saved[0])
            static.ssm_states.copy_(saved[1])

        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph, logits = capture_graph(lambda: self._decode_fn(bucket.input_ids, static), static.conv_states.device,
                                          warmups=2, pool=self._pool, after_warmup=restore_states)
        except Exception as error:  # capture is impossible here (an op that syncs, an unsupported kernel, ...)
            _close_failed_capture(static.conv_states.device)
            restore_states()
            bucket.failed = True
            _say_once("capture", f"CUDA-graph decode: capture failed ({type(error).__name__}: {error}); "
                                 "decoding eagerly")
            return False
        bucket.graph, bucket.logits, bucket.signature = graph, logits, self._signature()
        return True

    # ------------------------------------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], cache,
                logits_to_keep: int = 0) -> Optional[torch.Tensor]:
        """A fresh cache's prompt prefill through a graph: logits (batch, L or logits_to_keep, vocab) float32 (a copy),
        the cache holding the prompt; or None where it does not apply or is not captured yet (the caller then runs the
        prefill eagerly: the first sight of a key, a prompt too long, a capture that failed).

        input_ids (batch, L) on the cache's device; attention_mask (batch, L) with 0 on (left) padding, or None.
        """
        bucket = self._owned_bucket(cache)
        if self._prefill_fn is None or cache.seqlen_offset != 0 or input_ids.dim() != 2:
            return None
        batch, length = input_ids.shape
        if length > PREFILL_MAX_LENGTH or batch * length > PREFILL_MAX_TOKENS or batch != cache.batch_size:
            return None
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            return None  # (the eager path says what is wrong with it)
        # One host sync, as the eager prefill's own check: a mask without padding is no mask.
        padded = attention_mask is not None and not bool(attention_mask.all())
        key = (batch, length, padded, attention_mask.dtype if padded else None, int(logits_to_keep))
        if key not in bucket.prefills:
            if key not in bucket.prefill_seen:  # first sight: remember it, run eagerly
                bucket.prefill_seen[key] = None
                while len(bucket.prefill_seen) > PREFILL_SEEN:
                    bucket.prefill_seen.popitem(last=False)
                return None
            del bucket.prefill_seen[key]
            bucket.prefills[key] = self._capture_prefill(bucket, input_ids, attention_mask if padded else None, cache,
                                                         int(logits_to_keep))
            while len(bucket.prefills) > PREFILL_GRAPHS:
                bucket.prefills.popitem(last=False)
        bucket.prefills.move_to_end(key)
        captured = bucket.prefills[key]
        if captured is None:
            return None
        captured.input_ids.copy_(input_ids)
        if padded:
            captured.attention_mask.copy_(attention_mask)
        captured.graph.replay()
        cache.seqlen_offset = length
        return captured.logits.clone()

    def _capture_prefill(self, bucket: _Bucket, input_ids, attention_mask, cache, logits_to_keep) -> Optional[_Prefill]:
        """Capture ``prefill_fn`` on static copies of the inputs, writing ``cache``'s rows (a view of the bucket's
        static cache, at the same addresses for every later call of this batch size). A fresh cache's prefill reads no
        state, so the warm-up run (executed for real) needs no saving of the states."""
        static_ids = input_ids.clone()
        static_mask = attention_mask.clone() if attention_mask is not None else None
        device = static_ids.device

        def fresh_cache():  # the warm-up prefill advanced it; the captured one must be a fresh cache's prefill too
            cache.seqlen_offset = 0

        try:
            # Its own memory pool (no pool given): the prefill's activations are larger than a decode step's, and a
            # private pool is freed with the graph (least recently used first out).
            graph, logits = capture_graph(lambda: self._prefill_fn(static_ids, static_mask, cache, logits_to_keep),
                                          device, after_warmup=fresh_cache)
        except Exception as error:  # an op that syncs or cannot be captured: this key stays eager
            _close_failed_capture(device)
            _say_once("prefill-capture", f"CUDA-graph prefill: capture failed ({type(error).__name__}: {error}); "
                                         "prefilling eagerly")
            return None
        finally:
            cache.seqlen_offset = 0
        bucket.prefill_signature = bucket.current_signature
        return _Prefill(graph, static_ids, static_mask, logits)

    def prefill_graphs(self) -> Dict[int, list]:
        """{bucket size: [(rows, length, padded, mask dtype, logits kept) of its captured prefill graphs]} (tests and
        benchmarks)."""
        return {key[0]: [k for k, v in bucket.prefills.items() if v is not None]
                for key, bucket in self._buckets.items()}

    # A copied or pickled model starts without graphs (they hold CUDA graphs and the original's tensors).
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_no_graphs, ())

    def buckets(self) -> Dict[int, bool]:
        """{bucket size: captured?} of the live buckets (for tests and benchmarks)."""
        return {key[0]: bucket.graph is not None for key, bucket in self._buckets.items()}
