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


# ----------------------------------------------------------------------------------------------------------------
# Coupled Mamba: LoRA defaults and the paper's metrics (usable as Trainer's ``compute_metrics``).
# ----------------------------------------------------------------------------------------------------------------

# Every block's mixer projections, in every layer and for every modality. Anchored on ``blocks.<modality>.mixer`` so
# the task head's own ``classifier.out_proj`` is never matched (it is trained fully, see below).
COUPLED_MAMBA_LORA_TARGET_REGEX = r"(.*\.)?layers\.\d+\.blocks\.[^.]+\.mixer\.(in_proj|x_proj|dt_proj|out_proj)"


def coupled_mamba_lora_config(config=None, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05,
                              train_input_projections: bool = True, **kwargs):
    """A ``peft.LoraConfig`` for ``CoupledMambaForSequenceClassification``.

    - LoRA on every Coupled Mamba block's mixer projections (``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj``) in
      every layer and for every modality; all four train (the mixer calls each projection as a module).
    - ``modules_to_save`` (trained fully, saved with the adapter): the task head ``classifier`` (a new task needs a new
      head; PEFT's ``SEQ_CLS`` task adds it anyway) and, when ``train_input_projections`` (default), each modality's
      input projection ``projections.<modality>``. Those are where the raw features enter: fine-tuning on another
      dataset usually means other feature extractors or statistics (the paper's MOSEI / SIMS features differ), and
      they are small next to the coupled layers. Training them also keeps gradients flowing into the checkpointed
      layers under reentrant gradient checkpointing. Pass ``train_input_projections=False`` to freeze them.
    - Frozen: the LayerNorms of the blocks and the final norms, the SSM parameters ``A_log`` / ``D``, the conv, and
      the M fusion logits (a bare parameter, which ``modules_to_save`` cannot hold).

    config: the model's ``CoupledMambaConfig`` (or the model); needed for the modality names when
        ``train_input_projections``. r, lora_alpha, lora_dropout: LoRA's rank, scale and dropout (defaults sized for
        the paper's hidden 128 / intermediate 256). Extra keyword arguments go to ``LoraConfig``.
    """
    from peft import LoraConfig

    if config is not None and not hasattr(config, "modality_names"):
        config = getattr(config, "config", None)
        if config is None or not hasattr(config, "modality_names"):
            raise ValueError("coupled_mamba_lora_config: config must be a CoupledMambaConfig or a Coupled Mamba model")
    modules_to_save = ["classifier"]
    if train_input_projections:
        if config is None:
            raise ValueError(
                "coupled_mamba_lora_config: train_input_projections=True needs the model's config (for the modality "
                "names): coupled_mamba_lora_config(model.config), or pass train_input_projections=False"
            )
        modules_to_save += [f"projections.{name}" for name in config.modality_names]
    extra = kwargs.pop("modules_to_save", None) or []
    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=COUPLED_MAMBA_LORA_TARGET_REGEX,
        modules_to_save=modules_to_save + [name for name in extra if name not in modules_to_save],
        task_type="SEQ_CLS", **kwargs,
    )


def _eval_arrays(eval_pred):
    """(predictions, labels) as numpy arrays from an ``EvalPrediction`` or a (predictions, labels) pair."""
    import numpy as np

    if hasattr(eval_pred, "predictions"):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        try:
            predictions, labels = eval_pred
        except (TypeError, ValueError):
            raise ValueError("eval_pred must be an EvalPrediction or a (predictions, labels) pair") from None
    if isinstance(predictions, tuple):
        predictions = predictions[0]  # Trainer's (logits, hidden_states, ...): the logits come first
    if labels is None:
        raise ValueError("the evaluation has no labels: give the eval dataset a 'label' column")
    predictions = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if predictions.shape[0] == 0:
        raise ValueError("no predictions to evaluate")
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"got {predictions.shape[0]} predictions but {labels.shape[0]} labels")
    return predictions, labels


