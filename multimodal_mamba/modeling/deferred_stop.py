"""Let transformers' ``generate`` defer its stop check by one step when it decodes from a CUDA-graph cache.

transformers' sampling loop (greedy and multinomial) reads ``unfinished_sequences.max() == 0`` on the host after
every token. On CUDA that is a synchronization per token: the host waits for the step to finish before it starts
preparing the next one, so the loop's own host work (logits processors, argmax, concatenation, stopping criteria,
~0.5 ms per token) adds to the GPU time instead of overlapping it. transformers already has the cure,
``DeferredStopCheck`` (the flag is copied asynchronously and read one step later; one extra step is run and undone
when generation stops early), but enables it only on ``mps`` (its ``is_supported``).

``allow_deferred_stop_check()`` extends that decision for one case only: a CUDA device, not an assistant model, the
cache not returned to the caller, and the cache a ``MambaStateCache`` view of a decode-graph bucket (the cache
``generate`` allocates for itself; a cache the user passes in has no bucket). The extra step then only advances a
state nobody reads afterwards, and transformers removes its token from the output, so the tokens are the same as
without deferral. In every other case transformers' own decision stands. Nothing changes for beam search (it has its
own loop) or for transformers versions without ``DeferredStopCheck`` (then this is a no-op).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()


def _decodes_from_graph_cache(device, cache, cache_is_returned, is_assistant) -> bool:
    """The one case added to transformers' ``DeferredStopCheck.is_supported``."""
    return (
        getattr(device, "type", None) == "cuda"
        and not is_assistant
        and not cache_is_returned
        and getattr(cache, "graph_bucket", None) is not None
        and type(cache).__name__ == "MambaStateCache"
    )


def allow_deferred_stop_check() -> bool:
    """Install the extension (once per process, idempotent); returns whether transformers has the hook."""
    try:
        from transformers.generation import utils as generation_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    check = getattr(generation_utils, "DeferredStopCheck", None)
    original = getattr(check, "is_supported", None) if check is not None else None
    if original is None:
        return False
    with _lock:
        current = check.__dict__.get("is_supported")
        if getattr(getattr(current, "__func__", current), "_extends_for_graph_caches", False):
            return True  # already installed (by this package or a remote-code copy of this module)

        def is_supported(device, cache, cache_is_returned, is_assistant):
            if _decodes_from_graph_cache(device, cache, cache_is_returned, is_assistant):
                return True
            return original(device, cache, cache_is_returned, is_assistant)

        is_supported._extends_for_graph_caches = True
        is_supported.__doc__ = (original.__doc__ or "") + (
            "\n\nExtended by multimodal_mamba: also True for CUDA decoding from a MambaStateCache graph bucket that "
            "is not returned to the caller (see multimodal_mamba/modeling/deferred_stop.py)."
        )
        check.is_supported = staticmethod(is_supported)
    return True
