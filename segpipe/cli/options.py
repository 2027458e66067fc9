"""The options of the commands themselves, not of what they run (how a command prints its result), and the way
every command reads its options back from the parsed flags (:func:`parsed`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, TypeVar

from segpipe.core.options import given, option, options_of

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Printing:
    """How a command prints its result on stdout: as text (a summary, Markdown tables), or as JSON."""

    json: bool = option(False, help="print the result as JSON on stdout instead of text")


def parsed(args: argparse.Namespace, cls: type[T]) -> T:
    """An instance of the options class ``cls`` from the flags :func:`~segpipe.core.options.add_arguments` added for
    it: those given on the command line, the class's defaults for the others (checked by the class).

    Raises:
        ConfigError: a value the class refuses (the message names the flag).
    """
    values: dict[str, Any] = given(args, options_of(cls))
    return cls(**values)
