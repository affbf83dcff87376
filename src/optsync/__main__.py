"""``python -m optsync``: the same as the ``optsync`` command."""

from optsync.cli import main

main()
