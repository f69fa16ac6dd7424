"""multimodal-mamba: VL-Mamba and Coupled Mamba as Hugging Face transformers models."""

from .modeling.modeling_mamba_lm import MambaBackbone, MambaCausalLM, MambaMixer, MambaStateCache
from .modeling.ops_selective_scan import (
    causal_conv1d,
    causal_conv1d_update,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
)
from .modeling.ssm_backends import available_backends, last_backend, ssm_backend

__version__ = "0.1.0"
