"""Convert a mamba-ssm checkpoint to transformers' Mamba layout.

Input: a folder (or Hub repo id) in mamba-ssm's format, as ``state-spaces/mamba-2.8b-slimpj``:

- ``config.json``: ``d_model``, ``n_layer``, ``vocab_size``, ``ssm_cfg`` (``d_state``, ``d_conv``, ``expand``,
  ``dt_rank``, ...; ``{}`` for the defaults), ``rms_norm``, ``residual_in_fp32``, ``fused_add_norm``,
  ``pad_vocab_size_multiple`` (the embedding has ``vocab_size`` rounded up to it rows), ``tie_embeddings``.
- ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``; safetensors and sharded forms also work):
  ``backbone.embedding.weight`` (padded_vocab, d_model), ``backbone.layers.{i}.norm.weight``,
  ``backbone.layers.{i}.mixer.{in_proj.weight, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight,
  dt_proj.bias, A_log, D, out_proj.weight}``, ``backbone.norm_f.weight``, ``lm_head.weight`` (tied).

Output: ``config.json`` (a transformers ``MambaConfig``) and ``model.safetensors`` (sharded above
``--max-shard-size``) with transformers' names (``backbone.embeddings.weight``; the tied ``lm_head`` is not
stored), which ``MambaForCausalLM.from_pretrained`` and this package's VL-Mamba builder load; optionally the
tokenizer (``--tokenizer``; mamba-ssm checkpoints ship none: state-spaces' models use EleutherAI/gpt-neox-20b).

    python -m multimodal_mamba.conversion.convert_mamba_ssm state-spaces/mamba-2.8b-slimpj mamba-2.8b-slimpj-hf \\
        --tokenizer EleutherAI/gpt-neox-20b
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from .common import (
    DTYPES,
    add_output_arguments,
    cast_state_dict,
    compare_state_dict,
    load_state_dict,
    read_json,
    resolve_checkpoint_source,
    resolve_source,
    run_cli,
    staged_output,
    write_sharded_safetensors,
)

# mamba-ssm ssm_cfg key -> transformers MambaConfig field.
SSM_CFG_FIELDS = {
    "d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "dt_rank": "time_step_rank",
    "dt_min": "time_step_min", "dt_max": "time_step_max", "dt_init": "time_step_init_scheme",
    "dt_scale": "time_step_scale", "dt_init_floor": "time_step_floor", "conv_bias": "use_conv_bias",
    "bias": "use_bias",
}
# ssm_cfg keys that do not change the weights or the computation.
SSM_CFG_IGNORED = {"use_fast_path", "layer", "device", "dtype"}
TOP_LEVEL_KEYS = {
    "d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
    "pad_vocab_size_multiple", "tie_embeddings", "d_intermediate", "attn_layer_idx", "attn_cfg", "norm_epsilon",
}
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """mamba-ssm's embedding rows: ``vocab_size`` rounded up to a multiple of ``pad_vocab_size_multiple``."""
    return vocab_size if multiple <= 1 or vocab_size % multiple == 0 else vocab_size + multiple - vocab_size % multiple


def mamba_ssm_config_to_transformers(cfg: dict, source: str = "config.json"):
    """A transformers ``MambaConfig`` from mamba-ssm's ``config.json`` dict (ValueError for what transformers'
    Mamba cannot represent: Mamba-2 layers, attention or MLP layers, LayerNorm instead of RMSNorm)."""
    from transformers import MambaConfig

    if cfg.get("model_type") == "mamba" and "d_model" not in cfg:
        raise ValueError(f"{source} is already a transformers MambaConfig (model_type 'mamba'): nothing to convert")
    missing = [key for key in ("d_model", "n_layer", "vocab_size") if key not in cfg]
    if missing:
        raise ValueError(f"{source} is not a mamba-ssm config: it lacks {missing}")
    unknown = sorted(set(cfg) - TOP_LEVEL_KEYS - {"model_type", "architectures", "transformers_version"})
    if unknown:
        raise ValueError(f"{source} has fields this converter does not know: {unknown}")
    ssm_cfg = dict(cfg.get("ssm_cfg") or {})
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise ValueError(f"{source} describes {ssm_cfg['layer']} layers; only Mamba-1 checkpoints are supported")
    unknown_ssm = sorted(set(ssm_cfg) - set(SSM_CFG_FIELDS) - SSM_CFG_IGNORED)
    if unknown_ssm:
        raise ValueError(f"{source}: unsupported ssm_cfg field(s) {unknown_ssm}")
    if int(cfg.get("d_intermediate", 0) or 0) > 0:
        raise ValueError(f"{source} has MLP layers (d_intermediate={cfg['d_intermediate']}), which Mamba-1 has not")
    if cfg.get("attn_layer_idx"):
        raise ValueError(f"{source} has attention layers (attn_layer_idx={cfg['attn_layer_idx']}): a hybrid model")
    if not cfg.get("rms_norm", True):
        raise ValueError(f"{source} uses LayerNorm (rms_norm=false); transformers' Mamba supports RMSNorm only")
    for key in ("d_model", "n_layer", "vocab_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{source}: {key} must be a positive integer, got {cfg[key]!r}")
    vocab = padded_vocab_size(cfg["vocab_size"], int(cfg.get("pad_vocab_size_multiple", 8) or 1))
    kwargs = {SSM_CFG_FIELDS[key]: value for key, value in ssm_cfg.items() if key in SSM_CFG_FIELDS}
    return MambaConfig(
        vocab_size=vocab, hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"],
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        layer_norm_epsilon=float(cfg.get("norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_embeddings", True)), **kwargs,
    )


