"""MkDocs hooks: the command-line reference, generated from the commands' parsers (whose flags come from the option
declarations), replaces ``<!-- cli-reference -->`` in docs/cli.md, so the reference cannot drift from the code; and
the API reference reads the package in its installed layout.

The folders pipeline/, models/ and flows/ are mapped into the segpipe package by pyproject.toml, which the API
reference's source reader (griffe) cannot follow; as for mypy (.ci/mypy), a tree of symlinks in build/docs gives it
the package's layout, and mkdocs.yml points the reader there."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

MARKER = "<!-- cli-reference -->"
MAPPED = ("pipeline", "models", "flows")


def package_layout(root: Path) -> Path:
    """Build ``root/build/docs/segpipe`` as symlinks to the checkout's folders, in the installed package's layout."""
    tree = root / "build" / "docs"
    shutil.rmtree(tree, ignore_errors=True)
    package = tree / "segpipe"
    package.mkdir(parents=True)
    for entry in (root / "segpipe").iterdir():
        (package / entry.name).symlink_to(entry.resolve())
    for folder in MAPPED:
        (package / folder).symlink_to((root / folder).resolve())
    return tree


def on_startup(command: str, dirty: bool) -> None:
    # Before any plugin reads its configuration: the reader drops search paths that do not exist yet.
    package_layout(Path(__file__).resolve().parent.parent)


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
