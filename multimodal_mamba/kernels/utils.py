"""Helpers shared by the Triton kernels: device checks, memory layouts, small jitted functions."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.0 / math.log(2.0)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpret_mode() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): the kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_kernel_device(*tensors) -> bool:
    """Whether every given tensor lives where the kernels can run: CUDA, or the CPU under the interpreter."""
    want_cuda = not interpret_mode()
    for t in tensors:
        if t is None:
            continue
        if want_cuda and not t.is_cuda:
            return False
        if not want_cuda and t.device.type != "cpu":
            return False
    return True


def float_dtypes(*tensors) -> bool:
    return all(t is None or t.dtype in FLOAT_DTYPES for t in tensors)


def empty_like_layout(reference: torch.Tensor, dtype=None) -> torch.Tensor:
    """An empty (batch, ..., L) tensor shaped as ``reference``, time-major ((batch, L, ...) memory) when the
    reference's last dim is not its contiguous one, else contiguous. The mixers keep activations time-major,
    so outputs and gradients come back in the layout the next module reads densely."""
    dtype = dtype or reference.dtype
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
    """torch's softplus (threshold 20), accurate for very negative x too."""
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def affine_combine(a1, b1, a2, b2):
    """Compose x -> a1 x + b1, then x -> a2 x + b2 (the first-order linear recurrence's scan operator)."""
    return a1 * a2, b1 * a2 + b2