def _weighted_f1(truth, predicted):
    """sklearn's ``f1_score(truth, predicted, average="weighted")`` for labels of any type: the per-class F1
    (0 where undefined) averaged with weights = each class's support in ``truth``."""
    import numpy as np

    total, score = len(truth), 0.0
    for label in np.unique(truth):
        tp = np.sum((predicted == label) & (truth == label))
        fp = np.sum((predicted == label) & (truth != label))
        fn = np.sum((predicted != label) & (truth == label))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
        score += f1 * np.sum(truth == label) / total
    return float(score)


def coupled_regression_metrics(eval_pred) -> Dict[str, float]:
    """The paper's regression metrics (its Tables 1, 8, 11, 14 on CMU-MOSEI), for ``Trainer(compute_metrics=...)``.

    eval_pred: an ``EvalPrediction`` (or a (predictions, labels) pair) with predictions (N,) or (N, 1) and labels (N,).
    Conventions are those of the authors' ``utils/metricsTop.py`` (MMSA's MOSEI regression evaluation):

    - ``mae``: mean absolute error; ``corr``: Pearson correlation (NaN when either side is constant);
    - ``acc2`` / ``f1``: negative vs positive, samples whose true label is exactly 0 left out (MMSA's
      "Non0_acc_2" / "Non0_F1_score"); F1 is the support-weighted F1 of the two classes. The paper prints one
      Acc-2 / F1 pair without naming its convention and its code computes both; this one is the primary pair
      because it is the split MOSEI tables usually call Acc-2 (an inference, not stated by the paper);
    - ``acc2_has0`` / ``f1_has0``: negative (< 0) vs non-negative (>= 0), every sample (MMSA's "Has0_*");
    - ``acc7`` / ``acc5``: predictions and labels clipped to [-3, 3] / [-2, 2] and rounded (numpy's round half to
      even, as the authors' code), then compared: MOSEI's 7- and 5-class sentiment accuracies, meaningful for labels
      on MOSEI's [-3, 3] scale.

    Accuracies are fractions in [0, 1] (the paper prints them x 100). ``acc2`` / ``f1`` are NaN when every label is 0.
    """
    import numpy as np

    predictions, labels = _eval_arrays(eval_pred)
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    if predictions.ndim != 1:
        raise ValueError(
            f"coupled_regression_metrics: predictions must be (N,) or (N, 1) (one regression output), got shape "
            f"{predictions.shape}; for classification use coupled_classification_metrics"
        )
    labels = labels.reshape(labels.shape[0], -1)
    if labels.shape[1] != 1:
        raise ValueError(f"coupled_regression_metrics: labels must be (N,), got shape {labels.shape}")
    labels = labels[:, 0]
    if not (np.isfinite(predictions).all() and np.isfinite(labels).all()):
        raise ValueError("coupled_regression_metrics: predictions or labels contain NaN or inf")
    mae = float(np.mean(np.abs(predictions - labels)))
    if predictions.std() > 0 and labels.std() > 0:
        corr = float(np.corrcoef(predictions, labels)[0, 1])
    else:
        corr = float("nan")
    nonzero = labels != 0
    if nonzero.any():
        truth, predicted = labels[nonzero] > 0, predictions[nonzero] > 0
        acc2, f1 = float(np.mean(truth == predicted)), _weighted_f1(truth, predicted)
    else:
        acc2 = f1 = float("nan")
    truth, predicted = labels >= 0, predictions >= 0
    metrics = {
        "mae": mae,
        "corr": corr,
        "acc2": acc2,
        "f1": f1,
        "acc2_has0": float(np.mean(truth == predicted)),
        "f1_has0": _weighted_f1(truth, predicted),
    }
    for name, bound in (("acc7", 3.0), ("acc5", 2.0)):
        metrics[name] = float(np.mean(
            np.round(np.clip(predictions, -bound, bound)) == np.round(np.clip(labels, -bound, bound))
        ))
    return metrics


