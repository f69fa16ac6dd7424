"""Publishing on the Hugging Face Hub: remote code, model cards rendered from ``model_cards/``, ``push_to_hub``.

Remote code. ``register_remote_code(config_class, {auto_class: model_class, ...}, {auto_class: processor_class})``
(called by ``multimodal_mamba/__init__.py`` and ``coupled_api.py`` for every family) makes a plain

    model.save_pretrained(folder); processor.save_pretrained(folder)

write a self-contained remote-code folder: transformers copies each saved class's module and every module it
imports with a single-dot relative import next to the weights, and records the saved class in ``auto_map``;
transformers records only the class being saved, so the registered model classes also write the family's other
Auto entries (``AutoConfig``, ``AutoModel``, the task class) into ``config.json``, and a processor class registered
under several Auto classes (Coupled Mamba's feature extractor: ``AutoFeatureExtractor`` and ``AutoProcessor``) writes
all of them into its own file. Such a folder loads with ``trust_remote_code=True`` where this package is not
installed.

Model cards. ``render_model_card(model_or_config, ...)`` fills the family's template (``model_cards/<family>.md``,
a Jinja template; ``model_cards/adapter.md`` for PEFT adapters) from the config, and from the processor saved with
it where the family's usage snippet depends on it: YAML metadata (``library_name``,
``pipeline_tag``, ``license``, ``base_model``, ``tags``, ``datasets``), a usage snippet, the architecture and its
options, training details when given, limitations. The result is a ``huggingface_hub.ModelCard``.

Pushing. ``push_to_hub(repo_id, model=..., processor=...)`` saves a model (or a PEFT adapter) and its processor into
a temporary folder with the card as ``README.md`` and uploads everything as one commit (``HfApi.create_repo`` then
``HfApi.create_commit``). An existing ``README.md`` in the repo is kept unless ``overwrite_card=True``. The
registered model classes' own ``model.push_to_hub(repo_id, processor=...)`` goes through the same path.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

MODEL_CARDS_ENV = "MULTIMODAL_MAMBA_MODEL_CARDS"
ADAPTER_TEMPLATE = "adapter.md"
DEFAULT_LICENSE = "apache-2.0"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


# ------------------------------------------------------------------------------------------------- remote code
def auto_map_entry(cls: type) -> str:
    """``"module.ClassName"`` as ``auto_map`` names a class whose module is copied flat into the folder."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def register_remote_code(
    config_class: type,
    model_classes: Mapping[str, type],
    processor_classes: Optional[Mapping[str, type]] = None,
) -> Dict[str, str]:
    """Register a model family for Hub remote code (idempotent).

    Args:
        config_class: the family's configuration class (recorded as ``AutoConfig``).
        model_classes: Auto class name -> model class, e.g. ``{"AutoModel": VLMambaModel,
            "AutoModelForImageTextToText": VLMambaForConditionalGeneration}``.
        processor_classes: Auto class name -> processor / feature extractor class, e.g.
            ``{"AutoProcessor": VLMambaProcessor}``; transformers writes their ``auto_map`` into the processor files.
            One class may be listed under several Auto classes (``{"AutoFeatureExtractor": FE, "AutoProcessor": FE}``):
            the first is the class's own (what transformers records), its ``save_pretrained`` adds the others.

    Returns the ``auto_map`` that every registered model class writes into ``config.json`` on ``save_pretrained``
    (``{"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel", ...}``).
    """
    entries = {"AutoConfig": auto_map_entry(config_class)}
    entries.update({auto_class: auto_map_entry(cls) for auto_class, cls in model_classes.items()})
    config_class.register_for_auto_class("AutoConfig")
    for auto_class, model_class in model_classes.items():
        model_class.register_for_auto_class(auto_class)
        model_class._family_auto_map = dict(entries)
        current = model_class.__dict__.get("save_pretrained")
        if not getattr(current, "_writes_family_auto_map", False):
            model_class.save_pretrained = _save_with_family_auto_map(model_class.save_pretrained)
        if not getattr(model_class.__dict__.get("push_to_hub"), "_pushes_model_card", False):
            model_class.push_to_hub = _model_push_to_hub
    auto_classes_of: Dict[type, List[str]] = {}
    for auto_class, processor_class in (processor_classes or {}).items():
        auto_classes_of.setdefault(processor_class, []).append(auto_class)
    for processor_class, auto_classes in auto_classes_of.items():
        processor_class.register_for_auto_class(auto_classes[0])
        if len(auto_classes) > 1:
            name = auto_map_entry(processor_class)
            processor_class._family_auto_map = {auto_class: name for auto_class in auto_classes}
            if not getattr(processor_class.__dict__.get("save_pretrained"), "_writes_family_auto_map", False):
                processor_class.save_pretrained = _save_processor_with_family_auto_map(processor_class.save_pretrained)
    return entries


