"""Denoising Vision Transformers at dataset scale."""

__version__ = "0.1.0"
