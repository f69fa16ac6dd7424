"""Processors (image + text, multimodal feature sequences) and chat templates.

Like ``modeling/``, these files import each other only with single-dot relative imports so that
``save_pretrained`` can copy them next to a checkpoint as remote code.
"""