def _save_with_family_auto_map(save_pretrained: Callable) -> Callable:
    @functools.wraps(save_pretrained)
    def save_with_family_auto_map(self, save_directory, *args, **kwargs):
        # Only the registered class itself (not a user's subclass defined elsewhere, whose module would be copied
        # instead of ours) gets the family's entries; transformers then adds the saved class as usual.
        entries = type(self).__dict__.get("_family_auto_map")
        if entries and getattr(type(self), "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update(entries)
            self.config.auto_map = auto_map
        return save_pretrained(self, save_directory, *args, **kwargs)

    save_with_family_auto_map._writes_family_auto_map = True
    return save_with_family_auto_map


def _save_processor_with_family_auto_map(save_pretrained: Callable) -> Callable:
    @functools.wraps(save_pretrained)
    def save_processor_with_family_auto_map(self, save_directory, *args, **kwargs):
        # The processor's own ``auto_map`` attribute is what transformers serializes (and extends with the class's
        # ``_auto_class``); as for models, only the registered class itself gets the family's entries.
        entries = type(self).__dict__.get("_family_auto_map")
        if entries and getattr(type(self), "_auto_class", None) is not None:
            auto_map = dict(getattr(self, "auto_map", None) or {})
            auto_map.update(entries)
            self.auto_map = auto_map
        return save_pretrained(self, save_directory, *args, **kwargs)

    save_processor_with_family_auto_map._writes_family_auto_map = True
    return save_processor_with_family_auto_map


def _model_push_to_hub(
    self, repo_id: str, *, processor=None, commit_message: Optional[str] = None,
    commit_description: Optional[str] = None, private: Optional[bool] = None, token=None,
    revision: Optional[str] = None, create_pr: bool = False, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    tags: Optional[Sequence[str]] = None, overwrite_card: bool = False, **card_kwargs,
):
    """Upload this model (and ``processor``, if given) to ``repo_id`` in one commit, with a model card rendered from
    the family's template as ``README.md`` (an existing card in the repo is kept unless ``overwrite_card``).
    Keyword arguments as ``multimodal_mamba.hub.push_to_hub``; returns its ``CommitInfo``."""
    return push_to_hub(
        repo_id, model=self, processor=processor, commit_message=commit_message,
        commit_description=commit_description, private=private, token=token, revision=revision,
        create_pr=create_pr, max_shard_size=max_shard_size, tags=tags, overwrite_card=overwrite_card, **card_kwargs,
    )


_model_push_to_hub._pushes_model_card = True


# ------------------------------------------------------------------------------------------------- model cards
class CardFamily:
    """How to render the card of one model family.

    Args:
        template: file name of the Jinja template in the model-card folder.
        pipeline_tag: the Hub task.
        tags: tags every card of the family gets.
        context: ``context(config, model_or_None) -> dict`` of template variables (the architecture, usage); a
            ``"card_tags"`` entry (list) adds tags that depend on the config.
        language: default ``language`` metadata (``None``: none).
        usage: optional ``usage(config, processor_or_None, adapter) -> dict`` of the usage snippet's variables when
            they depend on the processor saved with the card (``adapter``: rendering an adapter's card).
        check_processor: optional ``check_processor(config, processor)`` raising ValueError when ``processor`` cannot
            go with a model of ``config`` (checked before anything is written or uploaded).
    """

    def __init__(self, template: str, pipeline_tag: str, tags: Sequence[str],
                 context: Callable[[Any, Any], dict], language: Optional[Sequence[str]] = None,
                 usage: Optional[Callable[[Any, Any, bool], dict]] = None,
                 check_processor: Optional[Callable[[Any, Any], None]] = None):
        self.template = template
        self.pipeline_tag = pipeline_tag
        self.tags = list(tags)
        self.context = context
        self.language = list(language) if language else None
        self.usage = usage
        self.check_processor = check_processor


CARD_FAMILIES: Dict[str, CardFamily] = {}


def register_card_family(model_type: str, family: CardFamily) -> None:
    """Render cards of configs with ``model_type`` with ``family`` (its template lives in the model-card folder)."""
    CARD_FAMILIES[model_type] = family


def model_card_dir(template_dir: Union[str, os.PathLike, None] = None) -> Path:
    """The folder holding the card templates.

    Looked up in order: ``template_dir``; ``$MULTIMODAL_MAMBA_MODEL_CARDS``; ``model_cards/`` next to the package
    (a source checkout or an editable install); ``share/multimodal-mamba/model_cards`` under ``sys.prefix`` or the
    user base (a wheel install: pyproject.toml installs them there).
    """
    import site

    share = Path("share") / "multimodal-mamba" / "model_cards"
    candidates = [template_dir, os.environ.get(MODEL_CARDS_ENV), Path(__file__).resolve().parent.parent / "model_cards",
                  Path(sys.prefix) / share, Path(site.getuserbase()) / share]
    for candidate in candidates:
        if candidate and (Path(candidate) / ADAPTER_TEMPLATE).is_file():
            return Path(candidate)
    looked = [str(c) for c in candidates if c]
    raise FileNotFoundError(
        f"model card templates not found (looked in {looked}); pass template_dir= or set ${MODEL_CARDS_ENV}"
    )


def is_hub_repo_id(value: str) -> bool:
    """True for ``namespace/name`` strings that are not an existing local path (usable as ``base_model``)."""
    return isinstance(value, str) and bool(_REPO_ID.match(value)) and not os.path.exists(value)


def _as_list(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value]


def format_count(count: Optional[int]) -> str:
    """1234567 -> "1.23M"."""
    if count is None:
        return "unknown"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


_TRAINING_ARGUMENT_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "optim", "seed", "bf16", "fp16",
    "gradient_checkpointing",
)


