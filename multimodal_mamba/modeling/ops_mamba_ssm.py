"""Kernel backends of the state-space ops: mamba-ssm / causal-conv1d ("mamba_ssm"), this package's Triton kernels
("triton") and its C++ CPU kernels ("cpp").

Importing this module registers, into the op dispatch of ``ssm_backends`` (the one next to this file, so a
remote-code copy of the modeling files registers into its own):

- backend ``"mamba_ssm"``, when the packages are installed and a CUDA device is present:
  ``selective_scan`` -> ``mamba_ssm``'s ``selective_scan_fn`` (CUDA), ``selective_state_update`` -> its Triton decode
  step, ``causal_conv1d`` / ``causal_conv1d_update`` -> ``causal-conv1d``. Each ``accepts`` check declines what those
  kernels do not support, so the call falls through to the PyTorch path: CPU tensors, float64, an
  ``initial_state`` for the scan (mamba-ssm has none), a final state whose gradient would be needed (mamba-ssm
  ignores it), conv widths other than 2-4, a conv initial state on a layout the kernel cannot take (channel-last
  with dim % 8 == 0), and gradients through a decode step.
- backend ``"triton"`` (``multimodal_mamba.kernels``), when that package, Triton and CUDA are available.
- backend ``"cpp"`` (``multimodal_mamba.kernels.cpu``), when that package is installed: the selective scan's and the
  causal conv's forward on CPU float32 tensors, compiled on first use (without a C++ compiler it declines every
  call).

The imports of mamba-ssm happen on the first call (``import mamba_ssm`` is slow and pulls in much more); only
their presence is checked here. Nothing of this package is imported outside ``try:``, so this file travels with
``save_pretrained``'s remote code.
"""

from __future__ import annotations

import importlib.util

import torch

from .ssm_backends import register_backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        return False


HAS_MAMBA_SSM = _has_module("mamba_ssm") and _has_module("selective_scan_cuda")
HAS_CAUSAL_CONV1D = _has_module("causal_conv1d") and _has_module("causal_conv1d_cuda")

_imported = {}


def _load(name):
    """The kernel function ``name``, imported on first use; None if the import fails."""
    if name not in _imported:
        fn = None
        try:
            if name == "selective_scan_fn":
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
            elif name == "selective_state_update":
                from mamba_ssm.ops.triton.selective_state_update import selective_state_update as fn
            elif name == "causal_conv1d_fn":
                from causal_conv1d import causal_conv1d_fn as fn
            elif name == "causal_conv1d_update":
                from causal_conv1d import causal_conv1d_update as fn
        except Exception:  # ImportError, or a build that does not match this torch / GPU
            fn = None
        _imported[name] = fn
    return _imported[name]


def _cuda_floats(*tensors) -> bool:
    return all(t is None or (t.is_cuda and t.dtype in _FLOAT_DTYPES) for t in tensors)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------------------
# selective_scan -> mamba_ssm.selective_scan_fn
# ----------------------------------------------------------------------------------------------------------------
def accepts_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                           initial_state=None, return_final_state=False) -> bool:
    if initial_state is not None or u.shape[-1] < 2 or A.shape[-1] > 256 or A.is_complex():
        return False  # (its bf16 backward gives NaN in dA at L = 1, seen on an H200)
    if return_final_state and _needs_grad(u, delta, A, B, C, D, z, delta_bias):
        return False  # mamba-ssm drops the final state's gradient
    return _cuda_floats(u, delta, A, B, C, D, z, delta_bias) and _load("selective_scan_fn") is not None


def selective_scan_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                             initial_state=None, return_final_state=False):
    """``selective_scan`` through mamba-ssm's CUDA kernel (no initial state). Same contract."""
    if initial_state is not None:
        raise ValueError("the mamba_ssm backend has no initial_state; use the 'triton' or 'torch' backend")
    fn = _load("selective_scan_fn")
    dtype = u.dtype
    # its kernel wants delta, B, C, z in u's dtype and A, D, delta_bias in float32
    return fn(
        u, delta.to(dtype), A.float(), B.to(dtype), C.to(dtype),
        D.float() if D is not None else None,
        z.to(dtype) if z is not None else None,
        delta_bias.float() if delta_bias is not None else None,
        delta_softplus=bool(delta_softplus), return_last_state=bool(return_final_state),
    )


# ----------------------------------------------------------------------------------------------------------------
# selective_state_update -> mamba_ssm's Triton decode step
# ----------------------------------------------------------------------------------------------------------------
def accepts_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True) -> bool:
    return (
        (B.dim() == 2 or B.shape[1] == 1)  # its groups split heads, not channels
        and not _needs_grad(x, dt, A, B, C, D, z, dt_bias)
        and _cuda_floats(state, x, dt, A, B, C, D, z, dt_bias)
        and _load("selective_state_update") is not None
    )


