"""The reference the Triton coupled scan is tested against: the sequential float32 loop, defined (with the op's
contract) in ``multimodal_mamba.modeling.ops_coupled_scan``."""

from ...modeling.ops_coupled_scan import coupled_selective_scan_chunked, coupled_selective_scan_ref  # noqa: F401
