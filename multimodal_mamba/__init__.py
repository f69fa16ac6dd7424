"""multimodal-mamba: VL-Mamba and Coupled Mamba as first-class Hugging Face transformers models.

Importing the package registers every model with transformers' Auto classes:

    from transformers import AutoModelForImageTextToText, AutoProcessor
    import multimodal_mamba  # noqa: F401
    model = AutoModelForImageTextToText.from_pretrained(folder)
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling.configuration_vl_mamba import VLMambaConfig
from .modeling.modeling_mamba_lm import MambaBackbone, MambaCausalLM, MambaMixer, MambaStateCache
from .modeling.modeling_vl_mamba import VLMambaForConditionalGeneration, VLMambaModel, VLMambaPreTrainedModel
from .modeling.ops_selective_scan import (
    causal_conv1d,
    causal_conv1d_update,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
)
from .modeling.ssm_backends import available_backends, last_backend, ssm_backend
from .processing.processing_vl_mamba import VLMambaProcessor
from .hub import push_to_hub, register_remote_code, render_model_card

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register(VLMambaConfig.model_type, VLMambaConfig, exist_ok=True)
    AutoModel.register(VLMambaConfig, VLMambaModel, exist_ok=True)
    AutoModelForImageTextToText.register(VLMambaConfig, VLMambaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(VLMambaConfig, VLMambaProcessor, exist_ok=True)
    # Remote code: save_pretrained copies the modeling / processing files next to the weights and writes the whole
    # family's auto_map (AutoConfig, AutoModel, AutoModelForImageTextToText; AutoProcessor in the processor files),
    # so the folder loads with trust_remote_code=True where this package is not installed. model.push_to_hub
    # uploads with a model card rendered from model_cards/ (see multimodal_mamba.hub).
    register_remote_code(
        VLMambaConfig,
        {"AutoModel": VLMambaModel, "AutoModelForImageTextToText": VLMambaForConditionalGeneration},
        {"AutoProcessor": VLMambaProcessor},
    )


_register_auto_classes()

# >>> coupled mamba exports (issue 3) are appended below this line
from .coupled_api import *  # noqa: F401,F403
from .training import (  # noqa: E402  Coupled Mamba fine-tuning (issue 4)
    COUPLED_MAMBA_LORA_TARGET_REGEX,
    coupled_classification_metrics,
    coupled_mamba_lora_config,
    coupled_regression_metrics,
    load_coupled_mamba_dataset,
)
