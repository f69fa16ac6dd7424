"""(batch, L, C) -> (batch, C, L) contiguous on Triton (``fused.py``); reference: ``naive.channel_major_ref``."""

from .fused import channel_major_group, channel_major_many, channel_major_triton, time_contiguous_group

__all__ = ["channel_major_group", "channel_major_many", "channel_major_triton", "time_contiguous_group"]
