"""Coupled Mamba (Li et al., NeurIPS 2024): M modality chains whose Mamba states are coupled at every step.

Architecture (the paper's Fig. 1 and Algorithm 1, with the coupled transition of its Eq. 6, which the authors'
released code does not implement):

- per modality m, an input projection (Linear-LayerNorm-ReLU-Linear-LayerNorm, as the authors' code) maps the
  features (batch, L, dim_m) to the common width (batch, L, hidden);
- ``num_hidden_layers`` layers; each holds one Coupled Mamba block per modality (LayerNorm + the shared
  ``MambaMixer``, with its own parameters). A layer runs every block's input stage (in_proj, causal conv,
  x_proj, dt_proj), then ONE coupled selective scan over the M chains (every chain's next state is computed
  from the sum, or mean, of all chains' previous states), then every block's gate and out_proj, plus the residual;
- a final LayerNorm per modality, pooling over each modality's valid steps ("mean", "max", "last"), fusion of the
  M pooled vectors ("weighted", "mean", "concat"), and for classification / regression a two-layer head
  (as the authors' RegressionHead).

With ``coupling="none"`` the same model runs M independent chains (one grouped selective scan): the ablation.
All modalities share one time axis L; bring unaligned sequences to one with ``CoupledMambaFeatureExtractor``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput

from .configuration_coupled_mamba import CoupledMambaConfig
from .peft_adapters import AdapterLoadingMixin
from .modeling_mamba_lm import KEEP_IN_FP32, MambaMixer, _package_kernels, init_mamba_module_weights
from .forward_graphs import ForwardGraphs, capture_branches, on_branch
from .ops_coupled_scan import coupled_selective_scan_chains
from .ops_selective_scan import selective_scan
from .ssm_backends import config_backend, forced_backend, training_forward


@dataclass
class CoupledMambaModelOutput(ModelOutput):
    """Outputs of ``CoupledMambaModel``.

    last_hidden_state: (batch, M, L, hidden), every modality's stream after the final norm.
    pooler_output: (batch, fused_size), the fused representation (fused_size = hidden, or M * hidden for "concat").
    modality_embeds: (batch, M, hidden), each modality pooled over its valid steps (zeros for an absent one).
    modality_mask: (batch, M) bool, whether each modality has at least one valid step.
    hidden_states: optional tuple of (batch, M, L, hidden), the input of every layer and the final output.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    pooler_output: Optional[torch.FloatTensor] = None
    modality_embeds: Optional[torch.FloatTensor] = None
    modality_mask: Optional[torch.BoolTensor] = None
    hidden_states: Optional[tuple] = None


class CoupledMambaLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and results up to float32 summation order) whose calls on CUDA without
    gradients run as this package's Triton kernel (kernels/layer_norm: several rows per program, strided inputs
    read in place; PyTorch's kernel took ~4x the memory time at a Coupled Mamba layer's widths). Every other call,
    and any call the kernel does not take, is ``F.layer_norm``."""

    def forward(self, x):
        if x.is_cuda and not torch.is_grad_enabled() and len(self.normalized_shape) == 1:
            kernels = _package_kernels()
            if kernels is not None:
                accepts, layer_norm = kernels["layer_norm"]
                if accepts(x, self.weight, self.bias):
                    return layer_norm(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class CoupledMambaInputProjection(nn.Module):
    """(batch, L, input_dim) -> (batch, L, hidden): Linear, LayerNorm, ReLU, Dropout, Linear, LayerNorm."""

    def __init__(self, input_dim: int, config: CoupledMambaConfig):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, config.projection_hidden_size)
        self.norm1 = CoupledMambaLayerNorm(config.projection_hidden_size, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.projection_dropout)
        self.fc2 = nn.Linear(config.projection_hidden_size, config.hidden_size)
        self.norm2 = CoupledMambaLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, features):
        hidden = self.dropout(F.relu(self.norm1(self.fc1(features))))
        return self.norm2(self.fc2(hidden))


def _gemm_rows(features: torch.Tensor) -> torch.Tensor:
    """(batch, T, dim) -> the (batch * T, dim) rows the input projection multiplies: a view where the memory allows,
    else a dense copy (a chunked forward's time slices). F.linear given the strided 3-D slice would copy it just the
    same and then add the bias in a pass of its own; on 2-D rows the bias is fused into the GEMM."""
    return features.reshape(-1, features.shape[-1])


class CoupledMambaBlock(nn.Module):
    """One modality's Coupled Mamba block: pre-norm and the shared ``MambaMixer`` (its scan runs in the layer)."""

    def __init__(self, config: CoupledMambaConfig, layer_idx: int):
        super().__init__()
        self.norm = CoupledMambaLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MambaMixer(
            config.hidden_size,
            state_size=config.state_size,
            expand=config.expand,
            conv_kernel=config.conv_kernel,
            time_step_rank=config.time_step_rank,
            use_bias=config.use_bias,
            use_conv_bias=config.use_conv_bias,
            time_step_min=config.time_step_min,
            time_step_max=config.time_step_max,
            time_step_floor=config.time_step_floor,
            time_step_scale=config.time_step_scale,
            time_step_init_scheme=config.time_step_init_scheme,
            layer_idx=layer_idx,
            intermediate_size=config.intermediate_size,
        )


class CoupledMambaLayerState:
    """What one layer carries from one time chunk to the next (``config.inference_chunk_size``).

    conv_states: per modality (batch, intermediate, conv_kernel), the last conv inputs (model dtype), read by the
    next chunk; conv_spares: as many buffers of that shape, which a chunk writes its own last inputs into before the
    two lists are swapped (no copy of the previous inputs per chunk); ssm_state: the scan's final state, float32:
    (batch, intermediate, N) coupled, (batch, M * intermediate, N) for ``coupling="none"``; None before the first
    chunk. scan_parameters: the layer's stacked (A, D) for its scan, computed at the first chunk (the parameters do
    not change during a forward).
    """

    def __init__(self, conv_buffers):
        """conv_buffers: (2, M, batch, intermediate, conv_kernel) zeros (a first chunk of one step updates its buffer
        in place as the conv's history: the decode path), the conv states and their spares."""
        self.conv_states = list(conv_buffers[0].unbind(0))
        self.conv_spares = list(conv_buffers[1].unbind(0))
        self.ssm_state = None
        self.scan_parameters = None

    @classmethod
    def for_layers(cls, layers, chains, batch, intermediate_size, conv_kernel, device, dtype):
        """One state per layer, their conv buffers zeroed in one allocation (one kernel, not 2 M per layer)."""
        buffers = torch.zeros(layers, 2, chains, batch, intermediate_size, conv_kernel, device=device, dtype=dtype)
        return [cls(buffers[index]) for index in range(layers)]

    @property
    def started(self) -> bool:
        return self.ssm_state is not None

    def swap_conv_states(self) -> None:
        """After a chunk: the inputs it wrote become the ones the next chunk reads."""
        self.conv_states, self.conv_spares = self.conv_spares, self.conv_states


class CoupledMambaLayer(GradientCheckpointingLayer):
    """One layer: a ``CoupledMambaBlock`` per modality, joined by one coupled selective scan.

    forward: hidden_states (batch, M, L, hidden), attention_mask (batch, M, L) or None -> (batch, M, L, hidden).
    state: a ``CoupledMambaLayerState``, for a forward in time chunks without gradients: read (the states after the
    previous chunk) and updated in place.
    """

    def __init__(self, config: CoupledMambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.coupling = config.coupling
        self.blocks = nn.ModuleDict({name: CoupledMambaBlock(config, layer_idx) for name in config.modality_names})

    def forward(self, hidden_states, attention_mask=None, state=None, scan_parameters=None):
        """scan_parameters: this layer's (A, D) as ``_scan_parameters`` returns them, when the caller computed them
        (the model does, for every layer at once, in inference); None: computed here."""
        if state is not None and torch.is_grad_enabled():
            raise ValueError("CoupledMambaLayer: a carried state (chunked inference) needs gradients disabled")
        if not self.training:
            return self._forward(hidden_states, attention_mask, state, scan_parameters)
        with training_forward():  # the same numbers with and without gradients (see MambaMixer.forward)
            return self._forward(hidden_states, attention_mask, state, scan_parameters)

    def _forward(self, hidden_states, attention_mask, state=None, scan_parameters=None):
        xs, zs, deltas, Bs, Cs = [], [], [], [], []
        initial_state = state.ssm_state if state is not None else None
        mixers = [block.mixer for block in self.blocks.values()]
        chains = len(mixers)
        # under a CUDA graph capture the modalities' input stages are captured on separate streams (concurrent at
        # replay); the scan, which needs all of them, runs after the join
        branches = capture_branches(hidden_states, chains)
        # without gradients the conv writes its output over in_proj's first half, which nothing else reads
        overwrite = not torch.is_grad_enabled()
        for index, block in enumerate(self.blocks.values()):
            with on_branch(branches, index):
                mask = attention_mask[:, index] if attention_mask is not None else None
                conv_state = conv_initial = None
                if state is not None:  # a continued sequence: the conv reads the previous chunk's last inputs, and
                    # writes this one's
                    conv_state = state.conv_spares[index]
                    conv_initial = state.conv_states[index][..., 1:] if state.started else None
                # (the normed input is not kept: it is dead once in_proj has read it)
                x, z = block.mixer.input_stage(block.norm(hidden_states[:, index]), mask, conv_state, conv_initial,
                                               overwrite_conv_input=overwrite)  # (batch, dim, L) each
                delta, B, C = block.mixer.ssm_parameters(x)  # (batch, dim, L), (batch, N, L), (batch, N, L)
            xs.append(x)
            zs.append(z)
            deltas.append(delta)
            Bs.append(B)
            Cs.append(C)
        del x, z, delta, B, C  # (the lists hold them: the output stage then frees them with the lists)
        if branches is not None:
            branches.join()
        if state is not None:
            state.swap_conv_states()
            if state.scan_parameters is None:
                state.scan_parameters = scan_parameters or self._scan_parameters(mixers)
            A, D = state.scan_parameters
        else:
            A, D = scan_parameters or self._scan_parameters(mixers)
        if self.coupling == "none":
            # Independent chains: one grouped selective scan, group m = modality m's channels with its B, C.
            u, delta, z = torch.cat(xs, dim=1), torch.cat(deltas, dim=1), torch.cat(zs, dim=1)
            B, C = torch.stack(Bs, dim=1), torch.stack(Cs, dim=1)
            del xs, zs, deltas, Bs, Cs  # the per-modality activations are no longer needed once stacked
            y = selective_scan(u, delta, A, B, C, D, z=z, delta_softplus=True, initial_state=initial_state,
                               return_final_state=state is not None)
            if state is not None:
                y, state.ssm_state = y
            y = y.unflatten(1, (chains, -1))
            del u, delta, z, B, C  # (batch, M, dim, L) each: free them before the output projections
            ys = list(y.unbind(1))
        else:
            # the chains as they are: the Triton kernel reads each modality's activations in place (no stacking
            # copies; y comes back in the activations' time-major layout); other backends stack them
            # on CUDA without gradients y is written over the conv outputs (the kernel reads each u before its y):
            # no memory for y
            in_place = xs[0].is_cuda and not torch.is_grad_enabled()
            y = coupled_selective_scan_chains(xs, deltas, A, Bs, Cs, D, zs=zs, delta_softplus=True,
                                              coupling=self.coupling, initial_state=initial_state,
                                              return_final_state=state is not None, outs=xs if in_place else None)
            if state is not None:
                y, state.ssm_state = y
            del xs, zs, deltas, Bs, Cs  # free the per-modality activations before the output projections
            ys = y if isinstance(y, list) else list(y.unbind(1))  # (batch, dim, L) per modality
        del y
        if not torch.is_grad_enabled():
            # (M, batch, L, hidden) memory: the next layer's per-modality slices are contiguous (no copies for its
            # norms), and the residual sums are written in place of a stacking copy
            out = hidden_states.new_empty((chains,) + hidden_states[:, 0].shape)
            branches = capture_branches(hidden_states, chains)
            for index, mixer in enumerate(mixers):
                with on_branch(branches, index):
                    torch.add(hidden_states[:, index], mixer.output_stage(ys[index].to(hidden_states.dtype)),
                              out=out[index])
            if branches is not None:
                branches.join()  # (ys and the inputs stay referenced until here)
            return out.transpose(0, 1)
        outputs = [
            hidden_states[:, index] + mixer.output_stage(ys[index].to(hidden_states.dtype))
            for index, mixer in enumerate(mixers)
        ]
        return torch.stack(outputs, dim=0).transpose(0, 1)

    def _scan_parameters(self, mixers):
        """A and D of the modalities' mixers as the scan takes them: (M, dim, N) and (M, dim) for the coupled scan,
        (M * dim, N) and (M * dim,) for ``coupling="none"``'s grouped scan. (Not cached by parameter version:
        PyTorch's fused AdamW, the Trainer's default, updates parameters without bumping their version counters.)"""
        if self.coupling == "none":
            return torch.cat([m.ssm_A() for m in mixers], dim=0), torch.cat([m.D for m in mixers], dim=0)
        return _stacked_scan_parameters(mixers)


def _stacked_scan_parameters(mixers):
    """A (len(mixers), dim, N) float32 and D (len(mixers), dim) of the given mixers, stacked: the same values as
    stacking every ``ssm_A()``, in 3 kernels instead of 2 * len(mixers) + 1 (unless a mixer's A is overridden)."""
    if any(m.__dict__.get("_A_override") is not None for m in mixers):
        A = torch.stack([m.ssm_A() for m in mixers])
    else:
        A = -torch.exp(torch.stack([m.A_log for m in mixers]).float())
    return A, torch.stack([m.D for m in mixers])


class CoupledMambaStepPooling:
    """Pools each modality's final states over its valid steps (``config.pooling``), fed the states in time order, a
    chunk at a time (the chunked forward: no (batch, M, L, hidden) tensor is ever needed) or whole.

    mask: (batch, M, L) float, 1 on valid steps. ``add(part, start)`` takes part (batch, M, T, hidden) = the states
    of steps start .. start + T - 1; ``result()`` -> pooled (batch, M, hidden) in the states' dtype, zeros for absent
    modalities, and present (batch, M) bool. Mean pools sum each chunk in the states' dtype (one matmul per chunk,
    the weights cast once) and add the chunks' sums in float32 at the end.
    """

    def __init__(self, mode: str, mask: torch.Tensor):
        self.mode, self.mask = mode, mask
        self.present = mask.sum(-1) > 0  # (batch, M)
        self.pooled = None
        self.sums = []  # mean: each chunk's masked sum (batch, M, hidden)
        self.weights = None  # mean: (batch, M, 1, L) in the states' dtype, made at the first chunk
        if mode == "last":
            positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=mask.dtype)
            self.last = (mask * positions).argmax(dim=-1)  # (batch, M): the last valid step (0 when none)

    def add(self, part: torch.Tensor, start: int) -> None:
        steps = part.shape[2]
        if self.mode == "mean":
            if self.weights is None:
                self.weights = self.mask[..., None, :].to(part.dtype)
            # (batch, M, 1, T) @ (batch, M, T, hidden): the masked sum without a masked copy of the states
            self.sums.append(torch.matmul(self.weights[..., start:start + steps], part)[..., 0, :])
        elif self.mode == "max":
            lowest = torch.finfo(part.dtype).min
            best = part.masked_fill(self.mask[:, :, start:start + steps, None] == 0, lowest).amax(dim=2)
            self.pooled = best if self.pooled is None else torch.maximum(self.pooled, best)
        else:  # the last valid step, from the chunk that holds it
            offset = (self.last - start).clamp(0, steps - 1)
            picked = torch.gather(part, 2, offset[..., None, None].expand(-1, -1, 1, part.shape[-1])).squeeze(2)
            held = ((self.last >= start) & (self.last < start + steps))[..., None]
            self.pooled = torch.where(held, picked, picked if self.pooled is None else self.pooled)

    def result(self):
        pooled = self.pooled
        if self.mode == "mean":
            total = self.sums[0].float() if len(self.sums) == 1 else torch.stack(self.sums).float().sum(0)
            pooled = (total / self.mask.sum(-1, keepdim=True).clamp_min(1.0)).to(self.sums[0].dtype)
        return torch.where(self.present[..., None], pooled, torch.zeros_like(pooled)), self.present


class CoupledMambaPreTrainedModel(AdapterLoadingMixin, PreTrainedModel):
    config_class = CoupledMambaConfig
    base_model_prefix = "model"
    main_input_name = "input_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CoupledMambaLayer"]
    _keep_in_fp32_modules_strict = KEEP_IN_FP32

    def enable_input_require_grads(self):
        """Make the input projections' outputs require grad (transformers hooks the input embeddings, which this model
        has not). Without it, reentrant gradient checkpointing with frozen projections (e.g. LoRA on the mixers only)
        gives the checkpointed layers' adapters no gradient. PEFT and transformers' adapter integration call it; the
        model's forward does the same under gradient checkpointing."""

        def make_output_require_grad(module, inputs, output):
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hooks = [
            module.register_forward_hook(make_output_require_grad)
            for module in self.modules()
            if isinstance(module, CoupledMambaInputProjection)
        ]
        self._require_grads_hook = self._require_grads_hooks[0]

    @torch.no_grad()
    def _init_weights(self, module):
        """PyTorch's default init for the linear layers, as the authors' code (mamba-ssm modules and plain
        ``nn.Linear``s), not transformers' normal(0, 0.02), under which the SSM path starts about 1e-6 of the
        residual and its gradients fall below Adam's epsilon. Then the Mamba mixers' own init (dt, A, D, conv,
        out_proj), and ``config.ssm_bc_init_scale`` on the B / C rows of ``x_proj``."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features) if module.in_features > 0 else 0.0
                init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)
        init_mamba_module_weights(module, self.config)
        scale = getattr(self.config, "ssm_bc_init_scale", 1.0)
        if isinstance(module, MambaMixer) and scale != 1.0:
            weight = module.x_proj.weight.detach().clone()
            weight[module.time_step_rank :] *= scale
            init.copy_(module.x_proj.weight, weight)  # a no-op on weights loaded from a checkpoint
        if isinstance(module, CoupledMambaModel):
            init.zeros_(module.fusion_logits)  # equal modality weights at the start


def _describe(value):
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


class CoupledMambaModel(CoupledMambaPreTrainedModel):
    """The Coupled Mamba encoder: input projections, coupled layers, per-modality pooling and fusion.

    forward inputs:
        input_features: the modalities' features on one time axis, either packed as one tensor
            (batch, L, sum_m dim_m) with the modalities concatenated in ``config.modality_names`` order (what
            ``CoupledMambaFeatureExtractor`` returns), or per modality as a dict {name: (batch, L, dim_m)} or a
            list in config order; a modality that is None or missing from the dict is absent.
        attention_mask: 1 on valid steps, 0 on padding: (batch, M, L), (batch, L) shared by all modalities,
            or a dict / list of (batch, L) per modality. A modality whose mask is all zeros is absent.
    """

    def __init__(self, config: CoupledMambaConfig):
        super().__init__(config)
        self.projections = nn.ModuleDict(
            {name: CoupledMambaInputProjection(dim, config) for name, dim in config.modality_dims.items()}
        )
        self.layers = nn.ModuleList([CoupledMambaLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = nn.ModuleDict(
            {name: CoupledMambaLayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
             for name in config.modality_names}
        )
        self.fusion_logits = nn.Parameter(torch.zeros(config.num_modalities))
        self.gradient_checkpointing = False
        self._forward_graphs = ForwardGraphs()
        self.post_init()

    @property
    def fused_size(self) -> int:
        return self.config.hidden_size * (self.config.num_modalities if self.config.fusion == "concat" else 1)

    # ------------------------------------------------------------------------------------------------------------
    # Input checks: a ValueError naming the problem instead of a shape error deep inside.
    # ------------------------------------------------------------------------------------------------------------
    def _split_features(self, input_features):
        names = self.config.modality_names
        dims = self.config.modality_dims
        if input_features is None:
            raise ValueError("CoupledMambaModel: input_features is required")
        if isinstance(input_features, torch.Tensor):
            total = sum(dims.values())
            if input_features.dim() != 3 or input_features.shape[-1] != total:
                raise ValueError(
                    f"CoupledMambaModel: packed input_features must be (batch, L, {total}) = the modalities "
                    f"{dict(dims)} concatenated, got {_describe(input_features)}; pass a dict of per-modality "
                    f"tensors to use other layouts"
                )
            return list(torch.split(input_features, list(dims.values()), dim=-1))
        if isinstance(input_features, Mapping):
            unknown = [key for key in input_features if key not in dims]
            if unknown:
                raise ValueError(f"CoupledMambaModel: unknown modalities {unknown}; this model has {names}")
            return [input_features.get(name) for name in names]
        if isinstance(input_features, (list, tuple)):
            if len(input_features) != len(names):
                raise ValueError(
                    f"CoupledMambaModel: got {len(input_features)} modalities but this model has "
                    f"{len(names)} ({names})"
                )
            return list(input_features)
        raise ValueError(
            f"CoupledMambaModel: input_features must be a tensor, a dict or a list of tensors, got "
            f"{type(input_features).__name__}"
        )

    def _prepare_inputs(self, input_features, attention_mask):
        """-> features: list of M (batch, L, dim_m) tensors (zeros for absent ones), mask (batch, M, L) float."""
        names = self.config.modality_names
        dims = self.config.modality_dims
        features = self._split_features(input_features)
        present = [f for f in features if f is not None]
        if not present:
            raise ValueError(f"CoupledMambaModel: every modality is missing; give at least one of {names}")
        for name, feat in zip(names, features):
            if feat is None:
                continue
            if not isinstance(feat, torch.Tensor) or feat.dim() != 3:
                raise ValueError(f"CoupledMambaModel: features of {name!r} must be (batch, L, {dims[name]}), got {_describe(feat)}")
            if feat.shape[-1] != dims[name]:
                raise ValueError(
                    f"CoupledMambaModel: features of {name!r} have dim {feat.shape[-1]}, expected {dims[name]}"
                )
            if not feat.is_floating_point():
                raise ValueError(f"CoupledMambaModel: features of {name!r} must be floating point, got {feat.dtype}")
        batches = {name: f.shape[0] for name, f in zip(names, features) if f is not None}
        if len(set(batches.values())) > 1:
            raise ValueError(f"CoupledMambaModel: the modalities have different batch sizes {batches}")
        lengths = {name: f.shape[1] for name, f in zip(names, features) if f is not None}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"CoupledMambaModel: the modalities have different lengths {lengths}; the coupled scan needs one time "
                f"axis: align them with CoupledMambaFeatureExtractor (segment averaging or padding)"
            )
        self._check_finite(names, features)
        batch, length = present[0].shape[:2]
        dtype = self.projections[names[0]].fc1.weight.dtype
        device = present[0].device
        features = [
            f.to(dtype) if f is not None else torch.zeros(batch, length, dims[name], device=device, dtype=dtype)
            for name, f in zip(names, features)
        ]
        mask = self._prepare_mask(attention_mask, batch, length, device)
        absent = [f is None for f in self._split_features(input_features)]
        if any(absent):  # (decided on the host: no device round trip)
            mask = mask.masked_fill(torch.tensor(absent, device=device)[None, :, None], 0.0)
        return features, mask

    @staticmethod
    def _check_finite(names, features):
        """ValueError naming the first modality whose features hold NaN or inf. One device round trip for all
        modalities (not one each); skipped while a CUDA graph is being captured (no synchronization is allowed
        there)."""
        present = [f for f in features if f is not None]
        if not present or (present[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        CoupledMambaModel._raise_if_not_finite(names, features, CoupledMambaModel._finite_flags(features))

    @staticmethod
    def _finite_flags(features):
        """(number of given modalities,) bool on their device: whether each given modality's features are finite.
        From each tensor's min and max (NaN propagates, inf is an extreme): ``isfinite(f).all()`` made a bool copy of
        the features, the largest temporary of a chunked forward at long lengths."""
        flags = []
        for f in features:
            if f is None:
                continue
            if f.numel() == 0:
                flags.append(torch.ones((), dtype=torch.bool, device=f.device))
                continue
            low, high = torch.aminmax(f)
            flags.append(torch.isfinite(low) & torch.isfinite(high))
        return torch.stack(flags)

    @staticmethod
    def _raise_if_not_finite(names, features, flags):
        """ValueError naming the first given modality whose ``_finite_flags`` entry is False (reads the flags)."""
        given = [name for name, f in zip(names, features) if f is not None]
        for name, ok in zip(given, flags.tolist()):
            if not ok:
                raise ValueError(f"CoupledMambaModel: features of {name!r} contain NaN or inf")

    def _prepare_mask(self, attention_mask, batch, length, device):
        names = self.config.modality_names
        chains = len(names)
        expected = f"(batch, M, L) = {(batch, chains, length)} or (batch, L) = {(batch, length)}"
        if attention_mask is None:
            return torch.ones(batch, chains, length, device=device)
        if isinstance(attention_mask, Mapping):
            unknown = [key for key in attention_mask if key not in names]
            if unknown:
                raise ValueError(f"CoupledMambaModel: attention_mask has unknown modalities {unknown}; this model has {names}")
            attention_mask = [attention_mask.get(name) for name in names]
        if isinstance(attention_mask, (list, tuple)):
            if len(attention_mask) != chains:
                raise ValueError(
                    f"CoupledMambaModel: attention_mask lists {len(attention_mask)} modalities, expected {chains}"
                )
            rows = []
            for name, m in zip(names, attention_mask):
                if m is None:
                    rows.append(torch.ones(batch, length, device=device))
                    continue
                if not isinstance(m, torch.Tensor) or tuple(m.shape) != (batch, length):
                    raise ValueError(
                        f"CoupledMambaModel: attention_mask of {name!r} must be (batch, L) = {(batch, length)}, got "
                        f"{_describe(m)}"
                    )
                rows.append(m.to(device=device, dtype=torch.float32))
            return torch.stack(rows, dim=1)
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"CoupledMambaModel: attention_mask must be a tensor, dict or list, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) == (batch, length):
            attention_mask = attention_mask[:, None, :].expand(batch, chains, length)
        elif tuple(attention_mask.shape) != (batch, chains, length):
            raise ValueError(f"CoupledMambaModel: attention_mask must be {expected}, got shape {tuple(attention_mask.shape)}")
        if attention_mask.dtype.is_floating_point and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("CoupledMambaModel: attention_mask must hold 0 (padding) and 1 (valid) only")
        return attention_mask.to(device=device, dtype=torch.float32)

    def _layer_mask(self, attention_mask, input_features, mask):
        """The mask the layers apply: None when every step of every modality is valid. Without an attention mask and
        with every modality given that is known on the host; otherwise it is read from the mask (one device round
        trip), except while a CUDA graph is being captured, where the mask is applied as it is (same result)."""
        if attention_mask is None and all(f is not None for f in self._split_features(input_features)):
            return None
        if mask.is_cuda and torch.cuda.is_current_stream_capturing():
            return mask
        return None if bool(mask.all()) else mask

    # ------------------------------------------------------------------------------------------------------------
    def _fuse(self, pooled, present):
        """pooled (batch, M, hidden), present (batch, M) -> (batch, fused_size); absent modalities are left out."""
        fusion = self.config.fusion
        if fusion == "concat":
            return pooled.flatten(1)
        if fusion == "mean":
            weights = present.to(pooled.dtype)
        else:  # softmax over the learned logits, renormalized over the modalities present
            weights = torch.softmax(self.fusion_logits.float(), dim=0)[None, :] * present.float()
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        return (pooled * weights[..., None].to(pooled.dtype)).sum(1)

    def forward(
        self, input_features=None, attention_mask=None, output_hidden_states=None, return_dict=None,
        return_last_hidden_state=None, **kwargs,
    ):
        """See the class docstring for the inputs. Returns ``CoupledMambaModelOutput``.

        return_last_hidden_state (default True): False leaves ``last_hidden_state`` out of the output (None) for
        callers that need only the pooled / fused vectors, as the classification model: with
        ``config.inference_chunk_size`` the (batch, M, L, hidden) final states are then never materialized (the
        pooling takes them chunk by chunk), and a CUDA-graphed forward neither keeps nor copies them out.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        keep_last = True if return_last_hidden_state is None else bool(return_last_hidden_state)
        if getattr(self.config, "inference_cuda_graphs", False) and attention_mask is None and not self.training:
            graphed = self._graphed_forward(input_features, output_hidden_states, return_dict, keep_last)
            if graphed is not None:
                return graphed
        return self._eager_forward(input_features, attention_mask, output_hidden_states, return_dict, keep_last)

    def _graphed_forward(self, input_features, output_hidden_states, return_dict, keep_last=True):
        """The forward as a replayed CUDA graph (``config.inference_cuda_graphs``), or None where it does not apply:
        gradients enabled, features not all CUDA tensors, or a failed capture. The features' values are checked
        (NaN / inf) as the eager forward does, but inside the graph: its flags are read after the replay, so the
        check costs no synchronization before the kernels start (the first call of a shape, which captures, checks
        eagerly)."""
        names = self.config.modality_names
        if isinstance(input_features, torch.Tensor):
            tensors, layout = [input_features], None
        elif isinstance(input_features, Mapping) and all(isinstance(v, torch.Tensor) for v in input_features.values()):
            layout = tuple(name for name in names if name in input_features)
            if len(layout) != len(input_features):
                return None  # unknown names: the eager forward raises the ValueError
            tensors = [input_features[name] for name in layout]
        else:
            return None
        if not tensors or not all(t.is_cuda for t in tensors) or torch.is_grad_enabled():
            return None

        def forward(*static):
            feats = static[0] if layout is None else dict(zip(layout, static))
            output = self._eager_forward(feats, None, output_hidden_states, return_dict, keep_last)
            return output, self._finite_flags(self._split_features(feats))

        # what else decides the captured kernels: a backend forced by context manager or by the config field, the
        # chunk size
        extra = (layout, bool(output_hidden_states), bool(return_dict), keep_last, forced_backend(),
                 getattr(self.config, "ssm_backend", None), self.config.inference_chunk_size)
        # the parameters' storage (a module walk: about half the host time of self.parameters())
        storage = [p for module in self.modules() for p in module._parameters.values() if p is not None]
        result = self._forward_graphs.run(forward, tensors, storage, extra)
        if result is None:
            return None
        output, finite = result
        self._raise_if_not_finite(names, self._split_features(input_features), finite)
        return output

    def _eager_forward(self, input_features, attention_mask, output_hidden_states, return_dict, keep_last=True):
        features, mask = self._prepare_inputs(input_features, attention_mask)
        layer_mask = self._layer_mask(attention_mask, input_features, mask)
        pooling = CoupledMambaStepPooling(self.config.pooling, mask)
        chunk = self.config.inference_chunk_size
        if chunk is not None and features[0].shape[1] > chunk and not torch.is_grad_enabled():
            hidden_states, all_hidden_states = self._layers_in_chunks(
                features, layer_mask, chunk, output_hidden_states, pooling, keep_last or output_hidden_states
            )
        else:
            hidden_states, all_hidden_states = self._layers_whole(features, layer_mask, output_hidden_states)
            pooling.add(hidden_states, 0)
        pooled, present = pooling.result()
        fused = self._fuse(pooled, present)
        if not keep_last:
            hidden_states = None
        if not return_dict:
            return tuple(v for v in (hidden_states, fused, pooled, present, all_hidden_states) if v is not None)
        return CoupledMambaModelOutput(
            last_hidden_state=hidden_states, pooler_output=fused, modality_embeds=pooled, modality_mask=present,
            hidden_states=all_hidden_states,
        )

    def _per_modality(self, modules, inputs, modality_major=False, prepare=None):
        """modules[name](prepare(inputs[i])) for each modality (``prepare``: none when None), stacked: (batch, M,
        ...); with ``modality_major`` a view of (M, batch, ...) memory, whose per-modality slices are contiguous. Under
        a CUDA graph capture each modality's call is captured on its own stream (``capture_branches``), so the replay
        runs them concurrently."""
        names = self.config.modality_names
        branches = capture_branches(inputs[0], len(names))
        outputs = []
        for index, name in enumerate(names):
            with on_branch(branches, index):
                value = inputs[index] if prepare is None else prepare(inputs[index])
                outputs.append(modules[name](value))
        if branches is not None:
            branches.join()
        if modality_major:
            return torch.stack(outputs, dim=0).transpose(0, 1)
        return torch.stack(outputs, dim=1)

    def _project(self, features):
        """M (batch, L, dim_m) features -> (batch, M, L, hidden) through the input projections, a view of (M, batch,
        L, hidden) memory as every layer's output: the first layer reads each modality's states densely."""
        batch, length = features[0].shape[:2]
        # (batch * L, M, hidden) rows of (M, batch * L, hidden) memory -> (batch, M, L, hidden)
        projected = self._per_modality(self.projections, features, modality_major=True, prepare=_gemm_rows)
        return projected.unflatten(0, (batch, length)).transpose(1, 2)

    def _final_norm(self, hidden_states):
        """(batch, M, L, hidden) -> the same after each modality's final LayerNorm."""
        return self._per_modality(self.norm_f, hidden_states.unbind(1))

    def _inference_scan_parameters(self):
        """Every layer's (A, D) for its coupled scan, computed at once (one stack for all layers instead of one per
        layer), for a forward without gradients; None (each layer computes its own) with gradients and for
        ``coupling="none"``."""
        if torch.is_grad_enabled() or self.config.coupling == "none" or not len(self.layers):
            return None
        mixers = [block.mixer for layer in self.layers for block in layer.blocks.values()]
        A, D = _stacked_scan_parameters(mixers)
        shape = (len(self.layers), len(self.config.modality_names))
        A, D = A.unflatten(0, shape), D.unflatten(0, shape)
        return [(A[index], D[index]) for index in range(len(self.layers))]

    def _layers_whole(self, features, layer_mask, output_hidden_states):
        """features: M (batch, L, dim_m) -> the final (normed) hidden states (batch, M, L, hidden) and, when asked,
        every layer's input plus the final states."""
        hidden_states = self._project(features)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not hidden_states.requires_grad:
            # Reentrant checkpointing passes gradients only to layers whose input requires grad (frozen projections,
            # e.g. LoRA on the mixers only, would leave every checkpointed adapter without a gradient).
            hidden_states.requires_grad_(True)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        parameters = self._inference_scan_parameters() or [None] * len(self.layers)
        with config_backend(self.config):
            for layer, scan_parameters in zip(self.layers, parameters):
                if scan_parameters is None:  # (a training forward: its layers' calls stay as they were)
                    hidden_states = layer(hidden_states, layer_mask)
                else:
                    hidden_states = layer(hidden_states, layer_mask, scan_parameters=scan_parameters)
                if output_hidden_states:
                    all_hidden_states = all_hidden_states + (hidden_states,)
        hidden_states = self._final_norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        return hidden_states, all_hidden_states

    def _layers_in_chunks(self, features, layer_mask, chunk, output_hidden_states, pooling, keep_last):
        """``_layers_whole`` without gradients, ``chunk`` time steps at a time through every layer (each layer carries
        its conv and scan states in a ``CoupledMambaLayerState``), each chunk's final states handed to ``pooling``:
        only the outputs are L long, and the final states (batch, M, L, hidden) only when ``keep_last`` (else the
        first return value is None)."""
        names = self.config.modality_names
        batch, length = features[0].shape[:2]
        dtype = self.projections[names[0]].fc2.weight.dtype
        device = features[0].device
        shape = (batch, len(names), length, self.config.hidden_size)
        last_hidden = torch.empty(shape, device=device, dtype=dtype) if keep_last else None
        # every layer's input (embeddings first) when asked for: those are L long by request
        levels = [torch.empty(shape, device=device, dtype=dtype) for _ in self.layers] if output_hidden_states else []
        states = CoupledMambaLayerState.for_layers(len(self.layers), len(names), batch, self.config.intermediate_size,
                                                   self.config.conv_kernel, device, dtype)
        for state, scan_parameters in zip(states, self._inference_scan_parameters() or []):
            state.scan_parameters = scan_parameters
        with config_backend(self.config):
            for start in range(0, length, chunk):
                end = min(start + chunk, length)
                hidden_states = self._project([feat[:, start:end] for feat in features])
                mask = layer_mask[..., start:end] if layer_mask is not None else None
                for index, (layer, state) in enumerate(zip(self.layers, states)):
                    if levels:
                        levels[index][:, :, start:end] = hidden_states
                    hidden_states = layer(hidden_states, mask, state=state)
                final = self._final_norm(hidden_states)
                del hidden_states  # (the next chunk's layers run without this chunk's states)
                pooling.add(final, start)
                if last_hidden is not None:
                    last_hidden[:, :, start:end] = final
                del final
        return last_hidden, (tuple(levels) + (last_hidden,) if output_hidden_states else None)