def training_details(training) -> Optional[dict]:
    """Normalize training information for a card.

    ``training`` is None (unknown), a mapping with any of ``summary`` (str), ``datasets`` (list of dataset ids or
    names), ``hyperparameters`` (mapping), ``stages`` (list of str), or a transformers ``TrainingArguments``
    (its main hyperparameters are recorded). Returns ``{"summary", "datasets", "hyperparameters", "stages"}``.
    """
    if training is None:
        return None
    if hasattr(training, "to_dict") and hasattr(training, "learning_rate"):
        values = training.to_dict()
        hyperparameters = {}
        for name in _TRAINING_ARGUMENT_FIELDS:
            value = values.get(name)
            if value in (None, False, -1, 0) and name not in ("weight_decay",):
                continue
            hyperparameters[name] = getattr(value, "value", value)
        return {"summary": "Trained with transformers' Trainer.", "datasets": [],
                "hyperparameters": hyperparameters, "stages": []}
    if not isinstance(training, Mapping):
        raise ValueError(f"training must be None, a mapping or TrainingArguments, got {type(training).__name__}")
    unknown = set(training) - {"summary", "datasets", "hyperparameters", "stages"}
    if unknown:
        raise ValueError(f"unknown training field(s) {sorted(unknown)}: use summary, datasets, hyperparameters, stages")
    return {
        "summary": str(training.get("summary") or ""),
        "datasets": _as_list(training.get("datasets")),
        "hyperparameters": dict(training.get("hyperparameters") or {}),
        "stages": _as_list(training.get("stages")),
    }


def _render(template_path: Path, **context):
    import jinja2
    from huggingface_hub import ModelCard

    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    text = environment.from_string(template_path.read_text(encoding="utf-8")).render(**context)
    return ModelCard(text)


def _card_data(*, pipeline_tag, license, base_model, tags, datasets, language, model_name, library_name):
    from huggingface_hub import ModelCardData

    base_models = _as_list(base_model)
    for value in base_models:
        if not is_hub_repo_id(value):
            raise ValueError(f"base_model {value!r} is not a Hub repo id (namespace/name); local paths go in sources=")
    data = dict(
        library_name=library_name, pipeline_tag=pipeline_tag, license=license, tags=list(dict.fromkeys(tags)),
        datasets=list(dict.fromkeys(datasets)) or None, language=language or None, model_name=model_name,
    )
    if base_models:
        data["base_model"] = base_models[0] if len(base_models) == 1 else base_models
    return ModelCardData(**data)


def _is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _config_of(model_or_config):
    base = model_or_config.get_base_model() if _is_peft_model(model_or_config) else model_or_config
    return getattr(base, "config", base)


