"""The README's main job: train a tiny VL-Mamba and a tiny Coupled Mamba from scratch on a CPU, in a few minutes.

VL-Mamba, the whole Hugging Face path on real training:
1. generate a synthetic image question-answering dataset (1-3 red/green/blue squares/circles/triangles per image;
   "what color is the shape ?", "what shape is it ?", "how many shapes ?") and write it in LLaVA's JSON format
   with PNG images, as a user's own data would be;
2. load it with ``datasets`` and train a tiny VL-Mamba (SigLIP-style tower, VSS-L2 connector with a bidirectional
   2D selective scan, Mamba LM) from scratch with ``Trainer`` (progress bar), only the answers supervised;
3. save it with ``save_pretrained``, reload it through ``pipeline("image-text-to-text", model=folder)`` and answer
   held-out questions about new images: accuracy per question type (chance is 1/3) and a few answers;
4. write the loss curves to ``loss_curves.png``.

Coupled Mamba: the synthetic cross-modal task of ``multimodal_mamba.data.synthetic_coupled`` (the label says whether
the audio events repeat the text events one step later; no single modality carries it), trained with ``Trainer``
twice on the same data and budget: coupled chains (the paper's Eq. 6) and independent chains (``coupling="none"``).
Held-out accuracy of both, the coupled model reloaded and run through
``pipeline("multimodal-sequence-classification")``.

Everything is built locally (tokenizer, images, features): no network. Runs in under 5 minutes on 2 CPU cores.

    python examples/main_demo.py [--output-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from multimodal_mamba import (  # noqa: E402
    MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK,
    CoupledMambaConfig,
    CoupledMambaDataCollator,
    CoupledMambaFeatureExtractor,
    CoupledMambaForSequenceClassification,
    last_backend,
    make_coupled_interaction_samples,
    samples_to_dataset,
)
from multimodal_mamba.data.synthetic_vqa import VOCABULARY, make_shapes_vqa, write_llava_json  # noqa: E402
from multimodal_mamba.tiny import build_tiny_vl_mamba  # noqa: E402
from multimodal_mamba.training import LlavaConversationCollator, load_llava_dataset  # noqa: E402

COUPLED_DIMS = {"text": 16, "audio": 8, "vision": 6}
# lag-1 echo task, audio observed at twice the rate (unaligned lengths, aligned by the feature extractor)
COUPLED_TASK = dict(seq_len=32, modality_dims=COUPLED_DIMS, lag=1, event_rate=0.5, strength=1.0, noise=0.2,
                    rates={"audio": 2})

# Full run (README) and the quick run the test suite uses to check the whole path in seconds.
SETTINGS = {
    "full": dict(train_images=1200, test_images=100, epochs=8, batch_size=32, lr=1e-3,
                 coupled_train=2000, coupled_test=500, coupled_epochs=12, coupled_batch_size=128, coupled_lr=1e-2,
                 coupled_seed=2),
    "quick": dict(train_images=24, test_images=6, epochs=1, batch_size=8, lr=1e-3,
                  coupled_train=64, coupled_test=32, coupled_epochs=1, coupled_batch_size=32, coupled_lr=1e-2,
                  coupled_seed=2),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--output-dir", default=None, help="a new or empty folder (default: outputs/demo-<time>)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run of the same path (tests use it)")
    parser.add_argument("--seed", type=int, default=0)
    for name, value in SETTINGS["full"].items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                            help=f"default {value} ({SETTINGS['quick'][name]} with --quick)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--vision-hidden", type=int, default=48)
    parser.add_argument("--only", choices=["vl-mamba", "coupled"], default=None, help="run one of the two parts")
    args = parser.parse_args(argv)
    for name, value in SETTINGS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def prepare_output_dir(path):
    """A new or empty folder: nothing a user saved before is overwritten."""
    output_dir = Path(path or os.path.join("outputs", time.strftime("demo-%Y%m%d-%H%M%S")))
    if output_dir.exists() and any(output_dir.iterdir()):
        sys.exit(f"{output_dir} exists and is not empty; pass another --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def logging_steps(num_examples, batch_size, epochs, points=60):
    """Log the loss often enough for a curve of about ``points`` points."""
    return max(1, math.ceil(num_examples / batch_size) * epochs // points)


def loss_history(trainer):
    """[(step, training loss)] from a Trainer's log history."""
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------------------------
# VL-Mamba
# ---------------------------------------------------------------------------------------------------------------
def train_vl_mamba(args, output_dir: Path):
    """Train on synthetic LLaVA data, save, reload through pipeline() and score held-out questions."""
    data_dir = output_dir / "shapes_vqa"
    train_json = write_llava_json(make_shapes_vqa(args.train_images, seed=args.seed + 1, size=args.image_size),
                                  str(data_dir), "train.json")
    held_out = make_shapes_vqa(args.test_images, seed=args.seed + 2, size=args.image_size)
    train_set = load_llava_dataset(train_json)
    print(f"[vl-mamba] {len(train_set)} training questions on {args.train_images} images in LLaVA JSON "
          f"({train_json}), {len(held_out)} held-out questions on {args.test_images} new images")

    model, processor = build_tiny_vl_mamba(
        VOCABULARY, seed=args.seed, image_size=args.image_size, patch_size=args.patch_size,
        text_hidden=args.text_hidden, text_layers=2, vision_hidden=args.vision_hidden, vision_layers=2,
        projector_type="vss_l2", scan_type="bidirectional",
    )
    print(f"[vl-mamba] tiny VL-Mamba: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.config.image_seq_length} image tokens, VSS-L2 connector (bidirectional scan), trained from scratch")

    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer_vl_mamba"), per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05,
        weight_decay=0.0, logging_steps=logging_steps(len(train_set), args.batch_size, args.epochs),
        save_strategy="no", report_to=[], seed=args.seed, use_cpu=True,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=LlavaConversationCollator(processor))
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    model_dir = output_dir / "vl-mamba"
    trainer.save_model(str(model_dir))
    processor.save_pretrained(str(model_dir))

    # Held-out questions through the reloaded model, the way a user would ask.
    answerer = pipeline("image-text-to-text", model=str(model_dir))
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["conversations"][0]["value"]
                                                           .replace("<image>", "").strip()}]}],
        add_generation_prompt=True) for r in held_out]
    start = time.perf_counter()
    outputs = answerer(images=[r["image"] for r in held_out], text=prompts, max_new_tokens=2,
                       return_full_text=False, batch_size=16)
    answer_seconds = time.perf_counter() - start
    answers = [(out[0] if isinstance(out, list) else out)["generated_text"].strip().split(" ")[0] for out in outputs]

    correct, total = Counter(), Counter()
    for record, answer in zip(held_out, answers):
        total[record["question_type"]] += 1
        correct[record["question_type"]] += int(answer == record["answer"])
    accuracy = {kind: correct[kind] / total[kind] for kind in total}
    overall = sum(correct.values()) / max(1, sum(total.values()))
    print(f"\n[vl-mamba] trained in {train_seconds:.0f}s; reloaded from {model_dir} into pipeline('image-text-to-text'); "
          f"{len(held_out)} held-out answers in {answer_seconds:.1f}s (scan backend: {last_backend('selective_scan')})")
    print("[vl-mamba] held-out accuracy (chance 0.33): "
          + ", ".join(f"{kind} {accuracy[kind]:.2f}" for kind in ("color", "shape", "count") if kind in accuracy)
          + f", overall {overall:.2f}")
    for record, answer in list(zip(held_out, answers))[:6]:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        mark = "ok" if answer == record["answer"] else f"expected {record['answer']!r}"
        print(f"    {question:<28} -> {answer!r} ({mark})")
    return {"loss": loss_history(trainer), "accuracy": accuracy, "overall": overall, "seconds": train_seconds}


