"""MkDocs hook: the command-line reference, generated from the commands' parsers (whose flags come from the option
declarations), replaces ``<!-- cli-reference -->`` in docs/cli.md, so the reference cannot drift from the code."""

from __future__ import annotations

import argparse
from typing import Any

MARKER = "<!-- cli-reference -->"


def cli_reference() -> str:
    """Every ``segpipe`` command's ``--help``, one section each (nested commands too), as Markdown."""
    from segpipe.cli import build_parser

    parts: list[str] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        parser.prog = name
        parts.append(f"### `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}")

    walk(build_parser(), "segpipe")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
