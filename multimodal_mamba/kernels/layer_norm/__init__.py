"""LayerNorm on Triton (``fused.py``, inference); reference: ``naive.layer_norm_ref`` (``F.layer_norm``)."""

from .fused import layer_norm_triton

__all__ = ["layer_norm_triton"]