# ---------------------------------------------------------------------------------------------------------------
# Coupled Mamba
# ---------------------------------------------------------------------------------------------------------------
def train_coupled_mamba(args, output_dir: Path, coupling: str, train_set, held_out, extractor):
    """Train one Coupled Mamba variant with Trainer; held-out accuracy of the reloaded model."""
    config = CoupledMambaConfig(
        modality_dims=COUPLED_DIMS, hidden_size=16, num_hidden_layers=2, state_size=8, num_labels=2,
        id2label={0: "independent", 1: "audio follows text"}, coupling=coupling,
        ssm_bc_init_scale=10.0, time_step_min=0.1, time_step_max=1.0,
    )
    torch.manual_seed(args.coupled_seed)
    model = CoupledMambaForSequenceClassification(config)
    training_args = TrainingArguments(
        output_dir=str(output_dir / f"trainer_coupled_{coupling}"), per_device_train_batch_size=args.coupled_batch_size,
        num_train_epochs=args.coupled_epochs, learning_rate=args.coupled_lr, lr_scheduler_type="cosine", warmup_steps=20,
        weight_decay=0.01, logging_steps=logging_steps(len(train_set), args.coupled_batch_size, args.coupled_epochs),
        save_strategy="no", report_to=[], seed=args.coupled_seed, use_cpu=True,
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=CoupledMambaDataCollator(extractor))
    trainer.train()
    model_dir = output_dir / f"coupled-mamba-{coupling}"
    trainer.save_model(str(model_dir))
    extractor.save_pretrained(str(model_dir))

    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = extractor([s["input_features"] for s in held_out], return_tensors="pt")
    with torch.no_grad():
        predictions = reloaded(**batch).logits.argmax(-1).numpy()
    accuracy = float((predictions == np.array([s["label"] for s in held_out])).mean())
    return {"loss": loss_history(trainer), "accuracy": accuracy, "model_dir": model_dir}


