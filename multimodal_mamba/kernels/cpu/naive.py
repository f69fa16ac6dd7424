"""The reference the C++ CPU kernels are tested against: the sequential float32 loop, defined (with the op's contract)
in ``multimodal_mamba.modeling.ops_selective_scan``."""

from ...modeling.ops_selective_scan import selective_scan_ref  # noqa: F401
