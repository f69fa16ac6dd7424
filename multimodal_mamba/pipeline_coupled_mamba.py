"""A transformers pipeline for multimodal sequence regression / classification with Coupled Mamba.

Registered (by ``import multimodal_mamba``) as the task ``"multimodal-sequence-classification"``:

    import multimodal_mamba
    from transformers import pipeline
    pipe = pipeline("multimodal-sequence-classification", model=folder)
    pipe({"text": text_feats, "audio": audio_feats, "vision": vision_feats})
    # regression (num_labels == 1): {"score": 0.42}
    # classification: {"label": "positive", "score": 0.91}, or a list of top_k of them

Inputs are one sample (a dict {modality: (L_m, dim_m) array}; modalities may have different lengths or be
missing) or a list of samples. The folder's ``preprocessor_config.json`` (a ``CoupledMambaFeatureExtractor``)
aligns them; without one, a feature extractor is built from the model's config.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Pipeline

from .processing.processing_coupled_mamba import CoupledMambaFeatureExtractor

MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK = "multimodal-sequence-classification"


class MultimodalSequenceClassificationPipeline(Pipeline):
    """Regression or classification of multimodal feature sequences (see the module docstring).

    Call arguments: ``top_k`` (classification: how many labels; 1 gives one dict, None all labels as a list),
    ``function_to_apply`` ("softmax", "sigmoid" or "none"; default softmax for single-label, sigmoid for
    multi-label), ``alignment`` / ``sequence_length`` (override the feature extractor's).
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_tokenizer = False
    _load_feature_extractor = None  # load it when the folder has one; otherwise build it from the config

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.feature_extractor is None:
            self.feature_extractor = CoupledMambaFeatureExtractor.from_model_config(self.model.config)

    def _sanitize_parameters(self, top_k="unset", function_to_apply=None, alignment=None, sequence_length=None, **kwargs):
        if kwargs:
            raise ValueError(f"{type(self).__name__}: unexpected arguments {sorted(kwargs)}")
        preprocess = {}
        if alignment is not None:
            preprocess["alignment"] = alignment
        if sequence_length is not None:
            preprocess["sequence_length"] = sequence_length
        postprocess = {}
        if top_k != "unset":
            postprocess["top_k"] = top_k
        if function_to_apply is not None:
            if function_to_apply not in ("softmax", "sigmoid", "none"):
                raise ValueError(f"function_to_apply must be 'softmax', 'sigmoid' or 'none', got {function_to_apply!r}")
            postprocess["function_to_apply"] = function_to_apply
        return preprocess, {}, postprocess

    def preprocess(self, inputs, alignment=None, sequence_length=None):
        if not isinstance(inputs, dict):
            raise ValueError(
                f"{type(self).__name__}: each input must be a dict {{modality: (L, dim) array}}, got {type(inputs).__name__}"
            )
        return self.feature_extractor([inputs], alignment=alignment, sequence_length=sequence_length, return_tensors="pt")

    def _forward(self, model_inputs):
        return {"logits": self.model(**model_inputs).logits}

    def postprocess(self, model_outputs, top_k=1, function_to_apply=None):
        logits = model_outputs["logits"][0].float()
        config = self.model.config
        if config.num_labels == 1 and config.problem_type in (None, "regression"):
            return {"score": float(logits[0])}
        if function_to_apply is None:
            function_to_apply = "sigmoid" if config.problem_type == "multi_label_classification" else "softmax"
        if function_to_apply == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif function_to_apply == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        scores = scores.numpy()
        order = np.argsort(-scores)
        if top_k is not None:
            order = order[: int(top_k)]
        results = [{"label": config.id2label[int(i)], "score": float(scores[i])} for i in order]
        return results[0] if top_k == 1 else results