def expected_mamba_shapes(config) -> Dict[str, torch.Size]:
    """Tensor name -> shape of transformers' ``MambaForCausalLM`` for ``config`` (built on the meta device)."""
    from transformers import MambaForCausalLM

    with torch.device("meta"):
        model = MambaForCausalLM(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def normalize_mamba_state_dict(state: Dict[str, torch.Tensor], config, source: str) -> Dict[str, torch.Tensor]:
    """mamba-ssm (or transformers) Mamba weights -> transformers' names, checked against ``config``.

    Renames ``backbone.embedding.weight`` to ``backbone.embeddings.weight``; checks the layer count, the width,
    the (padded) vocabulary, then every name and shape; drops ``lm_head.weight`` when the embeddings are tied
    (after checking it equals the embedding). ValueError naming the mismatch otherwise.
    """
    state = dict(state)
    if "backbone.embedding.weight" in state:
        state["backbone.embeddings.weight"] = state.pop("backbone.embedding.weight")
    embedding = state.get("backbone.embeddings.weight")
    if embedding is None:
        raise ValueError(
            f"{source} has no backbone.embedding.weight: not a Mamba language model checkpoint "
            f"(its first tensors: {sorted(state)[:4]})"
        )
    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, state) if m})
    if len(layers) != config.num_hidden_layers:
        found = f"{len(layers)} layers (backbone.layers.{layers[0]}..{layers[-1]})" if layers else "no layers"
        raise ValueError(
            f"the config says n_layer={config.num_hidden_layers} but {source} has {found}: the config and the "
            "weights do not belong together"
        )
    if embedding.dim() != 2 or embedding.shape[1] != config.hidden_size:
        raise ValueError(
            f"the config says d_model={config.hidden_size} but the embedding in {source} is {tuple(embedding.shape)}"
        )
    if embedding.shape[0] != config.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the config gives {config.vocab_size} embedding rows (vocab_size padded to "
            f"pad_vocab_size_multiple) but the embedding in {source} has {embedding.shape[0]}"
        )
    lm_head = state.get("lm_head.weight")
    if config.tie_word_embeddings and lm_head is not None:
        if lm_head.shape != embedding.shape or not torch.equal(lm_head, embedding):
            raise ValueError(
                f"the config ties the embeddings but lm_head.weight in {source} differs from the embedding "
                "(set tie_embeddings to false in config.json if the model really has its own output layer)"
            )
        del state["lm_head.weight"]
    compare_state_dict(state, expected_mamba_shapes(config), source,
                       optional=("lm_head.weight",) if config.tie_word_embeddings else ())
    return state


def load_mamba_ssm_checkpoint(folder: Path) -> Tuple[object, Dict[str, torch.Tensor]]:
    """(transformers ``MambaConfig``, checked state dict with transformers' names) of a mamba-ssm folder."""
    folder = Path(folder)
    config = mamba_ssm_config_to_transformers(read_json(folder / "config.json", "checkpoint"),
                                              str(folder / "config.json"))
    state = load_state_dict(folder, "mamba-ssm checkpoint")
    return config, normalize_mamba_state_dict(state, config, str(folder))


def convert_mamba_ssm(source, output_dir, *, tokenizer: Optional[str] = None, dtype: str = "auto",
                      max_shard_size="5GB", overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the mamba-ssm checkpoint ``source`` (folder or Hub id) into ``output_dir``; returns its path.

    ``output_dir`` must be absent or empty unless ``overwrite`` (then it is replaced once the conversion has
    succeeded). ``dtype``: "auto" (keep), "float32", "bfloat16" or "float16" (A_log and D stay float32).
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    with staged_output(output_dir, overwrite, sources=[source, tokenizer]) as stage:
        folder = resolve_checkpoint_source(source, "mamba-ssm checkpoint")
        config, state = load_mamba_ssm_checkpoint(folder)
        state = cast_state_dict(state, None if dtype == "auto" else DTYPES[dtype])
        config.dtype = str(state["backbone.embeddings.weight"].dtype).replace("torch.", "")
        if tokenizer is not None:
            save_tokenizer(tokenizer, stage, config.vocab_size)
        write_sharded_safetensors(state, stage, max_shard_size=max_shard_size, progress=progress)
        config.save_pretrained(str(stage))
    return Path(output_dir)


def save_tokenizer(source, folder: Path, vocab_rows: int):
    """Copy the tokenizer ``source`` (folder or Hub id) into ``folder``, checking it fits the embedding."""
    from transformers import AutoTokenizer

    path = resolve_source(source, "tokenizer", ["*.json", "*.txt", "*.model"])
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:
        raise ValueError(f"could not load a tokenizer from {source}: {error}") from error
    if len(tok) > vocab_rows:
        raise ValueError(
            f"vocabulary mismatch: the tokenizer {source} has {len(tok)} tokens but the embedding has {vocab_rows} rows"
        )
    tok.save_pretrained(str(folder))
    return tok


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal-mamba-convert-mamba-ssm",
        description="Convert a mamba-ssm checkpoint (config.json with d_model/n_layer/vocab_size/ssm_cfg and "
                    "pytorch_model.bin with backbone.embedding.* keys, as state-spaces/mamba-2.8b-slimpj) to "
                    "transformers' Mamba layout (MambaConfig + sharded safetensors).",
    )
    parser.add_argument("source", help="folder (or Hub repo id) of the mamba-ssm checkpoint")
    parser.add_argument("output_dir", help="folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id to save with the model "
                                            "(state-spaces' Mamba models use EleutherAI/gpt-neox-20b)")
    add_output_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()

    def run(args):
        out = convert_mamba_ssm(args.source, args.output_dir, tokenizer=args.tokenizer, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                progress=not args.quiet)
        print(f"wrote {out}")

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
