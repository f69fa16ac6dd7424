"""Checkpoint converters and model builders, each a command-line tool (``--help``).

- ``convert_mamba_ssm`` (``multimodal-mamba-convert-mamba-ssm``): a mamba-ssm checkpoint (``config.json`` with
  ``d_model``/``n_layer``/``vocab_size``/``ssm_cfg`` and ``pytorch_model.bin`` with ``backbone.embedding.*`` keys,
  as ``state-spaces/mamba-2.8b-slimpj``) to transformers' Mamba layout (``MambaConfig`` + sharded safetensors).
- ``build_vl_mamba`` (``multimodal-mamba-build-vl-mamba``): a vision encoder (SigLIP-SO400M-384 by default) and a
  Mamba LM (transformers or mamba-ssm format) with a freshly initialized connector and a processor, into a
  VL-Mamba checkpoint ready for stage-1 training.

Run them as ``python -m multimodal_mamba.conversion.<name> --help`` or through the console scripts. Shared pieces
(reading checkpoints, writing sharded safetensors, output folders that are never overwritten unless asked) are in
``multimodal_mamba.conversion.common``. The submodules are not imported here, so ``python -m`` runs them cleanly.
"""
