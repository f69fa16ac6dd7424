"""Backend selection for the state-space ops (selective scan, coupled scan, decode steps, causal conv).

Every op has one public entry point, a plain PyTorch reference that defines what is correct (``"reference"``),
a fast PyTorch path (``"torch"``) and faster backends that register themselves here when they can be imported: on
CUDA ``"triton"`` (this package's kernels) and ``"mamba_ssm"`` (mamba-ssm / causal-conv1d), on the CPU ``"cpp"``
(this package's C++ kernels, built with the system compiler on first use: the selective scan's and the causal conv's
forward for float32 calls without gradients; ``multimodal_mamba.kernels.cpu``). Dispatch takes the first backend, in
priority order, that is registered, available and accepts the call; a user can force one:

    with ssm_backend("reference"):
        model(**inputs)
    last_backend("selective_scan")  # -> "reference"

or set ``ssm_backend`` on a model config (the models wrap their forward in this context manager).

``"torch_compile"`` (CPU, opt-in: "auto" never picks it) is the PyTorch path with the selective scan and the causal
conv compiled by ``torch.compile`` (``ops_selective_scan_compiled``). Forcing it also covers the ops and the calls it
has no compiled version for (decode steps, the coupled scan, calls that need gradients, CUDA tensors): those run on
its fallback, ``"torch"``, and ``last_backend`` reports ``"torch"`` for them. Forcing ``"cpp"`` works the same way
(everything but inference calls of the scan and the conv runs on ``"torch"``, and so do those where no C++ compiler is
found).

This file imports nothing from the package, so it travels with remote code unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, List, Optional

BACKEND_NAMES = ("auto", "triton", "mamba_ssm", "cpp", "torch", "torch_compile", "reference")
# Order tried by "auto"; "reference" is never chosen automatically (it is the slow definition of correct), nor is the
# opt-in "torch_compile" (its first call compiles for tens of seconds).
AUTO_PRIORITY = ("triton", "mamba_ssm", "cpp", "torch")
# A forced backend that is not registered for an op, or does not accept a call, hands it to its fallback.
FALLBACK = {"torch_compile": "torch", "cpp": "torch"}

# Backends that only take calls without gradients: "auto" skips them while a module in training mode runs
# (``training_forward``), so that a training-mode forward computes the same numbers with and without gradients.
# Reentrant gradient checkpointing runs each layer's forward without gradients and recomputes it with them in the
# backward: on different kernels the two differ in rounding, and the gradients then differ from a plain backward's
# (3e-5 relative on a tiny Coupled Mamba with the C++ conv).
INFERENCE_ONLY = ("cpp",)

_local = threading.local()
# op name -> backend name -> (implementation, accepts(*args, **kwargs) -> bool)
_REGISTRY: Dict[str, Dict[str, tuple]] = {}
_LAST: Dict[str, str] = {}


def register_backend(op: str, backend: str, fn: Callable, accepts: Optional[Callable[..., bool]] = None) -> None:
    """Register ``fn`` as ``backend`` for ``op``. ``accepts(*args, **kwargs)`` says whether it can take a call."""
    if backend not in BACKEND_NAMES or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES[1:]}")
    _REGISTRY.setdefault(op, {})[backend] = (fn, accepts)


def available_backends(op: str) -> List[str]:
    """The backends registered for ``op``, in the order "auto" tries them (then "reference")."""
    registered = _REGISTRY.get(op, {})
    return [name for name in (*AUTO_PRIORITY, "torch_compile", "reference") if name in registered]


def _validate_backend_name(name: str) -> str:
    if name is None:
        return "auto"
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown ssm backend {name!r}; expected one of {BACKEND_NAMES}")
    return name


def forced_backend() -> str:
    """The backend forced by the innermost ``ssm_backend(...)`` context, or ``"auto"``."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else "auto"


@contextlib.contextmanager
def ssm_backend(name: Optional[str]):
    """Force every state-space op called inside the block onto backend ``name`` ("auto" restores dispatch).

    A forced backend that cannot take a call raises a ValueError naming the op and the reason rather than
    silently running something else.
    """
    name = _validate_backend_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def config_backend(config):
    """Context manager applying a model config's ``ssm_backend`` field ("auto" or absent: no effect).

    An enclosing ``ssm_backend(...)`` block that forces a backend takes precedence over the config.
    """
    name = _validate_backend_name(getattr(config, "ssm_backend", None) or "auto")
    if name == "auto" or forced_backend() != "auto":
        return contextlib.nullcontext()
    return ssm_backend(name)


@contextlib.contextmanager
def training_forward():
    """Mark the block as the forward of a module in training mode: inside it "auto" skips the ``INFERENCE_ONLY``
    backends. The mixers wrap their forward in it when ``self.training`` (eval-mode calls pay nothing)."""
    depth = getattr(_local, "training", 0)
    _local.training = depth + 1
    try:
        yield
    finally:
        _local.training = depth


def last_backend(op: str) -> Optional[str]:
    """The backend that ran the most recent call of ``op`` (None if it has not run)."""
    return _LAST.get(op)


def record_backend(op: str, name: str) -> None:
    """For an implementation that hands a call to another backend's code: record which one really ran."""
    _LAST[op] = name


def choose_backend(op: str, *args, **kwargs):
    """(name, implementation) of the backend ``dispatch`` runs this call of ``op`` on: the first that applies, or the
    forced one (a ValueError where none can run it). For an op entry point that hands some calls extra arguments only
    one backend takes; it records what ran with ``record_backend``."""
    registered = _REGISTRY.get(op)
    if not registered:
        raise ValueError(f"no backend is registered for op {op!r}")
    forced = forced_backend()
    if forced == "auto":  # the common case first (this runs for every op call of every layer)
        skip = INFERENCE_ONLY if getattr(_local, "training", 0) else ()
        for name in AUTO_PRIORITY:
            if name in skip:
                continue
            entry = registered.get(name)
            if entry is not None and (entry[1] is None or entry[1](*args, **kwargs)):
                return name, entry[0]
        raise ValueError(f"no backend can run this {op!r} call (registered: {sorted(registered)})")
    fallback = FALLBACK.get(forced)
    if fallback is not None and fallback in registered:
        entry = registered.get(forced)
        if entry is None or (entry[1] is not None and not entry[1](*args, **kwargs)):
            forced = fallback
    if forced not in registered:
        raise ValueError(
            f"ssm backend {forced!r} was forced but is not available for {op!r} here "
            f"(available: {available_backends(op)})"
        )
    fn, accepts = registered[forced]
    if accepts is not None and not accepts(*args, **kwargs):
        raise ValueError(f"ssm backend {forced!r} was forced but cannot run this {op!r} call (device, dtype or shape)")
    return forced, fn


def dispatch(op: str, *args, **kwargs):
    """Run ``op`` on the first backend that applies (or on the forced one) and record which ran."""
    name, fn = choose_backend(op, *args, **kwargs)
    _LAST[op] = name
    return fn(*args, **kwargs)
