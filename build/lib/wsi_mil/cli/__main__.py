"""``python -m wsi_mil.cli``: the ``wsi-mil`` program."""

from wsi_mil.cli import entry

entry()
