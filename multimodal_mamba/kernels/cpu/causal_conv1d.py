"""Backend "cpp" of ``causal_conv1d``: ``causal_conv1d.cpp``, the causal depthwise conv with its bias and SiLU in one
pass, for CPU float32 calls that need no gradient. Same contract as
``multimodal_mamba.modeling.ops_selective_scan.causal_conv1d_ref``; tested against it in ``tests/test_cpu_kernels.py``.

x is read where it is, through its strides. The result is a (batch, dim, L) view of token-major memory, as the
PyTorch path (``causal_conv1d_shifted``) returns it: the scan and x_proj that follow read it that way.
"""

from __future__ import annotations

import ctypes

import torch

from .build import CompiledFunction, cpu_float32_without_grad

SOURCE = "causal_conv1d.cpp"
_MAX_WIDTH = 16


class _ConvArgs(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p), ("x_sb", ctypes.c_int64), ("x_sd", ctypes.c_int64), ("x_st", ctypes.c_int64),
        ("taps", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("initial_state", ctypes.c_void_p), ("s_sb", ctypes.c_int64), ("s_sd", ctypes.c_int64),
        ("s_st", ctypes.c_int64),
        ("out", ctypes.c_void_p), ("o_sb", ctypes.c_int64), ("o_sd", ctypes.c_int64), ("o_st", ctypes.c_int64),
        ("batch", ctypes.c_int64), ("dim", ctypes.c_int64), ("length", ctypes.c_int64), ("width", ctypes.c_int64),
        ("silu", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


KERNEL = CompiledFunction(SOURCE, "mm_causal_conv1d_fwd", "mm_conv_abi_version", 1, _ConvArgs, "causal conv")


def available() -> bool:
    """Whether the kernel is built (or can be built now) and loads (``CompiledFunction.available``)."""
    return KERNEL.available()


def accepts_causal_conv1d(x, weight, bias=None, initial_state=None, activation=None) -> bool:
    """CPU float32 tensors, L >= 1, width <= 16, activation None / SiLU, no gradient, and the kernel built."""
    return (
        cpu_float32_without_grad(x, weight, bias, initial_state)
        and x.shape[-1] >= 1
        and weight.shape[-1] <= _MAX_WIDTH
        and activation in (None, "silu", "swish")
        and available()
    )


def causal_conv1d_cpp(x, weight, bias=None, initial_state=None, activation=None):
    """The causal conv on the C++ kernel; arguments as ``causal_conv1d_ref``.

    x (batch, dim, L); weight (dim, W); bias (dim,); initial_state (batch, dim, W - 1). Returns (batch, dim, L)
    float32, a view of (batch, L, dim) memory.
    """
    from ...modeling.ops_selective_scan import _check_conv_inputs

    _check_conv_inputs(x, weight, initial_state)  # a ValueError naming the problem, as on every backend
    batch, dim, length = x.shape
    width = weight.shape[-1]
    taps = weight.t().contiguous()  # (width, dim): a vector of W channels per tap
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(batch, length, dim, dtype=torch.float32).transpose(1, 2)
    args = _ConvArgs(
        x=x.data_ptr(), x_sb=x.stride(0), x_sd=x.stride(1), x_st=x.stride(2),
        taps=taps.data_ptr(),
        bias=bias.data_ptr() if bias is not None else None,
        out=out.data_ptr(), o_sb=out.stride(0), o_sd=out.stride(1), o_st=out.stride(2),
        batch=batch, dim=dim, length=length, width=width,
        silu=1 if activation is not None else 0,
        threads=torch.get_num_threads(),
    )
    if initial_state is not None:
        args.initial_state = initial_state.data_ptr()
        args.s_sb, args.s_sd, args.s_st = initial_state.stride()
    if KERNEL(args) != 0:
        raise ValueError(f"causal_conv1d (cpp): arguments out of range (width {width}, L {length})")
    return out
