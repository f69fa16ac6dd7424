"""Tiny, randomly initialized VL-Mamba models, tokenizers and images, built locally (no hub access).

Used by the tests, the demo and the examples: a word-level tokenizer made with the `tokenizers` library, a
small SigLIP (or CLIP) vision tower, a small Mamba LM, and a processor tying them together.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import CLIPVisionConfig, MambaConfig, PreTrainedTokenizerFast, SiglipVisionConfig
from transformers import SiglipImageProcessor

from .modeling.configuration_vl_mamba import VLMambaConfig
from .modeling.modeling_vl_mamba import VLMambaForConditionalGeneration
from .processing.processing_vl_mamba import VLMambaProcessor

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<image>")
CHAT_WORDS = ("USER", "ASSISTANT", "SYSTEM", ":", "?", ".", ",")


def build_word_tokenizer(words: Iterable[str], padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` (plus the chat words) with <pad>, <eos>, <unk>, <image>."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in list(CHAT_WORDS) + [w for w in words]:
        if word not in vocab:
            vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<image>"], padding_side=padding_side,
    )
    return tokenizer


def tiny_vl_mamba_config(
    vocab_size: int = 64, projector_type: str = "vss_l2", scan_type: str = "bidirectional",
    vision: str = "siglip", image_size: int = 16, patch_size: int = 4, text_hidden: int = 32, text_layers: int = 2,
    vision_hidden: int = 16, vision_layers: int = 2, image_token_id: Optional[int] = 3, **kwargs,
) -> VLMambaConfig:
    """A VL-Mamba config of a few thousand parameters ((image_size / patch_size)^2 image tokens)."""
    vision_kwargs = dict(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size,
    )
    vision_config = SiglipVisionConfig(**vision_kwargs) if vision == "siglip" else CLIPVisionConfig(**vision_kwargs)
    text_config = MambaConfig(
        vocab_size=vocab_size, hidden_size=text_hidden, num_hidden_layers=text_layers, state_size=8,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    return VLMambaConfig(
        vision_config=vision_config, text_config=text_config, projector_type=projector_type, scan_type=scan_type,
        image_token_id=image_token_id, **kwargs,
    )


def build_processor(config: VLMambaConfig, tokenizer) -> VLMambaProcessor:
    """A processor matching ``config``: SigLIP-style image processing at the tower's resolution."""
    size = config.vision_config.image_size
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    return VLMambaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            num_image_tokens=config.image_seq_length)


def build_tiny_vl_mamba(words: Sequence[str] = (), seed: int = 0, **config_kwargs):
    """(model, processor): a random tiny VL-Mamba whose vocabulary covers ``words``."""
    import torch

    tokenizer = build_word_tokenizer(words)
    vocab_size = max(64, len(tokenizer))
    config = tiny_vl_mamba_config(
        vocab_size=vocab_size, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **config_kwargs
    )
    torch.manual_seed(seed)
    model = VLMambaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, build_processor(config, tokenizer)


def random_image(seed: int = 0, size: int = 24) -> Image.Image:
    """A small RGB noise image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def shape_image(shape: str, color: str, size: int = 32, position=(0.5, 0.5)) -> Image.Image:
    """A ``color`` ``shape`` ("square", "circle", "triangle") on a white background."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cx, cy = position[0] * size, position[1] * size
    r = size * 0.3
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image