def check_processor_fits(model_or_config, processor) -> None:
    """Raise ValueError when ``processor`` cannot be published with ``model_or_config`` (a model, its config or a PEFT
    adapter), for the families that define the check (Coupled Mamba: the feature extractor's modalities must be the
    model's, in the same order). Nothing to check when either is None."""
    if processor is None or model_or_config is None:
        return
    family = CARD_FAMILIES.get(getattr(_config_of(model_or_config), "model_type", None))
    if family is not None and family.check_processor is not None:
        family.check_processor(_config_of(model_or_config), processor)


def render_model_card(
    model_or_config, *, repo_id: Optional[str] = None, license: str = DEFAULT_LICENSE, base_model=None,
    datasets: Optional[Iterable[str]] = None, tags: Optional[Iterable[str]] = None, language=None,
    training=None, sources: Optional[Mapping[str, str]] = None, model_name: Optional[str] = None,
    limitations: Optional[Iterable[str]] = None, template_dir=None, processor=None,
):
    """The model card (``huggingface_hub.ModelCard``) of a model, a config or a PEFT adapter.

    Args:
        model_or_config: a model of a registered family (its parameter count and dtype are reported), its config,
            or a ``peft.PeftModel`` wrapping one (rendered with the adapter template).
        repo_id: where the card will live (a Hub id or a folder); the usage snippet loads from it (default: the
            path the model was loaded from; ValueError when there is none).
        license: Hub license id (the card asks users to respect the licenses of the base models too).
        base_model: Hub repo id(s) of the checkpoints this one derives from (for an adapter: defaults to the PEFT
            config's ``base_model_name_or_path`` when that is a repo id).
        datasets, tags, language: extra metadata (``datasets`` also come from ``training["datasets"]``).
        training: see ``training_details``; None renders "not recorded".
        sources: free-form provenance, ``{"vision encoder": "path or id", ...}``, listed in the card.
        model_name: title; default the last part of ``repo_id``.
        limitations: extra limitation bullet points, after the family's.
        template_dir: folder of the templates (default: see ``model_card_dir``).
        processor: the processor / feature extractor uploaded with the card, if any (families whose usage snippet
            depends on it, as Coupled Mamba's, describe and load it; a processor that does not fit the config is a
            ValueError).
    """
    adapter = _is_peft_model(model_or_config)
    base = model_or_config.get_base_model() if adapter else model_or_config
    config = getattr(base, "config", base)
    model = base if hasattr(base, "config") else None
    family = CARD_FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(
            f"no model card template for model_type {getattr(config, 'model_type', None)!r} "
            f"(known: {sorted(CARD_FAMILIES)})"
        )
    folder = model_card_dir(template_dir)
    details = training_details(training)
    all_datasets = _as_list(datasets) + (details["datasets"] if details else [])
    context = dict(family.context(config, model))
    check_processor_fits(config, processor)
    if family.usage is not None:
        context.update(family.usage(config, processor, adapter))
    config_tags = _as_list(context.pop("card_tags", None))
    repo_id = repo_id or getattr(config, "_name_or_path", None) or None
    if not repo_id:
        raise ValueError("pass repo_id= (the Hub id or folder the card's usage snippet loads from)")
    name = model_name or Path(str(repo_id)).name or context["default_name"]
    context.update(
        model_name=name, repo_id=repo_id, training=details, sources=dict(sources or {}),
        extra_limitations=_as_list(limitations), license_id=license, datasets_list=all_datasets,
        base_models=_as_list(base_model),
    )
    if not adapter:
        card_data = _card_data(
            pipeline_tag=family.pipeline_tag, license=license, base_model=base_model,
            tags=family.tags + config_tags + _as_list(tags) + list(getattr(model, "model_tags", None) or []),
            datasets=all_datasets, language=_as_list(language) or family.language, model_name=name,
            library_name="transformers",
        )
        return _render(folder / family.template, card_data=card_data.to_yaml(), **context)

    peft_config = model_or_config.peft_config[getattr(model_or_config, "active_adapter", "default")]
    base_id = getattr(peft_config, "base_model_name_or_path", None)
    if base_model is None and base_id and is_hub_repo_id(base_id):
        base_model = base_id
    if _as_list(base_model):
        base_id = _as_list(base_model)[0]
    if not base_id:
        raise ValueError(
            "the adapter's base model is unknown (its PEFT config has no base_model_name_or_path): pass "
            "base_model=<Hub repo id of the base model>"
        )
    trainable, total = model_or_config.get_nb_trainable_parameters()
    context.update(
        adapter=_adapter_context(peft_config), base_model_id=base_id,
        trainable_parameters=format_count(trainable), total_parameters=format_count(total),
        trainable_percent=f"{100.0 * trainable / max(total, 1):.3f}", base_models=_as_list(base_model),
    )
    peft_type = str(getattr(getattr(peft_config, "peft_type", None), "value", peft_config.peft_type)).lower()
    card_data = _card_data(
        pipeline_tag=family.pipeline_tag, license=license, base_model=base_model,
        tags=family.tags + config_tags + ["peft", peft_type, "adapter"] + _as_list(tags), datasets=all_datasets,
        language=_as_list(language) or family.language, model_name=name, library_name="peft",
    )
    return _render(folder / ADAPTER_TEMPLATE, card_data=card_data.to_yaml(), **context)


