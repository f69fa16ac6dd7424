"""Configuration of VL-Mamba (Qiao et al., arXiv 2403.13600): a vision tower, a MultiModal Connector and a Mamba LM."""

from __future__ import annotations

from transformers import AutoConfig, MambaConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

PROJECTOR_TYPES = ("mlp", "vss_mlp", "vss_l2")
SCAN_TYPES = ("bidirectional", "cross")
SELECT_STRATEGIES = ("default", "full")
# Vision towers whose sequence starts with a CLS token ("default" selection drops it).
_TOWERS_WITH_CLS = ("clip_vision_model",)


def _default_vision_config():
    """SigLIP-SO400M-patch14-384, the paper's final vision encoder (729 patch tokens, no CLS)."""
    return CONFIG_MAPPING["siglip_vision_model"](
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14,
    )


def _default_text_config():
    """Mamba-2.8B-SlimPJ's shape (the paper's language model)."""
    return MambaConfig(vocab_size=50280, hidden_size=2560, num_hidden_layers=64, state_size=16, expand=2, conv_kernel=4)


def _as_config(value, default_factory, default_model_type):
    if value is None:
        return default_factory()
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_model_type)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown sub-config model_type {model_type!r}")
        return CONFIG_MAPPING[model_type](**value)
    if isinstance(value, PretrainedConfig):
        return value
    raise ValueError(f"expected a config or a dict, got {type(value).__name__}")


class VLMambaConfig(PretrainedConfig):
    r"""Configuration of a [`VLMambaForConditionalGeneration`].

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*): the vision tower (SigLIP by default; CLIP vision
            also works), built with `AutoModel.from_config`.
        text_config (`dict` or `MambaConfig`, *optional*): the Mamba language model (a plain transformers
            `MambaConfig`, so any Mamba checkpoint in transformers' format fits).
        projector_type (`str`, defaults to `"vss_l2"`): the MultiModal Connector. `"mlp"`: Linear-GELU-Linear.
            `"vss_mlp"`: V_out = MLP(Norm(VSS(V) + V)), the scan at the vision width. `"vss_l2"` (the paper's
            final model): V' = Linear(V); V_out = Linear(Norm(VSS(GELU(V')) + V')), the scan at the LM width.
        scan_type (`str`, defaults to `"bidirectional"`): the VSS 2D scan: `"bidirectional"` (forward and backward
            over the patch sequence, the paper's BSM) or `"cross"` (rows and columns, both ways, the paper's CSM).
        vss_state_size, vss_expand, vss_conv_kernel, vss_time_step_rank: the VSS Mamba mixer's hyperparameters.
        projector_hidden_act (`str`, defaults to `"gelu"`).
        vision_feature_layer (`int` or `list[int]`, defaults to -2): hidden state(s) of the vision tower fed to the
            connector (several are concatenated along the feature dim).
        vision_feature_select_strategy (`str`, defaults to `"default"`): `"default"` keeps the patch tokens (drops a
            CLS token where the tower has one), `"full"` keeps every token.
        image_token_id (`int`, *optional*): id of the `<image>` placeholder token in the tokenizer.
        ssm_backend (`str`, defaults to `"auto"`): force the state-space ops onto one backend ("torch",
            "reference", "triton", "mamba_ssm").
    """

    model_type = "vl_mamba"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}
    attribute_map = {"image_token_index": "image_token_id"}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projector_type: str = "vss_l2",
        scan_type: str = "bidirectional",
        vss_state_size: int = 16,
        vss_expand: int = 2,
        vss_conv_kernel: int = 4,
        vss_time_step_rank="auto",
        projector_hidden_act: str = "gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy: str = "default",
        image_token_id=None,
        ssm_backend: str = "auto",
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.vision_config = _as_config(vision_config, _default_vision_config, "siglip_vision_model")
        self.text_config = _as_config(text_config, _default_text_config, "mamba")
        if self.text_config.model_type != "mamba":
            raise ValueError(f"text_config must be a MambaConfig, got model_type {self.text_config.model_type!r}")
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector_type {projector_type!r}; expected one of {PROJECTOR_TYPES}")
        if scan_type not in SCAN_TYPES:
            raise ValueError(f"unknown scan_type {scan_type!r}; expected one of {SCAN_TYPES}")
        if vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"unknown vision_feature_select_strategy {vision_feature_select_strategy!r}; "
                f"expected one of {SELECT_STRATEGIES}"
            )
        self.projector_type = projector_type
        self.scan_type = scan_type
        self.vss_state_size = vss_state_size
        self.vss_expand = vss_expand
        self.vss_conv_kernel = vss_conv_kernel
        self.vss_time_step_rank = vss_time_step_rank
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_feature_layer = vision_feature_layer
        self.validate_vision_feature_layer(vision_feature_layer)
        if (
            projector_type != "mlp"
            and vision_feature_select_strategy == "full"
            and self.vision_tower_has_cls_token
        ):
            raise ValueError(
                "VSS projectors scan the 2D patch grid, which a CLS token does not belong to: use "
                "vision_feature_select_strategy='default' with this vision tower, or projector_type='mlp'"
            )
        self.image_token_id = image_token_id
        self.ssm_backend = ssm_backend
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)

    @property
    def vision_tower_has_cls_token(self) -> bool:
        return self.vision_config.model_type in _TOWERS_WITH_CLS

    @property
    def patch_grid(self) -> tuple:
        """(rows, cols) of the vision tower's patch grid."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side, side

    @property
    def image_seq_length(self) -> int:
        """Number of `<image>` tokens (connector outputs) per image."""
        rows, cols = self.patch_grid
        extra = 1 if (self.vision_tower_has_cls_token and self.vision_feature_select_strategy == "full") else 0
        return rows * cols + extra

    @property
    def vision_feature_layers(self) -> list:
        layer = self.vision_feature_layer
        return list(layer) if isinstance(layer, (list, tuple)) else [layer]

    def validate_vision_feature_layer(self, layer) -> None:
        """ValueError unless every index addresses one of the tower's hidden states (embeddings + layers)."""
        layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        count = self.vision_config.num_hidden_layers + 1
        if not layers:
            raise ValueError("vision_feature_layer must name at least one layer")
        for index in layers:
            if not isinstance(index, int) or isinstance(index, bool) or not -count <= index < count:
                raise ValueError(
                    f"vision_feature_layer {index!r} is out of range: the vision tower has {count} hidden states "
                    f"(embeddings + {count - 1} layers), valid indices are {-count}..{count - 1}"
                )

    def to_dict(self):
        output = super().to_dict()
        for key in ("vision_config", "text_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return output
