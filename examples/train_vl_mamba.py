"""Train VL-Mamba on LLaVA-format data with transformers' Trainer: the paper's two stages.

Stage 1 (pretraining, "alignment"): only the MultiModal Connector trains; vision tower and LM are frozen.
Stage 2 (instruction tuning): connector + language model (full), or connector + LoRA on the LM (``--lora``).
Defaults are LLaVA-1.5's recipes (scripts/v1_5/pretrain.sh and finetune.sh), which VL-Mamba follows:

    stage 1: lr 1e-3, 1 epoch, global batch 256, weight decay 0, warmup 3%, cosine, max length 2048
    stage 2: lr 2e-5, 1 epoch, global batch 128, weight decay 0, warmup 3%, cosine, max length 2048

Data: a JSON or JSONL file of ``{"image": "relative/or/absolute/path.png", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`` records (LLaVA's format); only the answers train.

Single process:        python examples/train_vl_mamba.py --model CKPT --data data.json --stage 1 --output-dir out
Several GPUs (DDP):    accelerate launch --num_processes 2 examples/train_vl_mamba.py ...
FSDP:                  accelerate launch --config_file examples/accelerate_fsdp.yaml examples/train_vl_mamba.py ...

CKPT is a VL-Mamba folder (e.g. from ``multimodal_mamba.conversion.build_vl_mamba``, or a stage-1 output).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments  # noqa: E402

import multimodal_mamba  # noqa: E402,F401
from multimodal_mamba.training import (  # noqa: E402
    STAGE_DEFAULTS,
    LlavaConversationCollator,
    load_llava_dataset,
    prepare_vl_mamba_stage,
    vl_mamba_lora_config,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="VL-Mamba checkpoint folder (or hub id)")
    parser.add_argument("--data", required=True, nargs="+", help="LLaVA JSON/JSONL file(s)")
    parser.add_argument("--image-folder", default=None, help="base folder of relative image paths")
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--lora", action="store_true", help="stage 2 with LoRA on the LM instead of full tuning")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite-output-dir", action="store_true")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--global-batch-size", type=int, default=None)
    parser.add_argument("--per-device-batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (A_log and D stay float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--use-cpu", action="store_true")
    parser.add_argument("--loss-log", default=None, help="write the per-step training losses to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    defaults = STAGE_DEFAULTS[args.stage]
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        sys.exit(f"{args.output_dir} exists and is not empty; pass --overwrite-output-dir to replace it")
    if args.lora and args.stage != 2:
        sys.exit("--lora applies to stage 2 (stage 1 trains the connector only)")

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = args.global_batch_size or defaults["global_batch_size"]
    accumulation = max(1, global_batch // (args.per_device_batch_size * world_size))

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    counts = prepare_vl_mamba_stage(model, args.stage)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, vl_mamba_lora_config(r=args.lora_r, lora_alpha=2 * args.lora_r))
        counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"stage {args.stage}{' + LoRA' if args.lora else ''}: {counts['trainable']:,} of {counts['total']:,} "
          f"parameters train; global batch {args.per_device_batch_size} x {accumulation} x {world_size}")

    dataset = load_llava_dataset(args.data, image_folder=args.image_folder)
    collator = LlavaConversationCollator(processor, max_length=args.max_length or defaults["model_max_length"])
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=args.learning_rate or defaults["learning_rate"],
        num_train_epochs=args.epochs or defaults["num_train_epochs"],
        max_steps=args.max_steps,
        weight_decay=defaults["weight_decay"] if args.weight_decay is None else args.weight_decay,
        warmup_steps=defaults["warmup_steps"],
        lr_scheduler_type=defaults["lr_scheduler_type"],
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=args.use_cpu,
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
        if args.loss_log:
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            with open(args.loss_log, "w", encoding="utf-8") as handle:
                json.dump({"losses": losses, "world_size": world_size}, handle)
    return trainer


if __name__ == "__main__":
    main()