def selective_state_update_mamba_ssm(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """``selective_state_update`` through mamba-ssm's Triton kernel (state updated in place). Same contract."""
    # 2.3.2.post1's launcher fails without dt_bias or D (it unpacks their strides): pass zeros instead of None
    if dt_bias is None:
        dt_bias = _zeros(state.shape[1], state.device)
    if D is None:
        D = _zeros(state.shape[1], state.device)
    if B.dim() == 3:
        B, C = B[:, 0], C[:, 0]
    return _load("selective_state_update")(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


_ZEROS = {}


def _zeros(size, device):
    key = (size, str(device))
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(size, device=device, dtype=torch.float32)
    return _ZEROS[key]


# ----------------------------------------------------------------------------------------------------------------
# causal_conv1d / causal_conv1d_update -> causal-conv1d
# ----------------------------------------------------------------------------------------------------------------
def _channel_last_ok(x) -> bool:
    """causal-conv1d's channel-last kernel: channels contiguous, dim and the other strides multiples of 8."""
    return x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0


def accepts_causal_conv1d(x, weight, bias=None, initial_state=None, activation=None) -> bool:
    if activation not in (None, "silu", "swish") or not 2 <= weight.shape[1] <= 4 or x.shape[-1] < 2:
        return False  # (at L = 1 its backward rejects the gradient's strides)
    if initial_state is not None and x.shape[1] % 8 != 0:
        return False  # its initial state needs the channel-last kernel
    return _cuda_floats(x, weight, bias, initial_state) and _load("causal_conv1d_fn") is not None


def causal_conv1d_mamba_ssm(x, weight, bias=None, initial_state=None, activation=None):
    """``causal_conv1d`` through causal-conv1d's CUDA kernel. Same contract."""
    fn = _load("causal_conv1d_fn")
    if initial_state is not None or x.stride(1) == 1:
        if not _channel_last_ok(x):
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        if initial_state is not None:
            initial_state = initial_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    elif x.stride(2) != 1:
        x = x.contiguous()
    return fn(
        x, weight.contiguous(), bias.to(weight.dtype) if bias is not None else None,
        initial_states=initial_state, activation=activation,
    )


def accepts_causal_conv1d_update(x, conv_state, weight, bias=None, activation=None) -> bool:
    return (
        activation in (None, "silu", "swish")
        and 2 <= weight.shape[1] <= 4
        and conv_state.dtype == x.dtype
        and not _needs_grad(x, weight, bias)
        and _cuda_floats(x, conv_state, weight, bias)
        and _load("causal_conv1d_update") is not None
    )


def causal_conv1d_update_mamba_ssm(x, conv_state, weight, bias=None, activation=None):
    """``causal_conv1d_update`` through causal-conv1d (conv_state (batch, dim, W) rolled in place). Same contract."""
    return _load("causal_conv1d_update")(
        x, conv_state, weight.contiguous(), bias.to(weight.dtype) if bias is not None else None, activation=activation
    )


def register_mamba_ssm_backends(register=register_backend) -> list:
    """Register the "mamba_ssm" backends whose packages are installed (and CUDA present). Returns the ops."""
    registered = []
    if not torch.cuda.is_available():
        return registered
    if HAS_MAMBA_SSM:
        register("selective_scan", "mamba_ssm", selective_scan_mamba_ssm, accepts_selective_scan)
        register("selective_state_update", "mamba_ssm", selective_state_update_mamba_ssm,
                 accepts_selective_state_update)
        registered += ["selective_scan", "selective_state_update"]
    if HAS_CAUSAL_CONV1D:
        register("causal_conv1d", "mamba_ssm", causal_conv1d_mamba_ssm, accepts_causal_conv1d)
        register("causal_conv1d_update", "mamba_ssm", causal_conv1d_update_mamba_ssm, accepts_causal_conv1d_update)
        registered += ["causal_conv1d", "causal_conv1d_update"]
    return registered


def register_triton_backends(register=register_backend) -> list:
    """Register this package's Triton kernels (backend "triton") into this module's registry, if importable."""
    if not torch.cuda.is_available():
        return []
    try:
        from multimodal_mamba.kernels import register_backends
    except Exception:  # the package, Triton or CUDA missing: the other backends remain
        return []
    return register_backends(register)


def register_cpp_backends(register=register_backend) -> list:
    """Register this package's C++ CPU kernels (backend "cpp") into this module's registry, if importable. Nothing
    is compiled here: the first call that the kernels accept builds them (``multimodal_mamba.kernels.cpu.build``)."""
    try:
        from multimodal_mamba.kernels.cpu import register_backends
    except Exception:  # the package is not installed (remote code): the PyTorch path remains
        return []
    return register_backends(register)


GPU_BACKENDS = {"mamba_ssm": register_mamba_ssm_backends(), "triton": register_triton_backends()}
CPU_BACKENDS = {"cpp": register_cpp_backends()}
