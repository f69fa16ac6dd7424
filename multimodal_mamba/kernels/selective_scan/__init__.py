"""Selective scan (Mamba-1 S6) on Triton: ``fused.py`` holds the kernels and the autograd wrapper; the reference
they must match is ``naive.selective_scan_ref`` (the sequential loop of ``modeling.ops_selective_scan``)."""

from .fused import SelectiveScanFn, selective_scan_bwd, selective_scan_fwd, selective_scan_triton

__all__ = ["SelectiveScanFn", "selective_scan_bwd", "selective_scan_fwd", "selective_scan_triton"]
