"""One-row matrix-vector products for decode steps (``fused.py``); reference: ``naive.linear_ref``."""

from .fused import gemv_triton, linear_one_row

__all__ = ["gemv_triton", "linear_one_row"]
