"""Coupled selective scan (Coupled Mamba) on Triton: ``fused.py`` holds the kernels and the autograd wrapper; the
reference they must match is ``naive.coupled_selective_scan_ref`` (the sequential loop of
``modeling.ops_coupled_scan``)."""

from .fused import CoupledScanFn, coupled_scan_bwd, coupled_scan_fwd, coupled_selective_scan_triton

__all__ = ["CoupledScanFn", "coupled_scan_bwd", "coupled_scan_fwd", "coupled_selective_scan_triton"]
