"""wsi-mil: weakly supervised whole-slide MIL."""

__version__ = "0.1.0"
