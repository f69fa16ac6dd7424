"""The reference the Triton decode step is tested against (defined in ``modeling.ops_selective_scan``)."""

from ...modeling.ops_selective_scan import selective_state_update_ref  # noqa: F401
