"""C++ CPU kernels behind the op contracts of ``multimodal_mamba.modeling`` (backend ``"cpp"``).

- ``selective_scan``: the Mamba-1 scan's forward with the channels in the SIMD lanes (``selective_scan.cpp``);
- ``causal_conv1d``: the causal depthwise conv with its bias and SiLU in one pass (``causal_conv1d.cpp``);

both for CPU float32 calls without gradients (prefill, ``generate``, ``pipeline``); other calls go on to the PyTorch
path.

The sources are compiled on first use with the system C++ compiler and cached (``build.py``). The reference each
kernel must match is the sequential loop in ``modeling/ops_*.py`` (``naive.py``); ``tests/test_cpu_kernels.py``
compares them. Without a compiler, or with ``MULTIMODAL_MAMBA_CPP=0``, nothing is built and dispatch uses the PyTorch
path. Importing this package registers the kernels as backend ``"cpp"`` of the op dispatch
(``multimodal_mamba.modeling.ssm_backends``), which ``"auto"`` tries before ``"torch"``.
"""

from __future__ import annotations

from .build import CppKernelUnavailable, enabled
from .causal_conv1d import accepts_causal_conv1d, causal_conv1d_cpp
from .selective_scan import accepts_selective_scan, available, lanes, selective_scan_cpp

OPS = ("selective_scan", "causal_conv1d")


def register_backends(register_backend=None) -> list:
    """Register the kernels as backend "cpp" with ``register_backend(op, backend, fn, accepts)`` (default: this
    package's ``ssm_backends.register_backend``; a remote-code copy of the modeling files passes its own). Nothing is
    compiled until a call is accepted. Returns the ops registered."""
    if register_backend is None:
        from ...modeling.ssm_backends import register_backend
    register_backend("selective_scan", "cpp", selective_scan_cpp, accepts_selective_scan)
    register_backend("causal_conv1d", "cpp", causal_conv1d_cpp, accepts_causal_conv1d)
    return list(OPS)


__all__ = ["CppKernelUnavailable", "OPS", "accepts_causal_conv1d", "accepts_selective_scan", "available",
           "causal_conv1d_cpp", "enabled", "lanes", "register_backends", "selective_scan_cpp"]
