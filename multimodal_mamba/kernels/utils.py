"""Helpers shared by the Triton kernels: the interpreter switch, memory layouts, small jitted functions, cached
launches."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.0 / math.log(2.0)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:  # grid dependency control for programmatic dependent launch (Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: pdl_available() is False, the kernels never call them
    gdc_launch_dependents = gdc_wait = None

# Programmatic dependent launch (PDL) of the decode-step kernels and the one-row GEMV: set False to launch them the
# ordinary way (MULTIMODAL_MAMBA_PDL=0 at import does the same).
PDL = os.environ.get("MULTIMODAL_MAMBA_PDL", "1") not in ("0", "")
_PDL_DEVICES = {}


def pdl_available(device) -> bool:
    """Whether kernels may be launched with programmatic dependent launch on ``device``: ``PDL`` on, a CUDA GPU of
    compute capability 9.0 or later, not the interpreter, and a Triton with ``launch_pdl`` and the gdc functions.

    A kernel launched so may start while the kernel before it on the stream still runs (once all of that kernel's
    programs have called ``gdc_launch_dependents``, or ended); it must call ``gdc_wait`` (which returns once the kernel
    before it has finished and its writes are visible) before it reads anything an earlier kernel writes, and before
    that may read only inputs that the kernel right before it does not write (here: weights; a decode step starts with
    the embedding lookup, an ordinary launch, so a weight update before the step is complete when it starts). The
    kernels here load their weight tiles, then wait, so a layer's kernels start and stream their weights while the
    one before finishes: the launch gap and the first load latency of each small kernel overlap the previous one.
    Results are unchanged (same arithmetic)."""
    device = torch.device(device)
    if not PDL or device.type != "cuda" or interpret_mode() or gdc_wait is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _PDL_DEVICES.get(index)
    if found is None:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions

            found = ("launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
                     and torch.cuda.get_device_capability(index) >= (9, 0))
        except Exception:
            found = False
        _PDL_DEVICES[index] = found
    return found


def interpret_mode() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): the kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SM_COUNT = {}


def sm_count(device=None) -> int:
    """The streaming multiprocessors of ``device`` (default: the current CUDA device); 132 (an H100 / H200) where
    there is no CUDA device (the Triton interpreter)."""
    if not torch.cuda.is_available():
        return 132
    index = torch.cuda.current_device() if device is None else torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def empty_like_layout(reference: torch.Tensor, dtype=None) -> torch.Tensor:
    """An empty (batch, ..., L) tensor shaped as ``reference``, time-major ((batch, L, ...) memory) when the
    reference's last dim is not its contiguous one, else contiguous. The mixers keep activations time-major,
    so outputs and gradients come back in the layout the next module reads densely."""
    dtype = dtype or reference.dtype
    if reference.dim() == 3 and reference.stride(-1) != 1 and reference.shape[-1] > 1:  # the common case, cheaply
        batch, dim, length = reference.shape
        return torch.empty(batch, length, dim, device=reference.device, dtype=dtype).transpose(1, 2)
    if reference.dim() >= 3 and reference.stride(-1) != 1 and reference.shape[-1] > 1:
        perm = (0, reference.dim() - 1) + tuple(range(1, reference.dim() - 1))
        inverse = [perm.index(i) for i in range(len(perm))]
        return torch.empty([reference.shape[i] for i in perm], device=reference.device, dtype=dtype).permute(*inverse)
    return torch.empty(reference.shape, device=reference.device, dtype=dtype)


def largest_pow2_divisor(n: int, cap: int) -> int:
    block = 1
    while block * 2 <= cap and n % (block * 2) == 0:
        block *= 2
    return block


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(n)


@triton.jit
def softplus(x):
    """torch's softplus (threshold 20). Absolute error below 1e-7 everywhere, but for x in [-15, -5], where 1 + e^x
    rounds, its relative error reaches 0.17 (e^x itself below -15); the selective scan's ``_softplus`` is accurate to
    4e-6 relative there."""
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def mufu_ex2(x, FAST: tl.constexpr):
    """2^x; FAST: ex2.approx on the special-function unit (inline PTX: not under the interpreter), else tl.exp2."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def mufu_lg2(x, FAST: tl.constexpr):
    """log2(x); FAST: lg2.approx (|error| < 2^-22 absolute), one instruction instead of a libdevice polynomial."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def mufu_rcp(x, FAST: tl.constexpr):
    """1 / x; FAST: rcp.approx (1 ulp) instead of an IEEE division."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@triton.jit
def affine_combine(a1, b1, a2, b2):
    """Compose x -> a1 x + b1, then x -> a2 x + b2 (the first-order linear recurrence's scan operator)."""
    return a1 * a2, b1 * a2 + b2