def coupled_classification_metrics(eval_pred) -> Dict[str, float]:
    """Classification metrics for ``Trainer(compute_metrics=...)``, as the paper reports them.

    Single-label (logits (N, C), labels (N,) class ids): ``accuracy``, ``f1`` (support-weighted F1, the paper's
    "F1-Score" and BRCA's "Weighted F1", as the authors' ``metricsTop.py``) and ``f1_macro`` (BRCA's "Macro F1").
    Multi-label (logits and 0/1 labels both (N, C); a label is predicted where its logit > 0): ``f1_micro`` and
    ``f1_macro`` (MM-IMDB's columns) and ``accuracy`` (exact match of the whole label set).
    """
    import numpy as np

    logits, labels = _eval_arrays(eval_pred)
    if logits.ndim != 2:
        raise ValueError(f"coupled_classification_metrics: logits must be (N, num_labels), got shape {logits.shape}")
    if labels.ndim == 2 and labels.shape == logits.shape:  # multi-label
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("coupled_classification_metrics: multi-label labels must be 0 or 1")
        truth, predicted = labels.astype(bool), logits > 0
        tp, fp, fn = (truth & predicted).sum(0), (~truth & predicted).sum(0), (truth & ~predicted).sum(0)
        denominator = 2 * tp + fp + fn
        per_label = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        micro_denominator = 2 * tp.sum() + fp.sum() + fn.sum()
        return {
            "accuracy": float(np.mean((truth == predicted).all(axis=1))),
            "f1_micro": float(2 * tp.sum() / micro_denominator) if micro_denominator > 0 else 0.0,
            "f1_macro": float(per_label.mean()),
        }
    labels = labels.reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"coupled_classification_metrics: labels must be (N,) class ids or (N, num_labels) 0/1, got shape "
            f"{labels.shape} for logits {logits.shape}"
        )
    if logits.shape[1] < 2:
        raise ValueError("coupled_classification_metrics: got one output per sample; for regression use "
                         "coupled_regression_metrics")
    if not (labels == np.round(labels)).all() or labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"coupled_classification_metrics: labels must be class ids in [0, {logits.shape[1]})")
    predicted = logits.argmax(axis=1)
    labels = labels.astype(np.int64)
    per_class = []
    for label in range(logits.shape[1]):
        if not ((labels == label).any() or (predicted == label).any()):
            continue  # sklearn's macro average covers the labels present in either
        tp = np.sum((predicted == label) & (labels == label))
        fp = np.sum((predicted == label) & (labels != label))
        fn = np.sum((predicted != label) & (labels == label))
        per_class.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "f1": _weighted_f1(labels, predicted),
        "f1_macro": float(np.mean(per_class)),
    }


class _CoupledRows(torch.utils.data.Dataset):
    """Rows {"input_features": {modality: (L_m, dim_m) float32 array or None}, "label": value} held in memory."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _row_from_record(record, index, source):
    """One JSON record / dataset row -> {"input_features": {name: array or None}, "label": value}."""
    import numpy as np

    if not isinstance(record, dict):
        raise ValueError(f"{source}: record {index} must be an object, got {type(record).__name__}")
    label_key = "label" if "label" in record else "labels" if "labels" in record else None
    if label_key is None:
        raise ValueError(f"{source}: record {index} has no 'label' (fields: {sorted(record)})")
    if "input_features" in record:
        features = record["input_features"]
        if not isinstance(features, dict):
            raise ValueError(f"{source}: 'input_features' of record {index} must map modality -> (L, dim) list")
    else:
        features = {key: value for key, value in record.items() if key != label_key}
    if not features:
        raise ValueError(f"{source}: record {index} has no modalities")
    arrays = {}
    for name, value in features.items():
        if value is None:
            arrays[name] = None
            continue
        try:
            array = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(
                f"{source}: modality {name!r} of record {index} is not a (L, dim) array of numbers"
            ) from None
        if array.ndim != 2:
            raise ValueError(f"{source}: modality {name!r} of record {index} must be (L, dim), got shape {array.shape}")
        arrays[name] = array
    label = record[label_key]
    if label is None or (isinstance(label, (list, tuple)) and not label):
        raise ValueError(f"{source}: record {index} has an empty label")
    return {"input_features": arrays, "label": label}


def _modality_dims(rows, source):
    """{name: dim} in first-seen order; every sample must agree on each modality's dim."""
    dims = {}
    for index, row in enumerate(rows):
        for name, array in row["input_features"].items():
            if array is None or array.shape[0] == 0:
                continue
            if dims.setdefault(name, array.shape[1]) != array.shape[1]:
                raise ValueError(
                    f"{source}: modality {name!r} has dim {array.shape[1]} in sample {index} but {dims[name]} before"
                )
    for row in rows:  # modalities that are always missing still need a known dim
        for name in row["input_features"]:
            if name not in dims:
                raise ValueError(f"{source}: modality {name!r} is missing (None / empty) in every sample")
    return dims


