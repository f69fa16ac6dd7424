"""Fused GPU kernels (Triton) behind the op contracts of ``multimodal_mamba.modeling``.

One subpackage per op, flash-linear-attention style: ``fused.py`` holds the Triton kernels and a thin autograd
wrapper (as mamba-ssm's ``selective_scan_interface.py``), ``naive.py`` points at the PyTorch reference that defines
what is correct (the sequential loops in ``modeling/ops_*.py``), and the GPU tests compare the two.

- ``selective_scan``: the Mamba-1 scan, forward and backward (grouped B/C, z, D, delta_bias, initial and final
  state, the final state's gradient).
- ``coupled_scan``: the Coupled Mamba scan (M chains sharing one state), forward and backward.
- ``causal_conv1d``: the causal depthwise conv, forward and backward with a carried state, and its decode update.
- ``state_update``: the decode step of the selective scan (state updated in place).

``cpu/`` holds the C++ CPU kernels (backend ``"cpp"``: the selective scan's and the causal conv's forward for
inference), compiled with the system compiler on first use; it does not need Triton.

Importing this package registers the kernels as backend ``"triton"`` of the op dispatch
(``multimodal_mamba.modeling.ssm_backends``) when Triton imports and a CUDA device is present; ``"auto"`` then
tries them first, and each backend's ``accepts`` check sends calls the kernels do not cover (CPU tensors, float64,
gradients through a decode step, ...) on to the next backend. ``register_backends(register_backend)`` registers them
into another registry: a remote-code copy of the modeling files has its own (see ``modeling/ops_mamba_ssm.py``).

Under ``TRITON_INTERPRET=1`` the kernel functions also take CPU tensors (Triton's interpreter: slow, for tests on
small shapes); they are then not registered for automatic dispatch.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: without it (or without CUDA) nothing here is registered.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

OPS = ("selective_scan", "coupled_selective_scan", "causal_conv1d", "causal_conv1d_update", "selective_state_update")
_MAX_STATE = 256  # largest N the register tiles are sized for (mamba-ssm's limit too)
_MAX_CHAINS = 4  # chains unrolled in the coupled kernels
_MAX_CONV_WIDTH = 8
_INT32 = 2**31 - 1


def kernels_available() -> bool:
    """Whether the Triton kernels can run here: Triton imports and a CUDA device is present."""
    return HAS_TRITON and torch.cuda.is_available()


_DEVICE_AND_DTYPES = []  # (whether the kernels want CUDA tensors, the float dtypes they take), set on first use


def _tensors_ok(*tensors) -> bool:
    """Every given tensor (None skipped) on the kernels' device (CUDA; the CPU under the interpreter), of a float
    dtype, and small enough for 32-bit element offsets within a batch row. Runs on every dispatched call: kept lean."""
    if not _DEVICE_AND_DTYPES:
        from .utils import FLOAT_DTYPES, interpret_mode

        # (Triton reads TRITON_INTERPRET once, at import, too)
        _DEVICE_AND_DTYPES.append((not interpret_mode(), FLOAT_DTYPES))
    want_cuda, float_dtypes = _DEVICE_AND_DTYPES[0]
    for t in tensors:
        if t is None:
            continue
        if want_cuda:
            if not t.is_cuda:
                return False
        elif t.device.type != "cpu":
            return False
        if t.dtype not in float_dtypes:
            return False
        # element offsets inside one batch row are computed in 32 bits (the product bound first: it is cheap)
        shape = t.shape
        if shape and max(shape) * max(t.stride()) > _INT32 and max(
            (s - 1) * st for s, st in zip(shape, t.stride()) if s > 0
        ) > _INT32:
            return False
    return True


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def accepts_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                           initial_state=None, return_final_state=False) -> bool:
    return (
        u.shape[-1] >= 1
        and A.shape[-1] <= _MAX_STATE
        and not A.is_complex()
        and _tensors_ok(u, delta, A, B, C, D, z, delta_bias, initial_state)
    )


def accepts_coupled_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                                   coupling="mean", initial_state=None, return_final_state=False) -> bool:
    return (
        coupling in ("mean", "sum")
        and u.shape[-1] >= 1
        and u.shape[1] <= _MAX_CHAINS
        and A.shape[-1] <= _MAX_STATE
        and _tensors_ok(u, delta, A, B, C, D, z, delta_bias, initial_state)
    )


def accepts_causal_conv1d(x, weight, bias=None, initial_state=None, activation=None) -> bool:
    return (
        activation in (None, "silu", "swish")
        and x.shape[-1] >= 1
        and weight.shape[1] <= _MAX_CONV_WIDTH
        and _tensors_ok(x, weight, bias, initial_state)
    )


def accepts_causal_conv1d_update(x, conv_state, weight, bias=None, activation=None) -> bool:
    return (
        activation in (None, "silu", "swish")
        and weight.shape[1] <= _MAX_CONV_WIDTH
        and not _needs_grad(x, weight, bias)
        and _tensors_ok(x, conv_state, weight, bias)
    )


def accepts_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True) -> bool:
    return (
        A.shape[-1] <= _MAX_STATE
        and not _needs_grad(x, dt, A, B, C, D, z, dt_bias)
        and _tensors_ok(state, x, dt, A, B, C, D, z, dt_bias)
    )


def kernel_functions() -> dict:
    """op name -> (Triton implementation, accepts). Imports the kernel modules (needs Triton)."""
    from .causal_conv1d import causal_conv1d_triton, causal_conv1d_update_triton
    from .coupled_scan import coupled_selective_scan_triton
    from .selective_scan import selective_scan_triton
    from .state_update import selective_state_update_triton

    return {
        "selective_scan": (selective_scan_triton, accepts_selective_scan),
        "coupled_selective_scan": (coupled_selective_scan_triton, accepts_coupled_selective_scan),
        "causal_conv1d": (causal_conv1d_triton, accepts_causal_conv1d),
        "causal_conv1d_update": (causal_conv1d_update_triton, accepts_causal_conv1d_update),
        "selective_state_update": (selective_state_update_triton, accepts_selective_state_update),
    }


def register_backends(register_backend=None, ops=OPS, force: bool = False) -> list:
    """Register the kernels as backend "triton" for ``ops`` with ``register_backend(op, backend, fn, accepts)``
    (default: this package's ``ssm_backends.register_backend``). Does nothing unless Triton and CUDA are
    available (``force``: register anyway, e.g. under ``TRITON_INTERPRET=1``). Returns the ops registered."""
    if not (kernels_available() or (force and HAS_TRITON)):
        return []
    if register_backend is None:
        from ..modeling.ssm_backends import register_backend
    functions = kernel_functions()
    for op in ops:
        fn, accepts = functions[op]
        register_backend(op, "triton", fn, accepts)
    return list(ops)


REGISTERED = register_backends()

__all__ = [
    "HAS_TRITON", "OPS", "REGISTERED", "kernel_functions", "kernels_available", "register_backends",
    "accepts_selective_scan", "accepts_coupled_selective_scan", "accepts_causal_conv1d",
    "accepts_causal_conv1d_update", "accepts_selective_state_update",
]
