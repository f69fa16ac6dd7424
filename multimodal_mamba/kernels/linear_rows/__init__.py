"""Projections of a few rows (a decode step at batch 8 - 32) on Triton (``fused.py``), whole or as split-K float32
partial sums; references: ``naive.py`` (importable without Triton)."""

try:  # Triton is optional; the naive reference is not
    from .fused import linear_rows, linear_rows_partials, split_count

    __all__ = ["linear_rows", "linear_rows_partials", "split_count"]
except ImportError:  # pragma: no cover - without Triton
    __all__ = []
