"""CoupledMambaFeatureExtractor: multimodal feature sequences of different lengths -> one time axis, batched.

Coupled Mamba runs all modalities' state chains on one time axis, but the data come unaligned (the papers'
setting): e.g. a BERT vector per word, a COVAREP vector per audio frame and a Facet vector per video frame. This
feature extractor brings each sample's modalities to one length, either

- ``alignment="segment_mean"`` (default, as the authors' code): each modality is cut into ``sequence_length``
  equal segments (np.linspace boundaries) and each segment averaged; a sequence shorter than ``sequence_length``
  is stretched (each step repeated); every step is valid; or
- ``alignment="pad"``: each modality keeps its own steps from t = 0 and is padded (``padding_value``) to the
  longest sequence of the batch (or to ``sequence_length`` when given, truncating longer ones); the attention
  mask marks the valid steps;

and returns a ``BatchFeature`` with

- ``input_features``: (batch, L, sum_m dim_m) float32, the modalities concatenated in ``modality_names`` order;
- ``attention_mask``: (batch, M, L) int64, 1 on valid steps. A missing modality (absent from the sample, None,
  or with zero steps) gets zero features and an all-zero mask row, which the model handles (pooling skips it,
  fusion renormalizes over the modalities present);
- ``labels`` when ``labels`` are given.

It saves and loads with ``save_pretrained`` / ``from_pretrained`` (``preprocessor_config.json``) and, once
registered (``import multimodal_mamba``), loads through ``AutoFeatureExtractor`` and ``AutoProcessor``.
This file imports nothing of this package, so it travels with remote code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np

from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin

DEFAULT_MODALITY_DIMS = {"text": 768, "audio": 74, "vision": 35}
ALIGNMENTS = ("segment_mean", "pad")
DEFAULT_SEGMENT_LENGTH = 50


def segment_mean(sequence: np.ndarray, length: int) -> np.ndarray:
    """(L_in, dim) -> (length, dim): the mean over each of ``length`` segments with np.linspace boundaries.

    When L_in >= length the segments partition the sequence; when L_in < length each output step takes the input
    step its segment starts in (a stretch). L_in must be >= 1.
    """
    steps = sequence.shape[0]
    edges = np.linspace(0.0, steps, length + 1)
    starts = np.minimum(np.floor(edges[:-1]).astype(np.int64), steps - 1)
    ends = np.maximum(np.floor(edges[1:]).astype(np.int64), starts + 1)
    ends = np.minimum(ends, steps)
    cumulative = np.zeros((steps + 1, sequence.shape[1]), dtype=np.float64)
    np.cumsum(sequence, axis=0, dtype=np.float64, out=cumulative[1:])
    sums = cumulative[ends] - cumulative[starts]
    return (sums / (ends - starts)[:, None]).astype(np.float32)


def _to_numpy(value):
    if value is None:
        return None
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _depth(value) -> int:
    """Nesting depth of array-likes: 2 for one (L, dim) sequence, 3 for a list of them."""
    if value is None:
        return -1
    if hasattr(value, "ndim"):
        return int(value.ndim)
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return 1
        inner = next((v for v in value if v is not None), None)
        return 1 + max(_depth(inner), 0) if inner is not None else 1
    return 0


class CoupledMambaFeatureExtractor(FeatureExtractionMixin):
    r"""Aligns and batches multimodal feature sequences for Coupled Mamba (see the module docstring).

    Args:
        modality_dims (`dict[str, int]`): the modalities, in the model's order, with their feature dims.
        modality_names (`list[str]`, optional): their order (kept on save, since JSON sorts dict keys).
        alignment (`str`): "segment_mean" (default) or "pad".
        sequence_length (`int`, optional): the common length for "segment_mean" (default 50); for "pad", the
            length to pad / truncate to (default None: the longest in the batch).
        padding_value (`float`): the feature value of padded steps.
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(
        self,
        modality_dims=None,
        modality_names=None,
        alignment="segment_mean",
        sequence_length=DEFAULT_SEGMENT_LENGTH,
        padding_value=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        modality_dims = dict(DEFAULT_MODALITY_DIMS if modality_dims is None else modality_dims)
        if modality_names is not None:
            if sorted(modality_names) != sorted(modality_dims):
                raise ValueError(
                    f"CoupledMambaFeatureExtractor: modality_names {list(modality_names)} must list each key of "
                    f"modality_dims {list(modality_dims)} once"
                )
            modality_dims = {name: modality_dims[name] for name in modality_names}
        if not modality_dims:
            raise ValueError("CoupledMambaFeatureExtractor: modality_dims must name at least one modality")
        for name, dim in modality_dims.items():
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"CoupledMambaFeatureExtractor: modality {name!r} needs a positive integer dim, got {dim!r}")
        self._check_alignment(alignment, sequence_length)
        self.modality_dims = modality_dims
        self.modality_names = list(modality_dims)
        self.alignment = alignment
        self.sequence_length = sequence_length
        self.padding_value = float(padding_value)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "CoupledMambaFeatureExtractor":
        """A feature extractor for the modalities of a ``CoupledMambaConfig``."""
        return cls(modality_dims=dict(config.modality_dims), modality_names=list(config.modality_names), **kwargs)

    @staticmethod
    def _check_alignment(alignment, sequence_length):
        if alignment not in ALIGNMENTS:
            raise ValueError(f"CoupledMambaFeatureExtractor: alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if alignment == "segment_mean" and (sequence_length is None or int(sequence_length) < 1):
            raise ValueError(
                f"CoupledMambaFeatureExtractor: alignment='segment_mean' needs sequence_length >= 1, got {sequence_length!r}"
            )
        if sequence_length is not None and int(sequence_length) < 1:
            raise ValueError(f"CoupledMambaFeatureExtractor: sequence_length must be >= 1, got {sequence_length!r}")

    # ------------------------------------------------------------------------------------------------------------
    def _as_samples(self, features):
        """Normalize the accepted input forms to a list of {name: (L_m, dim_m) float32 array or None}."""
        names = self.modality_names
        if isinstance(features, Mapping):
            present = [v for v in features.values() if v is not None]
            if present and all(_depth(v) == 3 for v in present):  # columnar batch: {name: [seq, seq, ...]}
                sizes = {key: len(value) for key, value in features.items() if value is not None}
                if len(set(sizes.values())) > 1:
                    raise ValueError(f"CoupledMambaFeatureExtractor: the modalities have different batch sizes {sizes}")
                batch = next(iter(sizes.values()))
                samples = [{key: (value[i] if value is not None else None) for key, value in features.items()} for i in range(batch)]
            else:
                samples = [features]
        elif isinstance(features, (list, tuple)):
            if len(features) == 0:
                raise ValueError("CoupledMambaFeatureExtractor: got an empty batch")
            if all(isinstance(item, Mapping) for item in features):
                samples = list(features)
            elif all(isinstance(item, (list, tuple)) for item in features):
                samples = [self._from_ordered(item, index) for index, item in enumerate(features)]
            else:
                samples = [self._from_ordered(features, 0)]
        else:
            raise ValueError(
                "CoupledMambaFeatureExtractor: features must be a dict {modality: (L, dim) array} for one sample, a "
                f"list of such dicts, or a dict of per-sample lists; got {type(features).__name__}"
            )
        return [self._check_sample(sample, index) for index, sample in enumerate(samples)]

    def _from_ordered(self, item, index):
        names = self.modality_names
        if len(item) != len(names):
            raise ValueError(
                f"CoupledMambaFeatureExtractor: sample {index} has {len(item)} modalities but the model has "
                f"{len(names)} ({names})"
            )
        return dict(zip(names, item))

    def _check_sample(self, sample, index):
        names, dims = self.modality_names, self.modality_dims
        unknown = [key for key in sample if key not in dims]
        if unknown:
            raise ValueError(f"CoupledMambaFeatureExtractor: sample {index} has unknown modalities {unknown}; expected {names}")
        checked = {}
        for name in names:
            array = _to_numpy(sample.get(name))
            if array is not None and array.size == 0:
                array = None  # zero steps: the modality is missing
            if array is not None:
                if array.ndim != 2:
                    raise ValueError(
                        f"CoupledMambaFeatureExtractor: {name!r} of sample {index} must be (L, {dims[name]}), got shape "
                        f"{array.shape}"
                    )
                if array.shape[1] != dims[name]:
                    raise ValueError(
                        f"CoupledMambaFeatureExtractor: {name!r} of sample {index} has feature dim {array.shape[1]}, "
                        f"expected {dims[name]}"
                    )
                if not np.isfinite(array).all():
                    raise ValueError(f"CoupledMambaFeatureExtractor: {name!r} of sample {index} contains NaN or inf")
            checked[name] = array
        return checked

    def __call__(
        self,
        features,
        labels=None,
        alignment: Optional[str] = None,
        sequence_length: Optional[int] = None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        """Align and batch ``features``.

        features: one sample as a dict {modality: (L_m, dim_m) array / tensor / nested list, or None}, a list of
            such dicts (a batch), a dict of per-sample lists (a columnar batch, as ``datasets.map(batched=True)``
            gives), or lists in ``modality_names`` order. Modalities may have different lengths.
        labels: optional per-sample labels (a float per sample for regression, a class id, or a 0/1 vector).
        alignment, sequence_length: override the extractor's settings for this call.
        return_tensors: "pt", "np" or None (lists).
        Returns a ``BatchFeature`` with input_features (batch, L, sum dims), attention_mask (batch, M, L) and labels.
        """
        if kwargs:
            raise ValueError(f"CoupledMambaFeatureExtractor: unexpected arguments {sorted(kwargs)}")
        alignment = alignment or self.alignment
        if sequence_length is None:
            if alignment == self.alignment:
                sequence_length = self.sequence_length
            else:
                sequence_length = DEFAULT_SEGMENT_LENGTH if alignment == "segment_mean" else None
        self._check_alignment(alignment, sequence_length)
        samples = self._as_samples(features)
        names, dims = self.modality_names, self.modality_dims
        lengths = [[0 if s[name] is None else s[name].shape[0] for name in names] for s in samples]
        if alignment == "segment_mean":
            length = int(sequence_length)
        else:
            longest = max(max(row) for row in lengths)
            length = int(sequence_length) if sequence_length is not None else max(1, longest)
        offsets = np.cumsum([0] + [dims[name] for name in names])
        batch = len(samples)
        values = np.full((batch, length, int(offsets[-1])), self.padding_value, dtype=np.float32)
        mask = np.zeros((batch, len(names), length), dtype=np.int64)
        for b, sample in enumerate(samples):
            for m, name in enumerate(names):
                array = sample[name]
                if array is None:
                    values[b, :, offsets[m] : offsets[m + 1]] = 0.0
                    continue
                if alignment == "segment_mean":
                    values[b, :, offsets[m] : offsets[m + 1]] = segment_mean(array, length)
                    mask[b, m] = 1
                else:
                    steps = min(array.shape[0], length)
                    values[b, :steps, offsets[m] : offsets[m + 1]] = array[:steps]
                    mask[b, m, :steps] = 1
        data = {"input_features": values, "attention_mask": mask}
        if labels is not None:
            data["labels"] = self._labels_array(labels, batch)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _labels_array(labels, batch):
        if np.isscalar(labels):
            labels = [labels]
        labels = [np.asarray(label) for label in labels]
        if len(labels) != batch:
            raise ValueError(f"CoupledMambaFeatureExtractor: got {len(labels)} labels for {batch} samples")
        array = np.stack(labels)
        if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_):
            return array.astype(np.int64)
        return array.astype(np.float32)


class CoupledMambaDataCollator:
    """Collates dataset rows for ``Trainer``: rows hold the features either as ``input_features`` (a dict
    {modality: (L_m, dim_m) array}, e.g. a ``datasets`` struct column) or as one column per modality, and a
    ``label`` / ``labels``. Returns the feature extractor's batch (return_tensors="pt") with ``labels``.
    """

    def __init__(self, feature_extractor: CoupledMambaFeatureExtractor, alignment=None, sequence_length=None):
        self.feature_extractor = feature_extractor
        self.alignment = alignment
        self.sequence_length = sequence_length

    def __call__(self, rows):
        names = self.feature_extractor.modality_names
        features, labels = [], []
        for row in rows:
            if "input_features" in row:
                features.append(row["input_features"])
            else:
                features.append({name: row[name] for name in names if name in row})
            label = row.get("labels", row.get("label"))
            labels.append(label)
        if any(label is None for label in labels) and not all(label is None for label in labels):
            raise ValueError("CoupledMambaDataCollator: some rows have a label and others do not")
        return self.feature_extractor(
            features,
            labels=None if labels[0] is None else labels,
            alignment=self.alignment,
            sequence_length=self.sequence_length,
            return_tensors="pt",
        )