def load_coupled_mamba_dataset(path, split: Optional[str] = None):
    """Load per-sample, per-modality feature sequences and labels for Coupled Mamba fine-tuning.

    Accepted formats (each modality's sequence is (L_m, dim_m); lengths may differ between modalities and samples,
    the feature extractor aligns them; a modality may be missing from a sample: None / absent / zero length):

    - a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` with ``split``), with
      an ``input_features`` struct column {modality: (L, dim) list} (what ``samples_to_dataset`` writes) or one column
      per modality, and a ``label`` (or ``labels``) column;
    - a ``.json`` (a list) or ``.jsonl`` (one per line) file of records {"input_features": {modality: [[...], ...]},
      "label": y} or {"<modality>": [[...], ...], ..., "label": y};
    - a ``.npz`` file with one array per modality, (N, L_m, dim_m), an optional ``<modality>_lengths`` (N,) array of
      valid steps per sample (the rest is padding, cut off; 0 = missing), and ``label`` (or ``labels``), (N,) or
      (N, num_labels).

    Labels: a float per sample (regression, e.g. MOSEI's sentiment in [-3, 3]), a class id (classification) or a 0/1
    vector (multi-label). Returns ``(dataset, modality_dims)``: rows {"input_features": {...}, "label": ...} that
    ``CoupledMambaDataCollator`` batches, and {modality: dim} in the data's order.
    """
    import json

    import numpy as np

    path = os.fspath(path)
    source = os.path.basename(path.rstrip(os.sep)) or path
    if os.path.isdir(path):
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError:
            raise ValueError(
                f"{source}: a dataset folder needs the `datasets` library (pip install datasets)"
            ) from None
        dataset = load_from_disk(path)
        if isinstance(dataset, DatasetDict):
            if split is None or split not in dataset:
                raise ValueError(f"{source}: a DatasetDict needs split= one of {sorted(dataset)}, got {split!r}")
            dataset = dataset[split]
        records = list(dataset)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        label_key = "label" if "label" in arrays else "labels" if "labels" in arrays else None
        if label_key is None:
            raise ValueError(f"{source}: an .npz needs a 'label' array (found {sorted(arrays)})")
        labels = arrays.pop(label_key)
        lengths = {key[: -len("_lengths")]: arrays.pop(key) for key in list(arrays) if key.endswith("_lengths")}
        unknown = [name for name in lengths if name not in arrays]
        if unknown:
            raise ValueError(f"{source}: lengths given for unknown modalities {unknown}")
        if not arrays:
            raise ValueError(f"{source}: an .npz needs one (N, L, dim) array per modality")
        for name, array in arrays.items():
            if array.ndim != 3 or array.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{source}: modality {name!r} must be (N, L, dim) with N = {labels.shape[0]} labels, got shape "
                    f"{array.shape}"
                )
            if name in lengths and (lengths[name].shape != (labels.shape[0],) or lengths[name].min() < 0
                                    or lengths[name].max() > array.shape[1]):
                raise ValueError(f"{source}: {name}_lengths must be (N,) steps in [0, {array.shape[1]}]")
        records = []
        for index in range(labels.shape[0]):
            features = {}
            for name, array in arrays.items():
                steps = int(lengths[name][index]) if name in lengths else array.shape[1]
                features[name] = array[index, :steps] if steps > 0 else None
            label = labels[index]
            records.append({"input_features": features, "label": label.tolist()})
    elif path.endswith(".json") or path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as handle:
            text = handle.read().strip()
        try:
            if text.startswith("["):
                records = json.loads(text)
            else:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not valid JSON / JSONL ({error})") from None
    else:
        raise ValueError(
            f"{source}: expected a `datasets` folder (save_to_disk), a .json / .jsonl file or an .npz file"
        )
    if not records:
        raise ValueError(f"{source}: no samples")
    rows = [_row_from_record(record, index, source) for index, record in enumerate(records)]
    return _CoupledRows(rows), _modality_dims(rows, source)