class CoupledMambaClassificationHead(nn.Module):
    """(batch, fused_size) -> (batch, num_labels): Dropout, Linear, ReLU, Dropout, Linear (the authors' head)."""

    def __init__(self, input_size: int, config: CoupledMambaConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.dense = nn.Linear(input_size, config.head_hidden_size)
        self.out_proj = nn.Linear(config.head_hidden_size, config.num_labels)

    def forward(self, pooled):
        hidden = self.dropout(F.relu(self.dense(self.dropout(pooled))))
        return self.out_proj(hidden)


class CoupledMambaForSequenceClassification(CoupledMambaPreTrainedModel):
    """Coupled Mamba with a task head: regression when ``num_labels == 1`` (MSE, or the paper's L1 with
    ``config.regression_loss="l1"``), single- or multi-label classification otherwise, following transformers'
    ``problem_type`` conventions.

    forward: the inputs of ``CoupledMambaModel`` and labels: (batch,) floats for regression, (batch,) class ids
    for single-label classification, (batch, num_labels) 0/1 for multi-label. Returns ``SequenceClassifierOutput``
    with logits (batch, num_labels).
    """

    accepts_loss_kwargs = False

    def __init__(self, config: CoupledMambaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CoupledMambaModel(config)
        self.classifier = CoupledMambaClassificationHead(self.model.fused_size, config)
        self.post_init()

    def forward(
        self, input_features=None, attention_mask=None, labels=None, output_hidden_states=None, return_dict=None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_features, attention_mask=attention_mask, output_hidden_states=output_hidden_states, return_dict=True,
            return_last_hidden_state=False,  # the head reads the pooled vector only
        )
        logits = self.classifier(outputs.pooler_output)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def compute_loss(self, logits, labels):
        """The loss of ``logits`` (batch, num_labels) against ``labels`` under ``config.problem_type`` (inferred
        as transformers does when unset: regression for one label, single-label for integer labels, else
        multi-label)."""
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        logits = logits.float()
        if self.config.problem_type == "regression":
            loss_fn = F.l1_loss if self.config.regression_loss == "l1" else F.mse_loss
            if self.num_labels == 1:
                return loss_fn(logits.squeeze(-1), labels.float().reshape(-1))
            return loss_fn(logits, labels.float())
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1).long())
        return F.binary_cross_entropy_with_logits(logits, labels.float())
