"""``python -m wsi_mil``: the ``wsi-mil`` program (the form job scripts and notebooks use)."""

from wsi_mil.cli import entry

entry()
