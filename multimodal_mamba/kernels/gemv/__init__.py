"""One-row and few-row (batch 2 - 32) projections for decode steps (``fused.py``); reference: ``naive.linear_ref``."""

from .fused import gemv_triton, linear_few_rows, linear_few_rows_triton, linear_one_row

__all__ = ["gemv_triton", "linear_few_rows", "linear_few_rows_triton", "linear_one_row"]