def _adapter_context(peft_config) -> dict:
    def show(value):
        if value is None:
            return "none"
        if isinstance(value, (set, frozenset, list, tuple)):
            return ", ".join(sorted(str(v) for v in value))
        return str(value)

    fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "bias",
              "task_type")
    options = {name: show(getattr(peft_config, name)) for name in fields if hasattr(peft_config, name)}
    peft_type = getattr(peft_config, "peft_type", None)
    return {"type": str(getattr(peft_type, "value", peft_type)), "options": options}


# --------------------------------------------------------------------------------------- VL-Mamba card context
_PROJECTORS = {
    "mlp": "a two-layer MLP (Linear-GELU-Linear)",
    "vss_mlp": "VSS-MLP: V_out = MLP(Norm(VSS(V) + V)), the 2D selective scan at the vision width",
    "vss_l2": "VSS-L2 (the paper's final connector): V' = Linear(V); V_out = Linear(Norm(VSS(GELU(V')) + V')), "
              "the 2D selective scan at the language model width",
}
_SCANS = {
    "bidirectional": "bidirectional scan (BSM): forward and backward over the row-major patch sequence",
    "cross": "cross scan (CSM): rows and columns, each both ways (four directions)",
}


def _vl_mamba_context(config, model) -> dict:
    vision, text = config.vision_config, config.text_config
    rows, cols = config.patch_grid
    parameters = model.num_parameters() if model is not None else None
    dtype = str(getattr(model, "dtype", None) or getattr(config, "dtype", None) or "float32").replace("torch.", "")
    uses_vss = config.projector_type != "mlp"
    size = vision.image_size
    example_code = (
        f'image = Image.new("RGB", ({size}, {size}), "white")  # or Image.open("photo.jpg")\n'
        'messages = [{"role": "user", "content": [{"type": "image", "image": image},\n'
        '                                         {"type": "text", "text": "What is in the picture?"}]}]\n'
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,\n"
        '                                       return_dict=True, return_tensors="pt")\n'
        "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
    )
    scan = f" ({config.scan_type} scan)" if uses_vss else ""
    summary = (
        f"{vision.model_type} vision encoder ({vision.image_size}px, patch {vision.patch_size}), "
        f"{config.projector_type} connector{scan}, Mamba language model ({text.num_hidden_layers} layers, "
        f"hidden size {text.hidden_size})"
    )
    return {
        "default_name": "vl-mamba",
        "family_name": "VL-Mamba",
        "summary": summary,
        "auto_model_class": "AutoModelForImageTextToText",
        "usage_imports": "from PIL import Image\nfrom transformers import AutoModelForImageTextToText, AutoProcessor",
        "adapter_load_processor": "processor = AutoProcessor.from_pretrained(base_id, trust_remote_code=True)",
        "example_code": example_code,
        "num_parameters": format_count(parameters),
        "dtype": dtype,
        "vision": {
            "model_type": vision.model_type, "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "grid": f"{rows}x{cols}",
        },
        "text": {
            "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
            "vocab_size": text.vocab_size, "state_size": text.state_size, "expand": text.expand,
            "conv_kernel": text.conv_kernel,
        },
        "projector_type": config.projector_type,
        "projector_description": _PROJECTORS[config.projector_type],
        "scan_type": config.scan_type if uses_vss else "none",
        "scan_description": _SCANS[config.scan_type] if uses_vss else "no scan (MLP connector)",
        "vss": {"state_size": config.vss_state_size, "expand": config.vss_expand,
                "conv_kernel": config.vss_conv_kernel} if uses_vss else None,
        "image_seq_length": config.image_seq_length,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "image_token_id": config.image_token_id,
    }


