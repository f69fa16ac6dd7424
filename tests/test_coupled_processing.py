"""CoupledMambaFeatureExtractor: alignment (segment averaging, padding), masks, missing modalities, input forms,
labels, save/load through AutoFeatureExtractor / AutoProcessor, and bad input."""

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoProcessor

from multimodal_mamba import CoupledMambaConfig, CoupledMambaFeatureExtractor
from multimodal_mamba.processing.processing_coupled_mamba import segment_mean

DIMS = {"text": 4, "audio": 3, "vision": 2}


def sample(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((length, DIMS[name])).astype(np.float32) for name, length in lengths.items()}


def loop_segment_mean(x, length):
    """The authors' resampling, written as a loop: average x over np.linspace segments."""
    edges = np.linspace(0, len(x), length + 1)
    out = []
    for i in range(length):
        start = min(int(np.floor(edges[i])), len(x) - 1)
        end = min(max(int(np.floor(edges[i + 1])), start + 1), len(x))
        out.append(x[start:end].mean(0))
    return np.stack(out)


@pytest.mark.parametrize("steps,length", [(50, 10), (23, 7), (7, 7), (3, 8), (1, 5)])
def test_segment_mean_matches_the_loop(steps, length):
    x = np.random.default_rng(1).standard_normal((steps, 3)).astype(np.float32)
    np.testing.assert_allclose(segment_mean(x, length), loop_segment_mean(x, length), rtol=1e-5, atol=1e-6)


def test_segment_mean_alignment_of_unaligned_modalities():
    extractor = CoupledMambaFeatureExtractor(modality_dims=DIMS, sequence_length=6)
    s = sample({"text": 5, "audio": 30, "vision": 12})
    batch = extractor(s, return_tensors="pt")
    assert batch["input_features"].shape == (1, 6, 9) and batch["input_features"].dtype == torch.float32
    assert batch["attention_mask"].shape == (1, 3, 6) and batch["attention_mask"].dtype == torch.int64
    assert batch["attention_mask"].all()
    np.testing.assert_allclose(batch["input_features"][0, :, 4:7].numpy(), segment_mean(s["audio"], 6), rtol=1e-6)
    # audio at 30 steps into 6 segments of 5: the first output step is the mean of the first five frames
    np.testing.assert_allclose(batch["input_features"][0, 0, 4:7].numpy(), s["audio"][:5].mean(0), rtol=1e-5)


def test_pad_alignment_masks_the_padding():
    extractor = CoupledMambaFeatureExtractor(modality_dims=DIMS, alignment="pad", sequence_length=None)
    samples = [sample({"text": 3, "audio": 7, "vision": 5}, 0), sample({"text": 4, "audio": 2, "vision": 1}, 1)]
    batch = extractor(samples, return_tensors="np")
    assert batch["input_features"].shape == (2, 7, 9)
    mask = batch["attention_mask"]
    assert mask[0].sum(-1).tolist() == [3, 7, 5] and mask[1].sum(-1).tolist() == [4, 2, 1]
    assert (mask[0, 0, :3] == 1).all() and (mask[0, 0, 3:] == 0).all()  # valid steps first
    np.testing.assert_array_equal(batch["input_features"][1, :2, 4:7], samples[1]["audio"])
    assert (batch["input_features"][1, 2:, 4:7] == 0).all()
    # a fixed length truncates the longer sequences
    fixed = extractor(samples, sequence_length=4, return_tensors="np")
    assert fixed["input_features"].shape == (2, 4, 9) and fixed["attention_mask"][0, 1].sum() == 4


def test_missing_modality_absent_none_or_empty_gets_a_zero_mask():
    extractor = CoupledMambaFeatureExtractor(modality_dims=DIMS, sequence_length=5)
    s = sample({"text": 8, "audio": 9})
    forms = [s, {**s, "vision": None}, {**s, "vision": np.zeros((0, 2), np.float32)}]
    for features in forms:
        batch = extractor(features, return_tensors="pt")
        assert batch["attention_mask"][0].sum(-1).tolist() == [5, 5, 0]
        assert (batch["input_features"][0, :, 7:] == 0).all()


