"""The project's exceptions. Every message says what went wrong *and how to fix it*."""

from __future__ import annotations


class WsiMilError(Exception):
    """Base class for all errors raised on purpose by wsi-mil."""


class ConfigError(WsiMilError):
    """An invalid option, recipe key or value."""


class ManifestError(WsiMilError):
    """A malformed slide manifest (missing columns, duplicate ids, missing files, ...)."""


class SlideError(WsiMilError):
    """A per-slide problem; the batch continues past it and reports it at the end."""


class SlideOpenError(SlideError):
    """The file is missing, is not a slide, or is truncated/corrupt."""


class MissingMppError(SlideError):
    """The slide has no microns-per-pixel in its metadata and none was given."""


class ResolutionError(SlideError):
    """The requested magnification cannot be produced from this slide."""


class NoTissueError(SlideError):
    """No tissue was found on the slide (reported as a warning-level outcome)."""


class StoreError(WsiMilError):
    """A coordinate/feature store is incompatible with the request or damaged."""
