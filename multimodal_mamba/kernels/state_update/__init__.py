"""Decode step of the selective scan on Triton (``fused.py``); reference: ``naive.selective_state_update_ref``."""

from .fused import selective_state_update_triton

__all__ = ["selective_state_update_triton"]