# ----------------------------------------------------------------------------------------------------------------
# Cheaper launches
# ----------------------------------------------------------------------------------------------------------------
_FAST_LAUNCH = []


def fast_launch_supported() -> bool:
    """Whether ``CachedLaunch`` may call compiled kernels directly: a real GPU (not the interpreter), not turned off
    (``MULTIMODAL_MAMBA_FAST_LAUNCH=0``), and a Triton whose ``JITFunction.run`` launches as this module expects
    (``kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, enter_hook,
    exit_hook, *bound_args.values())``, Triton 3.3 - 3.9); checked once, from Triton's source."""
    if not _FAST_LAUNCH:
        ok = False
        if not interpret_mode() and os.environ.get("MULTIMODAL_MAMBA_FAST_LAUNCH", "1") not in ("0", ""):
            try:
                import inspect

                from triton.runtime.jit import JITFunction

                source = inspect.getsource(JITFunction.run)
                ok = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata" in source
                      and "*bound_args.values())" in source and hasattr(triton, "knobs"))
            except Exception:  # pragma: no cover - an unexpected Triton
                ok = False
        _FAST_LAUNCH.append(ok)
    return _FAST_LAUNCH[0]


class CachedLaunch:
    """A ``@triton.jit`` kernel launched through a per-call-signature cache of its compiled form.

    ``kernel[grid](...)`` re-derives on every call what the compiled kernel depends on: Triton specializes each
    argument (dtype and 16-byte alignment of pointers, int width, divisibility by 16 and == 1 of ints), builds a cache
    key from that and the options, and looks the compiled kernel up; for a kernel of ~50 arguments that is most of the
    launch's ~15-30 us of host time (a batch-1 prefill is bound by exactly this). Here the first call with a given
    (device, scalar values, tensor dtypes and alignments, constexprs, num_warps) goes through Triton's own launch and
    keeps the compiled kernel it returns; later calls with the same inputs to that specialization (the other layers
    of a model, the next call at the same length) launch it directly. Exact scalar values are part of the key, so a
    hit can never reuse a kernel specialized differently; a new shape costs one ordinary launch (no recompile: Triton
    has it cached too).

    Calling convention: the kernel's parameters must be ``tensors`` (pointers, no None), then ``scalars`` (a tuple of
    ints and floats), then the constexprs, in signature order (``consts``: a tuple of their values); ``grid`` has
    three entries; ``launch_pdl``: launch with programmatic dependent launch (only where ``pdl_available``);
    ``num_stages``: Triton's software-pipelining depth (None: its default); ``maxnreg``: a register cap per thread
    for ptxas (None: none). Under
    the interpreter, or where the Triton version is not one this was written for (``fast_launch_supported``), every
    call is an ordinary launch.
    """

    __slots__ = ("kernel", "cache", "max_entries")

    def __init__(self, kernel, max_entries: int = 256):
        self.kernel = kernel
        self.cache = {}
        self.max_entries = max_entries

    def __call__(self, grid, tensors, scalars, consts, num_warps, launch_pdl=False, num_stages=None, maxnreg=None):
        options = {"num_warps": num_warps}
        if num_stages is not None:
            options["num_stages"] = num_stages
        if maxnreg is not None:  # (only then: the option is NVIDIA's)
            options["maxnreg"] = maxnreg
        if launch_pdl:  # (only then: a Triton without the option never sees it)
            options["launch_pdl"] = True
        if not fast_launch_supported():
            self.kernel[grid](*tensors, *scalars, *consts, **options)
            return
        device = _current_device()
        key = (device, scalars, consts, num_warps, num_stages, launch_pdl, maxnreg, tuple([t.dtype for t in tensors]),
               tuple([t.data_ptr() & 15 == 0 for t in tensors]))
        entry = self.cache.get(key)
        runtime = triton.knobs.runtime
        if entry is None or _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook):
            compiled = self.kernel[grid](*tensors, *scalars, *consts, **options)
            if compiled is not None and len(self.cache) < self.max_entries:
                self.cache[key] = (compiled.run, compiled.function, compiled.packed_metadata)
            return
        run, function, metadata = entry
        run(grid[0], grid[1], grid[2], _current_stream(device), function, metadata, None, None, None,
            *tensors, *scalars, *consts)


def _hook_set(hook) -> bool:
    """Whether a Triton launch hook would do anything: set (older Triton: a callable or None), or a hook chain
    with calls in it (newer Triton: an empty ``HookChain`` by default). Launches with hooks go through Triton."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _current_device() -> int:
    getter = getattr(torch._C, "_cuda_getDevice", None)
    return getter() if getter is not None else torch.cuda.current_device()


def _current_stream(device: int) -> int:
    """The raw handle of the current CUDA stream (what Triton's own launch passes)."""
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return getter(device) if getter is not None else torch.cuda.current_stream(device).cuda_stream