register_card_family("vl_mamba", CardFamily(
    template="vl_mamba.md", pipeline_tag="image-text-to-text",
    tags=["vl-mamba", "mamba", "state-space-model", "multimodal", "image-text-to-text", "custom_code"],
    context=_vl_mamba_context, language=["en"],
))


# ----------------------------------------------------------------------------------- Coupled Mamba card context
_COUPLINGS = {
    "mean": "one coupled state, the mean of the chains' states, H_t = (1/M) sum_m h^m_t, feeds every chain's next "
            "step (a convex combination: stable on long sequences)",
    "sum": "the paper's Eq. 6: the chains' states are summed, H_t = sum_m h^m_t, before every chain's next step (the "
           "coupled decay can reach M, so long sequences can overflow: the scan then raises CoupledScanOverflowError)",
    "none": "no coupling: M independent Mamba chains (the paper's ablation)",
}
_POOLINGS = {
    "mean": "mean over each modality's valid (unmasked) steps",
    "max": "maximum over each modality's valid (unmasked) steps",
    "last": "each modality's last valid step",
}
_FUSIONS = {
    "weighted": "softmax-weighted sum with one learned weight per modality (renormalized over the modalities present)",
    "mean": "mean over the modalities present",
    "concat": "concatenation of the pooled modality vectors",
}
# Step counts of the usage snippet's example modalities (cycled): different lengths show the alignment at work.
_EXAMPLE_STEPS = (12, 40, 25, 33, 18)


def _coupled_task(config) -> dict:
    """The task a Coupled Mamba config describes: name, card tag, output description and how the snippet reads it."""
    labels = config.num_labels
    problem = config.problem_type
    if problem == "regression" or (problem is None and labels == 1):
        loss = "L1 (the paper's)" if config.regression_loss == "l1" else "MSE"
        what = "one score" if labels == 1 else f"{labels} scores"
        return {"name": "regression", "tag": "regression", "description": f"regression: {what}, {loss} loss",
                "read": "print(logits[0].tolist())  # the predicted score(s)"}
    names = [str(config.id2label[i]) for i in range(labels)] if config.id2label else []
    named = [n for i, n in enumerate(names) if n != f"LABEL_{i}"]
    shown = f" ({', '.join(names)})" if named else ""
    if problem == "multi_label_classification":
        return {"name": "multi-label classification", "tag": "multi-label-classification",
                "description": f"multi-label classification over {labels} labels{shown}, sigmoid / binary "
                               "cross-entropy",
                "read": "probabilities = logits.sigmoid()[0]\n"
                        "print({model.config.id2label[i]: round(p, 3) for i, p in enumerate(probabilities.tolist())})"}
    return {"name": "classification", "tag": "classification",
            "description": f"single-label classification over {labels} labels{shown}, softmax / cross-entropy",
            "read": "probabilities = logits.softmax(-1)[0]\n"
                    "print(model.config.id2label[int(probabilities.argmax())], float(probabilities.max()))"}


def _coupled_mamba_context(config, model) -> dict:
    parameters = model.num_parameters() if model is not None else None
    dtype = str(getattr(model, "dtype", None) or getattr(config, "dtype", None) or "float32").replace("torch.", "")
    names = list(config.modality_names)
    dims = dict(config.modality_dims)
    task = _coupled_task(config)
    fused = config.hidden_size * (len(names) if config.fusion == "concat" else 1)
    modalities = ", ".join(f"{name} ({dims[name]})" for name in names)
    summary = (
        f"{len(names)} modalities ({modalities}), {config.num_hidden_layers} coupled layers of hidden size "
        f"{config.hidden_size} and state size {config.state_size}, `{config.coupling}` coupling, "
        f"`{config.pooling}` pooling, `{config.fusion}` fusion, {task['name']}"
    )
    return {
        "default_name": "coupled-mamba",
        "family_name": "Coupled Mamba",
        "summary": summary,
        "auto_model_class": "AutoModelForSequenceClassification",
        "num_parameters": format_count(parameters),
        "dtype": dtype,
        "modality_list": ", ".join(f"`{name}` {dims[name]}" for name in names),
        "modality_table": ", ".join(f"`{name}` ({dims[name]})" for name in names),
        "num_modalities": len(names),
        "total_dim": sum(dims.values()),
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "state_size": config.state_size,
        "expand": config.expand,
        "intermediate_size": config.intermediate_size,
        "conv_kernel": config.conv_kernel,
        "time_step_rank": config.time_step_rank,
        "projection_hidden_size": config.projection_hidden_size,
        "head_hidden_size": config.head_hidden_size,
        "fused_size": fused,
        "coupling": config.coupling,
        "coupling_description": _COUPLINGS[config.coupling],
        "pooling": config.pooling,
        "pooling_description": _POOLINGS[config.pooling],
        "fusion": config.fusion,
        "fusion_description": _FUSIONS[config.fusion],
        "task": task["description"],
        "task_name": task["name"],
        "num_labels": config.num_labels,
        "ssm_backend": getattr(config, "ssm_backend", None) or "auto",
        "card_tags": [task["tag"]],
    }


