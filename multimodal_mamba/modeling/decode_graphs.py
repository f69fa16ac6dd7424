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


class _Bucket:
    """Static cache, static input and (once captured) the graph and its output for one batch-size bucket."""

    def __init__(self, size: int, cache):
        self.size = size
        self.cache = cache  # MambaStateCache of ``size`` rows (the graph's static state)
        self.input_ids = torch.zeros(size, 1, dtype=torch.long, device=cache.conv_states.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None  # (size, 1, vocab) float32, written by every replay
        self.signature = None
        self.owner = None  # the MambaStateCache view handed to the current generate call
        self.failed = False


class DecodeGraphs:
    """Per-bucket CUDA graphs of one language model's decode step.

    ``make_cache(batch)`` -> (batch, ...) views of a bucket's static cache (or None: decode eagerly);
    ``step(input_ids (batch, 1), cache)`` -> logits (batch, 1, vocab) float32, the cache advanced by one token.

    ``decode_fn(input_ids (B, 1), cache) -> logits (B, 1, vocab)`` is the model's own eager decode step; it is what
    gets captured. ``allocate(batch, device, dtype)`` allocates a ``MambaStateCache``; ``signature()`` returns
    something that changes whenever a captured graph would be stale (parameter storage, op backend).
    """

    def __init__(self, decode_fn: Callable, allocate: Callable, signature: Callable):
        self._decode_fn = decode_fn
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
        return view

    # ------------------------------------------------------------------------------------------------------------
    def step(self, input_ids: torch.Tensor, cache) -> Optional[torch.Tensor]:
        """One decode step through the bucket's graph (captured on first use). Returns None if capture fails
        (the caller then runs the step eagerly; this bucket stays eager from then on)."""
        bucket: _Bucket = cache.graph_bucket
        if bucket.owner is not cache:
            raise ValueError("this cache_params belongs to an earlier generate() call whose CUDA-graph buffers "
                             "were reused; pass a fresh cache")
        batch = input_ids.shape[0]
        if bucket.graph is None:
            if not self._capture(bucket, input_ids, cache):
                return None
        bucket.input_ids[:batch].copy_(input_ids)
        bucket.graph.replay()
        cache.seqlen_offset += 1
        return bucket.logits[:batch].clone()

    def _capture(self, bucket: _Bucket, input_ids, cache) -> bool:
        static = bucket.cache
        batch = input_ids.shape[0]
        # Warm-up runs (cuBLAS handles, Triton compilation) execute the step for real: save the live rows.
        saved = (static.conv_states.clone(), static.ssm_states.clone())
        static.seqlen_offset = max(1, cache.seqlen_offset)
        bucket.input_ids.zero_()
        bucket.input_ids[:batch].copy_(input_ids)
        try:
            stream = torch.cuda.Stream(device=static.conv_states.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self._decode_fn(bucket.input_ids, static)
            torch.cuda.current_stream().wait_stream(stream)
            static.conv_states.copy_(saved[0])
            static.ssm_states.copy_(saved[1])
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
                logits = self._decode_fn(bucket.input_ids, static)
        except Exception as error:  # capture is impossible here (an op that syncs, an unsupported kernel, ...)
            _close_failed_capture(static.conv_states.device)
            static.conv_states.copy_(saved[0])
            static.ssm_states.copy_(saved[1])
            bucket.failed = True
            _say_once("capture", f"CUDA-graph decode: capture failed ({type(error).__name__}: {error}); "
                                 "decoding eagerly")
            return False
        bucket.graph, bucket.logits, bucket.signature = graph, logits, self._signature()
        return True

    # A copied or pickled model starts without graphs (they hold CUDA graphs and the original's tensors).
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_no_graphs, ())

    def buckets(self) -> Dict[int, bool]:
        """{bucket size: captured?} of the live buckets (for tests and benchmarks)."""
        return {key[0]: bucket.graph is not None for key, bucket in self._buckets.items()}
