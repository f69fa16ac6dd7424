"""Fine-tune Coupled Mamba with transformers' Trainer: regression (the paper's L1 loss and MAE / Corr / Acc-2 / F1 /
Acc-7) or classification (accuracy / weighted F1), on your own data or on the package's synthetic cross-modal task.

    python examples/finetune_coupled_mamba.py --task regression --output-dir out                 # synthetic data
    python examples/finetune_coupled_mamba.py --task regression --train-data train.npz --eval-data test.npz \\
        --output-dir out [--model CKPT] [--lora] [--gradient-checkpointing] [--bf16]

Data (``--train-data`` / ``--eval-data``; see ``multimodal_mamba.training.load_coupled_mamba_dataset``): each sample
holds one feature sequence (L_m, dim_m) per modality (lengths may differ; the feature extractor aligns them to
``--sequence-length`` steps by segment averaging, as the authors' code, or pads with ``--alignment pad``) and a label:

- ``.npz``: one (N, L_m, dim_m) array per modality named after it, optional ``<modality>_lengths`` (N,) valid steps
  (0 = missing), and ``label`` (N,);
- ``.json`` / ``.jsonl``: records {"text": [[...], ...], "audio": [[...], ...], "vision": [[...], ...], "label": y}
  (or the modalities under "input_features");
- a ``datasets`` folder (``save_to_disk``) with an ``input_features`` struct column or one column per modality and
  ``label``; for a ``DatasetDict`` folder, ``--train-split`` / ``--eval-split`` pick the splits.

Labels: a float per sample for regression (e.g. CMU-MOSEI sentiment in [-3, 3]; Acc-2 / F1 split it at 0), a class id
for classification. Without ``--train-data`` the script generates the synthetic task of
``multimodal_mamba.data.synthetic_coupled`` (the label lies only in how the audio events follow the text events), its
regression labels mapped from [0, 1] to [-1, 1] so that the sign metrics mean something.

Model: ``--model`` fine-tunes a saved Coupled Mamba folder (a new head is made when the task's head shape differs);
otherwise a fresh model with the paper's settings (hidden 128, 3 layers, d_state 64) for your data, or a small one
for the synthetic data. Optimizer: the paper's learning rate and weight decay (5e-4, 5e-4; Trainer's AdamW) on your
data; 1e-2 / 0.01 for the synthetic task as ``examples/coupled_mamba_synthetic.py`` (4000 samples, 15 epochs: about
1.5 minutes on one GPU; whether a fresh model leaves the initial plateau on it depends on the seed, about 2 seeds in
3 measured).

Options: ``--lora`` (``coupled_mamba_lora_config``: LoRA on every block's in_proj / x_proj / dt_proj / out_proj; head
and input projections trained fully), ``--gradient-checkpointing``, ``--bf16`` (bf16 autocast; A_log and D stay
float32). The output folder gets the model (with ``--lora``: the adapter, its fresh base in ``base_model/`` when no
``--model`` was given, and the merged model in ``merged/``), the feature extractor and ``eval_results.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed  # noqa: E402

import multimodal_mamba  # noqa: E402,F401
from multimodal_mamba import (  # noqa: E402
    CoupledMambaConfig,
    CoupledMambaDataCollator,
    CoupledMambaFeatureExtractor,
    CoupledMambaForSequenceClassification,
    make_coupled_interaction_samples,
)
from multimodal_mamba.training import (  # noqa: E402
    _CoupledRows,
    coupled_classification_metrics,
    coupled_mamba_lora_config,
    coupled_regression_metrics,
    load_coupled_mamba_dataset,
)

SYNTHETIC_DIMS = {"text": 16, "audio": 8, "vision": 6}
SYNTHETIC_TASK = dict(seq_len=32, modality_dims=SYNTHETIC_DIMS, lag=1, event_rate=0.5, strength=1.0, noise=0.2,
                      rates={"audio": 2})
# (your data, synthetic data): the paper's model and optimizer; a small model that learns the synthetic task on a CPU
DEFAULTS = {
    "hidden_size": (128, 16), "num_layers": (3, 2), "state_size": (64, 8), "sequence_length": (50, 32),
    "learning_rate": (5e-4, 1e-2), "weight_decay": (5e-4, 0.01), "epochs": (150.0, 15.0),
}
# Synthetic batch size per task: the L1 loss needs more steps than cross-entropy to leave the initial plateau (on an
# H200, 4000 samples x 15 epochs: batch 128 gave Corr ~0 for 3 of 3 seeds, batch 32 learned 2 of 3 (Corr 0.85-0.89);
# classification learned 2 of 3 seeds at batch 128). Training from scratch on this task is seed-dependent.
SYNTHETIC_BATCH = {"regression": 32, "classification": 128}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("regression", "classification"), required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite-output-dir", action="store_true")
    parser.add_argument("--train-data", default=None,
                        help=".npz, .json/.jsonl or a datasets folder (default: the synthetic task)")
    parser.add_argument("--eval-data", default=None, help="same formats (default: --train-data's --eval-split, if any)")
    parser.add_argument("--train-split", default="train", help="split of a DatasetDict folder")
    parser.add_argument("--eval-split", default=None,
                        help="split of a DatasetDict folder (default: validation, valid or test)")
    parser.add_argument("--num-labels", type=int, default=None, help="classes (default: from the training labels)")
    parser.add_argument("--model", default=None,
                        help="a saved Coupled Mamba folder to fine-tune (default: a fresh model)")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--state-size", type=int, default=None)
    parser.add_argument("--coupling", choices=("mean", "sum", "none"), default="mean")
    parser.add_argument("--regression-loss", choices=("l1", "mse"), default="l1", help="default: the paper's L1")
    parser.add_argument("--alignment", choices=("segment_mean", "pad"), default="segment_mean")
    parser.add_argument("--sequence-length", type=int, default=None, help="common length after alignment")
    parser.add_argument("--synthetic-train", type=int, default=4000, help="synthetic training samples")
    parser.add_argument("--synthetic-eval", type=int, default=500, help="synthetic evaluation samples")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--per-device-batch-size", type=int, default=None,
                        help="default 128 (synthetic regression: 32)")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--lora", action="store_true", help="LoRA on the mixer projections (coupled_mamba_lora_config)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--freeze-input-projections", action="store_true",
                        help="with --lora: freeze the input projections too (default: trained fully)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (A_log and D stay float32)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--use-cpu", action="store_true")
    return parser.parse_args(argv)


def _synthetic(task, count, seed):
    samples = make_coupled_interaction_samples(count, task=task, seed=seed, **SYNTHETIC_TASK)
    rows = [{"input_features": s["input_features"],
             "label": s["label"] if task == "classification" else 2.0 * s["label"] - 1.0} for s in samples]
    return _CoupledRows(rows)


def _is_dataset_dict(path):
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json"))


def _default_eval_split(path):
    from datasets import load_from_disk

    splits = list(load_from_disk(path).keys())
    for name in ("validation", "valid", "test"):
        if name in splits:
            return name
    return None


def load_data(args):
    """(train, eval or None, modality_dims, synthetic?)"""
    if args.train_data is None:
        if args.eval_data is not None:
            sys.exit("--eval-data needs --train-data (without both, the synthetic task is used)")
        train = _synthetic(args.task, args.synthetic_train, seed=100 + args.seed)
        return train, _synthetic(args.task, args.synthetic_eval, seed=200 + args.seed), dict(SYNTHETIC_DIMS), True
    is_dict = _is_dataset_dict(args.train_data)
    train, dims = load_coupled_mamba_dataset(args.train_data, split=args.train_split if is_dict else None)
    evaluation = None
    if args.eval_data is not None:
        split = (args.eval_split or _default_eval_split(args.eval_data)) if _is_dataset_dict(args.eval_data) else None
        evaluation, eval_dims = load_coupled_mamba_dataset(args.eval_data, split=split)
    elif is_dict and (args.eval_split or _default_eval_split(args.train_data)):
        evaluation, eval_dims = load_coupled_mamba_dataset(
            args.train_data, split=args.eval_split or _default_eval_split(args.train_data))
    if evaluation is not None and eval_dims != dims:
        sys.exit(f"the evaluation data's modalities {eval_dims} differ from the training data's {dims}")
    return train, evaluation, dims, False


def _num_labels(args, train):
    if args.task == "regression":
        for row in train.rows:
            if not isinstance(row["label"], (int, float)) or isinstance(row["label"], bool):
                sys.exit(f"--task regression needs one number per sample as label, got {row['label']!r}")
        return 1
    labels = [row["label"] for row in train.rows]
    if not all(isinstance(label, int) and not isinstance(label, bool) and label >= 0 for label in labels):
        sys.exit("--task classification needs integer class ids >= 0 as labels")
    num_labels = args.num_labels or max(labels) + 1
    if num_labels < 2 or max(labels) >= num_labels:
        sys.exit(f"--task classification: labels go up to {max(labels)} but num_labels is {num_labels} (need >= 2)")
    return num_labels


def build_model(args, dims, num_labels, synthetic):
    task_config = dict(num_labels=num_labels, regression_loss=args.regression_loss,  # the paper's: L1
                       problem_type="regression" if args.task == "regression" else "single_label_classification")
    if args.model is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, dtype=torch.float32, ignore_mismatched_sizes=True, **task_config)
        if not isinstance(model, CoupledMambaForSequenceClassification):
            sys.exit(f"{args.model} is not a Coupled Mamba checkpoint ({type(model).__name__})")
        if dict(model.config.modality_dims) != dims:
            sys.exit(f"the data's modalities {dims} differ from the model's {dict(model.config.modality_dims)}")
        return model
    pick = 1 if synthetic else 0
    extra = dict(ssm_bc_init_scale=10.0, time_step_min=0.1, time_step_max=1.0) if synthetic else {}
    config = CoupledMambaConfig(
        modality_dims=dims, coupling=args.coupling,
        hidden_size=args.hidden_size or DEFAULTS["hidden_size"][pick],
        num_hidden_layers=args.num_layers or DEFAULTS["num_layers"][pick],
        state_size=args.state_size or DEFAULTS["state_size"][pick], **extra, **task_config,
    )
    return CoupledMambaForSequenceClassification(config)


def format_metrics(task, metrics):
    if task == "regression":
        names = [("mae", "MAE", 1), ("corr", "Corr", 1), ("acc2", "Acc-2", 100), ("f1", "F1", 100),
                 ("acc2_has0", "Acc-2 (>=0)", 100), ("f1_has0", "F1 (>=0)", 100), ("acc7", "Acc-7", 100)]
    else:
        names = [("accuracy", "Acc", 100), ("f1", "F1 (weighted)", 100), ("f1_macro", "F1 (macro)", 100)]
    return " | ".join(f"{label} {metrics['eval_' + key] * scale:.{1 if scale == 100 else 3}f}"
                      for key, label, scale in names if "eval_" + key in metrics)


def _checkpointing_arguments(enabled):
    """TrainingArguments' checkpointing fields: ``activation_checkpointing*`` from transformers 5.2x, before that
    ``gradient_checkpointing*`` (deprecated since)."""
    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def main(argv=None):
    args = parse_args(argv)
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        sys.exit(f"{args.output_dir} exists and is not empty; pass --overwrite-output-dir to replace it")
    if args.freeze_input_projections and not args.lora:
        sys.exit("--freeze-input-projections applies with --lora")
    set_seed(args.seed)
    train, evaluation, dims, synthetic = load_data(args)
    num_labels = _num_labels(args, train)
    pick = 1 if synthetic else 0
    model = build_model(args, dims, num_labels, synthetic)
    sequence_length = args.sequence_length or DEFAULTS["sequence_length"][pick]
    extractor = CoupledMambaFeatureExtractor.from_model_config(
        model.config, alignment=args.alignment, sequence_length=sequence_length if args.alignment == "segment_mean"
        else args.sequence_length)
    if args.lora:
        from peft import get_peft_model

        if args.model is None:  # the adapter records its base model's folder: save the fresh base first
            base_dir = os.path.join(args.output_dir, "base_model")
            model.save_pretrained(base_dir)
            extractor.save_pretrained(base_dir)
            model = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=torch.float32)
        lora = coupled_mamba_lora_config(model.config, r=args.lora_r, lora_alpha=2 * args.lora_r,
                                         train_input_projections=not args.freeze_input_projections)
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    learning_rate = args.learning_rate or DEFAULTS["learning_rate"][pick]
    weight_decay = DEFAULTS["weight_decay"][pick] if args.weight_decay is None else args.weight_decay
    epochs = args.epochs or DEFAULTS["epochs"][pick]
    batch_size = args.per_device_batch_size or (SYNTHETIC_BATCH[args.task] if synthetic else 128)
    print(f"{args.task} on {'synthetic' if synthetic else 'your'} data: {len(train)} training samples"
          f"{f', {len(evaluation)} evaluation samples' if evaluation is not None else ''}; modalities {dims}; "
          f"{trainable:,} of {total:,} parameters train{' (LoRA)' if args.lora else ''}; lr {learning_rate}, "
          f"weight decay {weight_decay}, batch {batch_size}, "
          + (f"{args.regression_loss.upper()} loss, " if args.task == "regression" else "")
          + (f"{args.max_steps} steps" if args.max_steps > 0 else f"{epochs:g} epochs"))

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        num_train_epochs=epochs,
        max_steps=args.max_steps,
        warmup_steps=0 if args.max_steps > 0 and args.max_steps < 50 else 20,
        lr_scheduler_type="cosine",
        bf16=args.bf16,
        **_checkpointing_arguments(args.gradient_checkpointing),
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=args.use_cpu,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
        data_collator=CoupledMambaDataCollator(extractor),
        compute_metrics=coupled_regression_metrics if args.task == "regression" else coupled_classification_metrics,
    )
    result = trainer.train()
    if not math.isfinite(result.training_loss):
        sys.exit(f"training diverged (loss {result.training_loss})")
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        extractor.save_pretrained(args.output_dir)
    if evaluation is not None:
        metrics = trainer.evaluate()
        trainer.save_metrics("eval", metrics)
        print(f"evaluation ({len(evaluation)} samples): {format_metrics(args.task, metrics)}")
    if args.lora and trainer.is_world_process_zero():
        # The adapter folder loads with PeftModel.from_pretrained(base, folder) (or, with transformers newer than 5.17,
        # AutoModelForSequenceClassification.from_pretrained(folder)); merged/ is a plain model that loads anywhere.
        merged_dir = os.path.join(args.output_dir, "merged")
        merged = copy.deepcopy(trainer.model).merge_and_unload()
        merged.save_pretrained(merged_dir)
        extractor.save_pretrained(merged_dir)
        print(f"saved the LoRA adapter to {args.output_dir} and the merged model to {merged_dir}")
    else:
        print(f"saved to {args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
