"""Triton RMSNorm: one program per row does what ``MambaRMSNorm`` does in nine PyTorch kernels.

Reference: ``naive.rms_norm_ref``. Rounding follows the PyTorch module exactly (x rounded to the input dtype, the
normalized row rounded to it again before the weight multiplies it, the product rounded to the output dtype), so
outputs match it up to the order of the float32 sum of squares. Inference only: the model calls it when no
gradient is needed (training keeps the differentiable PyTorch path). A decode step at batch 1 is 64 rows of
2560, so kernel count, not bandwidth, is what this saves; a 2048-token prefill also saves the float32 round trips.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import CachedLaunch, next_pow2

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, hidden, stride_x, stride_out, eps,
                     IN_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(IN_DTYPE).to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden
    normed = (x * tl.rsqrt(mean_square + eps)).to(IN_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = w * normed
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_LAUNCH = CachedLaunch(_rms_norm_kernel)
_BLOCKS = {}  # hidden -> (block, num_warps)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, input_dtype=None) -> torch.Tensor:
    """Same contract as ``naive.rms_norm_ref``: x (..., hidden) any float dtype, weight (hidden,)."""
    input_dtype = input_dtype or x.dtype
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = weight.dtype if weight.dtype == input_dtype else torch.promote_types(weight.dtype, input_dtype)
    out = torch.empty(rows.shape, device=x.device, dtype=out_dtype)
    config = _BLOCKS.get(hidden)
    if config is None:
        block = next_pow2(hidden)
        config = _BLOCKS[hidden] = (block, 4 if block <= 4096 else 8)
    if rows.shape[0]:
        _LAUNCH((rows.shape[0], 1, 1), (rows, weight, out), (hidden, rows.stride(0), out.stride(0), eps),
                (_TL_DTYPES[input_dtype], config[0]), config[1])
    return out.view(x.shape)
