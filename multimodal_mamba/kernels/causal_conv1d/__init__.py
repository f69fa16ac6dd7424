"""Causal depthwise conv1d on Triton (``fused.py``: forward, backward with state, decode update); references:
``naive.causal_conv1d_ref`` and ``naive.causal_conv1d_update_ref``."""

from .fused import CausalConv1dFn, causal_conv1d_triton, causal_conv1d_update_triton

__all__ = ["CausalConv1dFn", "causal_conv1d_triton", "causal_conv1d_update_triton"]
