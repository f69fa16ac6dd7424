"""Configuration of Coupled Mamba (Li et al., NeurIPS 2024): multimodal fusion by coupled Mamba state chains."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# CMU-MOSEI features, as in the paper: BERT text 768, COVAREP audio 74, Facet vision 35.
DEFAULT_MODALITY_DIMS = {"text": 768, "audio": 74, "vision": 35}
COUPLING_MODES = ("mean", "sum", "none")
POOLING_MODES = ("mean", "max", "last")
FUSION_MODES = ("weighted", "mean", "concat")
REGRESSION_LOSSES = ("mse", "l1")


class CoupledMambaConfig(PretrainedConfig):
    r"""Configuration of [`CoupledMambaModel`] and [`CoupledMambaForSequenceClassification`].

    Defaults follow the paper (hidden 128, 3 layers, d_state 64, expand 2, conv 4, dt_rank = ceil(hidden / 8))
    and CMU-MOSEI's features (text 768, audio 74, vision 35).

    Args:
        modality_dims (`dict[str, int]`): the modalities, in order, with their input feature dims.
        modality_names (`list[str]`, optional): the order of the modalities (the saved config keeps it here,
            since JSON files sort dict keys); defaults to the order of ``modality_dims``.
        hidden_size (`int`): width of every modality's stream after its input projection (the paper's d_model).
        num_hidden_layers (`int`): layers; each holds one Coupled Mamba block per modality.
        state_size (`int`): N, the SSM state size (d_state).
        expand (`int`): intermediate size = expand * hidden_size.
        conv_kernel (`int`): width of the causal depthwise conv.
        time_step_rank (`int` or `"auto"`): rank of the dt projection; "auto" is ceil(hidden_size / 8) as the paper.
        coupling (`str`): "mean" (stable default: the coupled state is the mean of the chains' states), "sum" (the
            paper's Eq. 6; can overflow on long sequences) or "none" (independent chains: the ablation).
        pooling (`str`): "mean", "max" or "last" over each modality's valid (unmasked) steps.
        fusion (`str`): how the pooled modality vectors are combined: "weighted" (softmax-weighted sum with one
            learned weight per modality, as the authors' code), "mean", or "concat".
        projection_hidden_size (`int`, optional): hidden width of the per-modality input projection
            (Linear-LayerNorm-ReLU-Linear-LayerNorm, as the authors' code); default 2 * hidden_size.
        head_hidden_size (`int`, optional): hidden width of the task head; default hidden_size // 2.
        regression_loss (`str`): loss when the problem is a regression: "mse" (transformers' convention) or
            "l1" (the paper's).
        classifier_dropout (`float`): dropout before and inside the task head.
        projection_dropout (`float`): dropout inside the input projections.
        layer_norm_epsilon (`float`): epsilon of the LayerNorms.
        time_step_min, time_step_max, time_step_floor, time_step_scale, time_step_init_scheme: dt initialization
            of the Mamba mixers.
        ssm_bc_init_scale (`float`): multiplies the initial weights of the rows of each mixer's ``x_proj`` that
            produce B and C. 1.0 is Mamba's standard initialization, under which the SSM path (and with it the
            coupling between chains) starts about 1e-4 of the skip path; on small data, a larger value (e.g. 10,
            with time_step_min / max 0.1 / 1.0) lets cross-modal interactions be learned in hundreds rather than
            many thousands of steps (see ``benchmarks/results/coupled_synthetic.md``).
        use_bias, use_conv_bias (`bool`): biases of the mixers' projections / conv.
        initializer_range (`float`): std of the normal init of linear layers.
        ssm_backend (`str`): "auto", "triton", "mamba_ssm", "torch" or "reference": forces the scan backend.
        inference_cuda_graphs (`bool`): run no-grad forwards on CUDA without an attention mask as CUDA graphs, one
            captured per input shape and replayed (``forward_graphs.py``): removes the host's launch overhead
            (~250 launches per forward); costs a capture per new shape and keeps each graph's activations allocated.
        inference_chunk_size (`int`, optional): run forwards without gradients chunk by chunk of this many time
            steps through all layers, each layer carrying its conv and coupled states from one chunk to the next:
            the same outputs, with activation memory that grows with the chunk instead of with L (only the
            outputs stay L long). More, smaller kernels: slower where the GPU is not saturated. None (default):
            the whole sequence at once. Forwards with gradients always run whole.
        num_labels (`int`): 1 (default) gives regression; more gives classification (see ``problem_type``).
    """

    model_type = "coupled_mamba"

    def __init__(
        self,
        modality_dims=None,
        modality_names=None,
        hidden_size=128,
        num_hidden_layers=3,
        state_size=64,
        expand=2,
        conv_kernel=4,
        time_step_rank="auto",
        coupling="mean",
        pooling="mean",
        fusion="weighted",
        projection_hidden_size=None,
        head_hidden_size=None,
        regression_loss="mse",
        classifier_dropout=0.0,
        projection_dropout=0.0,
        layer_norm_epsilon=1e-5,
        time_step_min=0.001,
        time_step_max=0.1,
        time_step_floor=1e-4,
        time_step_scale=1.0,
        time_step_init_scheme="random",
        ssm_bc_init_scale=1.0,
        use_bias=False,
        use_conv_bias=True,
        initializer_range=0.02,
        ssm_backend="auto",
        inference_cuda_graphs=False,
        inference_chunk_size=None,
        **kwargs,
    ):
        modality_dims = dict(DEFAULT_MODALITY_DIMS if modality_dims is None else modality_dims)
        if not modality_dims:
            raise ValueError("CoupledMambaConfig: modality_dims must name at least one modality")
        if modality_names is not None:
            if sorted(modality_names) != sorted(modality_dims) or len(set(modality_names)) != len(modality_names):
                raise ValueError(
                    f"CoupledMambaConfig: modality_names {list(modality_names)} must list each key of modality_dims "
                    f"{list(modality_dims)} once"
                )
            modality_dims = {name: modality_dims[name] for name in modality_names}
        for name, dim in modality_dims.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"CoupledMambaConfig: modality names must be non-empty strings, got {name!r}")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"CoupledMambaConfig: modality {name!r} needs a positive integer dim, got {dim!r}")
        for field, value, allowed in (
            ("coupling", coupling, COUPLING_MODES),
            ("pooling", pooling, POOLING_MODES),
            ("fusion", fusion, FUSION_MODES),
            ("regression_loss", regression_loss, REGRESSION_LOSSES),
        ):
            if value not in allowed:
                raise ValueError(f"CoupledMambaConfig: {field} must be one of {allowed}, got {value!r}")
        self.modality_dims = modality_dims
        self.modality_names = list(modality_dims)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.state_size = state_size
        self.expand = expand
        self.intermediate_size = int(expand * hidden_size)
        self.conv_kernel = conv_kernel
        self.time_step_rank = math.ceil(hidden_size / 8) if time_step_rank == "auto" else int(time_step_rank)
        self.coupling = coupling
        self.pooling = pooling
        self.fusion = fusion
        self.projection_hidden_size = projection_hidden_size or 2 * hidden_size
        self.head_hidden_size = head_hidden_size or max(1, hidden_size // 2)
        self.regression_loss = regression_loss
        self.classifier_dropout = classifier_dropout
        self.projection_dropout = projection_dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.time_step_scale = time_step_scale
        self.time_step_init_scheme = time_step_init_scheme
        self.ssm_bc_init_scale = float(ssm_bc_init_scale)
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.initializer_range = initializer_range
        self.ssm_backend = ssm_backend
        self.inference_cuda_graphs = bool(inference_cuda_graphs)
        chunk = inference_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"CoupledMambaConfig: inference_chunk_size must be a positive integer or None, got {chunk!r}")
        self.inference_chunk_size = inference_chunk_size
        if "num_labels" not in kwargs and kwargs.get("id2label") is None:
            kwargs["num_labels"] = 1  # the paper's main task is sentiment regression
        super().__init__(**kwargs)

    def to_diff_dict(self):
        """As transformers', but always keeps the labels: transformers drops a 2-label ``id2label`` as its default,
        and this config's default is 1 label (regression), so a 2-label classifier would reload as a regressor."""
        output = super().to_diff_dict()
        if self.id2label is not None:
            output["id2label"] = {int(key): value for key, value in self.id2label.items()}
            label2id = self.label2id or {value: key for key, value in self.id2label.items()}
            output["label2id"] = {label: int(index) for label, index in label2id.items()}
        return output

    @property
    def num_modalities(self) -> int:
        return len(self.modality_names)
