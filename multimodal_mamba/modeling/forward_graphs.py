"""Whole inference forwards captured as CUDA graphs and replayed (Coupled Mamba's ``inference_cuda_graphs``).

A Coupled Mamba forward at the paper's lengths is ~250 small kernels (per layer and modality: norm, in_proj, conv,
x_proj, dt_proj, out_proj, residual; per layer one coupled scan), and the host needs longer to launch them than the
GPU needs to run them (H200, batch 32, L 500: ~6.8 ms of host time against ~3.8 ms of kernels). A CUDA graph
launches them all at once. ``ForwardGraphs`` keeps one graph per input signature (the input tensors' shapes, dtypes
and devices, the parameters' storage and the forced op backend), least recently used first out beyond
``max_graphs``: on a new signature it runs the forward once on a side stream (warm-up: Triton compilation, cuBLAS
workspaces), captures it with static copies of the inputs, and replays it for every later call of that signature,
copying the new inputs into the static ones first. Outputs are cloned out of the graph's memory (a result stays
valid after the next call). Parameters updated in place (optimizers) are read at replay; replaced ones change the
signature. Python forward hooks run at capture only. When capture fails the forward runs eagerly (logged once).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch

from .decode_graphs import _close_failed_capture, _say_once, capture_graph

logger = logging.getLogger(__name__)


def _clone_tree(value):
    """Clone every tensor of a (nested) tuple / list / dict / ModelOutput; other values pass unchanged."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):  # ModelOutput is an OrderedDict: rebuild the same class from its fields
        return type(value)(**{k: _clone_tree(v) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_tree(v) for v in value)
    return value


_BRANCH_STREAMS: dict = {}  # torch.device -> the side streams made so far (reused by every capture)


class CaptureBranches:
    """Independent pieces of a forward (one per modality, say) put on separate CUDA streams while a CUDA graph is
    being captured, so that its replay runs them concurrently: small kernels of one piece (a Coupled Mamba chunk's
    GEMMs of 2048 rows) leave most of the GPU idle, and a graph replays each stream's kernels in order.

    ``capture_branches(tensor, count)`` returns one when ``tensor`` is on CUDA and its current stream is capturing,
    else None (eager forwards stay on one stream: switching streams costs host time there). Piece 0 stays on the
    current stream; pieces 1 .. count - 1 get side streams (made once per process and device: cuBLAS keeps a 32 MiB
    workspace per stream), each of which waits for the current stream on creation of this object. ``branch(i)`` is
    the context for piece i; ``join()`` makes the current stream wait for the side streams. A tensor made on a branch
    and read after ``join()`` is safe to free whenever: its memory returns to that branch's stream, which reuses it
    only after its next fork, i.e. after everything the current stream had queued by then.
    """

    def __init__(self, device, count: int):
        self.main = torch.cuda.current_stream(device)
        streams = _BRANCH_STREAMS.setdefault(device, [])
        while len(streams) < count - 1:
            streams.append(torch.cuda.Stream(device=device))
        self.streams = streams[:count - 1]
        for stream in self.streams:
            stream.wait_stream(self.main)

    def branch(self, index: int):
        return torch.cuda.stream(self.streams[index - 1]) if index > 0 else contextlib.nullcontext()

    def join(self) -> None:
        for stream in self.streams:
            self.main.wait_stream(stream)


def capture_branches(tensor: torch.Tensor, count: int) -> Optional[CaptureBranches]:
    """A ``CaptureBranches`` for ``count`` pieces when a CUDA graph capture is under way on ``tensor``'s device and
    there is more than one piece, else None."""
    if count < 2 or not tensor.is_cuda or not torch.cuda.is_current_stream_capturing():
        return None
    return CaptureBranches(tensor.device, count)


def on_branch(branches: Optional[CaptureBranches], index: int):
    """The context for piece ``index``: its stream under a capture, nothing otherwise."""
    return branches.branch(index) if branches is not None else contextlib.nullcontext()


class _Captured:
    __slots__ = ("graph", "static_inputs", "static_output")

    def __init__(self, graph, static_inputs, static_output):
        self.graph, self.static_inputs, self.static_output = graph, static_inputs, static_output


class ForwardGraphs:
    """CUDA graphs of ``forward(*inputs)`` per input signature (see the module docstring).

    ``run(forward, inputs, extra_key)``: inputs is a sequence of CUDA tensors (the only data that may change between
    calls of one signature; everything else the forward reads must be fixed by ``extra_key`` or be parameters);
    returns the forward's output, or None when the call is not eligible or the capture failed (then run it eagerly).
    """

    def __init__(self, max_graphs: int = 4):
        if max_graphs < 1:
            raise ValueError(f"ForwardGraphs: max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[tuple, Optional[_Captured]]" = OrderedDict()

    def clear(self) -> None:
        self._graphs.clear()

    def __len__(self):
        return sum(1 for g in self._graphs.values() if g is not None)

    def __deepcopy__(self, memo):  # graphs refer to this model's memory: a copied model captures its own
        return ForwardGraphs(self.max_graphs)

    def __reduce__(self):
        return ForwardGraphs, (self.max_graphs,)

    def run(self, forward: Callable, inputs: Sequence[torch.Tensor], parameters: Sequence[torch.Tensor],
            extra_key=()) -> Optional[object]:
        """A ValueError of the forward's first (warm-up) run propagates, and nothing is kept for its signature."""
        if not inputs or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
            return None
        if torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return None
        key = (tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs),
               tuple(p.data_ptr() for p in parameters), extra_key)
        captured = self._graphs.get(key, False)
        if captured is False:
            captured = self._capture(forward, inputs, key)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            if captured is None:
                return None
            return _clone_tree(captured.static_output)  # the capture already ran on these inputs
        self._graphs.move_to_end(key)
        if captured is None:  # this signature failed to capture before: eager
            return None
        for static, new in zip(captured.static_inputs, inputs):
            static.copy_(new)
        captured.graph.replay()
        return _clone_tree(captured.static_output)

    @staticmethod
    def _capture(forward, inputs, key):
        device = inputs[0].device
        static_inputs = [t.clone() for t in inputs]
        try:
            graph, static_output = capture_graph(lambda: forward(*static_inputs), device)
            graph.replay()  # (the capture recorded the kernels without running them)
        except ValueError:  # the forward rejected these inputs (in its warm-up): the caller's error, not a capture's
            _close_failed_capture(device)
            raise
        except Exception as error:  # noqa: BLE001 (any other capture failure means: run eagerly)
            _close_failed_capture(device)
            _say_once(("forward capture", key[0]),
                      f"CUDA graph capture of the forward failed ({error!r}); running eagerly", log=logger)
            return None
        return _Captured(graph, static_inputs, static_output)
