"""Build a VL-Mamba checkpoint, ready for stage-1 training, from a pretrained vision encoder and a Mamba LM.

Inputs (local folders or Hub repo ids):

- the vision encoder (default ``google/siglip-so400m-patch14-384``, the paper's SigLIP-SO400M at 384 px): a SigLIP
  or CLIP checkpoint, either the vision model alone or the full image-text model (its vision half is taken),
  with its image processor;
- the Mamba language model (default ``state-spaces/mamba-2.8b-slimpj``) in transformers' format
  (``MambaForCausalLM.save_pretrained``) or mamba-ssm's (``config.json`` with ``d_model``/``n_layer``/...,
  ``pytorch_model.bin``; see ``convert_mamba_ssm``);
- the tokenizer (default: the LM folder's, else ``EleutherAI/gpt-neox-20b``, the tokenizer of state-spaces' Mamba
  models).

Output: ``VLMambaForConditionalGeneration`` weights (sharded safetensors) and config, with the encoder's and the LM's
weights unchanged and a freshly initialized MultiModal Connector; the processor (the encoder's image processor, the
tokenizer with an added ``<image>`` token, padding on the left, a chat template); the remote code
(``trust_remote_code=True`` loads it without this package); a model card. The ``<image>`` token takes a free row
of the LM's padded embedding (mamba-ssm pads the vocabulary to a multiple of 8: GPT-NeoX's 50277 tokens leave rows
50277-50279 free); the embedding is resized only when no row is free. Its embedding value never matters: the
image features replace it.

    python -m multimodal_mamba.conversion.build_vl_mamba vl-mamba-2.8b-stage0
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .common import (
    DTYPES,
    KEEP_FLOAT32,
    add_output_arguments,
    load_state_dict,
    read_json,
    resolve_checkpoint_source,
    resolve_source,
    run_cli,
    staged_output,
)
from .convert_mamba_ssm import load_mamba_ssm_checkpoint, normalize_mamba_state_dict

logger = logging.getLogger(__name__)

DEFAULT_VISION_ENCODER = "google/siglip-so400m-patch14-384"
DEFAULT_LANGUAGE_MODEL = "state-spaces/mamba-2.8b-slimpj"
DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
SUPPORTED_VISION_TYPES = ("siglip_vision_model", "clip_vision_model")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "*.model", "added_tokens.json", "chat_template.jinja"]


# ------------------------------------------------------------------------------------------------ vision side
def load_vision_encoder(folder: Path, dtype: Optional[torch.dtype] = None):
    """(vision config, vision model with the encoder's weights, image processor) from a SigLIP / CLIP folder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    read_json(folder / "config.json", "vision encoder")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as error:
        raise ValueError(f"could not read the vision encoder's config in {folder}: {error}") from error
    vision_config = getattr(config, "vision_config", None) or config
    if vision_config.model_type not in SUPPORTED_VISION_TYPES:
        raise ValueError(
            f"{folder} is not a supported vision encoder (model_type {config.model_type!r}); expected a SigLIP or "
            f"CLIP checkpoint ({', '.join(SUPPORTED_VISION_TYPES)} or their image-text models)"
        )
    vision_class = MODEL_MAPPING[type(vision_config)]
    try:
        tower, info = vision_class.from_pretrained(str(folder), config=vision_config, output_loading_info=True,
                                                   dtype=dtype or "auto")
    except Exception as error:
        raise ValueError(f"could not load the vision encoder's weights from {folder}: {error}") from error
    problems = {key: info.get(key) for key in ("missing_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ValueError(f"the vision encoder checkpoint {folder} does not match its config: {problems}")
    image_processor = load_image_processor(folder)
    check_image_processor(image_processor, vision_config, folder)
    return vision_config, tower, image_processor


def load_image_processor(folder: Path):
    from transformers import AutoImageProcessor

    from ..processing.processing_vl_mamba import _load_image_processor

    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    except ImportError:  # transformers 5.17 without torchvision: build the saved class directly
        return _load_image_processor(str(folder))
    except Exception as error:
        raise ValueError(f"could not load the vision encoder's image processor from {folder}: {error}") from error


def check_image_processor(image_processor, vision_config, folder) -> None:
    """ValueError unless the image processor turns an arbitrary image into (channels, image_size, image_size)."""
    from PIL import Image

    size = vision_config.image_size
    pixels = image_processor(Image.new("RGB", (size + 13, size + 7), "white"), return_tensors="pt")["pixel_values"]
    expected = (1, vision_config.num_channels, size, size)
    if tuple(pixels.shape) != expected:
        raise ValueError(
            f"the image processor in {folder} produces pixel_values of shape {tuple(pixels.shape)} but the vision "
            f"encoder expects {expected}: the processor and the encoder do not belong together"
        )


# -------------------------------------------------------------------------------------------- language side
def detect_lm_format(folder: Path) -> str:
    """"transformers" (config.json of model_type mamba) or "mamba_ssm" (config.json with d_model and n_layer)."""
    config = read_json(folder / "config.json", "language model")
    if config.get("model_type") == "mamba":
        return "transformers"
    if "d_model" in config and "n_layer" in config:
        return "mamba_ssm"
    raise ValueError(
        f"{folder} is neither a transformers Mamba checkpoint (model_type 'mamba') nor a mamba-ssm one (d_model, "
        f"n_layer); its config.json has model_type {config.get('model_type')!r}"
    )


def load_language_model(folder: Path, lm_format: str = "auto"):
    """(MambaConfig, ``MambaCausalLM`` holding the checkpoint's weights) from either format."""
    from transformers import MambaConfig

    from ..modeling.modeling_mamba_lm import MambaCausalLM

    found = detect_lm_format(folder)
    if lm_format not in ("auto", found):
        raise ValueError(f"--lm-format {lm_format} was given but {folder} is in {found} format")
    if found == "mamba_ssm":
        config, state = load_mamba_ssm_checkpoint(folder)
    else:
        try:
            config = MambaConfig.from_pretrained(str(folder))
        except Exception as error:
            raise ValueError(f"could not read the language model's config in {folder}: {error}") from error
        state = normalize_mamba_state_dict(load_state_dict(folder, "language model"), config, str(folder))
    with torch.device("meta"):
        model = MambaCausalLM(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"the language model {folder} does not fit MambaCausalLM: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return config, model


def add_image_token(tokenizer, language_model, image_token: str, pad_to_multiple_of: int = 8) -> int:
    """Add ``image_token`` to ``tokenizer`` (a special token) and return its id; resize the LM's embedding (and an
    untied head) only when the id has no row, to ``len(tokenizer)`` rounded up to ``pad_to_multiple_of``, the new
    rows set to the mean of the old ones. ValueError when the tokenizer is larger than the embedding."""
    from tokenizers import AddedToken

    rows = language_model.backbone.embeddings.weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but the language model's embedding has "
            f"{rows} rows: the tokenizer does not belong to this language model"
        )
    existing = tokenizer.convert_tokens_to_ids(image_token)
    if existing is None or existing == tokenizer.unk_token_id:
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if len(tokenizer.encode(image_token, add_special_tokens=False)) != 1:
        raise ValueError(f"the tokenizer does not encode {image_token!r} as one token")
    if token_id >= rows:
        multiple = max(1, int(pad_to_multiple_of))
        new_rows = -(-len(tokenizer) // multiple) * multiple
        logger.info("no free embedding row for %s: resizing the embedding from %d to %d rows", image_token, rows,
                    new_rows)
        resize_embeddings(language_model, new_rows)
    return token_id


def _grow(weight: torch.Tensor, rows: int) -> nn.Parameter:
    grown = torch.empty(rows, weight.shape[1], dtype=weight.dtype)
    grown[: weight.shape[0]] = weight.detach()
    grown[weight.shape[0]:] = weight.detach().float().mean(0).to(weight.dtype)
    return nn.Parameter(grown)


def resize_embeddings(language_model, rows: int) -> None:
    """Grow the embedding (and the head) of a ``MambaCausalLM`` to ``rows`` rows; new rows = mean of the old."""
    config = language_model.config
    embeddings = language_model.backbone.embeddings
    embeddings.weight = _grow(embeddings.weight, rows)
    embeddings.num_embeddings = rows
    if config.tie_word_embeddings:
        language_model.lm_head.weight = embeddings.weight
    else:
        language_model.lm_head.weight = _grow(language_model.lm_head.weight, rows)
    language_model.lm_head.out_features = rows
    config.vocab_size = rows


def load_tokenizer(source, lm_folder: Path):
    from transformers import AutoTokenizer

    if source is None:
        has_own = any((lm_folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
        source = str(lm_folder) if has_own else DEFAULT_TOKENIZER
        if not has_own:
            logger.warning("%s has no tokenizer: using %s", lm_folder, DEFAULT_TOKENIZER)
    folder = resolve_source(source, "tokenizer", TOKENIZER_FILES)
    try:
        return str(source), AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    except Exception as error:
        raise ValueError(f"could not load a tokenizer from {source}: {error}") from error


# ---------------------------------------------------------------------------------------------------- builder
def build_vl_mamba(
    output_dir, *, vision_encoder: str = DEFAULT_VISION_ENCODER, language_model: str = DEFAULT_LANGUAGE_MODEL,
    tokenizer: Optional[str] = None, lm_format: str = "auto", projector_type: str = "vss_l2",
    scan_type: str = "bidirectional", vision_feature_layer=-2, vision_feature_select_strategy: str = "default",
    image_token: str = "<image>", chat_template: Optional[str] = None, dtype: str = "float32", seed: int = 0,
    pad_to_multiple_of: int = 8, max_shard_size="5GB", overwrite: bool = False, repo_id: Optional[str] = None,
    license: str = "apache-2.0", verify: bool = False, progress: bool = True,
) -> Path:
    """Assemble a VL-Mamba checkpoint into ``output_dir`` (see the module docstring); returns its path.

    ``dtype``: "auto" keeps each part's dtype, else all weights are cast (A_log and D stay float32).
    ``chat_template``: a Jinja template string or the path of a file holding one (default: the processor's
    USER/ASSISTANT template). ``seed`` seeds the connector's initialization. ``verify`` runs one forward pass through the saved
    processor and model before the output is published. ``repo_id`` is the id the model card's snippet loads.
    """
    from transformers.utils import logging as hf_logging

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    target_dtype = None if dtype == "auto" else DTYPES[dtype]
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return _build(output_dir, vision_encoder=vision_encoder, language_model=language_model,
                      tokenizer=tokenizer, lm_format=lm_format, projector_type=projector_type, scan_type=scan_type,
                      vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy=vision_feature_select_strategy, image_token=image_token,
                      chat_template=chat_template, target_dtype=target_dtype, seed=seed,
                      pad_to_multiple_of=pad_to_multiple_of, max_shard_size=max_shard_size, overwrite=overwrite,
                      repo_id=repo_id, license=license, verify=verify)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _build(output_dir, *, vision_encoder, language_model, tokenizer, lm_format, projector_type, scan_type,
           vision_feature_layer, vision_feature_select_strategy, image_token, chat_template, target_dtype, seed,
           pad_to_multiple_of, max_shard_size, overwrite, repo_id, license, verify) -> Path:
    from ..hub import is_hub_repo_id, render_model_card
    from ..modeling.configuration_vl_mamba import VLMambaConfig
    from ..modeling.modeling_vl_mamba import VLMambaForConditionalGeneration, VLMambaMultiModalProjector
    from ..processing.processing_vl_mamba import VLMambaProcessor

    with staged_output(output_dir, overwrite, sources=[vision_encoder, language_model, tokenizer]) as stage:
        encoder_folder = resolve_checkpoint_source(vision_encoder, "vision encoder")
        vision_config, tower, image_processor = load_vision_encoder(encoder_folder, target_dtype)
        lm_folder = resolve_checkpoint_source(language_model, "language model", TOKENIZER_FILES)
        text_config, lm = load_language_model(lm_folder, lm_format)
        tokenizer_source, tok = load_tokenizer(tokenizer, lm_folder)
        image_token_id = add_image_token(tok, lm, image_token, pad_to_multiple_of)
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; give it a pad token")
            tok.pad_token = tok.eos_token

        config = VLMambaConfig(
            vision_config=vision_config, text_config=text_config, projector_type=projector_type,
            scan_type=scan_type, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, image_token_id=image_token_id,
        )
        with torch.device("meta"):
            model = VLMambaForConditionalGeneration(config)
        model.model.vision_tower = tower
        model.model.language_model = lm
        torch.manual_seed(seed)
        projector = VLMambaMultiModalProjector(config)
        projector.apply(model._init_weights)
        model.model.multi_modal_projector = projector
        if target_dtype is not None:
            model.to(target_dtype)
        for name, parameter in model.named_parameters():
            if KEEP_FLOAT32.search(name):
                parameter.data = parameter.data.float()
        on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if on_meta:
            raise RuntimeError(f"tensors left uninitialized (a bug): {on_meta[:5]}")
        model.eval()
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        if tok.bos_token_id is not None:
            model.generation_config.bos_token_id = tok.bos_token_id

        template = chat_template
        if template is not None and "{{" not in template and "{%" not in template:  # a file, not a template
            if not Path(template).is_file():
                raise ValueError(f"the chat template file {template} does not exist")
            template = Path(template).read_text(encoding="utf-8")
        processor = VLMambaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                     image_token=image_token, num_image_tokens=config.image_seq_length)

        model.save_pretrained(str(stage), max_shard_size=max_shard_size)
        processor.save_pretrained(str(stage))
        sources = {"vision encoder": str(vision_encoder), "language model": str(language_model),
                   "tokenizer": tokenizer_source}
        card = render_model_card(
            model, repo_id=repo_id or str(output_dir), license=license, sources=sources,
            base_model=[s for s in (vision_encoder, language_model) if is_hub_repo_id(str(s))] or None,
            training={
                "summary": "Not trained yet. Assembled by multimodal_mamba.conversion.build_vl_mamba from the "
                           "pretrained vision encoder and language model listed under Sources, with a freshly "
                           f"initialized connector (seed {seed}): it answers with arbitrary text until trained.",
                "stages": ["Next: stage 1 (connector only, vision encoder and language model frozen).",
                           "Then: stage 2 (connector and language model, vision encoder frozen)."],
            },
        )
        card.save(stage / "README.md")
        if verify:
            verify_checkpoint(stage)
    return Path(output_dir)


def verify_checkpoint(folder: Path) -> None:
    """Load ``folder`` with the Auto classes and run the processor and one forward pass on a blank image."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    size = model.config.vision_config.image_size
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (size, size), "white")},
                                             {"type": "text", "text": "Describe the image."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    if not torch.isfinite(logits).all():
        raise ValueError(f"the built model in {folder} produces non-finite logits")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal-mamba-build-vl-mamba",
        description="Build a VL-Mamba checkpoint ready for stage-1 training: a vision encoder + a Mamba language "
                    "model (transformers or mamba-ssm format) + a freshly initialized connector + a processor "
                    "(the encoder's image processor, the LM's tokenizer with an <image> token, a chat template).",
    )
    parser.add_argument("output_dir", help="folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--vision-encoder", default=DEFAULT_VISION_ENCODER,
                        help=f"SigLIP or CLIP folder or Hub id (default: {DEFAULT_VISION_ENCODER})")
    parser.add_argument("--language-model", default=DEFAULT_LANGUAGE_MODEL,
                        help=f"Mamba LM folder or Hub id, transformers or mamba-ssm format "
                             f"(default: {DEFAULT_LANGUAGE_MODEL})")
    parser.add_argument("--lm-format", default="auto", choices=["auto", "transformers", "mamba_ssm"],
                        help="format of the language model (default: detected from its config.json)")
    parser.add_argument("--tokenizer", help=f"tokenizer folder or Hub id (default: the LM's, else {DEFAULT_TOKENIZER})")
    parser.add_argument("--projector-type", default="vss_l2", choices=["mlp", "vss_mlp", "vss_l2"],
                        help="MultiModal Connector (default: vss_l2, the paper's final model)")
    parser.add_argument("--scan-type", default="bidirectional", choices=["bidirectional", "cross"],
                        help="2D vision selective scan of the VSS connectors (default: bidirectional)")
    parser.add_argument("--vision-feature-layer", type=int, nargs="+", default=[-2],
                        help="vision hidden state(s) fed to the connector (default: -2)")
    parser.add_argument("--vision-feature-select-strategy", default="default", choices=["default", "full"])
    parser.add_argument("--image-token", default="<image>", help="the image placeholder token (default: <image>)")
    parser.add_argument("--chat-template", help="Jinja chat template file (default: USER:/ASSISTANT: turns)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=8,
                        help="round the vocabulary up to this when the embedding must grow (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the connector's initialization")
    parser.add_argument("--repo-id", help="Hub repo id the model card's usage snippet loads (default: output_dir)")
    parser.add_argument("--license", default="apache-2.0", help="license of the model card (default: apache-2.0)")
    parser.add_argument("--verify", action="store_true", help="run one forward pass before publishing the output")
    add_output_arguments(parser)
    parser.set_defaults(dtype="float32")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()

    def run(args):
        layer = args.vision_feature_layer[0] if len(args.vision_feature_layer) == 1 else args.vision_feature_layer
        out = build_vl_mamba(
            args.output_dir, vision_encoder=args.vision_encoder, language_model=args.language_model,
            tokenizer=args.tokenizer, lm_format=args.lm_format, projector_type=args.projector_type,
            scan_type=args.scan_type, vision_feature_layer=layer,
            vision_feature_select_strategy=args.vision_feature_select_strategy, image_token=args.image_token,
            chat_template=args.chat_template, dtype=args.dtype, seed=args.seed,
            pad_to_multiple_of=args.pad_to_multiple_of, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, repo_id=args.repo_id, license=args.license, verify=args.verify,
            progress=not args.quiet,
        )
        print(f"wrote {out}")

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
