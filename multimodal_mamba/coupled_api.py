"""Coupled Mamba's public API; importing it registers the family with transformers.

Registered: ``AutoConfig`` ("coupled_mamba"), ``AutoModel``, ``AutoModelForSequenceClassification``,
``AutoFeatureExtractor`` and ``AutoProcessor`` (both give the feature extractor), the pipeline task
``"multimodal-sequence-classification"``, and the classes for remote code (``save_pretrained`` writes ``auto_map``
and copies the modeling / processing files next to the weights).
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
    # Remote code: save_pretrained records auto_map and copies the files (the models add the other Auto entries).
    CoupledMambaConfig.register_for_auto_class()
    CoupledMambaModel.register_for_auto_class("AutoModel")
    CoupledMambaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    CoupledMambaFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
    if MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK,
            pipeline_class=MultimodalSequenceClassificationPipeline,
            pt_model=AutoModelForSequenceClassification,
            type="multimodal",
        )


_register()
