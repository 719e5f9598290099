"""MIL aggregators: a registry of models with one contract (see ``models.py``)."""

from wsi_mil.mil.models import MILOutput, available, build_model

__all__ = ["MILOutput", "available", "build_model"]
