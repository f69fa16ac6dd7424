"""Coupled Mamba end to end on the synthetic cross-modal task: build, train with Trainer, save, reload, pipeline.

The data come from ``multimodal_mamba.data.synthetic_coupled``: each modality is a sequence of events, and the
label says whether the audio events repeat the text events two steps later; no single modality carries it. Audio is
observed at twice the rate of the others (unaligned lengths); the feature extractor segment-averages every modality
to one time axis. A small Coupled Mamba learns the task in a few hundred steps on a CPU; the same model with
``--coupling none`` (independent chains) stays at chance (see benchmarks/results/coupled_synthetic.md).

    python examples/coupled_mamba_synthetic.py [--output-dir DIR] [--coupling mean|sum|none] [--epochs 15]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, pipeline  # noqa: E402

from multimodal_mamba import (  # noqa: E402
    MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK,
    CoupledMambaConfig,
    CoupledMambaDataCollator,
    CoupledMambaFeatureExtractor,
    CoupledMambaForSequenceClassification,
    make_coupled_interaction_samples,
    samples_to_dataset,
)

DIMS = {"text": 16, "audio": 8, "vision": 6}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=None, help="where the trained model goes (default: a temp folder)")
    parser.add_argument("--coupling", default="mean", choices=["mean", "sum", "none"])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    task = dict(seq_len=32, modality_dims=DIMS, lag=1, event_rate=0.5, strength=1.0, noise=0.2, rates={"audio": 2})
    train = samples_to_dataset(make_coupled_interaction_samples(args.train, seed=100 + args.seed, **task))
    test = make_coupled_interaction_samples(args.test, seed=200 + args.seed, **task)

    config = CoupledMambaConfig(
        modality_dims=DIMS, hidden_size=16, num_hidden_layers=2, state_size=8, num_labels=2,
        id2label={0: "independent", 1: "audio follows text"}, coupling=args.coupling,
        ssm_bc_init_scale=10.0, time_step_min=0.1, time_step_max=1.0,  # a larger SSM path at the start
    )
    model = CoupledMambaForSequenceClassification(config)
    extractor = CoupledMambaFeatureExtractor.from_model_config(config, sequence_length=32)

    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="coupled_mamba_"))
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), per_device_train_batch_size=128, num_train_epochs=args.epochs,
        learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.01, logging_steps=20,
        save_strategy="no", report_to=[], seed=args.seed, use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      data_collator=CoupledMambaDataCollator(extractor))
    trainer.train()

    model_dir = output_dir / "model"
    trainer.save_model(str(model_dir))
    extractor.save_pretrained(str(model_dir))
    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = extractor([s["input_features"] for s in test], return_tensors="pt")
    predictions = reloaded(**batch).logits.argmax(-1).numpy()
    accuracy = float((predictions == np.array([s["label"] for s in test])).mean())
    print(f"coupling={args.coupling}: held-out accuracy {accuracy:.3f} on {len(test)} samples")

    classifier = pipeline(MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK, model=str(model_dir))
    print("pipeline on one sample:", classifier(test[0]["input_features"]), "label:", test[0]["label"])
    print(f"model saved to {model_dir}")


if __name__ == "__main__":
    main()
