"""Backend "cpp" of ``selective_scan``: the forward of ``selective_scan.cpp`` (channels in SIMD lanes), for CPU
float32 calls that need no gradient (inference: prefill, ``generate``, ``pipeline``). Same contract as
``multimodal_mamba.modeling.ops_selective_scan.selective_scan``; tested against ``selective_scan_ref`` in
``tests/test_cpu_kernels.py``.

Inputs are read where they are, through their strides (the mixers pass token-major views of the projections'
outputs; nothing is copied). y comes back in u's layout: token-major memory for a token-major u, as the chunked
PyTorch scan returns it. The kernel splits the (batch, group, block of channels) units over ``torch.get_num_threads()``
threads.
"""

from __future__ import annotations

import ctypes

import torch

from .build import CompiledFunction, cpu_float32_without_grad, library

SOURCE = "selective_scan.cpp"
_MAX_STATE = 256


class _ScanArgs(ctypes.Structure):
    _fields_ = [
        ("u", ctypes.c_void_p), ("u_sb", ctypes.c_int64), ("u_sd", ctypes.c_int64), ("u_st", ctypes.c_int64),
        ("delta", ctypes.c_void_p), ("delta_sb", ctypes.c_int64), ("delta_sd", ctypes.c_int64),
        ("delta_st", ctypes.c_int64),
        ("z", ctypes.c_void_p), ("z_sb", ctypes.c_int64), ("z_sd", ctypes.c_int64), ("z_st", ctypes.c_int64),
        ("B", ctypes.c_void_p), ("B_sb", ctypes.c_int64), ("B_sg", ctypes.c_int64), ("B_sn", ctypes.c_int64),
        ("B_st", ctypes.c_int64),
        ("C", ctypes.c_void_p), ("C_sb", ctypes.c_int64), ("C_sg", ctypes.c_int64), ("C_sn", ctypes.c_int64),
        ("C_st", ctypes.c_int64),
        ("A", ctypes.c_void_p),
        ("D", ctypes.c_void_p),
        ("delta_bias", ctypes.c_void_p),
        ("h0", ctypes.c_void_p),
        ("y", ctypes.c_void_p), ("y_sb", ctypes.c_int64), ("y_sd", ctypes.c_int64), ("y_st", ctypes.c_int64),
        ("h_last", ctypes.c_void_p),
        ("batch", ctypes.c_int64), ("dim", ctypes.c_int64), ("length", ctypes.c_int64),
        ("state_size", ctypes.c_int64), ("groups", ctypes.c_int64),
        ("delta_softplus", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


KERNEL = CompiledFunction(SOURCE, "mm_selective_scan_fwd", "mm_scan_abi_version", 1, _ScanArgs, "selective scan")


def lanes() -> int:
    """Channels per SIMD vector in the compiled kernel (16 with AVX-512, 8 with AVX2 / NEON, else 4)."""
    return library(SOURCE).mm_scan_lanes()


def available() -> bool:
    """Whether the kernel is built (or can be built now) and loads (``CompiledFunction.available``)."""
    return KERNEL.available()


def accepts_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                           initial_state=None, return_final_state=False) -> bool:
    """CPU float32 tensors, L >= 1, N <= 256, no gradient to compute, and the kernel built (see ``available``)."""
    return (
        cpu_float32_without_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
        and u.shape[-1] >= 1
        and A.shape[-1] <= _MAX_STATE
        and available()
    )


def _strides(t, names):
    return dict(zip(names, t.stride()))


def selective_scan_cpp(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                       initial_state=None, return_final_state=False):
    """The selective scan forward on the C++ kernel; arguments and results as ``selective_scan``.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (dim,);
    initial_state: (batch, dim, N). Returns y (batch, dim, L) float32 in u's memory order, and the final state
    (batch, dim, N) float32 when ``return_final_state``.
    """
    from ...modeling.ops_selective_scan import _check_selective_scan_inputs

    _check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)  # direct calls too
    batch, dim, length = u.shape
    state_size = A.shape[-1]
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    if u.stride(1) == 1 and u.stride(2) != 1:  # token-major u: token-major y
        y = torch.empty(batch, length, dim, dtype=torch.float32).transpose(1, 2)
    else:
        y = torch.empty(batch, dim, length, dtype=torch.float32)
    h_last = torch.empty(batch, dim, state_size, dtype=torch.float32) if return_final_state else None
    args = _ScanArgs(
        u=u.data_ptr(), **_strides(u, ("u_sb", "u_sd", "u_st")),
        delta=delta.data_ptr(), **_strides(delta, ("delta_sb", "delta_sd", "delta_st")),
        z=z.data_ptr() if z is not None else None,
        **(_strides(z, ("z_sb", "z_sd", "z_st")) if z is not None else {}),
        B=B.data_ptr(), **_strides(B, ("B_sb", "B_sg", "B_sn", "B_st")),
        C=C.data_ptr(), **_strides(C, ("C_sb", "C_sg", "C_sn", "C_st")),
        A=A.data_ptr(),
        D=D.data_ptr() if D is not None else None,
        delta_bias=delta_bias.data_ptr() if delta_bias is not None else None,
        h0=h0.data_ptr() if h0 is not None else None,
        y=y.data_ptr(), **_strides(y, ("y_sb", "y_sd", "y_st")),
        h_last=h_last.data_ptr() if h_last is not None else None,
        batch=batch, dim=dim, length=length, state_size=state_size, groups=groups,
        delta_softplus=1 if delta_softplus else 0,
        threads=torch.get_num_threads(),
    )
    if KERNEL(args) != 0:
        raise ValueError(f"selective_scan (cpp): arguments out of range (N {state_size}, dim {dim}, groups {groups})")
    return (y, h_last) if return_final_state else y