def _describe_feature_extractor(extractor) -> str:
    if extractor.alignment == "segment_mean":
        return (f"`segment_mean`: every modality is averaged over {extractor.sequence_length} equal segments "
                f"(shorter sequences are stretched), every step valid")
    target = (f"{extractor.sequence_length} steps (longer sequences are truncated)" if extractor.sequence_length
              else "the longest sequence of the batch")
    return f"`pad`: every modality keeps its own steps from t = 0 and is padded to {target}; the mask marks valid steps"


def _check_coupled_mamba_processor(config, processor) -> None:
    names = list(config.modality_names)
    dims = dict(config.modality_dims)
    extractor_dims = getattr(processor, "modality_dims", None)
    if not isinstance(extractor_dims, Mapping) or not hasattr(processor, "alignment"):
        raise ValueError(
            f"a Coupled Mamba model goes with a CoupledMambaFeatureExtractor, got {type(processor).__name__}"
        )
    extractor_names = list(getattr(processor, "modality_names", None) or extractor_dims)
    if extractor_names != names or dict(extractor_dims) != dims:
        raise ValueError(
            f"the feature extractor's modalities {dict(extractor_dims)} (order {extractor_names}) do not match the "
            f"model's {dims} (order {names}): build it with CoupledMambaFeatureExtractor.from_model_config(config)"
        )


def _coupled_mamba_usage(config, processor, adapter: bool) -> dict:
    """The usage snippet: with the feature extractor uploaded alongside, unaligned sequences go through it; without
    one, the example features are already on one time axis (the model takes a dict of per-modality tensors)."""
    names = list(config.modality_names)
    dims = dict(config.modality_dims)
    task = _coupled_task(config)
    where = "adapter_id" if adapter else "repo_id"
    if processor is not None:
        steps = {name: _EXAMPLE_STEPS[i % len(_EXAMPLE_STEPS)] for i, name in enumerate(names)}
        sample = ", ".join(f"{json.dumps(name)}: torch.randn({steps[name]}, {dims[name]})" for name in names)
        example_code = (
            "# one sample: a (steps, dim) feature sequence per modality (lengths may differ, a modality may be None)\n"
            f"sample = {{{sample}}}\n"
            'inputs = feature_extractor([sample], return_tensors="pt")  # input_features; attention_mask (1, M, L)\n'
            "with torch.no_grad():\n"
            "    logits = model(**inputs).logits\n"
            f"{task['read']}"
        )
        imports = "import torch\nfrom transformers import AutoFeatureExtractor, AutoModelForSequenceClassification"
        load = f"feature_extractor = AutoFeatureExtractor.from_pretrained({where}, trust_remote_code=True)"
        extractor = _describe_feature_extractor(processor)
    else:
        features = ", ".join(f"{json.dumps(name)}: torch.randn(1, 30, {dims[name]})" for name in names)
        example_code = (
            "# features already on one time axis: (batch, steps, dim) per modality (an absent modality: None)\n"
            f"features = {{{features}}}\n"
            "with torch.no_grad():\n"
            "    logits = model(input_features=features).logits\n"
            f"{task['read']}"
        )
        imports = "import torch\nfrom transformers import AutoModelForSequenceClassification"
        load = ""
        extractor = None
    return {
        "example_code": example_code,
        "usage_imports": imports,
        "load_processor": load,
        "adapter_load_processor": load if adapter else "",
        "feature_extractor": extractor,
    }


