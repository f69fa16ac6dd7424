"""The fused Mamba LM decode step on Triton (``fused.py``): residual add + RMSNorm in one kernel, and the mixer between
in_proj and out_proj (conv update, x_proj, dt_proj, state update, gate) in two; reference: ``naive.py`` (importable
without Triton). ``modeling_mamba_lm.MambaBackbone`` runs a decode step through ``fused`` when it applies (see
``MambaBackbone._fused_decode_ops``)."""

try:  # Triton is optional; the naive reference is not
    from .fused import add_rms_norm, in_projection, mixer_decode_step, out_projection, split_count

    __all__ = ["add_rms_norm", "in_projection", "mixer_decode_step", "out_projection", "split_count"]
except ImportError:  # pragma: no cover - without Triton
    __all__ = []
