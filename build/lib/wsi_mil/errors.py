"""The project's exceptions. Every message says what went wrong *and how to fix it*."""

from __future__ import annotations


class WsiMilError(Exception):
    """Base class for all errors raised on purpose by wsi-mil.

    ``exit_code`` is the command's exit status when the error ends it: 2 for bad options
    or input, 1 where the input was fine but some of the data could not be used."""

    exit_code = 2


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


class NonFiniteFeaturesError(StoreError):
    """A feature store (or an encoder's output) holds NaN or infinite values."""


class MissingDataError(WsiMilError):
    """Labelled slides have no usable feature store; nothing is dropped silently."""

    exit_code = 1


class OutputError(WsiMilError):
    """The output folder cannot be written (read-only, or the disk is full)."""


class DiskFullError(OutputError):
    """The disk holding the outputs is (about to be) full; finished outputs are kept."""

    exit_code = 1
