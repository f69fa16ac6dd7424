"""The shared Mamba mixer, the preallocated state cache, and the Mamba language model.

One ``MambaMixer`` serves the VL-Mamba language model, the VL-Mamba VSS connector and the Coupled Mamba blocks.
Every projection (``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj``) is called as a module, on every path, so
LoRA, hooks and quantization wrappers see every call. The scan, decode step and conv go through the op
dispatch of ``ops_selective_scan`` (reference, chunked PyTorch, fused GPU kernels).

``MambaCausalLM`` is configured by a plain transformers ``MambaConfig`` and has transformers'
``MambaForCausalLM`` parameter names (``backbone.embeddings``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer.{in_proj,conv1d,x_proj,dt_proj,out_proj,A_log,D}``, ``backbone.norm_f``,
``lm_head``), so a Mamba checkpoint in transformers' format loads into it unchanged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from transformers import MambaConfig, PreTrainedModel
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .peft_adapters import AdapterLoadingMixin
from .decode_graphs import DecodeGraphs
from .deferred_stop import allow_deferred_stop_check
from .ops_mamba_ssm import GPU_BACKENDS  # noqa: F401  (registers "mamba_ssm" and "triton" on CUDA, and "cpp")
from .ops_selective_scan import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
from .ssm_backends import config_backend, forced_backend, training_forward


class MambaStateCache:
    """Preallocated recurrent state of a stack of Mamba mixers, updated in place.

    conv_states: (num_layers, batch, intermediate_size, conv_kernel) in the model dtype: the last
    ``conv_kernel`` inputs of each layer's causal conv. ssm_states: (num_layers, batch, intermediate_size,
    state_size) float32. Shapes never change after allocation and every update is an in-place copy, so a
    whole decode step can be captured in a CUDA graph and replayed.
    """

    is_compileable = False
    # A recurrent state cannot be rolled back a step: transformers' deferred stop check (which runs one step past
    # the stop and undoes it) may only be used with this cache when the cache is not returned to the caller.
    is_croppable = False
    # Set on caches backed by a CUDA-graph bucket (see decode_graphs.py); None for ordinary caches.
    graph_bucket = None
    invalid_reason: Optional[str] = None

    def __init__(self, num_layers, batch_size, intermediate_size, state_size, conv_kernel, device=None, dtype=None):
        self.conv_states = torch.zeros(num_layers, batch_size, intermediate_size, conv_kernel, device=device, dtype=dtype)
        self.ssm_states = torch.zeros(
            num_layers, batch_size, intermediate_size, state_size, device=device, dtype=torch.float32
        )
        # Number of tokens already folded into the states (0: nothing yet, the next call is a prefill).
        self.seqlen_offset = 0

    def rows(self, batch_size: int) -> "MambaStateCache":
        """A cache whose states are the first ``batch_size`` rows of this one (views: updates land here)."""
        view = MambaStateCache.__new__(MambaStateCache)
        view.conv_states = self.conv_states[:, :batch_size]
        view.ssm_states = self.ssm_states[:, :batch_size]
        view.seqlen_offset = 0
        view.reset()
        return view

    def invalidate(self, reason: str) -> None:
        """Mark this cache unusable (its memory now serves another generate call); using it raises."""
        self.invalid_reason = reason

    @classmethod
    def for_config(cls, config: MambaConfig, batch_size: int, device=None, dtype=None) -> "MambaStateCache":
        return cls(
            config.num_hidden_layers, batch_size, config.intermediate_size, config.state_size, config.conv_kernel,
            device=device, dtype=dtype,
        )

    @property
    def batch_size(self) -> int:
        return self.conv_states.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    def reset(self) -> None:
        self.conv_states.zero_()
        self.ssm_states.zero_()
        self.seqlen_offset = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of the new states is row ``beam_idx[i]`` of the old ones (in place)."""
        beam_idx = beam_idx.to(self.conv_states.device)
        self.conv_states.copy_(self.conv_states.index_select(1, beam_idx))
        self.ssm_states.copy_(self.ssm_states.index_select(1, beam_idx))


_PACKAGE_KERNELS = []


def _package_kernels():
    """This package's Triton RMSNorm and LayerNorm (``"layer_norm"``: (accepts, run)), (batch, L, C) -> (batch, C, L)
    transposes (one tensor, differentiable; several same-shaped tensors in one launch), one-row GEMV (self-measured,
    see kernels/gemv) and fused decode step (``"decode_step"``, kernels/decode_step) as a dict, when they can run
    here (CUDA, Triton); else None. Imported on first use."""
    if not _PACKAGE_KERNELS:
        kernels = None
        if torch.cuda.is_available():
            try:  # absent from remote-code copies and machines without Triton: the PyTorch paths run instead
                from multimodal_mamba.kernels.gemv import linear_one_row
                from multimodal_mamba.kernels.layer_norm.fused import layer_norm_accepts, layer_norm_triton
                from multimodal_mamba.kernels.rms_norm import rms_norm_triton
                from multimodal_mamba.kernels.transpose import channel_major_triton, time_contiguous_group

                kernels = {"rms_norm": rms_norm_triton, "transpose": channel_major_triton,
                           "time_contiguous_group": time_contiguous_group, "linear_one_row": linear_one_row,
                           "layer_norm": (layer_norm_accepts, layer_norm_triton)}
            except Exception:
                kernels = None
            if kernels is not None:
                try:  # the fused decode step (kernels/decode_step); its absence only turns that path off
                    from multimodal_mamba.kernels.decode_step import fused as decode_step

                    kernels["decode_step"] = decode_step
                except Exception:
                    pass
        _PACKAGE_KERNELS.append(kernels)
    return _PACKAGE_KERNELS[0]


class DecodeLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same results up to float32 summation order) whose one-row calls on CUDA
    without gradients (a decode step at batch 1) go to this package's GEMV, which picks per shape the fastest of
    cuBLAS and its own Triton kernel (cuBLAS is slow on the small, odd shapes such as x_proj: kernels/gemv/fused.py).
    Every other call is ``F.linear`` (a few-rows Triton route for small batches was measured: it won only on lm_head,
    68 -> 63 us per step at batch 16, not worth a measurement per new row count; benchmarks/results/gpu_decode_parts.md).
    PEFT wraps it like any ``nn.Linear``."""

    def forward(self, x):
        if (x.is_cuda and x.shape[-1] == x.numel() and not torch.is_grad_enabled() and x.dtype == self.weight.dtype
                and self.weight.stride(-1) == 1):
            kernels = _package_kernels()
            if kernels is not None:
                return kernels["linear_one_row"](x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _time_contiguous(*tensors):
    """(batch, C, L) views of token-major memory -> the same values with L contiguous, on CUDA (L > 1).

    The projections are module calls and return token-major activations; the fused scan kernels read rows of L.
    The tiled Triton transpose does this near copy bandwidth (PyTorch's strided copy, which the kernels' wrappers
    would otherwise run, reaches about a third of it); without gradients, up to five tensors of one dtype (a
    prefill's x, delta, z, B and C) share one launch (at batch 1 a prefill's host time is mostly launches).
    Elsewhere (CPU: the chunked scan prefers token-major memory) the tensors pass unchanged.
    """
    kernels = _package_kernels()
    if kernels is None:
        return tensors
    todo = [i for i, t in enumerate(tensors)
            if t is not None and t.is_cuda and t.dim() == 3 and t.shape[-1] > 1 and t.stride(-1) != 1]
    if not todo:
        return tensors
    result = list(tensors)
    if torch.is_grad_enabled() and any(tensors[i].requires_grad for i in todo):
        one = kernels["transpose"]
        for i in todo:
            result[i] = one(tensors[i].transpose(1, 2))
        return tuple(result)
    group = kernels["time_contiguous_group"]
    batches = {}  # one launch per (dtype, batch): a prefill's five tensors share one
    for i in todo:
        batches.setdefault((tensors[i].dtype, tensors[i].shape[0]), []).append(i)
    for indices in batches.values():
        for i, out in zip(indices, group(*(tensors[i] for i in indices))):
            result[i] = out
    return tuple(result)


class MambaRMSNorm(nn.Module):
    """RMSNorm over the last dim, as transformers' ``MambaRMSNorm`` (normalizes in float32).

    ``forward(x, input_dtype)`` equals ``forward(x.to(input_dtype))``. On CUDA without gradients it runs as one Triton
    kernel with the same rounding steps (nine PyTorch kernels otherwise: it matters for the decode step).
    """

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states, input_dtype=None):
        if hidden_states.is_cuda and not (
            torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad)
        ):
            kernels = _package_kernels()
            if kernels is not None:
                return kernels["rms_norm"](hidden_states, self.weight, self.variance_epsilon, input_dtype)
        if input_dtype is not None:
            hidden_states = hidden_states.to(input_dtype)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


def _apply_padding_mask(hidden_states, attention_mask):
    """Zero padded positions. hidden_states (batch, L, dim); attention_mask (batch, L) with 0 on padding."""
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


class MambaMixer(nn.Module):
    """in_proj -> causal depthwise conv -> x_proj -> dt_proj -> selective scan -> gate -> out_proj.

    Input and output (batch, L, hidden_size). Parameters: ``in_proj`` (hidden -> 2 * intermediate),
    ``conv1d`` (depthwise, kernel ``conv_kernel``), ``x_proj`` (intermediate -> dt_rank + 2 * state_size),
    ``dt_proj`` (dt_rank -> intermediate, with bias), ``A_log`` (intermediate, state_size) and ``D``
    (intermediate,) kept float32, ``out_proj`` (intermediate -> hidden).
    """

    def __init__(
        self,
        hidden_size: int,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel: int = 4,
        time_step_rank="auto",
        use_bias: bool = False,
        use_conv_bias: bool = True,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_scale: float = 1.0,
        time_step_init_scheme: str = "random",
        layer_idx: Optional[int] = None,
        intermediate_size: Optional[int] = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.intermediate_size = int(intermediate_size or expand * hidden_size)
        self.conv_kernel = conv_kernel
        self.time_step_rank = math.ceil(hidden_size / 16) if time_step_rank == "auto" else int(time_step_rank)
        self.layer_idx = layer_idx
        self.time_step_min, self.time_step_max, self.time_step_floor = time_step_min, time_step_max, time_step_floor
        self.time_step_scale, self.time_step_init_scheme = time_step_scale, time_step_init_scheme

        self.in_proj = DecodeLinear(hidden_size, self.intermediate_size * 2, bias=use_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size, self.intermediate_size, kernel_size=conv_kernel, groups=self.intermediate_size,
            padding=conv_kernel - 1, bias=use_conv_bias,
        )
        self.x_proj = DecodeLinear(self.intermediate_size, self.time_step_rank + 2 * state_size, bias=False)
        self.dt_proj = DecodeLinear(self.time_step_rank, self.intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.intermediate_size, state_size))
        self.D = nn.Parameter(torch.empty(self.intermediate_size))
        self.out_proj = DecodeLinear(self.intermediate_size, hidden_size, bias=use_bias)
        if self.A_log.device.type != "meta":
            self.init_ssm_parameters()

    @classmethod
    def from_mamba_config(cls, config: MambaConfig, layer_idx: Optional[int] = None) -> "MambaMixer":
        return cls(
            config.hidden_size, config.state_size, config.expand, config.conv_kernel, config.time_step_rank,
            config.use_bias, config.use_conv_bias, config.time_step_min, config.time_step_max,
            config.time_step_floor, config.time_step_scale, config.time_step_init_scheme, layer_idx=layer_idx,
            intermediate_size=config.intermediate_size,
        )

    @torch.no_grad()
    def init_ssm_parameters(self):
        """S4D-real A, D = 1, and dt_proj so that softplus(bias) is log-uniform in [time_step_min, time_step_max]."""
        A = torch.arange(1, self.state_size + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(A)[None, :].expand(self.intermediate_size, -1))
        init.ones_(self.D)
        dt_init_std = self.time_step_rank**-0.5 * self.time_step_scale
        if self.time_step_init_scheme == "constant":
            init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(
            torch.rand(self.intermediate_size, device=self.dt_proj.bias.device)
            * (math.log(self.time_step_max) - math.log(self.time_step_min))
            + math.log(self.time_step_min)
        ).clamp(min=self.time_step_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    # The three stages are public so that the Coupled Mamba block can run its own scan between them.
    def input_stage(self, hidden_states, attention_mask=None, conv_state=None, conv_initial=None,
                    overwrite_conv_input=False):
        """hidden_states (batch, L, hidden) -> x (batch, intermediate, L) after conv + SiLU, gate z (same shape).

        ``conv_state`` (batch, intermediate, conv_kernel), if given, is updated in place: a single token is
        a decode step, a longer input refreshes it with the last inputs. ``conv_initial`` (batch,
        intermediate, conv_kernel - 1) are the inputs that precede this one (a continued prefill); it must not share
        memory with ``conv_state``, which the conv writes while it reads ``conv_initial``.
        ``overwrite_conv_input``: the conv may write x over its own input (in_proj's first half), which nothing
        else reads: inference then holds one (batch, L, intermediate) tensor less (x is then a view with in_proj's
        row stride).
        """
        hidden_states = _apply_padding_mask(hidden_states, attention_mask)
        # (batch, dim, L) views of time-major memory: the ops run on dense (batch, L, dim) tensors.
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        weight = self.conv1d.weight.squeeze(1)
        if conv_state is not None and x.shape[-1] == 1 and conv_initial is None:
            x = causal_conv1d_update(x[..., 0], conv_state, weight, self.conv1d.bias, activation="silu")[..., None]
        else:
            x = causal_conv1d(x, weight, self.conv1d.bias, initial_state=conv_initial, activation="silu",
                              conv_state_out=conv_state, overwrite_x=overwrite_conv_input)
        if attention_mask is not None:
            x = x * attention_mask[:, None, :].to(x.dtype)
        return x, z

    def ssm_parameters(self, x):
        """x (batch, intermediate, L) -> delta (batch, intermediate, L) with dt_proj's bias, B and C (batch, N, L)."""
        params = self.x_proj(x.transpose(1, 2))
        time_step, B, C = torch.split(params, [self.time_step_rank, self.state_size, self.state_size], dim=-1)
        # as (batch * L, rank) rows (a view): F.linear fuses the bias into the GEMM for 2-D inputs, while a strided
        # 3-D input costs a separate bias add over the whole (batch, L, intermediate) output
        delta = self.dt_proj(time_step.reshape(-1, self.time_step_rank)).view(x.shape[0], x.shape[-1], -1)
        return delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

    def output_stage(self, y):
        """y (batch, intermediate, L) -> (batch, L, hidden)."""
        return self.out_proj(y.transpose(1, 2))

    def ssm_A(self):
        """A = -exp(A_log) (intermediate, state_size) float32.

        Computed at every call (a cache keyed on A_log's version counter would go stale: fused optimizers update
        parameters in place without bumping it). Inside a captured decode step the LM computes every layer's A at
        once (``precomputed_A``) and the mixers read it from ``_A_override``.
        """
        override = self.__dict__.get("_A_override")
        if override is not None:
            return override
        return -torch.exp(self.A_log.float())

    def forward(self, hidden_states, cache_params: Optional[MambaStateCache] = None, attention_mask=None, scan_orders=None):
        """hidden_states (batch, L, hidden) -> (batch, L, hidden).

        cache_params: a ``MambaStateCache`` holding this layer's states (``layer_idx``); read and updated in
        place. scan_orders: (K, L) long, K orderings of the L positions (VSS): each ordering is scanned as its
        own sequence in one grouped scan, put back in position order, and the K results are summed.
        In training mode the ops skip the inference-only backends (``ssm_backends.INFERENCE_ONLY``), so the forward
        computes the same numbers with and without gradients (reentrant gradient checkpointing relies on it).
        """
        if not self.training:
            return self._forward(hidden_states, cache_params, attention_mask, scan_orders)
        with training_forward():
            return self._forward(hidden_states, cache_params, attention_mask, scan_orders)

    def _forward(self, hidden_states, cache_params, attention_mask, scan_orders):
        if scan_orders is not None:
            if cache_params is not None:
                raise ValueError("MambaMixer: scan_orders (multi-direction scan) cannot be combined with a cache")
            return self._forward_scan_orders(hidden_states, attention_mask, scan_orders)
        conv_state = ssm_state = conv_initial = initial_state = None
        if cache_params is not None:
            conv_state = cache_params.conv_states[self.layer_idx]
            ssm_state = cache_params.ssm_states[self.layer_idx]
            if cache_params.seqlen_offset > 0 and hidden_states.shape[1] > 1:  # continued prefill
                conv_initial = conv_state[..., 1:].clone()
                initial_state = ssm_state.clone()
        decode_step = cache_params is not None and cache_params.seqlen_offset > 0 and hidden_states.shape[1] == 1
        x, z = self.input_stage(hidden_states, attention_mask, conv_state, conv_initial)
        delta, B, C = self.ssm_parameters(x)
        if decode_step:
            y = selective_state_update(
                ssm_state, x[..., 0], delta[..., 0], self.ssm_A(), B[..., 0], C[..., 0], self.D, z=z[..., 0]
            )[..., None]
        else:
            x, delta, z, B, C = _time_contiguous(x, delta, z, B, C)
            result = selective_scan(
                x, delta, self.ssm_A(), B, C, self.D, z=z, delta_softplus=True, initial_state=initial_state,
                return_final_state=ssm_state is not None,
            )
            if ssm_state is not None:
                y, final_state = result
                ssm_state.copy_(final_state)
            else:
                y = result
        return self.output_stage(y.to(hidden_states.dtype))

    def _forward_scan_orders(self, hidden_states, attention_mask, scan_orders):
        batch, length, _ = hidden_states.shape
        if scan_orders.dim() != 2 or scan_orders.shape[1] != length:
            raise ValueError(f"MambaMixer: scan_orders must be (K, L={length}), got {tuple(scan_orders.shape)}")
        directions = scan_orders.shape[0]
        dim = self.intermediate_size
        hidden_states = _apply_padding_mask(hidden_states, attention_mask)
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        # (batch, dim, K, L) -> (batch * K, dim, L): each ordering becomes its own sequence.
        x = x[:, :, scan_orders].permute(0, 2, 1, 3).reshape(batch * directions, dim, length)
        z = z[:, :, scan_orders].permute(0, 2, 1, 3).reshape(batch, directions * dim, length)
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        delta, B, C = self.ssm_parameters(x)
        # One grouped scan: group k holds direction k's channels and its own B, C.
        y = selective_scan(
            x.reshape(batch, directions * dim, length),
            delta.reshape(batch, directions * dim, length),
            self.ssm_A().repeat(directions, 1),
            B.reshape(batch, directions, self.state_size, length),
            C.reshape(batch, directions, self.state_size, length),
            self.D.repeat(directions),
            z=z,
            delta_softplus=True,
        )
        inverse = torch.argsort(scan_orders, dim=1)  # position p of ordering k sits at index inverse[k, p]
        y = y.reshape(batch, directions, dim, length)
        index = inverse[None, :, None, :].expand(batch, directions, dim, length)
        merged = torch.gather(y, 3, index).sum(dim=1)
        return self.output_stage(merged.to(hidden_states.dtype))


@contextlib.contextmanager
def _precomputed_A(mixers):
    """Within the block, each of ``mixers`` returns A = -exp(A_log) computed for all of them at once."""
    if not mixers:
        yield
        return
    values = torch._foreach_exp([mixer.A_log.float() for mixer in mixers])
    torch._foreach_neg_(values)
    for mixer, value in zip(mixers, values):
        mixer.__dict__["_A_override"] = value
    try:
        yield
    finally:
        for mixer in mixers:
            mixer.__dict__.pop("_A_override", None)


class MambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), the residual in float32 when ``residual_in_fp32``."""

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MambaMixer.from_mamba_config(config, layer_idx=layer_idx)

    def forward(self, hidden_states, cache_params=None, attention_mask=None):
        residual = hidden_states
        hidden_states = self.norm(hidden_states, input_dtype=self.norm.weight.dtype)
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return residual + self.mixer(hidden_states, cache_params=cache_params, attention_mask=attention_mask)


def init_mamba_module_weights(module, config):
    """Initialization shared by every model that holds Mamba mixers (called from ``_init_weights``)."""
    if isinstance(module, MambaMixer):
        module.init_ssm_parameters()
        init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
        if module.conv1d.bias is not None:
            init.zeros_(module.conv1d.bias)
        init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
        if getattr(config, "rescale_prenorm_residual", False):
            with torch.no_grad():
                module.out_proj.weight /= math.sqrt(config.num_hidden_layers)
    elif isinstance(module, MambaRMSNorm):
        init.ones_(module.weight)


# Keeps A_log and D in float32 when a model is loaded in bf16/fp16 (anchored on "mixer.", never a bare "D").
KEEP_IN_FP32 = ["mixer.A_log", "mixer.D"]


class MambaLMPreTrainedModel(AdapterLoadingMixin, PreTrainedModel):
    config_class = MambaConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["MambaBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True
    _keep_in_fp32_modules_strict = KEEP_IN_FP32

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_mamba_module_weights(module, self.config)


_PLAIN_LINEARS = (DecodeLinear, nn.Linear)


def _no_hooks(module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _plain_decode_modules(backbone, dtype, device) -> bool:
    """Whether every module a decode step runs is this package's own (or a plain ``nn.Linear`` / ``nn.Conv1d``), with
    no hooks, its weights in ``dtype`` (A_log and D: any float dtype) and on ``device`` (see
    ``MambaBackbone._fused_decode_ops``)."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    norm_f = backbone.norm_f
    if type(norm_f) is not MambaRMSNorm or not _no_hooks(norm_f) or norm_f.weight.dtype != dtype:
        return False
    residual_in_fp32 = None
    for block in backbone.layers:
        if type(block) is not MambaBlock or not _no_hooks(block):
            return False
        if residual_in_fp32 is not None and block.residual_in_fp32 != residual_in_fp32:
            return False
        residual_in_fp32 = block.residual_in_fp32
        mixer, norm = block.mixer, block.norm
        if type(mixer) is not MambaMixer or type(norm) is not MambaRMSNorm or not (_no_hooks(mixer) and _no_hooks(norm)):
            return False
        projections = (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj)
        if any(type(p) not in _PLAIN_LINEARS or not _no_hooks(p) for p in projections):
            return False
        conv = mixer.conv1d
        if type(conv) is not nn.Conv1d or not _no_hooks(conv) or mixer.x_proj.bias is not None:
            return False
        weights = (norm.weight, conv.weight, conv.bias, *(p.weight for p in projections), mixer.dt_proj.bias)
        if any(w is not None and w.dtype != dtype for w in weights) or mixer.layer_idx is None:
            return False
    # One device check: a model spread over devices (accelerate's device_map) carries hooks, caught above.
    return norm_f.weight.device == device


