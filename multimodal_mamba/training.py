"""Fine-tuning VL-Mamba with PEFT and Trainer: LoRA defaults, the two training stages, LLaVA-format data.

- ``vl_mamba_lora_config()``: LoRA on the language model's ``in_proj``, ``x_proj``, ``dt_proj`` and
  ``out_proj`` (all four train: the mixer calls every projection as a module), the connector trained fully
  (``modules_to_save``), the vision tower frozen.
- ``prepare_vl_mamba_stage(model, stage)``: the paper's stages (LLaVA's): stage 1 trains the connector only;
  stage 2 trains the connector and the language model.
- ``load_llava_dataset`` / ``LlavaConversationCollator``: LLaVA JSON/JSONL records
  ``{"image": path, "conversations": [{"from": "human"|"gpt", "value": "...<image>..."}]}`` rendered with the
  processor's chat template; only the answers are trained (everything else, image positions included, is
  -100); batches are padded on the right.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from .modeling.modeling_vl_mamba import VLMambaForConditionalGeneration

IGNORE_INDEX = -100
MIXER_PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")
# The LM's mixer projections; anchored on language_model so the connector's VSS mixer and the vision tower's
# own out_proj (SigLIP/CLIP attention) are not matched.
VL_MAMBA_LORA_TARGET_REGEX = r".*language_model\.backbone\.layers\.\d+\.mixer\.(in_proj|x_proj|dt_proj|out_proj)"

# LLaVA-1.5's recipes (scripts/v1_5/pretrain.sh and finetune.sh), which VL-Mamba follows.
STAGE_DEFAULTS = {
    1: dict(learning_rate=1e-3, num_train_epochs=1, global_batch_size=256, weight_decay=0.0, warmup_steps=0.03,
            lr_scheduler_type="cosine", model_max_length=2048),
    2: dict(learning_rate=2e-5, num_train_epochs=1, global_batch_size=128, weight_decay=0.0, warmup_steps=0.03,
            lr_scheduler_type="cosine", model_max_length=2048),
}


def vl_mamba_lora_config(r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05,
                         train_connector: bool = True, **kwargs):
    """A ``peft.LoraConfig`` for VL-Mamba's language model.

    LoRA on every Mamba projection of the LM (``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj``); the
    connector trained fully when ``train_connector`` (``modules_to_save``); the vision tower frozen (PEFT
    freezes every module it does not target). Extra keyword arguments go to ``LoraConfig``.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=VL_MAMBA_LORA_TARGET_REGEX,
        modules_to_save=["multi_modal_projector"] if train_connector else None, task_type="CAUSAL_LM", **kwargs,
    )


def prepare_vl_mamba_stage(model: VLMambaForConditionalGeneration, stage: int) -> Dict[str, int]:
    """Set ``requires_grad`` for training stage 1 (connector only) or 2 (connector + language model).

    The vision tower is frozen in both stages. Returns the trainable / total parameter counts.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (connector only) or 2 (connector + language model), got {stage!r}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in model.multi_modal_projector.parameters():
        parameter.requires_grad_(True)
    if stage == 2:
        for parameter in model.language_model.parameters():
            parameter.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def conversations_to_messages(conversations: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """LLaVA turns ``{"from": "human"|"gpt"|"system", "value": str}`` -> chat messages ``{"role", "content"}``."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for turn in conversations:
        source = turn.get("from")
        if source not in roles:
            raise ValueError(f"unknown conversation role {source!r}; expected one of {sorted(roles)}")
        messages.append({"role": roles[source], "content": turn["value"]})
    return messages


def load_llava_dataset(data_files, image_folder: Optional[str] = None, split: str = "train"):
    """A ``datasets.Dataset`` of LLaVA records from JSON/JSONL file(s); image paths are made absolute against
    ``image_folder`` (default: the folder of the first data file). Where the ``datasets`` library is not
    installed (a bare GPU image), a list-backed ``torch.utils.data.Dataset`` of the same records."""
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(files[0]))
    try:
        from datasets import load_dataset
    except ImportError:
        return _JsonRecords(files, folder)
    dataset = load_dataset("json", data_files=[str(f) for f in files], split=split)
    for column in ("conversations",):
        if column not in dataset.column_names:
            raise ValueError(f"LLaVA records need a {column!r} field; found {dataset.column_names}")

    def absolute(record):
        image = record.get("image")
        if image and not os.path.isabs(image):
            record["image"] = os.path.join(folder, image)
        return record

    return dataset.map(absolute) if "image" in dataset.column_names else dataset


