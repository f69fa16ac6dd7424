"""Coupled Mamba's public API; importing it registers the family with transformers.

Registered: ``AutoConfig`` ("coupled_mamba"), ``AutoModel``, ``AutoModelForSequenceClassification``,
``AutoFeatureExtractor`` and ``AutoProcessor`` (both give the feature extractor), the pipeline task
``"multimodal-sequence-classification"``, and the classes for remote code through ``hub.register_remote_code``
(``save_pretrained`` writes the family's ``auto_map`` and copies the modeling / processing files next to the weights;
``model.push_to_hub`` uploads them with a model card rendered from ``model_cards/coupled_mamba.md``).
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .data.synthetic_coupled import make_coupled_interaction_samples, samples_to_dataset
from .hub import register_remote_code
from .modeling.configuration_coupled_mamba import CoupledMambaConfig
from .modeling.modeling_coupled_mamba import (
    CoupledMambaForSequenceClassification,
    CoupledMambaModel,
    CoupledMambaModelOutput,
    CoupledMambaPreTrainedModel,
)
from .modeling.ops_coupled_scan import (
    CoupledScanOverflowError,
    coupled_selective_scan,
    coupled_selective_scan_chunked,
    coupled_selective_scan_ref,
)
from .pipeline_coupled_mamba import MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK, MultimodalSequenceClassificationPipeline
from .processing.processing_coupled_mamba import CoupledMambaDataCollator, CoupledMambaFeatureExtractor

__all__ = [
    "CoupledMambaConfig",
    "CoupledMambaModel",
    "CoupledMambaModelOutput",
    "CoupledMambaPreTrainedModel",
    "CoupledMambaForSequenceClassification",
    "CoupledMambaFeatureExtractor",
    "CoupledMambaDataCollator",
    "CoupledScanOverflowError",
    "coupled_selective_scan",
    "coupled_selective_scan_ref",
    "coupled_selective_scan_chunked",
    "MultimodalSequenceClassificationPipeline",
    "MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK",
    "make_coupled_interaction_samples",
    "samples_to_dataset",
]


def _register() -> None:
    AutoConfig.register(CoupledMambaConfig.model_type, CoupledMambaConfig, exist_ok=True)
    AutoModel.register(CoupledMambaConfig, CoupledMambaModel, exist_ok=True)
    AutoModelForSequenceClassification.register(CoupledMambaConfig, CoupledMambaForSequenceClassification, exist_ok=True)
    AutoFeatureExtractor.register(CoupledMambaConfig, CoupledMambaFeatureExtractor, exist_ok=True)
    # The feature extractor is the family's whole processor; registering it here also keeps AutoProcessor from
    # probing AutoTokenizer (which would ask about remote code) before falling back to AutoFeatureExtractor.
    AutoProcessor.register(CoupledMambaConfig, CoupledMambaFeatureExtractor, exist_ok=True)
    # Remote code (multimodal_mamba.hub): save_pretrained copies the modeling / processing files next to the weights
    # and writes the whole family's auto_map (AutoConfig, AutoModel, AutoModelForSequenceClassification in
    # config.json; AutoFeatureExtractor and AutoProcessor in preprocessor_config.json), so the folder loads with
    # trust_remote_code=True where this package is not installed. model.push_to_hub uploads with a model card.
    register_remote_code(
        CoupledMambaConfig,
        {"AutoModel": CoupledMambaModel, "AutoModelForSequenceClassification": CoupledMambaForSequenceClassification},
        {"AutoFeatureExtractor": CoupledMambaFeatureExtractor, "AutoProcessor": CoupledMambaFeatureExtractor},
    )
    if MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK,
            pipeline_class=MultimodalSequenceClassificationPipeline,
            pt_model=AutoModelForSequenceClassification,
            type="multimodal",
        )


_register()
