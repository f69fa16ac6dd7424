"""The references the Triton conv kernels are tested against (defined in ``modeling.ops_selective_scan``)."""

from ...modeling.ops_selective_scan import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: F401
