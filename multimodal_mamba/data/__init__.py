"""Synthetic data generators used by the tests, examples and the demo."""