# Hub pipeline tag: "other". The Hub has no task for classification / regression of multimodal *feature sequences*
# (text, audio and vision features computed beforehand, e.g. BERT / COVAREP / Facet vectors): "text-classification",
# "audio-classification" or "video-classification" would promise raw text / audio / video input and a widget that
# cannot feed this model, and "tabular-*" describes tables, not sequences. The task ("regression", "classification",
# ...) goes into the tags instead, and the package's own pipeline task is "multimodal-sequence-classification".
register_card_family("coupled_mamba", CardFamily(
    template="coupled_mamba.md", pipeline_tag="other",
    tags=["coupled-mamba", "mamba", "state-space-model", "multimodal", "multimodal-fusion", "custom_code"],
    context=_coupled_mamba_context, usage=_coupled_mamba_usage, check_processor=_check_coupled_mamba_processor,
))


# ----------------------------------------------------------------------------------------------- save and push
def _check_empty_or_overwrite(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"{folder} already exists and is not empty: pass overwrite=True to write into it")


def save_for_hub(
    save_directory, model=None, processor=None, *, card: bool = True, overwrite: bool = False,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE, **card_kwargs,
) -> List[str]:
    """Write what ``push_to_hub`` uploads into ``save_directory``: the model (or PEFT adapter) files, the processor
    files and, with ``card``, ``README.md`` rendered by ``render_model_card(model, **card_kwargs)`` (``repo_id``
    defaults to ``save_directory``).

    Refuses a non-empty ``save_directory`` unless ``overwrite``. Returns the written paths relative to the folder,
    sorted.
    """
    if model is None and processor is None:
        raise ValueError("nothing to save: pass a model, a processor or both")
    check_processor_fits(model, processor)
    folder = Path(save_directory)
    _check_empty_or_overwrite(folder, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    if card and model is not None:
        card_kwargs.setdefault("repo_id", str(folder))  # the snippet then loads this very folder
        rendered = render_model_card(model, processor=processor, **card_kwargs)
    else:
        rendered = None
    if model is not None:
        if _is_peft_model(model):
            model.save_pretrained(str(folder))
        else:
            model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    if processor is not None:
        processor.save_pretrained(str(folder))
    readme = folder / "README.md"
    if rendered is not None:
        rendered.save(readme)
    elif readme.exists() and model is not None and _is_peft_model(model):
        readme.unlink()  # PEFT writes a generic card; without card=True nothing is written in its place
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def push_to_hub(
    repo_id: str, model=None, processor=None, *, commit_message: Optional[str] = None,
    commit_description: Optional[str] = None, private: Optional[bool] = None, token=None,
    revision: Optional[str] = None, create_pr: bool = False, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    tags: Optional[Sequence[str]] = None, overwrite_card: bool = False, **card_kwargs,
):
    """Upload a model (or PEFT adapter) and/or its processor to ``repo_id`` in one commit, with a model card.

    Steps: ``HfApi.create_repo(exist_ok=True)``; ``HfApi.file_exists(repo_id, "README.md")`` (an existing card is
    kept unless ``overwrite_card``); ``save_for_hub`` into a temporary folder; one ``HfApi.create_commit`` adding
    every file (plus ``HfApi.create_branch`` first when ``revision`` names a new branch). ``card_kwargs`` go to
    ``render_model_card`` (``license``, ``base_model``, ``datasets``, ``training``, ``sources``, ...). Returns the
    ``CommitInfo`` of the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from . import __version__

    if model is None and processor is None:
        raise ValueError("nothing to push: pass a model, a processor or both")
    check_processor_fits(model, processor)  # before any Hub call
    api = HfApi(library_name="multimodal-mamba", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    write_card = model is not None
    if write_card and not overwrite_card:
        write_card = not api.file_exists(repo_id, "README.md", revision=revision, token=token)
    with tempfile.TemporaryDirectory() as work_dir:
        files = save_for_hub(
            work_dir, model, processor, card=write_card, max_shard_size=max_shard_size, repo_id=repo_id, tags=tags,
            **card_kwargs,
        )
        operations = [
            CommitOperationAdd(path_in_repo=name.replace(os.sep, "/"), path_or_fileobj=os.path.join(work_dir, name))
            for name in files
        ]
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        if commit_message is None:
            what = "adapter" if model is not None and _is_peft_model(model) else ("model" if model else "processor")
            commit_message = f"Upload {what}" + (" and processor" if model is not None and processor else "")
        return api.create_commit(
            repo_id=repo_id, operations=operations, commit_message=commit_message,
            commit_description=commit_description, token=token, revision=revision, create_pr=create_pr,
        )