def test_input_forms_agree():
    extractor = CoupledMambaFeatureExtractor(modality_dims=DIMS, sequence_length=4)
    samples = [sample({"text": 5, "audio": 6, "vision": 7}, i) for i in range(3)]
    as_dicts = extractor(samples)["input_features"]
    columnar = extractor({name: [s[name] for s in samples] for name in DIMS})["input_features"]
    ordered = extractor([[s[name] for name in DIMS] for s in samples])["input_features"]
    tensors = extractor([{k: torch.from_numpy(v) for k, v in s.items()} for s in samples])["input_features"]
    nested_lists = extractor([{k: v.tolist() for k, v in s.items()} for s in samples])["input_features"]
    for other in (columnar, ordered, tensors, nested_lists):
        np.testing.assert_allclose(np.asarray(other), np.asarray(as_dicts), rtol=1e-6)


def test_labels_are_returned_with_the_right_dtype():
    extractor = CoupledMambaFeatureExtractor(modality_dims=DIMS, sequence_length=3)
    samples = [sample({"text": 4}, 0), sample({"text": 4}, 1)]
    assert extractor(samples, labels=[0.5, -1.0], return_tensors="pt")["labels"].dtype == torch.float32
    assert extractor(samples, labels=[1, 0], return_tensors="pt")["labels"].dtype == torch.int64
    assert extractor(samples, labels=[[1, 0, 1], [0, 0, 1]], return_tensors="pt")["labels"].shape == (2, 3)


def test_save_and_load_through_auto_classes_keeps_the_modality_order(tmp_path):
    config = CoupledMambaConfig(modality_dims={"vision": 2, "text": 4, "audio": 3})
    config.save_pretrained(tmp_path)
    extractor = CoupledMambaFeatureExtractor.from_model_config(config, alignment="pad", sequence_length=None)
    extractor.save_pretrained(tmp_path)
    for loader in (AutoFeatureExtractor, AutoProcessor, CoupledMambaFeatureExtractor):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, CoupledMambaFeatureExtractor)
        assert loaded.modality_names == ["vision", "text", "audio"]
        assert loaded.alignment == "pad" and loaded.sequence_length is None
    s = sample({"text": 3, "audio": 2, "vision": 4})
    np.testing.assert_array_equal(loaded(s)["input_features"], extractor(s)["input_features"])


@pytest.mark.parametrize(
    "features,message",
    [
        ({"text": np.zeros((3, 5))}, "'text' of sample 0 has feature dim 5, expected 4"),
        ({"text": np.zeros(3)}, r"'text' of sample 0 must be \(L, 4\)"),
        ({"depth": np.zeros((3, 1))}, r"unknown modalities \['depth'\]"),
        ([[np.zeros((3, 4)), np.zeros((3, 3))]], "sample 0 has 2 modalities but the model has 3"),
        ({"audio": np.full((3, 3), np.nan)}, "'audio' of sample 0 contains NaN or inf"),
        ([{"text": np.zeros((2, 4))}, {"vision": np.full((2, 2), np.inf)}], "'vision' of sample 1 contains NaN or inf"),
        ({"text": [np.zeros((2, 4))] * 2, "audio": [np.zeros((2, 3))] * 3}, "different batch sizes"),
        ("text", "features must be a dict"),
        ([], "empty batch"),
    ],
)
def test_bad_input_raises_value_error(features, message):
    extractor = CoupledMambaFeatureExtractor(modality_dims=DIMS, sequence_length=3)
    with pytest.raises(ValueError, match=message):
        extractor(features)


def test_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match="alignment must be one of"):
        CoupledMambaFeatureExtractor(modality_dims=DIMS, alignment="interpolate")
    with pytest.raises(ValueError, match="needs sequence_length >= 1"):
        CoupledMambaFeatureExtractor(modality_dims=DIMS, sequence_length=None)
    extractor = CoupledMambaFeatureExtractor(modality_dims=DIMS)
    with pytest.raises(ValueError, match="got 1 labels for 2 samples"):
        extractor([sample({"text": 2}), sample({"text": 2})], labels=[1])
    with pytest.raises(ValueError, match="unexpected arguments"):
        extractor(sample({"text": 2}), padding=True)