def run_coupled(args, output_dir: Path):
    train_samples = make_coupled_interaction_samples(args.coupled_train, seed=100 + args.coupled_seed, **COUPLED_TASK)
    try:
        train_set = samples_to_dataset(train_samples)  # a datasets.Dataset, as a user's data would be
    except ImportError:  # a machine without the datasets library: Trainer takes the list of records too
        train_set = train_samples
    held_out = make_coupled_interaction_samples(args.coupled_test, seed=200 + args.coupled_seed, **COUPLED_TASK)
    extractor = CoupledMambaFeatureExtractor(modality_dims=COUPLED_DIMS, sequence_length=COUPLED_TASK["seq_len"])
    print(f"\n[coupled] synthetic cross-modal task: {args.coupled_train} training / {args.coupled_test} held-out "
          f"sequences, modalities {COUPLED_DIMS} (audio at twice the rate); label = whether audio repeats text "
          f"{COUPLED_TASK['lag']} step later")
    results = {}
    for coupling in ("mean", "none"):
        start = time.perf_counter()
        results[coupling] = train_coupled_mamba(args, output_dir, coupling, train_set, held_out, extractor)
        results[coupling]["seconds"] = time.perf_counter() - start
    classify = pipeline(MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK, model=str(results["mean"]["model_dir"]))
    sample = held_out[0]
    print(f"\n[coupled] held-out accuracy (chance 0.50): coupled chains {results['mean']['accuracy']:.3f} "
          f"({results['mean']['seconds']:.0f}s), independent chains {results['none']['accuracy']:.3f} "
          f"({results['none']['seconds']:.0f}s)")
    print(f"[coupled] pipeline('{MULTIMODAL_SEQUENCE_CLASSIFICATION_TASK}') on one held-out sample: "
          f"{classify(sample['input_features'])} (true label: {classify.model.config.id2label[sample['label']]})")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Loss curves, drawn with Pillow (no plotting library needed)
# ---------------------------------------------------------------------------------------------------------------
def plot_loss_curves(panels, path, size=(520, 340)):
    """One panel per entry of ``panels`` ({title: {label: [(step, loss), ...]}}), side by side, to a PNG."""
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    width, height = size
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, 20, 30, 45
    for index, (title, curves) in enumerate(panels.items()):
        x0 = index * width
        points = [p for curve in curves.values() for p in curve]
        if not points:
            continue
        max_step = max(s for s, _ in points) or 1
        low, high = 0.0, max(loss for _, loss in points) * 1.05 or 1.0
        box = (x0 + left, top, x0 + width - right, height - bottom)
        draw.rectangle(box, outline="black")
        draw.text((x0 + left, 8), title, fill="black")
        for tick in range(5):
            value = low + (high - low) * tick / 4
            y = box[3] - (box[3] - box[1]) * tick / 4
            draw.line((box[0] - 4, y, box[0], y), fill="black")
            draw.text((x0 + 8, y - 6), f"{value:.2f}", fill="black")
        for tick in range(5):
            step = max_step * tick / 4
            x = box[0] + (box[2] - box[0]) * tick / 4
            draw.line((x, box[3], x, box[3] + 4), fill="black")
            draw.text((x - 10, box[3] + 8), f"{step:.0f}", fill="black")
        draw.text((x0 + width // 2 - 40, height - 18), "training step", fill="black")
        for n, (label, curve) in enumerate(curves.items()):
            color = colors[n % len(colors)]
            xy = [(box[0] + (box[2] - box[0]) * s / max_step, box[3] - (box[3] - box[1]) * (v - low) / (high - low))
                  for s, v in curve]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            elif xy:
                draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=color)
            draw.line((box[2] - 150, box[1] + 12 + 16 * n, box[2] - 130, box[1] + 12 + 16 * n), fill=color, width=2)
            draw.text((box[2] - 125, box[1] + 5 + 16 * n), label, fill="black")
    image.save(path)
    return path


def main(argv=None):
    args = parse_args(argv)
    output_dir = prepare_output_dir(args.output_dir)
    hf_logging.set_verbosity_error()  # keep the output to the training progress bars and the results
    hf_logging.disable_progress_bar()  # (the bars of saving and loading weights)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(f"torch {torch.__version__} on CPU with {torch.get_num_threads()} threads; writing to {output_dir}\n")

    vl = train_vl_mamba(args, output_dir) if args.only != "coupled" else None
    coupled = run_coupled(args, output_dir) if args.only != "vl-mamba" else None

    panels = {}
    if vl is not None:
        panels["VL-Mamba on synthetic shapes VQA (answer tokens, cross-entropy)"] = {"VL-Mamba": vl["loss"]}
    if coupled is not None:
        panels["Coupled Mamba on the cross-modal echo task"] = {
            "coupled chains": coupled["mean"]["loss"], "independent chains": coupled["none"]["loss"]}
    png = plot_loss_curves(panels, output_dir / "loss_curves.png")
    print(f"\nloss curves: {png}")
    print(f"total time {time.perf_counter() - start:.0f}s")
    return {"vl_mamba": vl, "coupled": coupled and {k: {"accuracy": v["accuracy"]} for k, v in coupled.items()},
            "output_dir": output_dir}


if __name__ == "__main__":
    main()
