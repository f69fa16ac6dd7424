"""Compile this folder's C++ kernels with the system compiler on first use and load them with ctypes.

Like inductor's own CPU kernels, the code is built on the machine that runs it (``-march=native``: the vector width
the CPU has) and kept in a cache directory, keyed by the source, the compiler, its flags and the CPU, so later
processes load it in milliseconds. Nothing links against torch: the kernels take raw float32 pointers and strides, so
a build takes about a second and needs no torch headers.

- Cache directory: ``$MULTIMODAL_MAMBA_CACHE`` if set, else ``$XDG_CACHE_HOME/multimodal_mamba`` (default
  ``~/.cache/multimodal_mamba``), subfolder ``cpu_kernels``; a temporary directory if that is not writable.
- Compiler: ``$CXX`` if set, else the first of ``c++``, ``g++``, ``clang++`` on the PATH.
- ``MULTIMODAL_MAMBA_CPP=0`` turns the kernels off (``library`` then raises ``CppKernelUnavailable``).

A build that fails is not retried in the same process; the error (the compiler's last lines) is kept for the message.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .. import _needs_grad

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-ffp-contract=fast")
# Tried in order: -march=native where the compiler takes it (x86, most aarch64 toolchains), else -mcpu=native, else
# neither; each with OpenMP first (the kernels then run on the OpenMP runtime torch already loaded), then without
# (std::thread).
ARCH_FLAGS = tuple((*arch, *omp) for arch in (("-march=native",), ("-mcpu=native",), ()) for omp in (("-fopenmp",), ()))
COMPILE_TIMEOUT_S = 300


class CppKernelUnavailable(RuntimeError):
    """The C++ kernels cannot be built or loaded here (no compiler, a failed build, or turned off)."""


_lock = threading.Lock()
_libraries = {}  # source name -> ctypes.CDLL
_failures = {}  # source name -> the reason, once a build has failed


def enabled() -> bool:
    """False when ``MULTIMODAL_MAMBA_CPP=0`` (or empty) turns the C++ kernels off."""
    return os.environ.get("MULTIMODAL_MAMBA_CPP", "1") not in ("", "0")


def find_compiler():
    """The C++ compiler to use (a path), or None."""
    configured = os.environ.get("CXX")
    if configured:
        return shutil.which(configured) or configured
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> Path:
    root = os.environ.get("MULTIMODAL_MAMBA_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multimodal_mamba"
    folder = base / "cpu_kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, delete=True)
        probe.close()
        return folder
    except OSError:
        user = os.getuid() if hasattr(os, "getuid") else 0
        folder = Path(tempfile.gettempdir()) / f"multimodal_mamba_cpu_kernels_{user}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


@functools.lru_cache(maxsize=None)
def _cpu_signature() -> str:
    """What -march=native depends on: the machine and (on Linux) the CPU's model and feature flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return "\n".join(parts)


@functools.lru_cache(maxsize=None)  # one `--version` run per compiler and process, not per library
def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
        return done.stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise CppKernelUnavailable(f"the C++ compiler {compiler!r} does not run: {error}") from error


def _build(name: str) -> ctypes.CDLL:
    if not enabled():
        raise CppKernelUnavailable("turned off by MULTIMODAL_MAMBA_CPP=0")
    compiler = find_compiler()
    if compiler is None:
        raise CppKernelUnavailable("no C++ compiler found (set CXX, or install g++ or clang++)")
    # the source and every header of this folder it may include (-I below)
    source = b"\0".join([(SOURCE_DIR / name).read_bytes(), *(h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h")))])
    version = _compiler_version(compiler)
    folder = cache_dir()
    errors = []
    for arch in ARCH_FLAGS:
        flags = (*FLAGS, *arch)
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), version.encode(), " ".join(flags).encode(),
                        _cpu_signature().encode()])
        ).hexdigest()[:20]
        target = folder / f"{Path(name).stem}-{key}.so"
        if not target.exists():
            # Build beside the target and rename: another process may be building the same file.
            fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp.so")
            os.close(fd)
            try:
                done = subprocess.run(
                    [compiler, *flags, "-I", str(SOURCE_DIR), str(SOURCE_DIR / name), "-o", partial],
                    capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                )
                if done.returncode != 0:
                    errors.append(f"{' '.join(flags)}: " + "\n".join((done.stderr or done.stdout).splitlines()[-8:]))
                    continue
                os.replace(partial, target)
            except (OSError, subprocess.SubprocessError) as error:
                errors.append(f"{' '.join(flags)}: {error}")
                continue
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
        try:
            return ctypes.CDLL(str(target))
        except OSError as error:
            errors.append(f"loading {target}: {error}")
    raise CppKernelUnavailable(f"building {name} with {compiler} failed:\n" + "\n".join(errors))


def library(name: str) -> ctypes.CDLL:
    """The compiled library of source file ``name`` in this folder (built on the first call of the process, or
    loaded from the cache). Raises ``CppKernelUnavailable`` (with the reason) if it cannot be built or loaded."""
    lib = _libraries.get(name)
    if lib is not None:
        return lib
    with _lock:
        if name in _libraries:
            return _libraries[name]
        if name in _failures:
            raise CppKernelUnavailable(_failures[name])
        try:
            lib = _build(name)
        except CppKernelUnavailable as error:
            _failures[name] = str(error)
            raise
        _libraries[name] = lib
        return lib


def cpu_float32_without_grad(*tensors) -> bool:
    """The calls the C++ kernels take: every given tensor (None skipped) a CPU float32 tensor, and no gradient to
    compute through them."""
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            return False
    return not _needs_grad(*tensors)


class CompiledFunction:
    """One C entry point ``symbol(const Args*) -> int`` of source file ``source``, built and loaded on first use.

    ``abi_symbol() -> int`` must return ``abi_version`` (a cached library of an older layout of ``Args`` is refused).
    Calling the object runs the entry point on a filled ``args_type`` structure and returns its status.
    """

    def __init__(self, source: str, symbol: str, abi_symbol: str, abi_version: int, args_type, what: str):
        self.source, self.symbol, self.abi_symbol, self.abi_version = source, symbol, abi_symbol, abi_version
        self.args_type, self.what = args_type, what
        self._fn = None
        self._available = None

    def function(self):
        """The loaded entry point; raises ``CppKernelUnavailable`` (with the reason) if it cannot be built."""
        if self._fn is None:
            lib = library(self.source)
            if getattr(lib, self.abi_symbol)() != self.abi_version:
                raise CppKernelUnavailable(f"{self.source}: the loaded library's ABI version is not {self.abi_version}")
            fn = getattr(lib, self.symbol)
            fn.argtypes = [ctypes.POINTER(self.args_type)]
            fn.restype = ctypes.c_int
            self._fn = fn
        return self._fn

    def available(self) -> bool:
        """Whether the kernel is built (or can be built now) and loads; builds it on the first call.

        When it cannot be (no C++ compiler, a failed build), a RuntimeWarning with the reason is issued once and
        the op runs on the PyTorch path; not when the kernels are turned off with ``MULTIMODAL_MAMBA_CPP=0``.
        """
        if self._available is None:
            try:
                self.function()
                self._available = True
            except CppKernelUnavailable as error:
                self._available = False
                if enabled():
                    warnings.warn(f"multimodal_mamba: the C++ CPU {self.what} is not available, the PyTorch path "
                                  f"runs instead: {error}", RuntimeWarning, stacklevel=3)
        return self._available

    def __call__(self, args) -> int:
        return self.function()(ctypes.byref(args))
