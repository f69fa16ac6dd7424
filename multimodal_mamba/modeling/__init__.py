"""Configurations, models and the shared Mamba layers and op dispatch.

The files here import each other only with single-dot relative imports, and nothing else of this package
except inside ``try:``, so that ``save_pretrained`` can copy them next to a checkpoint as remote code.
"""
