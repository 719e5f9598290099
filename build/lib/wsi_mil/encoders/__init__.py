"""Frozen patch encoders: one small contract, a registry, and the extraction pipeline."""

from wsi_mil.encoders.base import Encoder, Preprocess
from wsi_mil.encoders.registry import available, build_encoder

__all__ = ["Encoder", "Preprocess", "available", "build_encoder"]
