"""Coupled Mamba with transformers' clients: Trainer on a datasets.Dataset of per-sample feature arrays, the
registered pipeline loaded from a folder, and the synthetic cross-modal task generator."""

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments, pipeline

from multimodal_mamba import (
    MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK,
    CoupledMambaConfig,
    CoupledMambaDataCollator,
    CoupledMambaFeatureExtractor,
    CoupledMambaForSequenceClassification,
    MultimodalSequenceClassificationPipeline,
    make_coupled_interaction_samples,
    samples_to_dataset,
)
from multimodal_mamba.data.synthetic_coupled import echo_statistic

DIMS = {"text": 16, "audio": 8, "vision": 6}


def tiny_model(num_labels=1, **kwargs):
    torch.manual_seed(0)
    config = CoupledMambaConfig(
        modality_dims=DIMS, hidden_size=16, num_hidden_layers=1, state_size=8, projection_hidden_size=16,
        num_labels=num_labels, **kwargs,
    )
    return CoupledMambaForSequenceClassification(config)


# ---------------------------------------------------------------------------------------------------- generator
def test_generator_label_lives_only_in_the_cross_modal_echo():
    samples = make_coupled_interaction_samples(400, seq_len=32, seed=0)
    labels = np.array([s["label"] for s in samples])
    assert labels.mean() == 0.5
    echo = np.array([echo_statistic(s, lag=2) for s in samples])
    # The oracle statistic separates the classes ...
    assert echo[labels == 1].mean() > 0.85 and echo[labels == 0].mean() < 0.3
    # ... while each modality alone has the same event rate in both classes (it is i.i.d. Bernoulli(0.2)).
    for name in DIMS:
        rates = np.array([s["events"][name].mean() for s in samples])
        assert abs(rates[labels == 1].mean() - rates[labels == 0].mean()) < 0.02
        assert abs(rates.mean() - 0.2) < 0.02
    # Features: (L * rate, dim), and the same seed gives the same data.
    unaligned = make_coupled_interaction_samples(3, seq_len=10, rates={"audio": 3}, missing_prob=1.0, seed=4)
    assert unaligned[0]["input_features"]["audio"].shape == (30, 8)
    assert unaligned[0]["input_features"]["vision"] is None
    again = make_coupled_interaction_samples(3, seq_len=10, rates={"audio": 3}, missing_prob=1.0, seed=4)
    np.testing.assert_array_equal(again[2]["input_features"]["text"], unaligned[2]["input_features"]["text"])
    regression = make_coupled_interaction_samples(50, task="regression", seed=1)
    values = np.array([s["label"] for s in regression])
    assert values.min() >= 0 and values.max() <= 1 and values.std() > 0.2
    with pytest.raises(ValueError, match="lag must be in"):
        make_coupled_interaction_samples(2, seq_len=8, lag=0)


# ---------------------------------------------------------------------------------------------------- Trainer
def test_trainer_on_a_dataset_of_per_sample_feature_arrays(tmp_path):
    samples = make_coupled_interaction_samples(96, seq_len=12, task="regression", rates={"audio": 2}, seed=0,
                                               missing_prob=0.3)
    dataset = samples_to_dataset(samples)
    assert set(dataset.column_names) == {"input_features", "label"}
    model = tiny_model(regression_loss="l1")
    extractor = CoupledMambaFeatureExtractor.from_model_config(model.config, sequence_length=12)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=24, learning_rate=1e-2,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=CoupledMambaDataCollator(extractor))
    before = trainer.evaluate(eval_dataset=dataset)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(eval_dataset=dataset)["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 5 and np.isfinite(losses).all()
    assert after < before  # L1 loss on the training set went down
    trainer.save_model(str(tmp_path / "model"))
    extractor.save_pretrained(str(tmp_path / "model"))
    pipe = pipeline(MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK, model=str(tmp_path / "model"))
    assert isinstance(pipe.feature_extractor, CoupledMambaFeatureExtractor)
    out = pipe(samples[0]["input_features"])
    assert set(out) == {"score"} and np.isfinite(out["score"])
    batch = extractor([samples[0]["input_features"]], return_tensors="pt")
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**batch).logits[0, 0].item()
    assert abs(out["score"] - expected) < 1e-5


# ---------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_classification_from_a_folder(tmp_path):
    model = tiny_model(num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"})
    model.save_pretrained(tmp_path)
    CoupledMambaFeatureExtractor.from_model_config(model.config, sequence_length=8).save_pretrained(tmp_path)
    pipe = pipeline(MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK, model=str(tmp_path))
    assert isinstance(pipe, MultimodalSequenceClassificationPipeline)
    samples = make_coupled_interaction_samples(3, seq_len=8, rates={"audio": 2}, missing_prob=1.0, seed=2)
    top = pipe(samples[0]["input_features"])
    assert set(top) == {"label", "score"} and top["label"] in {"negative", "neutral", "positive"}
    every = pipe(samples[0]["input_features"], top_k=None)
    assert [r["label"] for r in every][0] == top["label"] and abs(sum(r["score"] for r in every) - 1) < 1e-5
    batch = pipe([s["input_features"] for s in samples], top_k=2)
    assert len(batch) == 3 and all(len(r) == 2 for r in batch)
    logits = pipe(samples[1]["input_features"], function_to_apply="none", top_k=None)
    extractor = CoupledMambaFeatureExtractor.from_model_config(model.config, sequence_length=8)
    with torch.no_grad():
        expected = model.eval()(**extractor([samples[1]["input_features"]], return_tensors="pt")).logits[0]
    assert abs(max(r["score"] for r in logits) - expected.max().item()) < 1e-5


def test_pipeline_without_a_saved_feature_extractor_builds_one_from_the_config(tmp_path):
    model = tiny_model(num_labels=1)
    model.save_pretrained(tmp_path)
    pipe = pipeline(MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK, model=str(tmp_path))
    assert pipe.feature_extractor.modality_names == ["text", "audio", "vision"]
    sample = make_coupled_interaction_samples(1, seq_len=60, seed=3)[0]["input_features"]
    assert np.isfinite(pipe(sample)["score"])
    with pytest.raises(ValueError, match="each input must be a dict"):
        pipe("not features")
