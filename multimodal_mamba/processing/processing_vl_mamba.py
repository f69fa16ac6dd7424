"""VLMambaProcessor: image processor + tokenizer + chat template, expanding each ``<image>`` to its tokens."""

from __future__ import annotations

import json
import os
from typing import List, Optional, Union

import transformers
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

# USER/ASSISTANT turns; an image item renders as "<image>\n" where it stands in the message. Mamba base models
# have no chat format of their own; this one is LLaVA-1.5's (minus the system preamble), which the training
# collator renders the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'SYSTEM: ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _count_images(images) -> int:
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(_count_images(item) for item in images)
    if hasattr(images, "ndim") and images.ndim == 4:  # a batch array/tensor (num_images, C, H, W)
        return int(images.shape[0])
    return 1


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [leaf for item in images for leaf in _flatten_images(item)]
    if hasattr(images, "ndim") and images.ndim == 4:
        return list(images)
    return [images]


class VLMambaProcessor(ProcessorMixin):
    r"""Processor of VL-Mamba: an image processor (SigLIP's by default) and a tokenizer with an ``<image>`` token.

    Each ``<image>`` in the text becomes ``num_image_tokens`` copies of itself (one per connector output), so the
    model can put the image features in their place; images are matched to ``<image>`` placeholders in order,
    across the whole batch. Batches are padded on the tokenizer's ``padding_side`` (left, for generation).

    Args:
        image_processor: a transformers image processor.
        tokenizer: a tokenizer that has ``image_token`` as a special token.
        chat_template (`str`, *optional*): Jinja template; `DEFAULT_CHAT_TEMPLATE` if None.
        image_token (`str`, defaults to `"<image>"`).
        num_image_tokens (`int`): tokens per image (`VLMambaConfig.image_seq_length`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>",
                 num_image_tokens=None, **kwargs):
        if num_image_tokens is None or int(num_image_tokens) < 1:
            raise ValueError("VLMambaProcessor needs num_image_tokens (the model config's image_seq_length)")
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)
        ids = tokenizer.convert_tokens_to_ids(image_token)
        if ids is None or ids == tokenizer.unk_token_id or len(tokenizer.encode(image_token, add_special_tokens=False)) != 1:
            raise ValueError(f"the tokenizer has no single token for {image_token!r}: add it as a special token")
        self.image_token_id = ids

    def __call__(self, images=None, text=None, padding=False, truncation=None, max_length=None,
                 return_tensors=None, padding_side=None, **kwargs) -> BatchFeature:
        """Tokenize ``text`` (a string or a list) with each ``<image>`` expanded, and process ``images``.

        ``images``: one image, a list (matched to the ``<image>`` placeholders of the whole batch in order), or a
        list of lists (one list per text). Returns ``input_ids``, ``attention_mask`` and, with images,
        ``pixel_values`` (num_images, C, H, W).
        """
        if text is None:
            raise ValueError("VLMambaProcessor needs text (with one <image> placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        placeholders = sum(t.count(self.image_token) for t in texts)
        num_images = _count_images(images)
        if num_images and not placeholders:
            raise ValueError(
                f"{num_images} image(s) were given but the text has no {self.image_token} token: put one "
                f"{self.image_token} where each image goes (or use apply_chat_template with image items)"
            )
        if placeholders != num_images:
            raise ValueError(
                f"the text has {placeholders} {self.image_token} token(s) but {num_images} image(s) were given: "
                "they must match one to one"
            )
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        tokenizer_kwargs = {"padding": padding, "truncation": truncation, "max_length": max_length}
        if padding_side is not None:
            tokenizer_kwargs["padding_side"] = padding_side
        text_inputs = self.tokenizer(expanded, return_tensors=return_tensors, **tokenizer_kwargs)
        data = dict(text_inputs)
        if num_images:
            data["pixel_values"] = self.image_processor(
                _flatten_images(images), return_tensors=return_tensors, **self._image_kwargs(kwargs)
            )["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _image_kwargs(self, kwargs) -> dict:
        """The keyword arguments meant for the image processor (callers such as apply_chat_template pass others)."""
        valid = getattr(getattr(self.image_processor, "valid_kwargs", None), "__annotations__", {})
        return {k: v for k, v in kwargs.items() if v is not None and k in valid}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> List[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        try:
            return super()._get_arguments_from_pretrained(
                pretrained_model_name_or_path, processor_dict=processor_dict, **kwargs
            )
        except ImportError:
            # transformers 5.17's AutoImageProcessor refuses to load without torchvision although the PIL image
            # processors work: build the saved image processor class directly.
            return [_load_image_processor(pretrained_model_name_or_path, processor_dict, **kwargs),
                    AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)]


def _load_image_processor(folder: Union[str, os.PathLike], processor_dict: Optional[dict] = None, **kwargs):
    config = (processor_dict or {}).get("image_processor")
    if config is None:
        for name in ("processor_config.json", "preprocessor_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
                config = data.get("image_processor", data if "image_processor_type" in data else None)
                if config is not None:
                    break
    if config is None:
        raise ValueError(f"no image processor configuration found in {folder}")
    class_name = config.get("image_processor_type", "")
    image_processor_class = getattr(transformers, class_name, None) or getattr(
        transformers, class_name.replace("Fast", "") + "Pil", None
    )
    if image_processor_class is None:
        raise ValueError(f"unknown image processor class {class_name!r} in {folder}")
    return image_processor_class.from_dict(config)
