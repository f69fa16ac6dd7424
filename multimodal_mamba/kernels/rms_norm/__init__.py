"""RMSNorm on Triton (``fused.py``); reference: ``naive.rms_norm_ref`` (the math of ``MambaRMSNorm``)."""

from .fused import rms_norm_triton

__all__ = ["rms_norm_triton"]
