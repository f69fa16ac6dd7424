"""VL-Mamba: vision tower -> MultiModal Connector (optionally a 2D Vision Selective Scan) -> Mamba LM.

Layout (as transformers' LLaVA): ``VLMambaForConditionalGeneration.model`` is a ``VLMambaModel`` holding
``vision_tower`` (``AutoModel.from_config(vision_config)``), ``multi_modal_projector`` and ``language_model``
(a ``MambaCausalLM`` with transformers' ``MambaForCausalLM`` parameter names, ``backbone.*`` and ``lm_head``).
The prompt holds one ``<image>`` token per connector output; their embeddings are replaced, in order, by the
projected image features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from transformers import AutoModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_vl_mamba import VLMambaConfig
from .modeling_mamba_lm import (
    KEEP_IN_FP32,
    MambaCausalLM,
    MambaGenerationMixin,
    MambaMixer,
    MambaStateCache,
    init_mamba_module_weights,
)
from .ssm_backends import config_backend
from .peft_adapters import AdapterLoadingMixin


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """dtype of a module's first floating weight. Unlike ``PreTrainedModel.dtype`` this also works on the
    replicas ``nn.DataParallel`` makes, which hold their weights as plain tensors, not parameters."""
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
    return torch.get_default_dtype()


def vision_scan_orders(scan_type: str, rows: int, cols: int, device=None) -> torch.LongTensor:
    """The K orderings of a (rows x cols) patch grid that the VSS scans, as (K, rows * cols) patch indices.

    "bidirectional" (K=2): row-major, and its reverse. "cross" (K=4): row-major, column-major, and both
    reversed (VMamba's cross scan).
    """
    row_major = torch.arange(rows * cols, device=device)
    if scan_type == "bidirectional":
        return torch.stack([row_major, row_major.flip(0)])
    if scan_type == "cross":
        column_major = row_major.view(rows, cols).t().reshape(-1)
        return torch.stack([row_major, column_major, row_major.flip(0), column_major.flip(0)])
    raise ValueError(f"unknown scan_type {scan_type!r}")


class VisionSelectiveScan(nn.Module):
    """The VSS module: one Mamba mixer run over K scan orderings of the patch grid as one grouped scan.

    Each ordering is scanned as its own sequence, put back in patch order, and the K results are summed.
    Input and output (num_images, rows * cols, width).
    """

    def __init__(self, width: int, config: VLMambaConfig):
        super().__init__()
        self.scan_type = config.scan_type
        self.mixer = MambaMixer(
            width, state_size=config.vss_state_size, expand=config.vss_expand, conv_kernel=config.vss_conv_kernel,
            time_step_rank=config.vss_time_step_rank,
        )
        self._orders = {}

    def forward(self, features: torch.Tensor, grid: tuple) -> torch.Tensor:
        rows, cols = grid
        key = (rows, cols, features.device)
        if key not in self._orders:
            self._orders[key] = vision_scan_orders(self.scan_type, rows, cols, features.device)
        return self.mixer(features, scan_orders=self._orders[key])


class VLMambaMultiModalProjector(nn.Module):
    """The MultiModal Connector: (num_images, P, vision_dim) -> (num_images, P, text_hidden)."""

    def __init__(self, config: VLMambaConfig):
        super().__init__()
        self.projector_type = config.projector_type
        vision_dim = config.vision_config.hidden_size * len(config.vision_feature_layers)
        text_dim = config.text_config.hidden_size
        self.act = ACT2FN[config.projector_hidden_act]
        if config.projector_type == "mlp":
            self.linear_1 = nn.Linear(vision_dim, text_dim)
            self.linear_2 = nn.Linear(text_dim, text_dim)
        elif config.projector_type == "vss_mlp":
            # V_out = MLP(Norm(VSS(V) + V)): the scan runs at the vision width.
            self.vss = VisionSelectiveScan(vision_dim, config)
            self.norm = nn.LayerNorm(vision_dim)
            self.linear_1 = nn.Linear(vision_dim, text_dim)
            self.linear_2 = nn.Linear(text_dim, text_dim)
        else:  # "vss_l2"
            # V' = Linear(V); V_out = Linear(Norm(VSS(GELU(V')) + V')): the scan runs at the LM width.
            self.linear_1 = nn.Linear(vision_dim, text_dim)
            self.vss = VisionSelectiveScan(text_dim, config)
            self.norm = nn.LayerNorm(text_dim)
            self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features: torch.Tensor, grid: tuple) -> torch.Tensor:
        if self.projector_type == "mlp":
            return self.linear_2(self.act(self.linear_1(features)))
        if self.projector_type == "vss_mlp":
            scanned = self.vss(features, grid)
            return self.linear_2(self.act(self.linear_1(self.norm(scanned + features))))
        projected = self.linear_1(features)
        scanned = self.vss(self.act(projected), grid)
        return self.linear_2(self.norm(scanned + projected))


class VLMambaPreTrainedModel(AdapterLoadingMixin, PreTrainedModel):
    config_class = VLMambaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _is_stateful = True
    _no_split_modules = ["MambaBlock"]
    _skip_keys_device_placement = ["cache_params"]
    _keep_in_fp32_modules_strict = KEEP_IN_FP32
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_mamba_module_weights(module, self.config.text_config)


@dataclass
class VLMambaModelOutput(ModelOutput):
    """last_hidden_state (batch, L, text_hidden); cache_params after this call; image_hidden_states
    (num_images, image_seq_length, text_hidden): the projected image features, when images were given."""

    last_hidden_state: Optional[torch.FloatTensor] = None
    cache_params: Optional[MambaStateCache] = None
    hidden_states: Optional[tuple] = None
    image_hidden_states: Optional[torch.FloatTensor] = None


@dataclass
class VLMambaCausalLMOutput(ModelOutput):
    """logits (batch, L, vocab) float32; loss when labels are given; cache_params; image_hidden_states."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache_params: Optional[MambaStateCache] = None
    hidden_states: Optional[tuple] = None
    image_hidden_states: Optional[torch.FloatTensor] = None


class VLMambaModel(VLMambaPreTrainedModel):
    """Vision tower + MultiModal Connector + Mamba LM, returning the LM's last hidden states."""

    _tied_weights_keys = {"language_model.lm_head.weight": "language_model.backbone.embeddings.weight"}

    def __init__(self, config: VLMambaConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = VLMambaMultiModalProjector(config)
        self.language_model = MambaCausalLM(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be (num_images, {expected[0]}, {expected[1]}, {expected[2]}) for this vision "
                f"tower ({expected[0]} channels, {expected[1]}x{expected[2]} pixels), got {tuple(pixel_values.shape)}"
            )

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None):
        """pixel_values (num_images, channels, H, W) -> (num_images, image_seq_length, text_hidden)."""
        self._check_pixel_values(pixel_values)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        self.config.validate_vision_feature_layer(layer)
        layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        outputs = self.vision_tower(pixel_values.to(_weight_dtype(self.vision_tower)), output_hidden_states=True)
        features = torch.cat([outputs.hidden_states[i] for i in layers], dim=-1)
        if strategy == "default" and self.config.vision_tower_has_cls_token:
            features = features[:, 1:]
        return self.multi_modal_projector(features, self.config.patch_grid)

    def _merge_image_features(self, input_ids, inputs_embeds, image_features):
        image_token_id = self.config.image_token_id
        if image_token_id is None:
            raise ValueError("images were given but config.image_token_id is not set")
        if input_ids is None:
            raise ValueError("pixel_values need input_ids with <image> placeholder tokens (not inputs_embeds alone)")
        mask = input_ids == image_token_id
        num_images, tokens_per_image = image_features.shape[:2]
        found = int(mask.sum())
        if found == 0:
            raise ValueError(
                f"{num_images} image(s) were given but the input has no <image> token (id {image_token_id}); "
                "add one <image> per image to the prompt (the processor expands it)"
            )
        if found != num_images * tokens_per_image:
            raise ValueError(
                f"the input has {found} <image> tokens but {num_images} image(s) x {tokens_per_image} tokens per "
                f"image = {num_images * tokens_per_image} were expected: the number of <image> placeholders must "
                "match the number of images (use the processor to expand them)"
            )
        return inputs_embeds.masked_scatter(mask[..., None], image_features.to(inputs_embeds.dtype))

    def embed_inputs(self, input_ids=None, pixel_values=None, inputs_embeds=None, **feature_kwargs):
        """Token embeddings with the projected image features in place of the ``<image>`` tokens.

        Returns (inputs_embeds (batch, L, text_hidden), image_features or None).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, **feature_kwargs)
            inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, image_features)
        elif input_ids is not None and self.config.image_token_id is not None:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ValueError("the input has <image> tokens but no pixel_values were given")
        return inputs_embeds, image_features

    def forward(
        self, input_ids=None, pixel_values=None, attention_mask=None, inputs_embeds=None, cache_params=None,
        use_cache=None, output_hidden_states=None, return_dict=None, vision_feature_layer=None,
        vision_feature_select_strategy=None, **kwargs,
    ):
        """input_ids (batch, L) with expanded ``<image>`` tokens; pixel_values (num_images, C, H, W), images in
        prompt order; attention_mask (batch, L), 0 on (left) padding. Returns ``VLMambaModelOutput``."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        with config_backend(self.config):
            inputs_embeds, image_features = self.embed_inputs(
                input_ids, pixel_values, inputs_embeds, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
            )
            outputs = self.language_model.backbone(
                inputs_embeds=inputs_embeds, cache_params=cache_params, use_cache=use_cache,
                output_hidden_states=output_hidden_states, return_dict=True, attention_mask=attention_mask,
            )
        result = VLMambaModelOutput(
            last_hidden_state=outputs.last_hidden_state, cache_params=outputs.cache_params,
            hidden_states=outputs.hidden_states, image_hidden_states=image_features,
        )
        return result if return_dict else result.to_tuple()


class VLMambaForConditionalGeneration(VLMambaPreTrainedModel, MambaGenerationMixin):
    """VL-Mamba with its LM head: ``generate()``, ``pipeline("image-text-to-text")``, training with labels."""

    _tied_weights_keys = {"model.language_model.lm_head.weight": "model.language_model.backbone.embeddings.weight"}

    def __init__(self, config: VLMambaConfig):
        super().__init__(config)
        self.model = VLMambaModel(config)
        self.post_init()

    @property
    def language_model(self) -> MambaCausalLM:
        return self.model.language_model

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def multi_modal_projector(self):
        return self.model.multi_modal_projector

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.language_model.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.model.language_model.lm_head = new_embeddings

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None):
        return self.model.get_image_features(pixel_values, vision_feature_layer, vision_feature_select_strategy)

    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> MambaStateCache:
        return self.model.language_model.allocate_cache(batch_size, device=device, dtype=dtype)

    def _decode_language_model(self) -> MambaCausalLM:
        return self.model.language_model

    def forward(
        self, input_ids=None, pixel_values=None, attention_mask=None, inputs_embeds=None, cache_params=None,
        labels=None, use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
        vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs,
    ):
        """Returns ``VLMambaCausalLMOutput``. ``labels`` (batch, L): -100 is ignored, and so are the positions
        of ``<image>`` tokens whatever their label; the loss is next-token cross-entropy (shifted inside)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # A decode step (one text token, the image already in the state) replays the LM's CUDA graph.
        logits = self._graph_decode_step(cache_params, input_ids, inputs_embeds, labels=labels,
                                         pixel_values=pixel_values, output_hidden_states=output_hidden_states)
        if logits is not None:
            result = VLMambaCausalLMOutput(logits=logits, cache_params=cache_params)
            return result if return_dict else result.to_tuple()
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, cache_params=cache_params, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=True, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        lm_head = self.model.language_model.lm_head
        logits = lm_head(hidden_states.to(lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            if input_ids is not None and self.config.image_token_id is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        result = VLMambaCausalLMOutput(
            loss=loss, logits=logits, cache_params=outputs.cache_params, hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )
        return result if return_dict else result.to_tuple()