class _JsonRecords(torch.utils.data.Dataset):
    """LLaVA records read with the json module (JSON list or JSONL), image paths made absolute."""

    def __init__(self, files, folder):
        import json

        self.records = []
        for path in files:
            with open(path, encoding="utf-8") as handle:
                text = handle.read().strip()
            rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
            self.records.extend(rows)
        for record in self.records:
            if "conversations" not in record:
                raise ValueError(f"LLaVA records need a 'conversations' field; found {sorted(record)}")
            if record.get("image") and not os.path.isabs(record["image"]):
                record["image"] = os.path.join(folder, record["image"])

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


class LlavaConversationCollator:
    """Turns LLaVA records into a training batch for VL-Mamba.

    Each record's conversation is rendered with the processor's chat template; ``<image>`` placeholders are
    expanded to the image tokens; labels are the token ids of the assistant answers (and their end-of-sequence
    token), -100 everywhere else. Batches are padded on the right (Mamba is causal: right padding never changes
    the positions before it). Returns ``input_ids``, ``attention_mask``, ``labels`` (batch, L) and
    ``pixel_values`` (num_images, C, H, W) when the batch has images.
    """

    def __init__(self, processor, max_length: Optional[int] = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token to pad batches")

    def _render(self, messages):
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def _answer_spans(self, messages):
        """Text of the whole conversation and the character spans of the assistant answers in it."""
        spans = []
        if messages and messages[0]["role"] == "assistant":
            raise ValueError("a conversation must start with a human (or system) turn, not an answer")
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            through = self._render(messages[: index + 1])
            if not through.startswith(before):
                raise ValueError("the chat template does not render an answer after its generation prompt")
            spans.append((len(before), len(through)))
        return self._render(messages), spans

    def _load_image(self, image):
        if image is None:
            return None
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as opened:
                return opened.convert("RGB")
        return image

    def example(self, record: Dict[str, Any]):
        """(input_ids, labels, images) of one record, before padding."""
        messages = conversations_to_messages(record["conversations"])
        text, spans = self._answer_spans(messages)
        if not spans:
            raise ValueError("a training conversation needs at least one assistant ('gpt') turn")
        image = self._load_image(record.get("image"))
        images = [image] if image is not None else []
        token = self.processor.image_token
        if text.count(token) != len(images):
            raise ValueError(f"a record has {text.count(token)} {token} placeholder(s) but {len(images)} image(s)")
        # Expand <image> in the text and move the answer spans accordingly (answers hold no <image>).
        extra = len(token) * (self.processor.num_image_tokens - 1)
        shifted = []
        for start, end in spans:
            shift = extra * text[:start].count(token)
            shifted.append((start + shift, end + shift))
        expanded = text.replace(token, token * self.processor.num_image_tokens)
        encoding = self.tokenizer(expanded, return_offsets_mapping=True, add_special_tokens=False)
        input_ids = encoding["input_ids"]
        labels = [
            token_id if any(s <= start < e for s, e in shifted) else IGNORE_INDEX
            for token_id, (start, _) in zip(input_ids, encoding["offset_mapping"])
        ]
        if self.max_length is not None and len(input_ids) > self.max_length:
            image_id = self.processor.image_token_id
            if image_id in input_ids[self.max_length :]:
                raise ValueError(
                    f"a record is {len(input_ids)} tokens long and max_length={self.max_length} would cut its "
                    "image tokens: raise max_length or shorten the conversation"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return input_ids, labels, images

    def __call__(self, records: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        examples = [self.example(record) for record in records]
        length = max(len(ids) for ids, _, _ in examples)
        pad = self.tokenizer.pad_token_id
        batch_ids = torch.full((len(examples), length), pad, dtype=torch.long)
        batch_labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        images = []
        for row, (ids, labels, record_images) in enumerate(examples):
            batch_ids[row, : len(ids)] = torch.tensor(ids)
            batch_labels[row, : len(labels)] = torch.tensor(labels)
            mask[row, : len(ids)] = 1
            images.extend(record_images)
        batch = {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels}
        if images:
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return batch
