"""``python -m segpipe.cli``: the ``segpipe`` command."""

from segpipe.cli import command

command()