@dataclass
class MambaLMOutput(ModelOutput):
    """last_hidden_state (batch, L, hidden); cache_params: the ``MambaStateCache`` after this call."""

    last_hidden_state: Optional[torch.FloatTensor] = None
    cache_params: Optional[MambaStateCache] = None
    hidden_states: Optional[tuple] = None


@dataclass
class MambaCausalLMOutput(ModelOutput):
    """logits (batch, L, vocab) float32; loss when labels are given; cache_params after this call."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache_params: Optional[MambaStateCache] = None
    hidden_states: Optional[tuple] = None


class MambaBackbone(MambaLMPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` Mamba blocks and the final norm (transformers' ``MambaModel`` names)."""

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MambaBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._register_load_state_dict_pre_hook(self._rename_mamba_ssm_keys)
        self.post_init()

    @staticmethod
    def _rename_mamba_ssm_keys(state_dict, prefix, *args):
        # mamba-ssm names the embedding "embedding" (singular)
        old = prefix + "embedding.weight"
        if old in state_dict:
            state_dict[prefix + "embeddings.weight"] = state_dict.pop(old)

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    # ------------------------------------------------------------------------------------------------------------
    # Fused decode step
    # ------------------------------------------------------------------------------------------------------------
    # A one-token step with a cache on CUDA runs per layer as: residual add + RMSNorm (one kernel), in_proj (module
    # call), conv + x_proj + dt_proj + state update + gate (two kernels, kernels/decode_step), out_proj (module call):
    # about half the launches of the module-by-module path, in eager decoding and in the captured CUDA graph alike
    # (so both give the same tokens). At a few rows (batch 8 - 32) ``ops.in_projection`` / ``ops.out_projection`` may
    # run in_proj / out_proj on kernels/linear_rows from their raw weights instead (out_proj as float32 partial sums
    # that the next add + RMSNorm adds up): only on this path, i.e. only for plain modules without hooks.
    # Set ``backbone.fused_decode = False`` to run decode steps module by module.
    fused_decode = True
    _MAX_WORKSPACES = 8

    def _fused_decode_ops(self, inputs_embeds):
        """The fused decode-step kernels (kernels/decode_step) if they may run this step, else None.

        They read x_proj's, dt_proj's and conv1d's raw weights (and at a few rows in_proj's and out_proj's,
        ``fused.in_projection`` / ``fused.out_projection``), so they run only when nothing could see or change
        those modules' calls: every block, norm, mixer and projection is this package's own class (or a plain
        ``nn.Linear`` / ``nn.Conv1d``) without forward hooks, no global module hooks are set, no op backend is forced
        (a forced backend must run the ops it names) and every weight has the step's device and dtype. PEFT / LoRA
        wrappers, quantized linears and accelerate's offloading hooks all fall back to the module-call path.
        """
        if not self.fused_decode or not inputs_embeds.is_cuda:
            return None
        kernels = _package_kernels()
        if kernels is None or "decode_step" not in kernels:
            return None
        if forced_backend() != "auto" or (getattr(self.config, "ssm_backend", None) or "auto") != "auto":
            return None
        if not _plain_decode_modules(self, inputs_embeds.dtype, inputs_embeds.device):
            return None
        return kernels["decode_step"]

    def _decode_workspace(self, batch, device, dtype, residual_dtype, ops):
        """Buffers the fused decode step reuses across layers and steps: residual (batch, hidden) in residual_dtype,
        normed (batch, hidden) and y (batch, intermediate) in dtype, x_proj partials (splits, batch, rank + 2N) float32,
        the mixer kernels' int32 counters (zeros; every step leaves them zero).
        Kept per (device, dtypes, batch) so that eager steps allocate nothing and a captured graph keeps its buffers
        (up to ``_MAX_WORKSPACES`` shapes; beyond that a step allocates its own, never freeing one a graph may use)."""
        config = self.config
        mixer = self.layers[0].mixer
        splits = ops.split_count(mixer.intermediate_size)  # (follows the kernels' block configuration)
        n_proj = mixer.time_step_rank + 2 * mixer.state_size
        counters = ops.counter_count(n_proj, batch)  # (follows the kernels' block configuration too)
        key = (str(device), dtype, residual_dtype, batch, id(ops), splits, counters)
        workspaces = self.__dict__.setdefault("_decode_workspaces", {})
        found = workspaces.get(key)
        if found is not None:
            return found
        found = (
            torch.empty(batch, config.hidden_size, device=device, dtype=residual_dtype),
            torch.empty(batch, config.hidden_size, device=device, dtype=dtype),
            torch.empty(splits, batch, n_proj, device=device, dtype=torch.float32),
            torch.empty(batch, mixer.intermediate_size, device=device, dtype=dtype),
            torch.zeros(counters, device=device, dtype=torch.int32),
        )
        if len(workspaces) < self._MAX_WORKSPACES:
            workspaces[key] = found
        return found

    def _fused_decode_step(self, inputs_embeds, cache_params, ops):
        """inputs_embeds (batch, 1, hidden) -> norm_f's output (batch, 1, hidden), the cache's states advanced.

        Same rounding steps as the module path (``MambaBlock.forward``): the residual in float32 when
        ``residual_in_fp32`` (else in the embeddings' dtype), each norm's input rounded to its weight's dtype, norm_f
        normalizing the residual in its own dtype. ``ops``: ``kernels.decode_step`` or its ``naive`` reference.
        """
        batch, _, hidden = inputs_embeds.shape
        x = inputs_embeds.reshape(batch, hidden)
        if x.stride(-1) != 1:
            x = x.contiguous()
        dtype = x.dtype
        residual_dtype = torch.float32 if self.layers[0].residual_in_fp32 else dtype
        residual, normed, partials, y, counters = self._decode_workspace(batch, x.device, dtype, residual_dtype, ops)
        residual_in, delta = x, None
        for block in self.layers:
            mixer = block.mixer
            ops.add_rms_norm(residual_in, delta, block.norm.weight, block.norm.variance_epsilon, residual, normed,
                             block.norm.weight.dtype, delta_dtype=dtype)
            xz = ops.in_projection(normed, mixer.in_proj)
            layer = mixer.layer_idx
            ops.mixer_decode_step(
                xz, cache_params.conv_states[layer], cache_params.ssm_states[layer], mixer.conv1d.weight[:, 0],
                mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.A_log,
                mixer.D, partials, y, counters,
            )
            delta = ops.out_projection(y, mixer.out_proj)  # (float32 partial sums where kernels route it so)
            residual_in = residual
        norm_f = self.norm_f
        out = torch.empty(batch, hidden, device=x.device, dtype=torch.promote_types(norm_f.weight.dtype, residual_dtype))
        ops.add_rms_norm(residual_in, delta, norm_f.weight, norm_f.variance_epsilon, residual, out, residual_dtype,
                         delta_dtype=dtype)
        return out[:, None, :]

    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> MambaStateCache:
        """A zeroed ``MambaStateCache`` for ``batch_size`` sequences on the model's device and dtype."""
        return MambaStateCache.for_config(
            self.config, batch_size, device=device or self.embeddings.weight.device,
            dtype=dtype or self.embeddings.weight.dtype,
        )

    def forward(
        self, input_ids=None, inputs_embeds=None, cache_params=None, use_cache=None, output_hidden_states=None,
        return_dict=None, attention_mask=None, attention_mask_has_padding: Optional[bool] = None, **kwargs,
    ):
        """input_ids (batch, L) or inputs_embeds (batch, L, hidden); attention_mask (batch, L) with 0 on padding
        (left padding for generation). ``attention_mask_has_padding``: the caller already knows whether the mask has
        a 0 (skips that check's host sync; a captured prefill cannot sync). Returns ``MambaLMOutput``."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        batch, length = inputs_embeds.shape[:2]
        if cache_params is not None and not isinstance(cache_params, MambaStateCache):
            raise ValueError(
                f"cache_params must be a MambaStateCache (see allocate_cache), got {type(cache_params).__name__}"
            )
        if cache_params is not None and cache_params.invalid_reason:
            raise ValueError(f"cache_params can no longer be used: {cache_params.invalid_reason}")
        if use_cache and cache_params is None:
            cache_params = self.allocate_cache(batch)
        if not use_cache:
            cache_params = None
        if cache_params is not None and cache_params.batch_size != batch:
            raise ValueError(f"cache_params holds {cache_params.batch_size} sequences but the input has {batch}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            if cache_params is not None and cache_params.seqlen_offset > 0 and attention_mask.shape[0] == batch:
                attention_mask = attention_mask[:, -length:]  # the mask of the whole sequence, as generate passes it
            else:
                raise ValueError(f"attention_mask must be (batch, L) = {(batch, length)}, got {tuple(attention_mask.shape)}")
        if attention_mask is not None and not (
                attention_mask_has_padding if attention_mask_has_padding is not None else not bool(attention_mask.all())):
            attention_mask = None  # nothing to mask: skip the multiplications

        if (cache_params is not None and cache_params.seqlen_offset > 0 and length == 1 and attention_mask is None
                and not output_hidden_states and not torch.is_grad_enabled()):
            ops = self._fused_decode_ops(inputs_embeds)
            if ops is not None:  # a decode step on the fused kernels (same math, fewer launches)
                hidden_states = self._fused_decode_step(inputs_embeds, cache_params, ops)
                cache_params.seqlen_offset += length
                if not return_dict:
                    return hidden_states, cache_params
                return MambaLMOutput(last_hidden_state=hidden_states, cache_params=cache_params)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        # Without gradients (a prefill or a decode step): every layer's A = -exp(A_log) from two multi-tensor kernels,
        # not two per layer (the same computation whether a decode step is replayed from a CUDA graph or not:
        # identical tokens; at batch 1 those two launches per layer are host time a prefill waits for).
        precompute = not torch.is_grad_enabled()
        with config_backend(self.config), _precomputed_A([block.mixer for block in self.layers] if precompute else []):
            for block in self.layers:
                hidden_states = block(hidden_states, cache_params=cache_params, attention_mask=attention_mask)
                if output_hidden_states:
                    all_hidden_states = all_hidden_states + (hidden_states,)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if cache_params is not None:
            cache_params.seqlen_offset += length
        if not return_dict:
            return tuple(v for v in (hidden_states, cache_params, all_hidden_states) if v is not None)
        return MambaLMOutput(last_hidden_state=hidden_states, cache_params=cache_params, hidden_states=all_hidden_states)


class MambaGenerationMixin(GenerationMixin):
    """generate() plumbing for models whose state lives in a ``MambaStateCache`` named ``cache_params``.

    transformers' generate passes a cache as ``cache_params`` to models whose class name contains "Mamba" and,
    left alone, would create a ``DynamicCache``. These models instead allocate their preallocated cache on the
    first forward (with the batch size generate expanded to, beams included), get it back through
    ``outputs.cache_params``, and feed only the newest token once the cache holds the prompt.
    """

    # On a CUDA device, generate() decodes through CUDA graphs of the LM's one-token step (decode_graphs.py).
    # Set ``model.decode_cuda_graph = False`` (or pass ``decode_cuda_graph=False`` to generate) to decode eagerly.
    decode_cuda_graph = True

    def _decode_language_model(self) -> "MambaCausalLM":
        """The ``MambaCausalLM`` whose state the generation cache holds."""
        return self

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        cache = model_kwargs.get("cache_params")
        if cache is not None and not isinstance(cache, MambaStateCache):
            raise ValueError(f"cache_params must be a MambaStateCache, got {type(cache).__name__}")
        if cache is not None:
            # As transformers marks a cache the user passed in: it outlives generate, so no step may be run past
            # the stop on it (transformers' deferred stop check reads this).
            cache._is_user_defined = True

    def _graph_generation_cache(self, batch_size: int, device) -> Optional[MambaStateCache]:
        """A cache backed by a CUDA-graph bucket for a generate call, or None (eager decode)."""
        language_model = self._decode_language_model()
        if self.training or torch.is_grad_enabled():
            return None
        cache = language_model.decode_graphs.make_cache(
            batch_size, device, language_model.backbone.embeddings.weight.dtype
        )
        if cache is not None and cache.graph_bucket is not None:
            # No host sync per token in transformers' sampling loop for this cache (deferred_stop.py says why).
            allow_deferred_stop_check()
        return cache

    @staticmethod
    def _graph_cache_applies(cache_params, prompt: bool, blockers: dict) -> bool:
        """Whether a call may replay a CUDA graph on ``cache_params``: a cache handed out by the decode graphs, at the
        prompt (``prompt``: nothing run on it yet) or past it, no gradients, and none of ``blockers`` (outputs or
        inputs a graph does not handle, e.g. labels) set. Raises for a cache that can no longer be used."""
        if getattr(cache_params, "graph_bucket", None) is None or (cache_params.seqlen_offset == 0) != prompt:
            return False
        if torch.is_grad_enabled() or any(value is not None and value is not False for value in blockers.values()):
            return False
        if cache_params.invalid_reason:
            raise ValueError(f"cache_params can no longer be used: {cache_params.invalid_reason}")
        return True

    def _graph_decode_step(self, cache_params, input_ids, inputs_embeds=None, **blockers) -> Optional[torch.Tensor]:
        """Logits (batch, 1, vocab) of a decode step replayed from the CUDA graph, or None (run it eagerly)."""
        if not self._graph_cache_applies(cache_params, False, blockers):
            return None
        if inputs_embeds is not None or input_ids is None or input_ids.shape[1] != 1:
            return None
        return self._decode_language_model().decode_graphs.step(input_ids, cache_params)

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, inputs_embeds=None, cache_params=None, use_cache=None,
        is_first_iteration=False, decode_cuda_graph=None, **kwargs,
    ):
        use_graph = self.decode_cuda_graph if decode_cuda_graph is None else bool(decode_cuda_graph)
        if cache_params is None and use_cache is not False and use_graph:
            first = input_ids if input_ids is not None and input_ids.shape[1] > 0 else inputs_embeds
            if first is not None:
                cache_params = self._graph_generation_cache(first.shape[0], first.device)
        decoding = cache_params is not None and cache_params.seqlen_offset > 0
        model_inputs = {"cache_params": cache_params, "use_cache": use_cache}
        if decoding:
            # The state holds the prefix: feed the newest token only, without the images of the prompt.
            model_inputs["input_ids"] = input_ids[:, -1:].contiguous()
            for key in self._prefill_only_inputs:
                kwargs.pop(key, None)
        elif inputs_embeds is not None and (is_first_iteration or input_ids is None or input_ids.shape[1] == 0):
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids.contiguous()
            model_inputs["attention_mask"] = attention_mask
        for key, value in kwargs.items():
            if key not in model_inputs and key not in ("past_key_values", "next_sequence_length", "position_ids"):
                model_inputs[key] = value
        return model_inputs

    _prefill_only_inputs = ("pixel_values",)


class MambaCausalLM(MambaLMPreTrainedModel, MambaGenerationMixin):
    """A Mamba language model (``backbone`` + ``lm_head``) on this package's ops and preallocated cache.

    Drop-in for transformers' ``MambaForCausalLM``: same config, same parameter names, same logits; faster on
    CPU (chunked scan instead of a loop over tokens) and GPU (fused kernels, in-place cache).

    On CUDA, ``generate()`` decodes by replaying CUDA graphs of the one-token step (``decode_cuda_graph``, see
    decode_graphs.py), and replays the prompt's prefill from a CUDA graph too when a prompt of the same shape (rows,
    length up to 128 tokens, padding or not) was seen before: a short prompt's prefill is bound by host launches
    (~30 ms for 16 tokens of the 2.8b shape), its graph by the GPU (a few ms); same logits and tokens as eager.
    ``config.prefill_cuda_graph`` (a plain attribute of the ``MambaConfig``, default True) set to False prefills
    eagerly; ``decode_cuda_graph=False`` turns off both. (VL-Mamba prefills its prompt, image features included, from
    embeddings, eagerly; its decode steps replay this model's graphs.)
    """

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        self.backbone = MambaBackbone(config)
        self.lm_head = DecodeLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> MambaStateCache:
        return self.backbone.allocate_cache(batch_size, device=device, dtype=dtype)

    @property
    def decode_graphs(self) -> DecodeGraphs:
        """The CUDA graphs of this model's decode step, per batch-size bucket (``.clear()`` frees them)."""
        graphs = self.__dict__.get("_decode_graphs")
        if graphs is None:
            graphs = DecodeGraphs(self._decode_step_logits, self._allocate_static_cache, self._decode_graph_signature,
                                  prefill_fn=self._prefill_logits)
            self.__dict__["_decode_graphs"] = graphs
        return graphs

    def _allocate_static_cache(self, batch_size, device, dtype):
        return MambaStateCache.for_config(self.config, batch_size, device=device, dtype=dtype)

    def _decode_step_logits(self, input_ids, cache_params):
        """The eager one-token step that decode graphs capture: input_ids (B, 1) -> logits (B, 1, vocab) float32.

        (The backbone computes every layer's A = -exp(A_log) for a decode step with two multi-tensor kernels; inside
        the graph that is part of the replayed step, so it follows any later change of A_log.)
        """
        hidden_states = self.backbone(input_ids, cache_params=cache_params, use_cache=True, return_dict=True)
        hidden_states = hidden_states.last_hidden_state
        return self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()

    def _prefill_logits(self, input_ids, attention_mask, cache_params, logits_to_keep):
        """The eager prompt prefill that prefill graphs capture (the same calls as ``forward``'s): input_ids (B, L),
        attention_mask (B, L) with padding or None (no padding) -> logits (B, L or logits_to_keep, vocab) float32."""
        outputs = self.backbone(input_ids, cache_params=cache_params, use_cache=True, return_dict=True,
                                attention_mask=attention_mask, attention_mask_has_padding=attention_mask is not None)
        return self._logits(outputs.last_hidden_state, logits_to_keep)

    def _logits(self, hidden_states, logits_to_keep):
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        return self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()

    def _graph_prefill(self, cache_params, input_ids, inputs_embeds, attention_mask, logits_to_keep, use_cache,
                       **blockers) -> Optional[torch.Tensor]:
        """Logits of a generate call's prompt prefill replayed from a CUDA graph (decode_graphs.py), or None (run it
        eagerly): only for a fresh cache handed out by the decode graphs, token ids, no gradients, an int
        logits_to_keep, ``config.prefill_cuda_graph`` not False."""
        if not self._graph_cache_applies(cache_params, True, blockers):
            return None
        if (input_ids is None or inputs_embeds is not None or use_cache is False
                or not isinstance(logits_to_keep, int) or not getattr(self.config, "prefill_cuda_graph", True)):
            return None
        if not input_ids.is_cuda or input_ids.device != cache_params.conv_states.device:
            return None
        return self.decode_graphs.prefill(input_ids, attention_mask, cache_params, logits_to_keep)

    def _decode_graph_signature(self):
        """Changes whenever a captured decode graph would be stale: parameter storage, dtype, op backend, and whether
        the fused decode step is switched on."""
        tensors = tuple((t.data_ptr(), t.dtype) for t in (*self.parameters(), *self.buffers()))
        return tensors, forced_backend(), getattr(self.config, "ssm_backend", None), self.backbone.fused_decode

    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, cache_params=None, labels=None,
        output_hidden_states=None, return_dict=None, use_cache=None, logits_to_keep=0, **kwargs,
    ):
        """Returns ``MambaCausalLMOutput``: logits (batch, L or logits_to_keep, vocab) float32, loss when
        ``labels`` (batch, L) are given (-100 ignored, shifted inside)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        logits = self._graph_decode_step(cache_params, input_ids, inputs_embeds, labels=labels,
                                         output_hidden_states=output_hidden_states)
        if logits is None:
            logits = self._graph_prefill(cache_params, input_ids, inputs_embeds, attention_mask, logits_to_keep,
                                         use_cache, labels=labels,
                                         output_hidden_states=output_hidden_states or self.config.output_hidden_states)
        if logits is not None:
            result = MambaCausalLMOutput(logits=logits, cache_params=cache_params)
            return result if return_dict else result.to_tuple()
        outputs = self.backbone(
            input_ids, inputs_embeds=inputs_embeds, cache_params=cache_params, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=True, attention_mask=attention_mask,
        )
        logits = self._logits(outputs.last_hidden_state, logits_to_keep)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = (logits,) + tuple(v for v in (outputs.cache_params, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return MambaCausalLMOutput(
            loss=loss, logits=logits, cache_params=outputs.cache_params, hidden_states=outputs.hidden_states
        )
