"""Loading a PEFT adapter folder with the Auto classes: the fully trained modules come back too, on every version.

``AutoModel*.from_pretrained(adapter_folder)`` (transformers' PEFT integration, ``load_adapter``) injects the LoRA
layers and loads their weights. An adapter trained with ``modules_to_save`` (VL-Mamba's connector, Coupled Mamba's
head and input projections) also stores those modules' full weights, under ``base_model.model.<module path>``. Up to
transformers 5.17 the integration does not map these keys onto PEFT's ``ModulesToSaveWrapper`` (its load report calls
them UNEXPECTED and the wrapped copies keep the base model's values), so the model silently computes with the
untrained connector / head; later versions map them. ``AdapterLoadingMixin.load_adapter`` copies them in after the
integration has run, so both behave the same (on versions that already load them, the copy writes equal values).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."


def _read_adapter_weights(peft_model_id, download_kwargs: dict) -> Optional[Dict[str, torch.Tensor]]:
    """The adapter's state dict (local folder or Hub repo, through transformers' cache), or None if not found."""
    from transformers.utils import cached_file

    for name in _ADAPTER_FILES:
        if os.path.isdir(str(peft_model_id)):
            path = os.path.join(str(peft_model_id), name)
            path = path if os.path.isfile(path) else None
        else:
            try:
                path = cached_file(peft_model_id, name, _raise_exceptions_for_missing_entries=False, **download_kwargs)
            except Exception:  # offline and not cached, a gated repo, ...: the integration has reported it already
                path = None
        if path is None:
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    return None


def load_modules_to_save(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], adapter_name: str) -> int:
    """Copy the full-module weights of an adapter state dict into ``model``'s ``ModulesToSaveWrapper`` copies for
    ``adapter_name``. Returns the number of tensors copied."""
    wrappers = {name: module for name, module in model.named_modules()
                if type(module).__name__ == "ModulesToSaveWrapper"}
    if not wrappers:
        return 0
    copied = 0
    for key, value in state_dict.items():
        path = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        for wrapper_path, wrapper in wrappers.items():
            if not path.startswith(wrapper_path + "."):
                continue
            rest = path[len(wrapper_path) + 1:]
            if rest.startswith(("modules_to_save.", "original_module.")):
                break  # already in the wrapper's own naming: the integration loaded it
            copies = getattr(wrapper, "modules_to_save", {})
            if adapter_name not in copies:
                break
            try:
                target = copies[adapter_name].get_parameter(rest)
            except AttributeError:
                try:
                    target = copies[adapter_name].get_buffer(rest)
                except AttributeError:
                    break
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))
            copied += 1
            break
    return copied


class AdapterLoadingMixin:
    """Mixed into this package's ``PreTrainedModel`` classes, ahead of ``PreTrainedModel``."""

    def load_adapter(self, peft_model_id=None, adapter_name=None, *args, **kwargs):
        result = super().load_adapter(peft_model_id, adapter_name, *args, **kwargs)
        name = adapter_name if adapter_name is not None else "default"
        state_dict = kwargs.get("adapter_state_dict")
        if state_dict is None and peft_model_id is not None:
            download = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if kwargs.get(k)}
            download.update({k: v for k, v in (kwargs.get("adapter_kwargs") or {}).items()
                             if k in ("revision", "token", "cache_dir", "local_files_only", "subfolder")})
            state_dict = _read_adapter_weights(peft_model_id, download)
        if state_dict:
            load_modules_to_save(self, state_dict, name)
        return result
